"""Which webhooks localstripe sends for the payment and subscription flows, and in what shape.

The flow of the README: the worker creates a PaymentIntent for an order (no
payment method), the user confirms it with a test card.  localstripe signs
and sends ``payment_intent.succeeded`` or ``payment_intent.payment_failed``
(once each, about a second later, never retried), and nothing for the
creation, a cancel or a refund.  The bodies it sent are kept verbatim in
``tests/fixtures/stripe/localstripe/<type>.json``; these tests check that
localstripe still sends that shape.  Re-record them with
``PAYSTREAM_RECORD_STRIPE_FIXTURES=1``.

Subscriptions: a subscription paid by card sends ``invoice.created``,
``invoice.payment_succeeded`` and ``customer.subscription.created``; a cancel
sends ``customer.subscription.deleted``; a plan change or a cancel at the
period's end sends nothing (Stripe: ``customer.subscription.updated``).
``invoice.payment_failed`` comes only from a payment failing later (a SEPA
debit of Stripe's failing test IBAN), never from a declined card.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import stripe

from connectors.stripe_gateway import StripeGateway
from streams.devtools.localstripe import LocalStripe
from streams.kernel import CallRefused
from tables.aggregate import Call
from tables.stripe_events import CONSUMED_TYPES, event_from_dict, event_key
from tables.stripe_objects import invoice_view, subscription_view
from tests.integration.stripe_support import TEST_API_KEY, WebhookReceiver, gateway_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe" / "localstripe"
RECORD = os.environ.get("PAYSTREAM_RECORD_STRIPE_FIXTURES") == "1"
SECRET = "whsec_test_localstripe_webhooks"
#: localstripe waits 1 s before sending; anything not there after this never comes.
QUIET = 2.5


@pytest.fixture(scope="module")
def own_localstripe() -> Iterator[LocalStripe]:
    """A localstripe of this module's own: its webhooks go to this module's receivers only."""
    with LocalStripe() as runner:
        yield runner


@pytest_asyncio.fixture
async def receiver(own_localstripe: LocalStripe) -> AsyncIterator[WebhookReceiver]:
    hooks = await WebhookReceiver(SECRET).start()
    own_localstripe.register_webhook("paystream-tests", hooks.url, SECRET)  # replaces the last test's
    yield hooks
    await hooks.stop()


@pytest_asyncio.fixture
async def gateway(own_localstripe: LocalStripe) -> AsyncIterator[StripeGateway]:
    async with StripeGateway.from_settings(gateway_settings(own_localstripe.url)) as instance:
        yield instance


def call(operation: str, **args: Any) -> Call:
    return Call("stripe", operation, args, f"test-{operation}-{uuid.uuid4().hex}")


def metadata() -> dict[str, str]:
    return {"order_id": f"ord-{uuid.uuid4().hex[:12]}", "user_id": f"usr-{uuid.uuid4().hex[:12]}"}


def shape(value: Any) -> Any:
    """The keys of a JSON value, recursively (lists by their first element)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def check_fixture(event_type: str, body: bytes) -> None:
    path = FIXTURES / f"{event_type}.json"
    if RECORD:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    recorded = json.loads(path.read_bytes())
    assert shape(json.loads(body)) == shape(recorded), f"localstripe's {event_type} changed shape"


