"""Guarded consumption: decode, hand to a handler, dead-letter what fails.

Agents read their topics as raw bytes and decode here, so that a record that
cannot be decoded (or that its handler rejects) still has its original bytes
for the dead-letter topic.  Nothing is dropped silently and no bad record
crashes the worker: it lands in ``paystream.dead-letters`` with the error and
its source topic/partition/offset in headers, and processing goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import EventT

from streams import catalog
from streams.codec import MalformedRecord, decode

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], EventT], Awaitable[None]]

#: Errors that say "this record is wrong", not "the system is unwell": they go
#: to the dead-letter topic at once.  Anything else is retried first.
REJECTIONS: tuple[type[BaseException], ...] = (ValueError, LookupError, TypeError)


class UnknownEventType(ValueError):
    """A record whose envelope names another event type than its topic carries."""


@dataclass(frozen=True)
class Route:
    topic: str  # the Kafka topic (with the deployment's prefix)
    contract: str | None  # catalog name whose .avsc decodes it; None = JSON
    handler: Handler


class DeadLetters:
    """Writes failed records, untouched, to the dead-letter topic."""

    def __init__(self, topic: faust.TopicT) -> None:
        self.topic = topic

    async def send(self, event: EventT, reason: str, error: BaseException) -> None:
        message = event.message
        headers = [
            ("dlq.reason", reason.encode()),
            ("dlq.error", f"{type(error).__name__}: {error}".encode()[:4000]),
            ("dlq.source.topic", message.topic.encode()),
            ("dlq.source.partition", str(message.partition).encode()),
            ("dlq.source.offset", str(message.offset).encode()),
            ("dlq.source.timestamp", str(int(message.timestamp * 1000)).encode()),
        ]
        headers.extend((k, v) for k, v in (message.headers or []) if not k.startswith("dlq."))
        log.warning(
            "dead-lettered %s[%d]@%d (%s): %s",
            message.topic, message.partition, message.offset, reason, error,
        )
        fut = await self.topic.send(key=message.key, value=message.value, headers=headers)
        await fut


class Dispatcher:
    """One agent's routing table: source topic -> decoder + handler.

    ``retries`` bounds how often an unexpected error (a broker hiccup, a
    registry timeout) is retried before the record is dead-lettered, so a
    poison record cannot stall its partition forever.
    """

    def __init__(
        self, app: Any, dead_letters: DeadLetters, *, retries: int = 3, backoff: float = 0.5
    ) -> None:
        self.app = app
        self.dead_letters = dead_letters
        self.retries = retries
        self.backoff = backoff
        self._routes: dict[str, Route] = {}

    def on(self, name: str, handler: Handler) -> None:
        """Route catalog topic ``name`` (Avro) or an internal topic (JSON) to ``handler``."""
        topic = self.app.settings.topic(name)
        contract = name if name in catalog.CATALOG else None
        if contract is None and name not in catalog.INTERNAL_TOPICS:
            raise LookupError(f"{name!r} is neither an event topic nor an internal topic")
        self._routes[topic] = Route(topic, contract, handler)

    @property
    def topics(self) -> Iterable[str]:
        return self._routes.keys()

    def source(self) -> faust.TopicT:
        """All routed topics as one raw-bytes Faust topic (they are co-partitioned)."""
        return self.app.topic(
            *self._routes, key_type=str, key_serializer="raw", value_serializer="raw",
        )

    def decode(self, route: Route, value: bytes | None) -> dict[str, Any]:
        if route.contract is None:
            try:
                record = json.loads(value or b"")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MalformedRecord(f"{route.topic}: not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise MalformedRecord(f"{route.topic}: JSON value is not an object")
            return record
        reader = self.app.event_topic(route.contract).value_serializer
        record = decode(value, reader.cache, reader.reader, route.topic)
        if record.get("event_type") != route.contract:
            raise UnknownEventType(
                f"{route.topic}: envelope says event_type {record.get('event_type')!r}, "
                f"the topic carries {route.contract!r}"
            )
        return record

    async def dispatch(self, event: EventT) -> None:
        """Decode and handle one record; dead-letter it if that cannot succeed."""
        route = self._routes.get(event.message.topic)
        if route is None:  # subscribed but unrouted: a wiring bug, keep the record
            await self.dead_letters.send(event, "unrouted", LookupError(event.message.topic))
            return
        try:
            record = self.decode(route, event.value)
        except (MalformedRecord, UnknownEventType) as exc:
            await self.dead_letters.send(event, "undecodable", exc)
            return
        for attempt in range(1, self.retries + 1):
            try:
                await route.handler(record, event)
                return
            except asyncio.CancelledError:
                raise
            except REJECTIONS as exc:
                await self.dead_letters.send(event, "rejected", exc)
                return
            except Exception as exc:
                if attempt == self.retries:
                    await self.dead_letters.send(event, "failed", exc)
                    return
                log.warning("retrying %s after %r (attempt %d)", event.message.topic, exc, attempt)
                await asyncio.sleep(self.backoff * attempt)


def dead_letter_topic(app: Any) -> faust.TopicT:
    """The dead-letter topic, bytes in and out."""
    return app.topic(
        app.settings.topic(catalog.DEAD_LETTERS), key_type=bytes, key_serializer="raw",
        value_serializer="raw", acks=True,
    )


def json_topic(app: Any, name: str) -> faust.TopicT:
    """An internal JSON topic, keyed by a string id."""
    return app.topic(
        app.settings.topic(name), key_type=str, key_serializer="raw", value_serializer="json",
        acks=True,
    )

