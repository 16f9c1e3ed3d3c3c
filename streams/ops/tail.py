"""``paystream tail TOPIC``: a topic's records, decoded, as JSON lines (kcat for paystream's topics).

Each record becomes one JSON object: ``topic``, ``partition``, ``offset``,
``timestamp`` (epoch ms), ``key`` (UTF-8 text, else ``0x`` + hex),
``headers`` (name -> text), then the value as :class:`streams.ops.records.Decoded`
gives it: ``format`` (``avro`` decoded by its writer schema through the
registry, ``json``, ``hex``, ``null``), ``value``, and for Avro ``schema_id``
and ``schema``.

Where it starts and stops:

- from the end (default): with ``count`` N, first the last N records (with
  ``key``, the last N of that key, which reads the whole topic once), oldest
  first; then, when following, every new record;
- ``from_beginning``: every record from the first offset, and with ``count``
  N only the first N (then it stops, following or not);
- ``follow=False`` stops at the end the topic had when the tail started.

Nothing is committed and no consumer group is joined.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import KafkaError, Message, TopicPartition

from streams import catalog
from streams.ops.records import (
    OpsError,
    ValueDecoder,
    headers_text,
    json_default,
    open_consumer,
    partitions_of,
    read_ranges,
    text,
    timestamp_ms,
    watermarks,
)
from streams.settings import Settings


def kafka_topic(settings: Settings, name: str) -> str:
    """The Kafka topic of ``name``: a catalog or internal topic gets the deployment's prefix."""
    if name in catalog.CATALOG or name in catalog.INTERNAL_TOPICS:
        return settings.topic(name)
    return name


def as_json(message: Message, decoder: ValueDecoder) -> dict[str, Any]:
    """One record as the JSON object ``tail`` prints."""
    return {
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp": timestamp_ms(message),
        "key": text(message.key()),
        "headers": headers_text(list(message.headers() or [])),
        **decoder.decode(message.value(), message.topic()).asdict(),
    }


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=json_default, separators=(",", ":"))


def tail(settings: Settings, topic: str, *, from_beginning: bool = False, key: str | None = None,
         count: int | None = None, follow: bool = True, decoder: ValueDecoder | None = None,
         stop: Callable[[], bool] | None = None, poll_seconds: float = 0.5) -> Iterator[dict[str, Any]]:
    """The records of ``topic`` (catalog name or Kafka name) as dicts, see the module docstring.

    Blocking; a follow runs until ``stop()`` answers True (checked every
    ``poll_seconds``) or the caller stops iterating.  :class:`OpsError` for
    a topic that does not exist.
    """
    if count is not None and count < 0:
        raise OpsError(f"-n {count}: a count is >= 0")
    name = kafka_topic(settings, topic)
    decoder = decoder or ValueDecoder(settings.schema_registry_url)
    wanted = None if key is None else key.encode()
    consumer = open_consumer(settings.kafka_bootstrap_servers)
    try:
        partitions = partitions_of(consumer, name)
        ends = {p: watermarks(consumer, name, p) for p in partitions}

        def keep(message: Message) -> bool:
            return wanted is None or message.key() == wanted

        emitted = 0
        if from_beginning:
            for message in read_ranges(consumer, name, ends):
                if not keep(message):
                    continue
                if count is not None and emitted >= count:
                    return
                emitted += 1
                yield as_json(message, decoder)
            if count is not None and emitted >= count:
                return
        elif count:
            ranges = ends if wanted is not None else {
                p: (max(low, high - count), high) for p, (low, high) in ends.items()}
            last: collections.deque[Message] = collections.deque(maxlen=count)
            for message in read_ranges(consumer, name, ranges):
                if keep(message):
                    last.append(message)
            newest = sorted(last, key=lambda m: (timestamp_ms(m) or 0, m.partition(), m.offset()))
            for message in newest[-count:]:
                yield as_json(message, decoder)
        if not follow:
            return
        consumer.assign([TopicPartition(name, p, high) for p, (_, high) in ends.items()])
        while stop is None or not stop():
            for message in consumer.consume(500, timeout=poll_seconds):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise OpsError(f"reading {name}[{message.partition()}] failed: {error}")
                if not keep(message):
                    continue
                if from_beginning and count is not None and emitted >= count:
                    return
                emitted += 1
                yield as_json(message, decoder)
            if from_beginning and count is not None and emitted >= count:
                return
    finally:
        consumer.close()


def stop_after(seconds: float) -> Callable[[], bool]:
    """A ``stop`` for :func:`tail` that ends a follow after ``seconds``."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline
