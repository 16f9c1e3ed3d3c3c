"""Dead letters: list them, show one decoded, replay them to their source topic.

A dead letter (written by the kernel, :func:`streams.dispatch.dead_letter_headers`)
is the original record (key, value bytes, headers) on
``<prefix>paystream.dead-letters`` with ``dlq.reason``, ``dlq.error`` and
``dlq.source.topic|partition|offset|timestamp`` headers.

Replay sends a dead letter back to its source topic as the original record:
same key, same value bytes, same partition (while the topic still has it),
its own headers without the ``dlq.*`` ones, plus
:data:`streams.dispatch.REPLAY_COUNT_HEADER` one higher than the dead
letter's.  The kernel keeps that header when the record fails again, so the
new dead letter carries the raised count, and a dead letter whose count
reached ``PAYSTREAM_DLQ_REPLAY_LIMIT`` is refused: a record that keeps
failing goes round at most that many times.  Replaying is safe because every
handler is idempotent (README, "Dead letters").

Every check is made before the first record is produced: a replay that is
refused (unknown offset, a topic that is not a dead-letter topic, a source
topic that no longer exists, a record at its replay limit picked by position)
produces nothing.

The functions take plain arguments and return dataclasses; reading is
blocking (call :func:`list_dead_letters` and :func:`show_dead_letter` in an
executor from an event loop); :func:`replay` is a coroutine.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message

from streams import catalog
from streams.dispatch import REPLAY_COUNT_HEADER
from streams.ops.records import (
    Decoded,
    OpsError,
    ValueDecoder,
    headers_text,
    offsets_at,
    open_consumer,
    partitions_of,
    read_one,
    read_ranges,
    text,
    timestamp_ms,
    watermarks,
)
from streams.producer import EventProducer
from streams.settings import Settings

Header = tuple[str, bytes | None]

#: Records handed to the producer before their acks are awaited; well under
#: librdkafka's queue (100,000 messages), so produce never has to wait for
#: room and records leave in the order they were read.
REPLAY_WINDOW = 5_000


class ReplayRefused(OpsError):
    """A replay that was refused as a whole; nothing was produced."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "; ".join(self.problems[:10])
        more = f" (and {len(self.problems) - 10} more)" if len(self.problems) > 10 else ""
        super().__init__(f"replay refused, nothing was produced: {shown}{more}")


