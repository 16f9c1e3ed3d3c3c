"""Bad records reach ``paystream.dead-letters`` untouched, and the worker goes on.

Records are produced to the order agents' real topics with a plain producer,
the dead-letter topic is read with a plain confluent-kafka consumer, and each
dead letter is matched to its record by the source topic/partition/offset
Kafka reported when the record was written.
"""

from __future__ import annotations

import uuid

import pytest

from streams import catalog
from tests.integration.pipeline_support import (
    DeadLetter,
    Pipeline,
    Sent,
    assert_app_healthy,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]



def assert_untouched(letter: DeadLetter, record: Sent, reason: str) -> None:
    """The dead letter is the record (key, bytes, headers) plus where and why."""
    assert letter.header("dlq.reason") == reason
    assert letter.header("dlq.source.topic") == record.topic
    assert letter.header("dlq.source.partition") == str(record.partition)
    assert letter.header("dlq.source.offset") == str(record.offset)
    assert letter.value == record.value
    key = record.key.encode() if isinstance(record.key, str) else record.key
    assert letter.key == key
    for name, value in record.headers:
        assert letter.headers.get(name) == value, name
    assert letter.header("dlq.error")


async def test_undecodable_records_are_dead_lettered_as_they_were(pipe: Pipeline) -> None:
    writer, topic = pipe.writer, pipe.settings.topic
    order = await pipe.create_order(f"u-{uuid.uuid4().hex[:8]}")
    order_id = order["order_id"]
    trace = [("trace-id", b"t-123")]

    # Garbage on an Avro topic, keyed like the order so it shares its partition.
    writer.send_raw(topic("payment.completed"), order_id, b"\xde\xad\xbe\xef not avro at all", trace)
    garbage = writer.last()
    # A real payment.completed whose first byte is not the Confluent magic byte.
    valid = writer.encode("payment.completed", writer.event("payment.completed", pipe.payment(order)))
    writer.send_raw(topic("payment.completed"), order_id, b"\x01" + valid[1:], trace)
    wrong_magic = writer.last()
    # Confluent framing with a schema id the registry never issued.
    writer.send_raw(topic("subscription.created"), "sub-x",
                    b"\x00" + (987_654_321).to_bytes(4, "big") + b"\x02ab")
    unknown_id = writer.last()
    # A header and four bytes: too short to be anything.
    writer.send_raw(topic("user.deleted"), "u-short", b"\x00\x00\x00")
    too_short = writer.last()
    # An order command that is not JSON, and one that is JSON but not an object.
    writer.send_raw(topic(catalog.ORDER_COMMANDS), order_id, b"{cancel this order", trace)
    not_json = writer.last()
    writer.send_raw(topic(catalog.ORDER_COMMANDS), order_id, b'["cancel"]')
    not_object = writer.last()

    for record in (garbage, wrong_magic, unknown_id, too_short, not_json, not_object):
        letter = await pipe.dead_letters.wait_for(record)
        assert_untouched(letter, record, "undecodable")
        assert "MalformedRecord" in letter.header("dlq.error"), letter.header("dlq.error")
    assert "magic byte 1" in (await pipe.dead_letters.wait_for(wrong_magic)).header("dlq.error")
    assert "987654321" in (await pipe.dead_letters.wait_for(unknown_id)).header("dlq.error")

    # The worker goes on: the next valid records on the same partitions are applied.
    pipe.writer.send("payment.intent.created", pipe.payment(order))
    paid = pipe.writer.send("payment.completed", pipe.payment(order))
    [completed] = await pipe.reader.wait_for("order.completed", order_id=order_id)
    assert completed["causation_id"] == paid["event_id"]
    assert (await pipe.order(order_id))["status"] == "COMPLETED"

    await pipe.settle()
    for record in (garbage, wrong_magic, unknown_id, too_short, not_json, not_object):
        assert len(pipe.dead_letters.of(record)) == 1
    assert_app_healthy(pipe.app)


async def test_rejected_and_mistyped_events_are_dead_lettered(pipe: Pipeline) -> None:
    writer, topic = pipe.writer, pipe.settings.topic
    order = await pipe.create_order(f"u-{uuid.uuid4().hex[:8]}")
    order_id = order["order_id"]
    response = await pipe.api.client.post(f"/orders/{order_id}/cancel")
    assert response.status_code == 200, response.text

    # A payment for an order that is canceled already: well-formed, but illegal.
    writer.send("payment.completed", pipe.payment(order))
    illegal = writer.last()
    letter = await pipe.dead_letters.wait_for(illegal)
    assert_untouched(letter, illegal, "rejected")
    assert "IllegalTransition" in letter.header("dlq.error")
    assert "CANCELED" in letter.header("dlq.error")

    # A payment.failed envelope on the payment.completed topic (encoded with that
    # topic's schema, so it decodes): the envelope does not match the topic.
    live = await pipe.create_order(f"u-{uuid.uuid4().hex[:8]}")
    mistyped = writer.event("payment.completed", pipe.payment(live))
    mistyped["event_type"] = "payment.failed"
    writer.send_raw(topic("payment.completed"), live["order_id"],
                    writer.encode("payment.completed", mistyped))
    mismatch = writer.last()
    letter = await pipe.dead_letters.wait_for(mismatch)
    assert_untouched(letter, mismatch, "undecodable")
    assert "UnknownEventType" in letter.header("dlq.error")
    # A real payment.failed record (its own schema id) produced to payment.completed.
    failed = writer.event("payment.failed", pipe.payment(live, error_message="declined"))
    writer.send_raw(topic("payment.completed"), live["order_id"], writer.encode("payment.failed", failed))
    wrong_topic = writer.last()
    letter = await pipe.dead_letters.wait_for(wrong_topic)
    assert letter.header("dlq.reason") == "undecodable"
    assert letter.value == wrong_topic.value

    # Neither was applied, and the worker still applies valid events afterwards.
    assert (await pipe.order(order_id))["status"] == "CANCELED"
    assert (await pipe.order(live["order_id"]))["status"] == "PENDING"
    pipe.writer.send("payment.intent.created", pipe.payment(live))
    await pipe.reader.wait_for("order.payment_pending", order_id=live["order_id"])
    assert (await pipe.order(live["order_id"]))["status"] == "PAYMENT_PENDING"

    await pipe.settle()
    assert "order.completed" not in pipe.order_events(order_id)
    assert pipe.order_events(live["order_id"]) == ["order.created", "order.payment_pending"]
    for record in (illegal, mismatch, wrong_topic):
        assert len(pipe.dead_letters.of(record)) == 1
    assert_app_healthy(pipe.app)