async def test_a_confirmed_intent_sends_payment_intent_succeeded_once(
        gateway: StripeGateway, receiver: WebhookReceiver) -> None:
    order = metadata()
    intent = await gateway.call(call("create_payment_intent", amount=1999, currency="eur", metadata=order))
    await gateway.call(call("confirm_payment_intent", payment_intent_id=intent["id"],
                            payment_method="pm_card_visa"))
    delivery = await receiver.wait_for("payment_intent.succeeded", intent["id"])
    await asyncio.sleep(QUIET)
    assert [d.event["type"] for d in receiver.deliveries
            if d.event["data"]["object"].get("id") == intent["id"]] == ["payment_intent.succeeded"]
    assert not receiver.rejected

    event = delivery.event
    assert event["id"].startswith("evt_") and event["object"] == "event" and event["livemode"] is False
    assert event["api_version"] == "2017-08-15"
    assert delivery.headers["Stripe-Signature"].startswith(f"t={event['created']},v1=")
    # Stripe's events also carry request {id, idempotency_key} and pending_webhooks.
    assert set(event) == {"api_version", "created", "data", "id", "livemode", "object", "type"}
    intent_object = event["data"]["object"]
    assert intent_object["status"] == "succeeded" and intent_object["amount"] == 1999
    assert intent_object["metadata"] == order
    assert intent_object["last_payment_error"] is None
    # Stripe sends latest_charge as an id; localstripe inlines the charge (and the old `charges` list).
    assert intent_object["latest_charge"]["id"].startswith("ch_")
    assert intent_object["latest_charge"]["status"] == "succeeded"
    assert intent_object["charges"]["data"][0]["id"] == intent_object["latest_charge"]["id"]
    assert intent_object["payment_method"] == "pm_card_visa"
    for stripe_field in ("amount_received", "canceled_at", "cancellation_reason", "payment_method_types"):
        assert stripe_field not in intent_object
    check_fixture("payment_intent.succeeded", delivery.body)


async def test_a_declined_confirm_sends_payment_intent_payment_failed_once(
        gateway: StripeGateway, receiver: WebhookReceiver) -> None:
    order = metadata()
    intent = await gateway.call(call("create_payment_intent", amount=900, currency="eur", metadata=order))
    with pytest.raises(CallRefused):
        await gateway.call(call("confirm_payment_intent", payment_intent_id=intent["id"],
                                payment_method="pm_card_chargeCustomerFail"))
    delivery = await receiver.wait_for("payment_intent.payment_failed", intent["id"])
    await asyncio.sleep(QUIET)
    assert [d.event["type"] for d in receiver.deliveries
            if d.event["data"]["object"].get("id") == intent["id"]] == ["payment_intent.payment_failed"]

    intent_object = delivery.event["data"]["object"]
    assert intent_object["status"] == "requires_payment_method"
    assert intent_object["metadata"] == order
    # Stripe's last_payment_error also has type "card_error", decline_code, payment_method.
    assert intent_object["last_payment_error"] == {
        "charge": intent_object["latest_charge"]["id"], "code": "card_declined",
        "message": "Your card was declined."}
    assert intent_object["latest_charge"]["status"] == "failed"
    check_fixture("payment_intent.payment_failed", delivery.body)


async def test_create_cancel_and_refund_send_nothing(
        gateway: StripeGateway, receiver: WebhookReceiver) -> None:
    opened = await gateway.call(call("create_payment_intent", amount=300, currency="eur",
                                     metadata=metadata()))
    await gateway.call(call("cancel_payment_intent", payment_intent_id=opened["id"]))
    paid = await gateway.call(call("create_payment_intent", amount=800, currency="eur", metadata=metadata(),
                                   confirm=True, payment_method="pm_card_visa"))
    await receiver.wait_for("payment_intent.succeeded", paid["id"])
    refund = await gateway.call(call("create_refund", payment_intent_id=paid["id"], amount=800))
    await asyncio.sleep(QUIET)
    about = {opened["id"], paid["id"], refund["id"], paid["latest_charge"]}
    sent = sorted(d.event["type"] for d in receiver.deliveries
                  if d.event["data"]["object"].get("id") in about)
    assert sent == ["payment_intent.succeeded"]
    assert not [d for d in receiver.deliveries if d.event["type"].startswith(("refund.", "charge."))]


# --------------------------------------------------------------------------
# Subscriptions and invoices

#: Stripe's test IBAN whose SEPA debit fails after a while (localstripe knows it too).
FAILING_IBAN = "DE62370400440532013001"


def about(receiver: WebhookReceiver, *object_ids: str) -> list[str]:
    """The types of the deliveries about these objects, in the order they came."""
    return [d.event["type"] for d in receiver.deliveries if d.event["data"]["object"].get("id") in object_ids]


