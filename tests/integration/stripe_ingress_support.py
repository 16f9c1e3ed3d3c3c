"""What the ingress tests share: Stripe-style signing, an in-process ingress on a real port, a topic reader.

Signatures are made the way Stripe makes them (``stripe.WebhookSignature``'s
scheme: ``t=<unix>,v1=<hex HMAC-SHA256 of "{t}.{body}">``), so the ingress'
verification is tested against the library's own signing, not against a
reimplementation of it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import stripe
from aiohttp import web
from confluent_kafka import Consumer, KafkaException, TopicPartition

from connectors.stripe_ingress import create_app
from streams import catalog
from streams.admin import ensure_topics
from streams.settings import Settings


def v1(body: bytes, secret: str, timestamp: int) -> str:
    """The hex ``v1`` signature Stripe puts on ``body`` signed with ``secret`` at ``timestamp``."""
    header = stripe.WebhookSignature.generate_signature_header(body.decode("utf-8"), secret, timestamp)
    return header.partition(",v1=")[2]


def signature(body: bytes, *secrets: str, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header with one ``v1`` per secret (Stripe sends several while rolling)."""
    t = int(time.time()) if timestamp is None else timestamp
    return ",".join([f"t={t}", *(f"v1={v1(body, s, t)}" for s in secrets)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_stripe_events_topic(settings: Settings) -> str:
    """The deployment's ``stripe.events`` topic, created as the catalog declares it."""
    spec = catalog.INTERNAL_TOPICS[catalog.STRIPE_EVENTS]
    ensure_topics(settings.kafka_bootstrap_servers, [spec.settings(name_prefix=settings.topic_prefix)])
    return settings.topic(catalog.STRIPE_EVENTS)


class InProcessIngress:
    """The ingress application (``create_app``) served by aiohttp on a free localhost port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner = web.AppRunner(self.app, access_log=None)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> InProcessIngress:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        await self._runner.cleanup()

    async def post(self, body: bytes | object, sig: str | None, **headers: str) -> Answer:
        if sig is not None:
            headers["Stripe-Signature"] = sig
        return await request(self.session, "POST", f"{self.url}/webhooks/stripe", data=body, headers=headers)

    async def get(self, path: str) -> Answer:
        return await request(self.session, "GET", f"{self.url}{path}")

    async def metrics(self) -> dict[str, float]:
        return parse_metrics((await self.get("/metrics")).text)


@dataclass
class Answer:
    status: int
    text: str
    headers: dict[str, str]
    elapsed: float

    def json(self) -> object:
        import json

        return json.loads(self.text)


async def request(session: aiohttp.ClientSession | None, method: str, url: str, **kwargs: object) -> Answer:
    assert session is not None
    began = time.perf_counter()
    async with session.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
        text = await response.text()
        return Answer(response.status, text, dict(response.headers), time.perf_counter() - began)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@dataclass(frozen=True)
class Record:
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    partition: int


def read_all(bootstrap: str, topic: str, *, timeout: float = 30.0) -> list[Record]:
    """Every record on ``topic`` right now (up to each partition's high watermark), in partition order."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{topic}",
                         "enable.auto.commit": False, "enable.partition.eof": False})
    try:
        deadline = time.monotonic() + timeout
        partitions = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
        ends = {p: _watermarks(consumer, TopicPartition(topic, p), deadline) for p in partitions}
        wanted = sum(high - low for low, high in ends.values())
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _high) in ends.items()])
        records: list[Record] = []
        while len(records) < wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"read {len(records)} of {wanted} records of {topic}")
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                raise AssertionError(f"consumer error: {message.error()}")
            records.append(Record(message.key(), message.value(), tuple(message.headers() or ()),
                                  message.partition()))
        return sorted(records, key=lambda r: r.partition)
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, partition: TopicPartition, deadline: float) -> tuple[int, int]:
    """A partition's (low, high) offsets, retried while a new topic has no leader yet."""
    while True:
        try:
            return consumer.get_watermark_offsets(partition, timeout=max(deadline - time.monotonic(), 1.0))
        except KafkaException:  # e.g. NOT_LEADER_FOR_PARTITION (librdkafka: not "retriable")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def read_all_async(bootstrap: str, topic: str) -> list[Record]:
    return await asyncio.get_running_loop().run_in_executor(None, read_all, bootstrap, topic)


def headers_of(record: Record) -> dict[str, bytes]:
    return dict(record.headers)


def secrets_setting(secrets: Sequence[str]) -> str:
    return ",".join(secrets)
