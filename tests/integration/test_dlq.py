"""``paystream dlq`` against a running worker on the real broker.

Dead letters are made the way production makes them: a malformed (or
illegal) record is produced to an agent's topic and the running worker
dead-letters it.  Then they are listed, shown, replayed to the source
topic, dead-lettered again with their count raised, and refused at the
limit; bad input is refused with nothing produced.  The library's blocking
reads run in threads: the worker shares this event loop.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streams import catalog
from streams.cli import main
from streams.dispatch import REPLAY_COUNT_HEADER
from streams.ops import dlq
from streams.ops.dlq import DeadLetterFilter
from streams.ops.records import OpsError, open_consumer, watermarks
from streams.ops.tail import tail
from streams.producer import producer_config
from tests.integration.pipeline_support import DeadLetter, Pipeline, Sent, assert_app_healthy

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def ends(pipe: Pipeline, *names: str) -> dict[tuple[str, int], int]:
    """End offsets of every partition of the deployment's topics ``names``."""
    consumer = open_consumer(pipe.settings.kafka_bootstrap_servers)
    try:
        return {(pipe.settings.topic(n), p): watermarks(consumer, pipe.settings.topic(n), p)[1]
                for n in names for p in range(catalog.EVENT_PARTITIONS)}
    finally:
        consumer.close()


def find(letters: list[dlq.DeadLetter], record: Sent) -> dlq.DeadLetter:
    [found] = [d for d in letters if (d.source_topic, d.source_partition, d.source_offset)
               == (record.topic, record.partition, record.offset)]
    return found


async def letters_of(pipe: Pipeline, **where: Any) -> list[dlq.DeadLetter]:
    return await asyncio.to_thread(dlq.list_dead_letters, pipe.settings, DeadLetterFilter(**where))


def as_sent(replayed: dlq.Replayed, original: Sent) -> Sent:
    """The record a replay produced, as the dead-letter reader matches it."""
    return Sent(replayed.source_topic, original.key, original.value, [],
                replayed.to_partition, replayed.to_offset)


