"""Bad input at the system level: what Stripe (or another writer) may send, each outcome asserted.

Stripe delivers at least once and in any order; an event may be about an
intent paystream never opened; a record on ``stripe.events`` may not come
from the ingress at all.  Each case goes through the deployed stack
(:mod:`tests.integration.payment_support`) and is judged from the topics,
the dead letters, the intent index's changelog and the API.  The ingress'
own refusals (signatures, bodies, sizes, Kafka down) are
``test_stripe_ingress.py``'s.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from streams import catalog
from tests.integration.payment_support import PaymentStack, encode, intent_event

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def user() -> str:
    return f"u-bad-{uuid.uuid4().hex[:8]}"


async def test_a_webhook_delivered_twice_completes_the_payment_once(payment_stack: PaymentStack) -> None:
    stack = payment_stack
    # Two copies of one event before the worker saw either (one Stripe event id).
    order, intent_id = await stack.open_payment(user(), 2100)
    order_id = order["order_id"]
    event = intent_event("succeeded", intent_id, amount=2100, order_id=order_id, user_id=order["user_id"],
                         payment_method="pm_card_visa", status="succeeded")
    body = encode(event)
    await stack.deliver(body)
    await stack.deliver(body)
    await stack.events_of("order.completed", order_id=order_id)

    # And localstripe's own delivery of a paid intent, posted again twice later.
    other, other_intent = await stack.paid_order(user(), 3300)
    stored = [r for r in await stack.stripe_records() if r.key == other_intent.encode()]
    [original] = stored
    await stack.deliver(original.value)
    await stack.deliver(original.value)

    await stack.settle()
    records = await stack.stripe_records()
    ids = [dict(r.headers)["stripe.event_id"] for r in records]
    assert ids.count(event["id"].encode()) == 2  # the ingress stores both; the worker dedupes
    assert ids.count(dict(original.headers)["stripe.event_id"]) == 3
    for order_id_, intent in ((order_id, intent_id), (other["order_id"], other_intent)):
        [completed] = stack.events("payment.completed", order_id=order_id_)
        assert completed["payment_intent_id"] == intent
        assert len(stack.events("order.completed", order_id=order_id_)) == 1
        assert (await stack.payment(intent))["status"] == "SUCCEEDED"
        assert not stack.dead_letters_of(intent.encode())


async def test_a_failure_reported_after_the_success_changes_nothing(payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order, intent_id = await stack.paid_order(user(), 2600)
    order_id = order["order_id"]
    [succeeded] = [r for r in await stack.stripe_records() if r.key == intent_id.encode()]
    created = json.loads(succeeded.value)["created"]

    # An older attempt's payment_failed, delivered late (Stripe does not order deliveries).
    late = intent_event("payment_failed", intent_id, amount=2600, order_id=order_id,
                        user_id=order["user_id"], created=created - 30)
    await stack.deliver(late)
    # And one that claims to be newer: a paid intent cannot fail any more either.
    newer = intent_event("payment_failed", intent_id, amount=2600, order_id=order_id,
                         user_id=order["user_id"], created=created + 30)
    await stack.deliver(newer)
    await stack.settle()

    assert not stack.events("payment.failed", order_id=order_id)
    assert not stack.events("order.canceled", order_id=order_id)
    assert len(stack.events("payment.completed", order_id=order_id)) == 1
    payment = await stack.payment(intent_id)
    assert (payment["status"], payment["failure_code"]) == ("SUCCEEDED", None)
    assert (await stack.order(order_id))["status"] == "COMPLETED"
    assert not stack.dead_letters_of(intent_id.encode())


async def test_an_event_for_an_intent_no_order_claims_is_kept_and_counted(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    intent_id = f"pi_unknown{uuid.uuid4().hex[:14]}"
    first = intent_event("succeeded", intent_id, amount=990, order_id=None, user_id=None,
                         status="succeeded")
    second = intent_event("payment_failed", intent_id, amount=990, order_id=None, user_id=None)
    await stack.deliver(first)
    await stack.deliver(second)
    await stack.settle()

    row = await stack.intent_row(intent_id)
    assert row is not None and row.get("unlinked") == 2, row
    assert row.get("order_id") is None
    assert sorted(row["applied"]) == sorted([first["id"], second["id"]])
    assert not [e for e in stack.reader.seen if e.get("payment_intent_id") == intent_id]
    assert not stack.dead_letters_of(intent_id.encode())
    answer = await stack.api.get(f"/payments/{intent_id}")
    assert answer.status_code == 404 and answer.json()["error"] == "not_found", answer.text
    # Kept: the raw events stay on stripe.events, byte for byte.
    kept = [r.value for r in await stack.stripe_records() if r.key == intent_id.encode()]
    assert kept == [encode(first), encode(second)]


async def test_a_record_that_is_no_stripe_event_written_past_the_ingress_is_dead_lettered(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    topic = stack.settings.topic(catalog.STRIPE_EVENTS)
    key = f"pi_bad{uuid.uuid4().hex[:14]}"
    not_an_event = json.dumps({"id": "not-an-event", "type": "payment_intent.succeeded",
                               "created": int(time.time()), "data": {"object": {"id": key}}}).encode()
    no_object = json.dumps({"id": f"evt_bad{uuid.uuid4().hex}", "object": "event",
                            "type": "payment_intent.succeeded", "created": int(time.time()),
                            "data": {"object": []}}).encode()
    not_json = b"\x00\x01 not json"
    an_array = json.dumps([{"id": f"evt_bad{uuid.uuid4().hex}"}]).encode()
    expected = {}
    for value, reason in ((not_an_event, "rejected"), (no_object, "rejected"), (not_json, "undecodable"),
                          (an_array, "undecodable")):
        stack.writer.send_raw(topic, key, value, [("stripe.type", b"payment_intent.succeeded")])
        expected[stack.writer.last().offset] = (value, reason)

    assert stack.dead_letters is not None
    for sent in stack.writer.sent[-4:]:
        letter = await stack.dead_letters.wait_for(sent)
        value, reason = expected[sent.offset]
        assert letter.value == value  # the original bytes
        assert letter.key == key.encode()
        assert letter.header("dlq.reason") == reason
        assert letter.header("dlq.source.topic") == topic
        assert letter.headers["stripe.type"] == b"payment_intent.succeeded"
    await stack.settle()
    assert not [e for e in stack.reader.seen if e.get("payment_intent_id") == key]
    assert await stack.intent_row(key) is None


async def test_a_consumed_type_with_an_unreadable_object_is_stored_by_the_ingress_and_dead_lettered(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order, intent_id = await stack.open_payment(user(), 1800)
    event = intent_event("succeeded", intent_id, amount=1800, order_id=order["order_id"],
                         user_id=order["user_id"], status="succeeded")
    event["data"]["object"]["metadata"] = "not an object"
    body = encode(event)
    await stack.deliver(body)  # signed, an event: stored verbatim; reading it is the worker's job
    await stack.settle()

    letters = stack.dead_letters_of(intent_id.encode())
    assert [(d.value, d.header("dlq.reason")) for d in letters] == [(body, "rejected")]
    assert "metadata is not an object" in letters[0].header("dlq.error")
    assert not stack.events("payment.completed", order_id=order["order_id"])
    assert (await stack.payment(intent_id))["status"] == "REQUIRES_PAYMENT"