@dataclass(frozen=True)
class DeadLetter:
    """One record of a dead-letter topic, as read."""

    topic: str
    partition: int
    offset: int
    #: When it was dead-lettered (the Kafka record timestamp), epoch ms.
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` as text, or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return None if value is None else value.decode("utf-8", "replace")
        return None

    def _int_header(self, name: str) -> int | None:
        raw = self.header(name)
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None

    @property
    def reason(self) -> str | None:
        return self.header("dlq.reason")

    @property
    def error(self) -> str | None:
        return self.header("dlq.error")

    @property
    def source_topic(self) -> str | None:
        return self.header("dlq.source.topic")

    @property
    def source_partition(self) -> int | None:
        return self._int_header("dlq.source.partition")

    @property
    def source_offset(self) -> int | None:
        return self._int_header("dlq.source.offset")

    @property
    def source_timestamp_ms(self) -> int | None:
        return self._int_header("dlq.source.timestamp")

    @property
    def replay_count(self) -> int:
        """How many times the record had been replayed when it was dead-lettered (0: never)."""
        return self._int_header(REPLAY_COUNT_HEADER) or 0

    def own_headers(self) -> list[Header]:
        """The original record's headers: every header that is not ``dlq.*``."""
        return [(k, v) for k, v in self.headers if not k.startswith("dlq.")]

    def dlq_headers(self) -> list[Header]:
        return [(k, v) for k, v in self.headers if k.startswith("dlq.")]

    def summary(self) -> dict[str, Any]:
        """What ``dlq list`` shows of it, as plain JSON-able values."""
        return {
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp_ms,
            "key": text(self.key),
            "reason": self.reason,
            "source_topic": self.source_topic,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
            "replay_count": self.replay_count,
            "error": self.error,
        }


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters to pick; every field that is set must match."""

    #: The source topic, by its catalog name or its full (prefixed) Kafka name.
    source_topic: str | None = None
    reason: str | None = None
    #: Dead-lettered at or after / at or before, epoch ms.
    since_ms: int | None = None
    until_ms: int | None = None

    def matches(self, letter: DeadLetter, topic_prefix: str = "") -> bool:
        if self.source_topic is not None and letter.source_topic not in (
                self.source_topic, f"{topic_prefix}{self.source_topic}"):
            return False
        if self.reason is not None and letter.reason != self.reason:
            return False
        stamp = letter.timestamp_ms
        if self.since_ms is not None and (stamp is None or stamp < self.since_ms):
            return False
        return not (self.until_ms is not None and (stamp is None or stamp > self.until_ms))


def is_dead_letter_topic(name: str) -> bool:
    """True for a deployment's dead-letter topic: the catalog's name under any prefix."""
    return name.endswith(catalog.DEAD_LETTERS)


def dead_letter_topic(settings: Settings, topic: str | None = None) -> str:
    """The dead-letter topic to work on: ``topic`` if given, else this deployment's.

    :class:`OpsError` for a name that is not a dead-letter topic: replaying
    records of any other topic would send them to wherever their headers say.
    """
    name = topic or settings.topic(catalog.DEAD_LETTERS)
    if not is_dead_letter_topic(name):
        raise OpsError(f"{name!r} is not a dead-letter topic (a dead-letter topic is named "
                       f"'<prefix>{catalog.DEAD_LETTERS}'; this deployment's is "
                       f"{settings.topic(catalog.DEAD_LETTERS)!r})")
    return name


def _letter(message: Message) -> DeadLetter:
    return DeadLetter(message.topic(), message.partition(), message.offset(), timestamp_ms(message),
                      message.key(), message.value(), tuple(message.headers() or ()))


def list_dead_letters(settings: Settings, where: DeadLetterFilter | None = None, *,
                      topic: str | None = None, limit: int | None = None) -> list[DeadLetter]:
    """The dead letters matching ``where``, oldest first (the newest ``limit`` if given).

    Reads the dead-letter topic from its start (or from the first offset at
    ``where.since_ms``) to its current end; blocking.
    """
    where = where or DeadLetterFilter()
    name = dead_letter_topic(settings, topic)
    consumer = open_consumer(settings.kafka_bootstrap_servers)
    try:
        partitions = partitions_of(consumer, name)
        ranges = {p: watermarks(consumer, name, p) for p in partitions}
        if where.since_ms is not None:
            # Kafka answers the earliest offset whose timestamp is >= since:
            # every record before it is older, so reading starts there.
            for partition, offset in offsets_at(consumer, name, partitions, where.since_ms).items():
                low, high = ranges[partition]
                ranges[partition] = (max(low, offset) if offset >= 0 else high, high)
        found = [letter for letter in map(_letter, read_ranges(consumer, name, ranges))
                 if where.matches(letter, settings.topic_prefix)]
    finally:
        consumer.close()
    found.sort(key=lambda d: (d.timestamp_ms or 0, d.partition, d.offset))
    return found[-limit:] if limit else found


def get_dead_letter(settings: Settings, partition: int, offset: int, *,
                    topic: str | None = None) -> DeadLetter:
    """The dead letter at ``partition``/``offset``; :class:`OpsError` if there is none."""
    name = dead_letter_topic(settings, topic)
    consumer = open_consumer(settings.kafka_bootstrap_servers)
    try:
        partitions_of(consumer, name)
        return _letter(read_one(consumer, name, partition, offset))
    finally:
        consumer.close()


@dataclass(frozen=True)
class ShownDeadLetter:
    """One dead letter with its value decoded (``dlq show``)."""

    letter: DeadLetter
    value: Decoded

    def asdict(self) -> dict[str, Any]:
        letter = self.letter
        return {
            "topic": letter.topic,
            "partition": letter.partition,
            "offset": letter.offset,
            "timestamp": letter.timestamp_ms,
            "key": text(letter.key),
            "dlq": headers_text(letter.dlq_headers()),
            "headers": headers_text(letter.own_headers()),
            **self.value.asdict(),
        }


def show_dead_letter(settings: Settings, partition: int, offset: int, *, topic: str | None = None,
                     decoder: ValueDecoder | None = None) -> ShownDeadLetter:
    """The dead letter at ``partition``/``offset``, its value decoded (Avro, JSON or hex)."""
    letter = get_dead_letter(settings, partition, offset, topic=topic)
    decoder = decoder or ValueDecoder(settings.schema_registry_url)
    return ShownDeadLetter(letter, decoder.decode(letter.value, letter.source_topic or letter.topic))


# ----------------------------------------------------------------------
# Replay


@dataclass(frozen=True)
class Replayed:
    """One dead letter sent back, and where Kafka put it."""

    partition: int
    offset: int
    source_topic: str
    replay_count: int
    to_partition: int
    to_offset: int


@dataclass
class ReplayResult:
    replayed: list[Replayed] = field(default_factory=list)
    #: A dry run's dead letters that would be sent.
    planned: list[DeadLetter] = field(default_factory=list)
    #: Dead letters a filter picked that were left out, with why (replay limit).
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)
    seconds: float = 0.0


def replay_record(letter: DeadLetter) -> tuple[bytes | None, bytes | None, list[Header]]:
    """(key, value, headers) of the record a replay of ``letter`` produces."""
    headers = letter.own_headers()
    headers.append((REPLAY_COUNT_HEADER, str(letter.replay_count + 1).encode()))
    return letter.key, letter.value, headers


def check_replay(letters: Iterable[DeadLetter], topics: dict[str, int], limit: int, *,
                 strict: bool) -> tuple[list[DeadLetter], list[tuple[DeadLetter, str]], list[str]]:
    """Split ``letters`` into (to replay, skipped with why, problems that refuse the replay).

    ``topics`` maps each existing topic to its partition count.  A letter at
    its replay limit is a problem when ``strict`` (it was picked by
    position), else it is skipped (a filter picked it).
    """
    chosen: list[DeadLetter] = []
    skipped: list[tuple[DeadLetter, str]] = []
    problems: list[str] = []
    for letter in letters:
        where = f"{letter.topic}[{letter.partition}]@{letter.offset}"
        source = letter.source_topic
        if not source or letter.source_partition is None:
            problems.append(f"{where} is not a dead letter (no dlq.source.topic/partition headers)")
            continue
        if source not in topics:
            problems.append(f"{where}: its source topic {source!r} no longer exists")
            continue
        if is_dead_letter_topic(source):
            problems.append(f"{where}: its source {source!r} is a dead-letter topic")
            continue
        if letter.replay_count >= limit:
            why = (f"{where} was replayed {letter.replay_count} times already "
                   f"(PAYSTREAM_DLQ_REPLAY_LIMIT={limit})")
            if strict:
                problems.append(why)
            else:
                skipped.append((letter, why))
            continue
        chosen.append(letter)
    return chosen, skipped, problems


def _existing_topics(settings: Settings, names: set[str]) -> dict[str, int]:
    consumer = open_consumer(settings.kafka_bootstrap_servers)
    try:
        found: dict[str, int] = {}
        for name in sorted(names):
            try:
                found[name] = len(partitions_of(consumer, name))
            except OpsError as exc:
                if "does not exist" not in str(exc):
                    raise
        return found
    finally:
        consumer.close()


def _pick(settings: Settings, positions: Sequence[tuple[int, int]] | None,
          where: DeadLetterFilter | None, topic: str | None) -> list[DeadLetter]:
    if positions is not None:
        name = dead_letter_topic(settings, topic)
        problems: list[str] = []
        letters: list[DeadLetter] = []
        consumer = open_consumer(settings.kafka_bootstrap_servers)
        try:
            partitions_of(consumer, name)
            for partition, offset in dict.fromkeys(positions):
                try:
                    letters.append(_letter(read_one(consumer, name, partition, offset)))
                except OpsError as exc:
                    problems.append(str(exc))
        finally:
            consumer.close()
        if problems:
            raise ReplayRefused(problems)
        return letters
    return list_dead_letters(settings, where, topic=topic)


async def replay(settings: Settings, *, positions: Sequence[tuple[int, int]] | None = None,
                 where: DeadLetterFilter | None = None, topic: str | None = None,
                 limit: int | None = None, producer: EventProducer | None = None,
                 dry_run: bool = False) -> ReplayResult:
    """Send the dead letters at ``positions`` (partition, offset), or those ``where`` picks, back.

    Exactly one of ``positions`` and ``where`` is given.  ``limit`` defaults
    to ``settings.dlq_replay_limit``.  Raises :class:`OpsError` (the topic is
    not a dead-letter topic or does not exist) or :class:`ReplayRefused`
    (unknown offsets, records that are not dead letters, missing source
    topics, records at their limit picked by position) before producing
    anything.  With ``dry_run`` everything is checked and nothing produced.
    """
    if (positions is None) == (where is None):
        raise ValueError("replay takes positions or a filter, exactly one of them")
    limit = settings.dlq_replay_limit if limit is None else limit
    started = time.perf_counter()
    letters = await asyncio.to_thread(_pick, settings, positions, where, topic)
    sources = {letter.source_topic for letter in letters if letter.source_topic}
    topics = await asyncio.to_thread(_existing_topics, settings, sources)
    chosen, skipped, problems = check_replay(letters, topics, limit, strict=positions is not None)
    if problems:
        raise ReplayRefused(problems)
    result = ReplayResult(skipped=skipped)
    if dry_run:
        result.planned = chosen
    if dry_run or not chosen:
        result.seconds = time.perf_counter() - started
        return result
    own = producer is None
    sender = producer or EventProducer(settings.kafka_bootstrap_servers, client_id="paystream-dlq-replay")
    try:
        for start in range(0, len(chosen), REPLAY_WINDOW):
            window = chosen[start:start + REPLAY_WINDOW]
            sends = []
            for letter in window:
                key, value, headers = replay_record(letter)
                source = letter.source_topic or ""
                partition = letter.source_partition
                if partition is None or partition >= topics[source]:
                    partition = None  # the topic shrank (recreated): place it by key
                sends.append(asyncio.ensure_future(
                    sender.send(source, value, key, headers=headers, partition=partition)))
            acks = await asyncio.gather(*sends)
            result.replayed.extend(
                Replayed(letter.partition, letter.offset, letter.source_topic or "",
                         letter.replay_count + 1, ack.partition(), ack.offset())
                for letter, ack in zip(window, acks, strict=True))
    finally:
        if own:
            await sender.close()
    result.seconds = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------
# Input and output for the command line (and anyone else who wants it)

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(raw: str, now_ms: int | None = None) -> int:
    """A point in time as epoch ms: ISO 8601 (UTC unless it says), epoch ms, or ``15m``/``2h``/``7d`` ago."""
    raw = raw.strip()
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    ago = _AGO.match(raw)
    if ago:
        return now_ms - int(float(ago.group(1)) * _UNIT_SECONDS[ago.group(2)] * 1000)
    if raw.isdigit():
        return int(raw)
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise OpsError(f"{raw!r} is not a time: give ISO 8601 (2026-11-27T10:00), epoch "
                       "milliseconds, or an age such as 30m, 2h, 7d") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_position(raw: str) -> tuple[int, int]:
    """``PARTITION:OFFSET`` (also ``PARTITION/OFFSET`` or ``PARTITION@OFFSET``)."""
    match = re.fullmatch(r"\s*(\d+)\s*[:/@]\s*(\d+)\s*", raw)
    if not match:
        raise OpsError(f"{raw!r} is not a position: give PARTITION:OFFSET, e.g. 2:15")
    return int(match.group(1)), int(match.group(2))


def iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def format_table(letters: Sequence[DeadLetter]) -> str:
    """``dlq list`` as aligned text, one dead letter per line."""
    header = ("PART:OFFSET", "DEAD-LETTERED", "KEY", "REASON", "SOURCE", "REPLAYS", "ERROR")
    rows = [header]
    for letter in letters:
        source = (f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}"
                  if letter.source_topic else "-")
        error = (letter.error or "").replace("\n", " ")
        rows.append((f"{letter.partition}:{letter.offset}", iso(letter.timestamp_ms),
                     text(letter.key) or "-", letter.reason or "-", source,
                     str(letter.replay_count), error[:80] + ("..." if len(error) > 80 else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
             + "  " + row[-1] for row in rows]
    lines.append(f"{len(letters)} dead letter(s)")
    return "\n".join(lines) + "\n"


def format_result(result: ReplayResult, *, dry_run: bool = False) -> str:
    """``dlq replay``'s report: one line per record sent (or that would be) and per record skipped."""
    lines = [f"replayed {r.partition}:{r.offset} -> {r.source_topic}[{r.to_partition}]@{r.to_offset} "
             f"(replay {r.replay_count})" for r in result.replayed]
    lines += [f"would replay {d.partition}:{d.offset} -> {d.source_topic}[{d.source_partition}] "
              f"(replay {d.replay_count + 1})" for d in result.planned]
    lines += [f"skipped {letter.partition}:{letter.offset}: {why}" for letter, why in result.skipped]
    verb = "would replay" if dry_run else "replayed"
    count = len(result.planned) if dry_run else len(result.replayed)
    lines.append(f"{verb} {count}, skipped {len(result.skipped)} in {result.seconds:.2f} s")
    return "\n".join(lines) + "\n"