async def test_list_show_replay_and_the_count_going_round(pipe: Pipeline) -> None:
    writer, topic = pipe.writer, pipe.settings.topic
    order = await pipe.create_order(f"u-{uuid.uuid4().hex[:8]}")
    order_id = order["order_id"]
    writer.send_raw(topic("payment.completed"), order_id, b"\xde\xad\xbe\xef not avro",
                    [("trace-id", b"t-9")])
    garbage = writer.last()
    first: DeadLetter = await pipe.dead_letters.wait_for(garbage)
    assert first.header("dlq.reason") == "undecodable"

    # list: found by its source topic (catalog name) and reason, with where it came from.
    listed = find(await letters_of(pipe, source_topic="payment.completed", reason="undecodable"), garbage)
    assert listed.key == order_id.encode() and listed.value == garbage.value
    assert listed.replay_count == 0 and listed.reason == "undecodable"
    assert "MalformedRecord" in (listed.error or "")
    assert listed not in await letters_of(pipe, reason="rejected")
    assert listed not in await letters_of(pipe, source_topic="order.created")
    assert listed in await letters_of(pipe, since_ms=listed.timestamp_ms, until_ms=listed.timestamp_ms)
    assert listed not in await letters_of(pipe, since_ms=(listed.timestamp_ms or 0) + 1)

    # show: undecodable bytes as hex, with the dlq.* headers and the record's own.
    shown = (await asyncio.to_thread(dlq.show_dead_letter, pipe.settings, listed.partition,
                                     listed.offset)).asdict()
    assert shown["format"] == "hex" and shown["value"] == garbage.value.hex()
    assert shown["key"] == order_id and shown["headers"] == {"trace-id": "t-9"}
    assert shown["dlq"]["dlq.reason"] == "undecodable"
    assert shown["dlq"]["dlq.source.offset"] == str(garbage.offset)

    # replay #1: back to the source topic and partition, same key/bytes, headers minus dlq.* plus the count.
    result = await dlq.replay(pipe.settings, positions=[(listed.partition, listed.offset)])
    [sent] = result.replayed
    assert (sent.source_topic, sent.to_partition, sent.replay_count) == (garbage.topic, garbage.partition, 1)
    [record] = [r for r in await asyncio.to_thread(lambda: list(tail(
        pipe.settings, "payment.completed", from_beginning=True, key=order_id, follow=False)))
        if r["offset"] == sent.to_offset]
    assert record["value"] == garbage.value.hex() and record["partition"] == garbage.partition
    assert record["headers"] == {"trace-id": "t-9", REPLAY_COUNT_HEADER: "1"}

    # The worker still cannot read it: dead-lettered again, with count 1.
    again = await pipe.dead_letters.wait_for(as_sent(sent, garbage))
    assert again.header(REPLAY_COUNT_HEADER) == "1" and again.header("dlq.reason") == "undecodable"
    second = find(await letters_of(pipe, source_topic="payment.completed"), as_sent(sent, garbage))
    assert second.replay_count == 1

    # replay #2 -> dead-lettered with count 2.
    [sent2] = (await dlq.replay(pipe.settings, positions=[(second.partition, second.offset)])).replayed
    assert sent2.replay_count == 2
    third_letter = await pipe.dead_letters.wait_for(as_sent(sent2, garbage))
    assert third_letter.header(REPLAY_COUNT_HEADER) == "2"
    third = find(await letters_of(pipe, source_topic="payment.completed"), as_sent(sent2, garbage))
    assert third.replay_count == 2

    # At the limit (2 here): refused by position, nothing produced; skipped by a filter.
    before = await asyncio.to_thread(ends, pipe, "payment.completed", catalog.DEAD_LETTERS)
    with pytest.raises(dlq.ReplayRefused, match="replayed 2 times already"):
        await dlq.replay(pipe.settings, positions=[(third.partition, third.offset)], limit=2)
    dry = await dlq.replay(pipe.settings, where=DeadLetterFilter(source_topic="payment.completed",
                                                                 reason="undecodable"),
                           limit=2, dry_run=True)
    assert third in [d for d, _ in dry.skipped]
    assert second in dry.planned and listed in dry.planned and third not in dry.planned
    await pipe.settle()
    assert await asyncio.to_thread(ends, pipe, "payment.completed", catalog.DEAD_LETTERS) == before
    assert_app_healthy(pipe.app)


async def test_an_avro_dead_letter_is_shown_decoded(pipe: Pipeline) -> None:
    order = await pipe.create_order(f"u-{uuid.uuid4().hex[:8]}")
    response = await pipe.api.client.post(f"/orders/{order['order_id']}/cancel")
    assert response.status_code == 200, response.text
    paid = pipe.writer.send("payment.completed", pipe.payment(order))  # illegal: the order is canceled
    illegal = pipe.writer.last()
    await pipe.dead_letters.wait_for(illegal)
    listed = find(await letters_of(pipe, reason="rejected"), illegal)
    shown = (await asyncio.to_thread(dlq.show_dead_letter, pipe.settings, listed.partition,
                                     listed.offset)).asdict()
    assert shown["format"] == "avro"
    assert shown["schema"] == "io.paystream.events.PaymentCompletedEvent"
    assert shown["value"]["event_id"] == paid["event_id"]
    assert shown["value"]["order_id"] == order["order_id"]
    assert shown["dlq"]["dlq.reason"] == "rejected" and "IllegalTransition" in shown["dlq"]["dlq.error"]


