"""The payment flow end to end: order -> PaymentIntent -> test card -> webhook -> order.completed.

Everything runs as deployed (:mod:`tests.integration.payment_support`): the
worker and the ingress are subprocesses, Stripe is localstripe, whose signed
``payment_intent.*`` webhooks reach the ingress over HTTP.  The verdict is read
from the topics (confluent-kafka's AvroDeserializer), from localstripe and
from the payment API.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from streams.kernel import CallRefused
from tables.payment_state import fact_event_id
from tests.integration.payment_support import PaymentStack

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def user() -> str:
    return f"u-flow-{uuid.uuid4().hex[:8]}"


async def test_a_card_payment_completes_the_order(payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order = await stack.create_order(user(), 4200)
    order_id = order["order_id"]

    [intent_created] = await stack.events_of("payment.intent.created", order_id=order_id)
    intent_id = intent_created["payment_intent_id"]
    assert intent_created["event_id"] == fact_event_id("payment.intent.created", intent_id)
    assert (intent_created["user_id"], intent_created["amount"], intent_created["currency"]) == (
        order["user_id"], 4200, "EUR")
    await stack.events_of("order.payment_pending", order_id=order_id)

    # The intent localstripe holds carries the order: the webhooks find their way back by it.
    intent = await stack.stripe_intent(intent_id)
    assert (intent["amount"], intent["currency"]) == (4200, "eur")
    assert intent["status"] == "requires_payment_method"
    assert intent["metadata"] == {"order_id": order_id, "user_id": order["user_id"]}
    pending = await stack.payment(intent_id)
    assert (pending["status"], pending["order_id"], pending["amount"]) == ("REQUIRES_PAYMENT", order_id, 4200)

    confirmed = await stack.confirm(intent_id, "pm_card_visa")
    assert not isinstance(confirmed, CallRefused) and confirmed["status"] == "succeeded"

    # localstripe's signed payment_intent.succeeded -> ingress -> stripe.events -> payment.completed
    [completed] = await stack.events_of("payment.completed", order_id=order_id)
    assert completed["event_id"] == fact_event_id("payment.completed", intent_id)
    assert (completed["payment_intent_id"], completed["amount"], completed["currency"]) == (
        intent_id, 4200, "EUR")
    await stack.events_of("order.completed", order_id=order_id)
    stored = [r for r in await stack.stripe_records() if r.key == intent_id.encode()]
    assert [dict(r.headers)["stripe.type"] for r in stored] == [b"payment_intent.succeeded"]

    await stack.settle()
    await asyncio.sleep(1.0)  # localstripe sends nothing else; a late duplicate would show now
    await stack.settle()
    assert sorted(stack.history(order_id)) == sorted([
        "order.created", "payment.intent.created", "order.payment_pending", "payment.completed",
        "order.completed"])
    assert len(stack.events("payment.completed", order_id=order_id)) == 1
    by_intent = await stack.payment(intent_id)
    by_order = await stack.order_payment(order_id)
    assert by_intent == by_order
    assert (by_intent["status"], by_intent["payment_intent_id"], by_intent["refundable_amount"]) == (
        "SUCCEEDED", intent_id, 4200)
    assert (await stack.order(order_id))["status"] == "COMPLETED"
    assert not stack.dead_letters_of(order_id.encode()) and not stack.dead_letters_of(intent_id.encode())


async def test_a_declined_card_fails_the_payment_and_cancels_the_order(payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order, intent_id = await stack.open_payment(user(), 1500)
    order_id = order["order_id"]

    declined = await stack.confirm(intent_id, "pm_card_chargeCustomerFail")
    assert isinstance(declined, CallRefused) and declined.code == "card_declined"

    [failed] = await stack.events_of("payment.failed", order_id=order_id)
    assert (failed["payment_intent_id"], failed["error_code"], failed["amount"]) == (
        intent_id, "card_declined", 1500)
    [canceled] = await stack.events_of("order.canceled", order_id=order_id)
    assert canceled["reason"] == "PAYMENT_FAILED"
    row = await stack.wait_status(order_id, "CANCELED")
    assert row["cancel_reason"] == "PAYMENT_FAILED"

    # order.canceled cancels the open intent on Stripe, and the payment with it.
    await stack.settle()
    payment = await stack.payment(intent_id)
    assert (payment["status"], payment["failure_code"]) == ("CANCELED", "card_declined")
    assert (await stack.stripe_intent(intent_id))["status"] == "canceled"
    assert not stack.events("payment.completed", order_id=order_id)
    assert not stack.events("order.completed", order_id=order_id)
    assert len(stack.events("payment.failed", order_id=order_id)) == 1
    assert not stack.dead_letters_of(order_id.encode())
