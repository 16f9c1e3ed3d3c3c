"""The payment flow end to end: order -> PaymentIntent -> test card -> webhook -> order.completed.

Everything runs as deployed (:mod:`tests.integration.payment_support`): the
worker and the ingress are subprocesses, Stripe is localstripe, whose signed
``payment_intent.*`` webhooks reach the ingress over HTTP.  The verdict is read
from the topics (confluent-kafka's AvroDeserializer), from localstripe and
from the payment API.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from schemas import contracts
from streams.kernel import CallRefused
from tables.payment_state import fact_event_id
from tests.integration.payment_support import PaymentStack, insufficient_funds_event
from tests.integration.pipeline_support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


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


async def test_a_top_up_retries_a_payment_that_failed_for_want_of_funds(payment_stack: PaymentStack) -> None:
    stack = payment_stack
    user_id = user()
    order, intent_id = await stack.open_payment(user_id, 3900)
    order_id = order["order_id"]

    # Stripe declines for insufficient funds (localstripe has no such card: posted signed).
    declined = insufficient_funds_event(intent_id, amount=3900, order_id=order_id, user_id=user_id)
    await stack.deliver(declined)
    [failed] = await stack.events_of("payment.failed", order_id=order_id)
    assert (failed["error_code"], failed["event_id"]) == (
        "insufficient_funds", fact_event_id("payment.failed", declined["id"]))
    await stack.settle()  # the user -> payments index knows the payment is retryable now
    assert (await stack.order(order_id))["status"] == "PAYMENT_PENDING"
    assert not stack.events("order.canceled", order_id=order_id)
    payment = await stack.payment(intent_id)
    assert (payment["status"], payment["failure_code"], payment["payment_method"]) == (
        "FAILED", "insufficient_funds", "pm_card_visa")

    def balance_changed(delta: int) -> dict[str, Any]:
        return stack.writer.send("wallet.balance_changed", {
            "user_id": user_id, "wallet_id": f"w-{user_id}", "balance_amount": 10_000 + delta,
            "delta_amount": delta, "currency": "EUR", "transaction_id": uuid.uuid4().hex})

    balance_changed(-500)  # money going out retries nothing
    await stack.settle()
    assert (await stack.payment(intent_id))["status"] == "FAILED"
    assert (await stack.stripe_intent(intent_id))["status"] == "requires_payment_method"

    balance_changed(+5000)  # money coming in: the payment is confirmed again with its card
    [completed] = await stack.events_of("payment.completed", order_id=order_id)
    assert completed["event_id"] == fact_event_id("payment.completed", intent_id)
    await stack.events_of("order.completed", order_id=order_id)
    intent = await stack.stripe_intent(intent_id)
    assert (intent["status"], intent["payment_method"]) == ("succeeded", "pm_card_visa")

    # localstripe's payment_intent.succeeded for the retry arrives about 1 s later: nothing new.
    await asyncio.sleep(2.0)
    balance_changed(+100)  # and a later top-up has nothing left to retry
    await stack.settle()
    assert len(stack.events("payment.completed", order_id=order_id)) == 1
    assert len(stack.events("order.completed", order_id=order_id)) == 1
    assert len(stack.events("payment.failed", order_id=order_id)) == 1
    stored = [dict(r.headers)["stripe.type"]
              for r in await stack.stripe_records() if r.key == intent_id.encode()]
    assert stored == [b"payment_intent.payment_failed", b"payment_intent.succeeded"]
    payment = await stack.payment(intent_id)
    assert (payment["status"], payment["attempts"], payment["failure_code"]) == ("SUCCEEDED", 2, None)
    assert (await stack.order(order_id))["status"] == "COMPLETED"
    assert not stack.dead_letters_of(order_id.encode()) and not stack.dead_letters_of(user_id.encode())


async def test_an_order_that_expires_or_is_canceled_cancels_its_open_payment_intent(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    expiring = await stack.create_order(user(), 1100, payment_window_seconds=3)
    [expiring_intent] = await stack.events_of("payment.intent.created", order_id=expiring["order_id"])
    canceled, canceled_intent = await stack.open_payment(user(), 1200)
    answer = await stack.api.post(f"/orders/{canceled['order_id']}/cancel", json={},
                                  headers={"Idempotency-Key": uuid.uuid4().hex})
    assert answer.status_code == 200, answer.text

    await stack.events_of("order.expired", order_id=expiring["order_id"], timeout=30)
    await stack.events_of("order.canceled", order_id=canceled["order_id"])
    await stack.settle()
    for intent_id in (expiring_intent["payment_intent_id"], canceled_intent):
        assert (await stack.payment(intent_id))["status"] == "CANCELED"
        assert (await stack.stripe_intent(intent_id))["status"] == "canceled"
        # The payer comes too late: Stripe refuses, and nothing is published.
        refused = await stack.confirm(intent_id, "pm_card_visa")
        assert isinstance(refused, CallRefused), refused
    await asyncio.sleep(1.5)
    await stack.settle()
    for order in (expiring, canceled):
        assert not stack.events("payment.completed", order_id=order["order_id"])
        assert not stack.events("payment.failed", order_id=order["order_id"])
        assert not stack.dead_letters_of(order["order_id"].encode())
    assert (await stack.order(expiring["order_id"]))["status"] == "EXPIRED"
    assert (await stack.order(canceled["order_id"]))["status"] == "CANCELED"


async def test_a_declined_retry_is_reported_once(payment_stack: PaymentStack) -> None:
    """A retry Stripe declines is announced once: by Stripe's payment_failed webhook, not also by the retry.

    With orders in the same worker a card_declined failure cancels the
    order, and its order.canceled usually cancels the payment before
    localstripe's webhook (sent 1 s later) arrives, which would hide a second
    announcement.  Here the order service is elsewhere (order.created is
    written to its topic as the order service would), so the payment stays
    FAILED after the declined retry, as it does in production for a retry
    declined for insufficient funds again, and the webhook's fact meets an
    open payment.
    """
    stack = payment_stack
    user_id, order_id = user(), str(uuid.uuid4())
    stack.writer.send("order.created", contracts.payload(
        "order.created", order_id=order_id, user_id=user_id, order_type="ONE_TIME", total_amount=3900,
        currency="EUR", items=[{"product_id": "sku-retry", "quantity": 1, "unit_amount": 3900}]),
        producer="order_service")
    [created] = await stack.events_of("payment.intent.created", order_id=order_id)
    intent_id = created["payment_intent_id"]
    await stack.deliver(insufficient_funds_event(intent_id, amount=3900, order_id=order_id, user_id=user_id,
                                                 payment_method="pm_card_chargeCustomerFail"))
    await stack.events_of("payment.failed", order_id=order_id)
    await stack.settle()
    stack.writer.send("wallet.balance_changed", {
        "user_id": user_id, "wallet_id": f"w-{user_id}", "balance_amount": 9000, "delta_amount": 5000,
        "currency": "EUR", "transaction_id": None})

    async def webhook_stored() -> bool:
        types = [dict(r.headers)["stripe.type"] for r in await stack.stripe_records()
                 if r.key == intent_id.encode()]
        return types.count(b"payment_intent.payment_failed") == 2  # ours, then localstripe's

    await wait_until(webhook_stored, timeout=20, what="localstripe's payment_failed webhook stored")
    await stack.settle()
    failures = stack.events("payment.failed", order_id=order_id)
    assert [e["error_code"] for e in failures] == ["insufficient_funds", "card_declined"], failures
    stored = [r for r in await stack.stripe_records() if r.key == intent_id.encode()]
    stripe_ids = [json.loads(r.value)["id"] for r in stored]
    assert [e["event_id"] for e in failures] == [fact_event_id("payment.failed", i) for i in stripe_ids]
    payment = await stack.payment(intent_id)
    assert (payment["status"], payment["failure_code"], payment["attempts"]) == ("FAILED", "card_declined", 2)


async def test_a_changed_order_total_reaches_the_intent_before_the_payer_pays(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order, intent_id = await stack.open_payment(user(), 2000)
    order_id = order["order_id"]
    items = [{"product_id": "sku-pay", "quantity": 3, "unit_amount": 1100}]
    answer = await stack.api.patch(f"/orders/{order_id}", json={"items": items},
                                   headers={"Idempotency-Key": uuid.uuid4().hex})
    assert answer.status_code == 200, answer.text
    await stack.events_of("order.updated", order_id=order_id)
    await stack.settle()  # the payment service brought the intent in line
    assert int((await stack.stripe_intent(intent_id))["amount"]) == 3300
    assert (await stack.payment(intent_id))["amount"] == 3300

    confirmed = await stack.confirm(intent_id, "pm_card_visa")
    assert not isinstance(confirmed, CallRefused) and confirmed["amount"] == 3300
    [completed] = await stack.events_of("payment.completed", order_id=order_id)
    assert (completed["amount"], completed["payment_intent_id"]) == (3300, intent_id)
    [finished] = await stack.events_of("order.completed", order_id=order_id)
    assert finished["total_amount"] == 3300
    await stack.settle()
    assert not stack.dead_letters_of(order_id.encode())
    assert [i["id"] for i in (await stack.stripe_intents_by_order([order_id]))[order_id]] == [intent_id]