async def test_bad_input_is_refused_and_nothing_is_produced(pipe: Pipeline) -> None:
    settings = pipe.settings
    order = await pipe.create_order(f"u-{uuid.uuid4().hex[:8]}")
    pipe.writer.send_raw(settings.topic("payment.completed"), order["order_id"], b"\x00\x01")
    garbage = pipe.writer.last()
    await pipe.dead_letters.wait_for(garbage)
    good = find(await letters_of(pipe, source_topic="payment.completed"), garbage)

    # A dead letter whose source topic was deleted since.
    gone = settings.topic(f"gone-{uuid.uuid4().hex[:6]}")
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    admin.create_topics([NewTopic(gone, 1, 1)])[gone].result(timeout=30)
    admin.delete_topics([gone])[gone].result(timeout=30)
    producer = Producer(producer_config(settings.kafka_bootstrap_servers, client_id="test-dlq"))
    delivered: list[Any] = []
    producer.produce(settings.topic(catalog.DEAD_LETTERS), key=b"k-gone", value=b"v", headers=[
        ("dlq.reason", b"undecodable"), ("dlq.error", b"MalformedRecord: x"),
        ("dlq.source.topic", gone.encode()), ("dlq.source.partition", b"0"),
        ("dlq.source.offset", b"0"), ("dlq.source.timestamp", b"0")],
        on_delivery=lambda err, msg: delivered.append(msg))
    assert producer.flush(30) == 0
    orphan = (delivered[0].partition(), delivered[0].offset())

    await pipe.settle()
    before = await asyncio.to_thread(ends, pipe, "payment.completed", catalog.DEAD_LETTERS)
    position = (good.partition, good.offset)
    with pytest.raises(dlq.ReplayRefused, match=r"no record at .*offset 999999") as refused:
        await dlq.replay(settings, positions=[position, (good.partition, 999_999)])
    assert len(refused.value.problems) == 1
    with pytest.raises(dlq.ReplayRefused, match="has no partition 99"):
        await dlq.replay(settings, positions=[(99, 0)])
    with pytest.raises(dlq.ReplayRefused, match=f"source topic '{gone}' no longer exists"):
        await dlq.replay(settings, positions=[position, orphan])
    with pytest.raises(dlq.ReplayRefused, match="no longer exists"):
        await dlq.replay(settings, where=DeadLetterFilter(reason="undecodable"))
    with pytest.raises(OpsError, match="is not a dead-letter topic"):
        await dlq.replay(settings, positions=[(0, 0)], topic=settings.topic("payment.completed"))
    with pytest.raises(OpsError, match="does not exist"):
        await dlq.replay(settings, positions=[(0, 0)], topic=f"{gone}.{catalog.DEAD_LETTERS}")
    with pytest.raises(OpsError, match="no record at"):
        await asyncio.to_thread(dlq.show_dead_letter, settings, good.partition, 999_999)
    await pipe.settle()
    assert await asyncio.to_thread(ends, pipe, "payment.completed", catalog.DEAD_LETTERS) == before
    names = admin.list_topics(timeout=10).topics
    assert gone not in names, "a refused replay must not create the deleted topic again"
    assert_app_healthy(pipe.app)


async def test_the_command_line(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    settings = pipe.settings
    for name, value in (("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
                        ("SCHEMA_REGISTRY_URL", settings.schema_registry_url),
                        ("PAYSTREAM_TOPIC_PREFIX", settings.topic_prefix)):
        monkeypatch.setenv(name, value)
    order = await pipe.create_order(f"u-{uuid.uuid4().hex[:8]}")
    pipe.writer.send_raw(settings.topic(catalog.ORDER_COMMANDS), order["order_id"], b"{not json")
    bad = pipe.writer.last()
    await pipe.dead_letters.wait_for(bad)

    assert await asyncio.to_thread(main, ["dlq", "list", "--json", "--source-topic",
                                          catalog.ORDER_COMMANDS]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    [row] = [r for r in rows if r["source_offset"] == bad.offset and r["source_partition"] == bad.partition]
    assert row["reason"] == "undecodable" and row["key"] == order["order_id"]

    assert await asyncio.to_thread(main, ["dlq", "list", "--reason", "undecodable"]) == 0
    table = capsys.readouterr().out
    assert f"{row['partition']}:{row['offset']} " in table and table.startswith("PART:OFFSET")

    position = f"{row['partition']}:{row['offset']}"
    assert await asyncio.to_thread(main, ["dlq", "show", position]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["format"] == "hex" and bytes.fromhex(shown["value"]) == b"{not json"

    assert await asyncio.to_thread(main, ["dlq", "replay", f"{row['partition']}:999999"]) == 2
    assert "nothing was produced" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["dlq", "replay", position, "--dry-run"]) == 0
    assert "would replay 1" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["dlq", "replay", position]) == 0
    out = capsys.readouterr().out
    assert f"replayed {position} -> {settings.topic(catalog.ORDER_COMMANDS)}[{bad.partition}]@" in out
    assert_app_healthy(pipe.app)
