"""Dead-letter tools without a broker: headers, filters, replay checks, decoding, formatting."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from schemas import contracts
from streams import catalog
from streams.codec import SchemaCache, encode
from streams.dispatch import REPLAY_COUNT_HEADER, dead_letter_headers
from streams.envelope import new_event
from streams.ops import dlq
from streams.ops.dlq import DeadLetter, DeadLetterFilter, check_replay, replay_record
from streams.ops.records import OpsError, ValueDecoder, headers_text, text
from streams.ops.tail import kafka_topic
from streams.settings import Settings

PREFIX = "t-ops."
DLQ = f"{PREFIX}{catalog.DEAD_LETTERS}"
SOURCE = f"{PREFIX}payment.completed"


def letter(offset: int = 7, *, partition: int = 1, reason: str = "undecodable", source: str | None = SOURCE,
           count: int | None = None, stamp: int = 1_000, extra: tuple = ()) -> DeadLetter:
    headers: list[tuple[str, bytes | None]] = [("dlq.reason", reason.encode()),
                                               ("dlq.error", b"MalformedRecord: bad")]
    if source is not None:
        headers += [("dlq.source.topic", source.encode()), ("dlq.source.partition", b"2"),
                    ("dlq.source.offset", b"40"), ("dlq.source.timestamp", b"900")]
    if count is not None:
        headers.append((REPLAY_COUNT_HEADER, str(count).encode()))
    headers += [("trace-id", b"t-1"), *extra]
    return DeadLetter(DLQ, partition, offset, stamp, b"order-1", b"\xde\xad", tuple(headers))


def settings(**overrides: object) -> Settings:
    return Settings.from_env({}, topic_prefix=PREFIX, **overrides)


def test_a_dead_letter_reads_its_headers() -> None:
    d = letter(count=2)
    assert (d.reason, d.source_topic, d.source_partition, d.source_offset) == (
        "undecodable", SOURCE, 2, 40)
    assert d.source_timestamp_ms == 900
    assert d.replay_count == 2
    assert letter().replay_count == 0
    assert d.own_headers() == [("trace-id", b"t-1")]
    assert [k for k, _ in d.dlq_headers()][:2] == ["dlq.reason", "dlq.error"]
    summary = d.summary()
    assert summary["key"] == "order-1" and summary["replay_count"] == 2
    assert summary["source_topic"] == SOURCE and summary["partition"] == 1 and summary["offset"] == 7


def test_a_replayed_record_is_the_original_plus_a_raised_count() -> None:
    key, value, headers = replay_record(letter(count=1, extra=(("dlq.other", b"x"),)))
    assert (key, value) == (b"order-1", b"\xde\xad")
    assert headers == [("trace-id", b"t-1"), (REPLAY_COUNT_HEADER, b"2")]
    assert replay_record(letter())[2][-1] == (REPLAY_COUNT_HEADER, b"1")


def test_the_kernel_dead_letter_headers_keep_the_replay_count_and_drop_other_dlq_headers() -> None:
    message = SimpleNamespace(
        topic=SOURCE, partition=3, offset=12, timestamp=1_700_000_000.5,
        headers=[("trace-id", b"t-1"), (REPLAY_COUNT_HEADER, b"2"), ("dlq.reason", b"stale")])
    headers = dead_letter_headers(SimpleNamespace(message=message), "rejected", ValueError("no"))
    names = [name for name, _ in headers]
    assert names.count("dlq.reason") == 1 and dict(headers)["dlq.reason"] == b"rejected"
    assert dict(headers)[REPLAY_COUNT_HEADER] == b"2"
    assert dict(headers)["dlq.source.offset"] == b"12"
    assert ("trace-id", b"t-1") in headers
    again = DeadLetter(DLQ, 0, 0, 1, b"k", b"v", tuple(headers))
    assert again.replay_count == 2


def test_filters() -> None:
    d = letter(stamp=5_000)
    assert DeadLetterFilter().matches(d)
    assert DeadLetterFilter(source_topic="payment.completed").matches(d, PREFIX)
    assert DeadLetterFilter(source_topic=SOURCE).matches(d, PREFIX)
    assert not DeadLetterFilter(source_topic="payment.completed").matches(d, "other.")
    assert not DeadLetterFilter(source_topic="order.created").matches(d, PREFIX)
    assert DeadLetterFilter(reason="undecodable").matches(d)
    assert not DeadLetterFilter(reason="rejected").matches(d)
    assert DeadLetterFilter(since_ms=5_000, until_ms=5_000).matches(d)
    assert not DeadLetterFilter(since_ms=5_001).matches(d)
    assert not DeadLetterFilter(until_ms=4_999).matches(d)


def test_only_a_dead_letter_topic_is_accepted() -> None:
    s = settings()
    assert dlq.dead_letter_topic(s) == DLQ
    assert dlq.dead_letter_topic(s, "other.paystream.dead-letters") == "other.paystream.dead-letters"
    with pytest.raises(OpsError, match="is not a dead-letter topic"):
        dlq.dead_letter_topic(s, SOURCE)


def test_replay_checks_refuse_missing_sources_non_dead_letters_and_counts_at_the_limit() -> None:
    topics = {SOURCE: 4}
    ok, at_limit, gone, plain = (letter(1), letter(2, count=3), letter(3, source=f"{PREFIX}gone"),
                                 letter(4, source=None))
    chosen, skipped, problems = check_replay([ok, at_limit, gone, plain], topics, 3, strict=True)
    assert chosen == [ok] and skipped == []
    assert any("replayed 3 times already" in p for p in problems)
    assert any(f"source topic '{PREFIX}gone' no longer exists" in p for p in problems)
    assert any("is not a dead letter" in p for p in problems)
    # Picked by a filter, a record at its limit is left out, not an error.
    chosen, skipped, problems = check_replay([ok, at_limit], topics, 3, strict=False)
    assert chosen == [ok] and problems == []
    assert [d for d, _ in skipped] == [at_limit]
    assert check_replay([letter(5, count=2)], topics, 3, strict=True)[0]  # below the limit
    refused = dlq.ReplayRefused(problems=["a", "b"])
    assert "nothing was produced" in str(refused) and refused.problems == ["a", "b"]


def test_a_dead_letter_never_replays_into_a_dead_letter_topic() -> None:
    loop = letter(source=DLQ)
    _, _, problems = check_replay([loop], {DLQ: 4}, 3, strict=False)
    assert problems and "is a dead-letter topic" in problems[0]


def test_the_replay_limit_is_a_setting() -> None:
    assert Settings.from_env({}).dlq_replay_limit == 3
    assert Settings.from_env({"PAYSTREAM_DLQ_REPLAY_LIMIT": "5"}).dlq_replay_limit == 5
    with pytest.raises(ValueError, match="PAYSTREAM_DLQ_REPLAY_LIMIT"):
        Settings.from_env({"PAYSTREAM_DLQ_REPLAY_LIMIT": "0"})


def test_times_and_positions() -> None:
    now = 10_000_000
    assert dlq.parse_time("30m", now) == now - 30 * 60_000
    assert dlq.parse_time("2h", now) == now - 7_200_000
    assert dlq.parse_time("1d", now) == now - 86_400_000
    assert dlq.parse_time("1700000000000") == 1_700_000_000_000
    assert dlq.parse_time("2026-11-27T10:00:00Z") == dlq.parse_time("2026-11-27T10:00:00")
    assert dlq.parse_time("2026-11-27T11:00:00+01:00") == dlq.parse_time("2026-11-27T10:00")
    with pytest.raises(OpsError, match="is not a time"):
        dlq.parse_time("yesterday")
    assert dlq.parse_position("2:15") == (2, 15)
    assert dlq.parse_position("0@3") == (0, 3)
    with pytest.raises(OpsError, match="PARTITION:OFFSET"):
        dlq.parse_position("2-15")


def test_the_list_table_and_the_replay_report() -> None:
    table = dlq.format_table([letter(7, count=1)])
    header, row, total = table.splitlines()
    assert header.split()[:4] == ["PART:OFFSET", "DEAD-LETTERED", "KEY", "REASON"]
    assert row.startswith("1:7 ") and "order-1" in row and "undecodable" in row
    assert f"{SOURCE}[2]@40" in row and "MalformedRecord: bad" in row
    assert row.split()[5] == "1"
    assert total == "1 dead letter(s)"
    result = dlq.ReplayResult(replayed=[dlq.Replayed(1, 7, SOURCE, 2, 2, 99)],
                              skipped=[(letter(8, count=3), "at the limit")], seconds=0.5)
    report = dlq.format_result(result)
    assert f"replayed 1:7 -> {SOURCE}[2]@99 (replay 2)" in report
    assert "skipped 1:8: at the limit" in report
    assert report.splitlines()[-1] == "replayed 1, skipped 1 in 0.50 s"
    dry = dlq.format_result(dlq.ReplayResult(planned=[letter(9)]), dry_run=True)
    assert f"would replay 1:9 -> {SOURCE}[2] (replay 1)" in dry
    assert dry.splitlines()[-1].startswith("would replay 1, skipped 0")


def _cache() -> SchemaCache:
    # An address nothing listens on: any registry call fails, so what decodes
    # here decodes from the preloaded schema alone.
    cache = SchemaCache("http://127.0.0.1:9", auto_register=False)
    cache.preload("payment.completed", "payment.completed", 42)
    return cache


def test_values_decode_as_avro_json_or_hex() -> None:
    decoder = ValueDecoder(_cache())
    event = new_event("payment.completed", {"payment_intent_id": "pi_1", "order_id": "o-1",
                                            "user_id": "u-1", "amount": 500, "currency": "EUR"},
                      producer="test")
    data = encode(contracts.parsed_schema("payment.completed"), 42, event)
    avro = decoder.decode(data, SOURCE)
    assert avro.format == "avro" and avro.schema_id == 42
    assert avro.schema_name == "io.paystream.events.PaymentCompletedEvent"
    assert avro.value["order_id"] == "o-1" and avro.value["occurred_at"] == event["occurred_at"]
    shown = avro.asdict()
    assert shown["schema"] == avro.schema_name and shown["value"]["amount"] == 500
    # An Avro frame whose body does not decode falls back, saying why.
    broken = decoder.decode(data[:5] + b"\xff\xff\xff", SOURCE)
    assert broken.format == "hex" and broken.value == (data[:5] + b"\xff\xff\xff").hex()
    assert "does not decode" in (broken.note or "")
    assert decoder.decode(b'{"command":"cancel"}').asdict() == {"format": "json",
                                                                 "value": {"command": "cancel"}}
    assert decoder.decode(b"\xde\xad\xbe\xef").asdict() == {"format": "hex", "value": "deadbeef"}
    assert decoder.decode(None).format == "null"


def test_an_unreachable_registry_is_an_error_not_a_hex_dump() -> None:
    decoder = ValueDecoder("http://127.0.0.1:9")
    with pytest.raises(OpsError, match="cannot reach"):
        decoder.decode(b"\x00\x00\x00\x00\x07\x02ab")


def test_keys_and_headers_as_text() -> None:
    assert text(b"order-1") == "order-1"
    assert text(b"\x00\x01") == "0x0001"
    assert text(b"\xff") == "0xff"
    assert text(None) is None
    assert headers_text([("a", b"1"), ("b", None), ("a", b"2")]) == {"a": ["1", "2"], "b": None}
    json.dumps(headers_text([("bin", b"\x00")]))


def test_tail_names_catalog_topics_with_the_prefix() -> None:
    s = settings()
    assert kafka_topic(s, "order.created") == f"{PREFIX}order.created"
    assert kafka_topic(s, catalog.DEAD_LETTERS) == DLQ
    assert kafka_topic(s, "some.other-topic") == "some.other-topic"


def test_a_tail_line_is_one_json_object_with_where_when_and_the_decoded_value() -> None:
    from confluent_kafka import Message

    from streams.ops.tail import as_json, json_line

    message = Message(topic=SOURCE, partition=3, offset=17, key=b"order-1", value=b'{"command":"cancel"}',
                      headers=[("trace-id", b"t-1"), ("bin", b"\x00\x01")], timestamp=(1, 1_700_000_000_123))
    record = as_json(message, ValueDecoder(_cache()))
    assert record == {"topic": SOURCE, "partition": 3, "offset": 17, "timestamp": 1_700_000_000_123,
                      "key": "order-1", "headers": {"trace-id": "t-1", "bin": "0x0001"},
                      "format": "json", "value": {"command": "cancel"}}
    line = json_line(record)
    assert "\n" not in line and json.loads(line) == record
    no_time = Message(topic=SOURCE, partition=0, offset=0, key=None, value=None, timestamp=(0, -1))
    assert as_json(no_time, ValueDecoder(_cache()))["timestamp"] is None
    assert json_line({"raw": b"\x01\x02"}) == '{"raw":"0102"}'


def test_a_shown_dead_letter_separates_dlq_headers_from_the_records_own() -> None:
    shown = dlq.ShownDeadLetter(letter(count=1), ValueDecoder(_cache()).decode(b"\xde\xad")).asdict()
    assert shown["dlq"]["dlq.reason"] == "undecodable" and shown["dlq"][REPLAY_COUNT_HEADER] == "1"
    assert shown["headers"] == {"trace-id": "t-1"}
    assert (shown["format"], shown["value"], shown["key"]) == ("hex", "dead", "order-1")
    assert (shown["partition"], shown["offset"], shown["topic"]) == (1, 7, DLQ)