async def test_a_subscription_sends_created_invoice_and_deleted_but_no_updated(
        own_localstripe: LocalStripe, gateway: StripeGateway, receiver: WebhookReceiver) -> None:
    plan = own_localstripe.ensure_plan("plan_webhooks_monthly", 1500, "eur", "month")
    user_id = f"usr-{uuid.uuid4().hex[:12]}"
    customer = await gateway.call(call("create_customer", user_id=user_id))
    await gateway.call(call("attach_payment_method", customer_id=customer["customer_id"],
                            payment_method="pm_card_visa"))
    view = await gateway.call(call("create_subscription", customer_id=customer["customer_id"], plan_id=plan,
                                   metadata={"user_id": user_id}))
    sub_id, invoice_id = view["subscription_id"], view["latest_invoice_id"]
    created = await receiver.wait_for("customer.subscription.created", sub_id)
    invoice_created = await receiver.wait_for("invoice.created", invoice_id)
    paid = await receiver.wait_for("invoice.payment_succeeded", invoice_id)
    await gateway.call(call("update_subscription", subscription_id=sub_id, quantity=2,
                            proration_behavior="create_prorations", cancel_at_period_end=True))
    await asyncio.sleep(QUIET)
    assert sorted(about(receiver, sub_id, invoice_id)) == [
        "customer.subscription.created", "invoice.created", "invoice.payment_succeeded"]
    await gateway.call(call("cancel_subscription", subscription_id=sub_id))
    deleted = await receiver.wait_for("customer.subscription.deleted", sub_id)
    await asyncio.sleep(QUIET)
    assert about(receiver, sub_id).count("customer.subscription.deleted") == 1
    assert not receiver.rejected

    # What paystream reads of them: the ingress stores them keyed by their object.
    for delivery in (created, invoice_created, paid, deleted):
        event = event_from_dict(delivery.event)
        assert event.type in CONSUMED_TYPES
        assert event_key(event) == (invoice_id if event.type.startswith("invoice.") else sub_id)
    assert subscription_view(created.event["data"]["object"])["status"] == "active"
    assert subscription_view(created.event["data"]["object"])["user_id"] == user_id
    assert subscription_view(deleted.event["data"]["object"])["status"] == "canceled"
    # invoice.created is sent while the invoice is a draft; payment_succeeded when it is paid.
    assert invoice_view(invoice_created.event["data"]["object"])["status"] == "draft"
    paid_view = invoice_view(paid.event["data"]["object"])
    assert (paid_view["status"], paid_view["amount_paid"]) == ("paid", 1500)
    assert paid_view["subscription_id"] == sub_id
    for event_type, delivery in (("customer.subscription.created", created),
                                 ("invoice.created", invoice_created), ("invoice.payment_succeeded", paid),
                                 ("customer.subscription.deleted", deleted)):
        check_fixture(event_type, delivery.body)


async def test_a_failing_sepa_debit_sends_invoice_payment_failed_then_deletes_the_subscription(
        own_localstripe: LocalStripe, gateway: StripeGateway, receiver: WebhookReceiver) -> None:
    plan = own_localstripe.ensure_plan("plan_webhooks_monthly", 1500, "eur", "month")
    http = stripe.AIOHTTPClient()
    try:
        raw = stripe.StripeClient(TEST_API_KEY, http_client=http, base_addresses={"api": own_localstripe.url})
        sepa = await raw.v1.payment_methods.create_async({"type": "sepa_debit",
                                                          "sepa_debit": {"iban": FAILING_IBAN}})
    finally:
        await http.close_async()
    user_id = f"usr-{uuid.uuid4().hex[:12]}"
    customer = await gateway.call(call("create_customer", user_id=user_id))
    await gateway.call(call("attach_payment_method", customer_id=customer["customer_id"],
                            payment_method=sepa.id))
    view = await gateway.call(call("create_subscription", customer_id=customer["customer_id"], plan_id=plan,
                                   metadata={"user_id": user_id}))
    # A SEPA debit is pending at first: localstripe starts the subscription active.
    assert view["status"] == "active"
    failed = await receiver.wait_for("invoice.payment_failed", view["latest_invoice_id"])
    await receiver.wait_for("customer.subscription.deleted", view["subscription_id"])
    failed_view = invoice_view(failed.event["data"]["object"])
    assert (failed_view["status"], failed_view["amount_paid"], failed_view["attempt_count"]) == ("open", 0, 1)
    assert failed_view["subscription_id"] == view["subscription_id"]
    check_fixture("invoice.payment_failed", failed.body)
