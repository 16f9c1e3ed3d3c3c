"""The refund flow end to end: ``create_refund`` on the worker's API -> Stripe refund -> payment.refunded.

A paid order (confirmed on localstripe with a test card, completed by
localstripe's webhook) is refunded in part, then in full, through
``POST /payments/{intent}/refunds``; refusals, retries under the same
Idempotency-Key and Stripe's own later refund webhooks must add nothing.
The verdict is read from the topics, from localstripe's refunds of the
intent, and from the API.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tables.payment_state import fact_event_id
from tests.integration.payment_support import PaymentStack, refund_object, stripe_event

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

AMOUNT = 5000


async def test_partial_then_full_refund_with_refusals_retries_and_stripe_echoes(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order, intent_id = await stack.paid_order(f"u-refund-{uuid.uuid4().hex[:8]}", AMOUNT)
    order_id = order["order_id"]
    first_key, second_key = f"refund-1-{uuid.uuid4().hex}", f"refund-2-{uuid.uuid4().hex}"

    # Requests that are not refunds of this payment: refused before Stripe is asked.
    for body, code in (({"amount": 0}, "invalid"), ({"amount": -5}, "invalid"), ({"amount": "12"}, "invalid"),
                       ({"amount": True}, "invalid"), ({"reason": "BECAUSE"}, "invalid"),
                       ({"amount": 100, "currency": "USD"}, "bad_request")):
        refused = await stack.refund(intent_id, f"refund-bad-{uuid.uuid4().hex}", **body)
        assert (refused.status_code, refused.json()["error"]) == (400, code), (body, refused.text)
    unknown = await stack.refund(f"pi_unknown{uuid.uuid4().hex[:12]}", None, amount=100)
    assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found"), unknown.text
    assert await stack.stripe_refunds(intent_id) == []

    # A partial refund.
    answer = await stack.refund(intent_id, first_key, amount=1200, reason="REQUESTED_BY_CUSTOMER")
    assert answer.status_code == 201, answer.text
    partial = answer.json()
    first_id = partial["refund_id"]
    assert first_id.startswith("re_")
    assert (partial["amount"], partial["status"], partial["reason"]) == (1200, "succeeded",
                                                                           "REQUESTED_BY_CUSTOMER")
    assert partial["payment"]["status"] == "PARTIALLY_REFUNDED"
    assert partial["payment"]["refundable_amount"] == AMOUNT - 1200
    [refunded] = await stack.events_of("payment.refunded", order_id=order_id)
    assert refunded["event_id"] == fact_event_id("payment.refunded", first_id)
    assert (refunded["refund_id"], refunded["payment_id"], refunded["amount"], refunded["currency"]) == (
        first_id, intent_id, 1200, "EUR")
    await stack.events_of("order.refunded", order_id=order_id)
    assert (await stack.wait_status(order_id, "PARTIALLY_REFUNDED"))["refunded_amount"] == 1200
    [on_stripe] = await stack.stripe_refunds(intent_id)
    assert (on_stripe["id"], on_stripe["amount"]) == (first_id, 1200)
    assert on_stripe["metadata"]["order_id"] == order_id

    # More than remains: refused as Stripe refuses it, nothing moves.
    over = await stack.refund(intent_id, f"refund-over-{uuid.uuid4().hex}", amount=AMOUNT - 1200 + 1)
    assert over.status_code == 400, over.text
    assert over.json()["error"] == "amount_too_large"

    # The first request retried under its key: the same answer, no second Stripe refund.
    again = await stack.refund(intent_id, first_key, amount=1200, reason="REQUESTED_BY_CUSTOMER")
    assert again.status_code == 201, again.text
    assert (again.json()["refund_id"], again.json()["amount"]) == (first_id, 1200)
    # The key with another amount is another request: 422.
    reused = await stack.refund(intent_id, first_key, amount=700, reason="REQUESTED_BY_CUSTOMER")
    assert reused.status_code == 422, reused.text
    assert reused.json()["error"] == "idempotency_key_reused"

    await stack.settle()
    assert [r["id"] for r in await stack.stripe_refunds(intent_id)] == [first_id]
    assert len(stack.events("payment.refunded", order_id=order_id)) == 1
    assert len(stack.events("order.refunded", order_id=order_id)) == 1

    # The rest (no amount: all that remains).
    answer = await stack.refund(intent_id, second_key, reason="REQUESTED_BY_CUSTOMER")
    assert answer.status_code == 201, answer.text
    full = answer.json()
    second_id = full["refund_id"]
    assert second_id != first_id and full["amount"] == AMOUNT - 1200
    assert (full["payment"]["status"], full["payment"]["refunded_amount"]) == ("REFUNDED", AMOUNT)
    await stack.events_of("payment.refunded", 2, order_id=order_id)
    await stack.events_of("order.refunded", 2, order_id=order_id)
    assert (await stack.wait_status(order_id, "REFUNDED"))["refunded_amount"] == AMOUNT
    nothing_left = await stack.refund(intent_id, f"refund-3-{uuid.uuid4().hex}", amount=1)
    assert nothing_left.status_code == 409, nothing_left.text

    # Stripe's own news of the same refunds, later, signed, in Stripe's shape: nothing new.
    refunds = {r["id"]: r for r in await stack.stripe_refunds(intent_id)}
    assert set(refunds) == {first_id, second_id}
    charge_id = refunds[first_id]["charge"]
    objects = [refund_object(rid, intent_id, charge_id, r["amount"], r["metadata"])
               for rid, r in refunds.items()]
    await stack.deliver(stripe_event("refund_updated", objects[0]))
    await stack.deliver(stripe_event("refund_updated", objects[1]))
    await stack.deliver(stripe_event("charge_refunded_with_refunds", {
        "id": charge_id, "payment_intent": intent_id, "amount": AMOUNT, "amount_refunded": AMOUNT,
        "currency": "eur", "metadata": {"order_id": order_id, "user_id": order["user_id"]},
        "refunded": True, "refunds": {"object": "list", "data": objects, "has_more": False,
                                      "total_count": 2, "url": f"/v1/charges/{charge_id}/refunds"}}))
    await stack.settle()

    refund_events = stack.events("payment.refunded", order_id=order_id)
    assert sorted((e["refund_id"], e["amount"]) for e in refund_events) == sorted(
        [(first_id, 1200), (second_id, AMOUNT - 1200)])
    assert len(stack.events("order.refunded", order_id=order_id)) == 2
    assert (await stack.order(order_id))["status"] == "REFUNDED"
    payment = await stack.payment(intent_id)
    assert (payment["status"], payment["refunded_amount"], payment["refundable_amount"]) == (
        "REFUNDED", AMOUNT, 0)
    assert sorted(r["refund_id"] for r in payment["refunds"]) == sorted([first_id, second_id])
    assert len(await stack.stripe_refunds(intent_id)) == 2
    assert not stack.dead_letters_of(order_id.encode()) and not stack.dead_letters_of(intent_id.encode())


async def test_a_payment_that_was_not_paid_cannot_be_refunded(payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order, intent_id = await stack.open_payment(f"u-refund-{uuid.uuid4().hex[:8]}", 900)
    answer = await stack.refund(intent_id, f"refund-{uuid.uuid4().hex}", amount=100)
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "illegal_transition"
    await stack.settle()
    assert await stack.stripe_refunds(intent_id) == []
    assert not stack.events("payment.refunded", order_id=order["order_id"])


async def test_concurrent_refund_requests_never_refund_more_than_was_paid(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order, intent_id = await stack.paid_order(f"u-refund-{uuid.uuid4().hex[:8]}", 2400)
    order_id = order["order_id"]

    # The same request twice at once (a client retrying before its first answer): one refund.
    key = f"refund-same-{uuid.uuid4().hex}"
    same = await asyncio.gather(*(stack.refund(intent_id, key, amount=400) for _ in range(2)))
    assert [a.status_code for a in same] == [201, 201], [a.text for a in same]
    assert same[0].json()["refund_id"] == same[1].json()["refund_id"]

    # Two different requests at once, each for all that remains: one of them.
    rest = await asyncio.gather(*(stack.refund(intent_id, f"refund-rest-{uuid.uuid4().hex}")
                                  for _ in range(2)))
    assert sorted(a.status_code for a in rest) == [201, 409], [a.text for a in rest]
    [won] = [a.json() for a in rest if a.status_code == 201]
    assert won["amount"] == 2000 and won["payment"]["status"] == "REFUNDED"

    await stack.settle()
    on_stripe = await stack.stripe_refunds(intent_id)
    assert sorted(r["amount"] for r in on_stripe) == [400, 2000]
    assert sorted(e["amount"] for e in stack.events("payment.refunded", order_id=order_id)) == [400, 2000]
    assert (await stack.order(order_id))["status"] == "REFUNDED"


async def test_a_refund_made_on_stripe_directly_is_reported_once(payment_stack: PaymentStack) -> None:
    """A refund from Stripe's dashboard: paystream learns it from refund.* / charge.refunded alone."""
    stack = payment_stack
    order, intent_id = await stack.paid_order(f"u-refund-{uuid.uuid4().hex[:8]}", 3000)
    order_id = order["order_id"]
    made = await stack.stripe_http.post("/v1/refunds", data={"payment_intent": intent_id, "amount": 500})
    assert made.status_code == 200, made.text
    refund = made.json()  # no paystream metadata: the intent index knows the order
    obj = refund_object(refund["id"], intent_id, refund["charge"], 500, {})
    obj["reason"] = None

    await stack.deliver(stripe_event("refund_created", {**obj, "status": "pending"}))
    await stack.settle()
    assert not stack.events("payment.refunded", order_id=order_id)  # pending: no money moved yet
    assert (await stack.payment(intent_id))["refunds"][0]["status"] == "pending"

    await stack.deliver(stripe_event("refund_updated", obj))
    [refunded] = await stack.events_of("payment.refunded", order_id=order_id)
    assert (refunded["refund_id"], refunded["amount"], refunded["reason"]) == (refund["id"], 500, "OTHER")
    assert refunded["event_id"] == fact_event_id("payment.refunded", refund["id"])
    await stack.deliver(stripe_event("charge_refunded_with_refunds", {
        "id": refund["charge"], "payment_intent": intent_id, "amount": 3000, "amount_refunded": 500,
        "currency": "eur", "metadata": {}, "refunds": {"object": "list", "data": [obj], "has_more": False,
                                                       "total_count": 1}}))
    await stack.settle()
    assert len(stack.events("payment.refunded", order_id=order_id)) == 1
    payment = await stack.payment(intent_id)
    assert (payment["status"], payment["refunded_amount"]) == ("PARTIALLY_REFUNDED", 500)
    assert (await stack.wait_status(order_id, "PARTIALLY_REFUNDED"))["refunded_amount"] == 500
