"""Topic administration: create topics with their declared settings, once.

Automatic topic creation is off on our brokers (a typo must not invent a
topic), so every topic paystream owns is created here from its declaration.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


@dataclass(frozen=True)
class TopicSettings:
    """What a topic is created with."""

    name: str
    partitions: int
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


def admin_client(bootstrap_servers: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap_servers})


def ensure_topics(
    bootstrap_servers: str, topics: Iterable[TopicSettings], *, timeout: float = 30.0
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    An existing topic is left as it is (never altered): changing partitions of
    a keyed topic would move keys between partitions behind the consumers' back.
    """
    wanted = list(topics)
    if not wanted:
        return []
    admin = admin_client(bootstrap_servers)
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(t.name, num_partitions=t.partitions, replication_factor=t.replication_factor,
                 config=dict(t.config))
        for t in wanted
        if t.name not in existing
    ]
    if not new:
        return []
    created: list[str] = []
    for name, future in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            future.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


def wait_until_listed(
    bootstrap_servers: str, names: Iterable[str], *, timeout: float = 30.0, interval: float = 0.2
) -> None:
    """Block until the broker's metadata lists every topic of ``names``, each partition with a leader.

    A CreateTopics answer does not mean the metadata lists the topic yet (on
    a busy KRaft broker it lags).  A consumer group whose first assignment is
    computed in that window leaves the topic out (Faust's assignor: "Ignoring
    missing topic") until a later rebalance.  Asks the broker that answers
    the metadata request (the only one on a single-node cluster); raises a
    retriable ``_TIMED_OUT`` KafkaException naming the topics still missing
    after ``timeout`` seconds.
    """
    wanted = sorted(set(names))
    if not wanted:
        return
    admin = admin_client(bootstrap_servers)
    deadline = time.monotonic() + timeout
    while True:
        listed = admin.list_topics(timeout=timeout).topics
        missing = [name for name in wanted if not _served(listed.get(name))]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise KafkaException(KafkaError(
                KafkaError._TIMED_OUT,
                f"{len(missing)} topics not listed by the broker's metadata after {timeout:.0f} s: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                retriable=True))
        time.sleep(interval)


def _served(metadata: object) -> bool:
    """A topic's metadata lists it without error and every partition has a leader."""
    if metadata is None or getattr(metadata, "error", None) is not None:
        return False
    partitions = metadata.partitions  # type: ignore[attr-defined]
    return bool(partitions) and all(p.leader >= 0 and p.error is None for p in partitions.values())


def delete_topics(bootstrap_servers: str, names: Iterable[str], *, timeout: float = 30.0) -> None:
    """Delete topics (tests clean up after themselves with this)."""
    names = list(names)
    if not names:
        return
    admin = admin_client(bootstrap_servers)  # must outlive the futures (else _DESTROY)
    for future in admin.delete_topics(names, operation_timeout=timeout).values():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
