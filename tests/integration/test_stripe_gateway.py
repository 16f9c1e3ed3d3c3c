"""The Stripe adapter against a real localstripe (no mocks): payments, refunds, cancels, errors.

Each test uses idempotency keys and metadata of its own, so all share the
session's localstripe.  Where localstripe differs from Stripe the test says
so and asserts what localstripe does, so a change in it shows up here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import stripe
from aiohttp import web

from connectors.stripe_gateway import (
    GatewayOptions,
    StripeConfigError,
    StripeCredentialsRejected,
    StripeGateway,
    StripeUnavailable,
)
from streams.devtools.localstripe import LocalStripe, free_port
from streams.kernel import CallRefused, transient
from tables.aggregate import Call
from tests.integration.stripe_support import (  # noqa: F401  (fixtures)
    TEST_API_KEY,
    gateway_settings,
    localstripe,
    stripe_gateway,
)

INTENT_KEYS = {"id", "status", "amount", "currency", "client_secret", "latest_charge", "last_payment_error"}


def key(label: str) -> str:
    return f"test-{label}-{uuid.uuid4().hex}"


def stripe_call(operation: str, idempotency_key: str | None = None, **args: Any) -> Call:
    return Call("stripe", operation, args, idempotency_key or key(operation))


def order_metadata() -> dict[str, str]:
    return {"order_id": f"ord-{uuid.uuid4().hex[:12]}", "user_id": f"usr-{uuid.uuid4().hex[:12]}"}


@pytest_asyncio.fixture
async def raw_client(localstripe: LocalStripe) -> AsyncIterator[stripe.StripeClient]:  # noqa: F811
    """A plain StripeClient, to look at what localstripe holds behind the adapter's back."""
    http = stripe.AIOHTTPClient()
    yield stripe.StripeClient(TEST_API_KEY, http_client=http, base_addresses={"api": localstripe.url})
    await http.close_async()


async def intents_of(client: stripe.StripeClient, order_id: str) -> list[Any]:
    listed = await client.v1.payment_intents.list_async({"limit": 100})
    found = [pi for pi in listed.data if pi.metadata.to_dict().get("order_id") == order_id]
    assert not listed.has_more
    return found


async def paid_intent(gateway: StripeGateway, amount: int = 1000) -> dict[str, Any]:
    intent = await gateway.call(stripe_call("create_payment_intent", amount=amount, currency="eur",
                                            metadata=order_metadata(), confirm=True,
                                            payment_method="pm_card_visa"))
    assert intent["status"] == "succeeded"
    return intent


async def test_a_confirmed_intent_with_a_good_card_succeeds(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient) -> None:  # noqa: F811
    metadata = order_metadata()
    intent = await stripe_gateway.call(stripe_call(
        "create_payment_intent", amount=1250, currency="EUR", metadata=metadata, confirm=True,
        payment_method="pm_card_visa"))
    assert set(intent) == INTENT_KEYS
    assert intent["status"] == "succeeded" and intent["amount"] == 1250 and intent["currency"] == "eur"
    assert intent["latest_charge"].startswith("ch_")  # an id, though localstripe inlines the charge
    assert intent["client_secret"].startswith(intent["id"] + "_secret_")
    stored = await raw_client.v1.payment_intents.retrieve_async(intent["id"])
    assert stored.metadata.to_dict() == metadata


async def test_a_declined_card_is_refused_with_card_declined_and_the_intent_waits_for_a_method(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient) -> None:  # noqa: F811
    with pytest.raises(CallRefused) as refused:
        await stripe_gateway.call(stripe_call("create_payment_intent", amount=900, currency="eur",
                                              metadata=order_metadata(), confirm=True,
                                              payment_method="pm_card_chargeCustomerFail"))
    assert refused.value.code == "card_declined"
    assert not transient(refused.value)
    # localstripe's 402 names the failed charge but not the intent (Stripe's names both).
    cause = refused.value.__cause__
    assert isinstance(cause, stripe.CardError)
    charge = await raw_client.v1.charges.retrieve_async(cause.json_body["error"]["charge"])
    assert charge.status == "failed" and charge.failure_code == "card_declined"
    retrieve = stripe_call("retrieve_payment_intent", payment_intent_id=charge.payment_intent)
    after = await stripe_gateway.call(retrieve)
    assert after["status"] == "requires_payment_method"
    assert after["last_payment_error"] == "card_declined"
    assert after["latest_charge"] == charge.id


async def test_the_same_key_twice_is_one_intent(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient) -> None:  # noqa: F811
    metadata = order_metadata()
    call = stripe_call("create_payment_intent", amount=500, currency="eur", metadata=metadata)
    first, again = await stripe_gateway.call(call), await stripe_gateway.call(call)
    assert again == first
    assert [pi.id for pi in await intents_of(raw_client, metadata["order_id"])] == [first["id"]]


async def test_concurrent_calls_with_one_key_are_one_intent(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient) -> None:  # noqa: F811
    metadata = order_metadata()
    call = stripe_call("create_payment_intent", amount=500, currency="eur", metadata=metadata)
    answers = await asyncio.gather(*(stripe_gateway.call(call) for _ in range(5)))
    assert len({a["id"] for a in answers}) == 1
    assert len(await intents_of(raw_client, metadata["order_id"])) == 1


async def test_a_replayed_decline_is_the_same_refusal_and_no_second_charge(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient) -> None:  # noqa: F811
    metadata = order_metadata()
    call = stripe_call("create_payment_intent", amount=900, currency="eur", metadata=metadata, confirm=True,
                       payment_method="pm_card_chargeCustomerFail")
    for _ in range(2):
        with pytest.raises(CallRefused) as refused:
            await stripe_gateway.call(call)
        assert refused.value.code == "card_declined"
    assert len(await intents_of(raw_client, metadata["order_id"])) == 1


async def test_the_same_key_with_other_parameters_is_refused(stripe_gateway: StripeGateway) -> None:  # noqa: F811
    idempotency_key = key("reuse")
    await stripe_gateway.call(stripe_call("create_payment_intent", idempotency_key, amount=500,
                                          currency="eur", metadata=order_metadata()))
    with pytest.raises(CallRefused) as refused:
        await stripe_gateway.call(stripe_call("create_payment_intent", idempotency_key, amount=700,
                                              currency="eur", metadata=order_metadata()))
    assert refused.value.code == "idempotency_error"


async def test_bare_localstripe_ignores_idempotency_keys() -> None:
    """Why the runner adds Stripe's idempotency: localstripe 1.15.10 alone runs a replay again."""
    with LocalStripe(idempotency=False) as bare:
        async with StripeGateway.from_settings(gateway_settings(bare.url)) as gateway:
            call = stripe_call("create_payment_intent", amount=500, currency="eur", metadata=order_metadata())
            first, again = await gateway.call(call), await gateway.call(call)
    assert first["id"] != again["id"]


async def test_a_partial_then_the_rest_refunded(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient) -> None:  # noqa: F811
    intent = await paid_intent(stripe_gateway, 1000)
    partial = await stripe_gateway.call(stripe_call(
        "create_refund", payment_intent_id=intent["id"], amount=300, reason="requested_by_customer",
        metadata={"order_id": "o-1", "refund_request": "r-1"}))
    assert partial == {"id": partial["id"], "status": "succeeded", "amount": 300, "currency": "eur",
                       "payment_intent": intent["id"], "charge": intent["latest_charge"]}
    rest = await stripe_gateway.call(stripe_call("create_refund", payment_intent_id=intent["id"], amount=700,
                                                 metadata={"order_id": "o-1"}))
    assert rest["status"] == "succeeded" and rest["amount"] == 700
    charge = await raw_client.v1.charges.retrieve_async(intent["latest_charge"])
    assert (charge.amount_refunded, charge.refunded) == (1000, True)
    stored = await raw_client.v1.refunds.retrieve_async(partial["id"])
    # localstripe refuses Stripe's `reason` parameter; the adapter keeps the reason in metadata.
    assert stored.metadata.to_dict() == {"order_id": "o-1", "refund_request": "r-1",
                                         "reason": "requested_by_customer"}


async def test_a_refund_without_amount_on_localstripe_refunds_the_whole_charge_again(
        stripe_gateway: StripeGateway) -> None:  # noqa: F811
    """Stripe refunds what is left; localstripe refunds the charge's full amount every time."""
    intent = await paid_intent(stripe_gateway, 1000)
    await stripe_gateway.call(stripe_call("create_refund", payment_intent_id=intent["id"], amount=400))
    rest = await stripe_gateway.call(stripe_call("create_refund", payment_intent_id=intent["id"]))
    assert rest["amount"] == 1000


async def test_a_replayed_refund_is_one_refund(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient) -> None:  # noqa: F811
    intent = await paid_intent(stripe_gateway, 1000)
    call = stripe_call("create_refund", payment_intent_id=intent["id"], amount=250,
                       metadata={"order_id": "o"})
    first, again = await stripe_gateway.call(call), await stripe_gateway.call(call)
    assert again == first
    refunds = await raw_client.v1.refunds.list_async({"payment_intent": intent["id"]})
    assert [r.id for r in refunds.data] == [first["id"]]


async def test_an_over_refund_is_not_refused_by_localstripe(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient) -> None:  # noqa: F811
    """Stripe refuses a refund above what is left (400); localstripe 1.15.10 accepts it.

    So the payment aggregate must refuse over-refunds itself, before it calls.
    """
    intent = await paid_intent(stripe_gateway, 1000)
    over = await stripe_gateway.call(stripe_call("create_refund", payment_intent_id=intent["id"],
                                                 amount=5000))
    assert over["status"] == "succeeded" and over["amount"] == 5000
    charge = await raw_client.v1.charges.retrieve_async(intent["latest_charge"])
    assert charge.amount_refunded == 5000


async def test_a_refund_of_a_declined_payment_is_refused(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient) -> None:  # noqa: F811
    with pytest.raises(CallRefused) as declined:
        await stripe_gateway.call(stripe_call("create_payment_intent", amount=900, currency="eur",
                                              confirm=True, payment_method="pm_card_chargeCustomerFail"))
    cause = declined.value.__cause__
    assert isinstance(cause, stripe.CardError)
    charge = await raw_client.v1.charges.retrieve_async(cause.json_body["error"]["charge"])
    intent_id = charge.payment_intent
    with pytest.raises(CallRefused) as refused:
        await stripe_gateway.call(stripe_call("create_refund", payment_intent_id=intent_id, amount=100))
    assert refused.value.code == "invalid_request_error"  # localstripe: no code; message says why
    assert "Cannot refund a failed payment" in str(refused.value)


async def test_an_open_intent_is_canceled_once(stripe_gateway: StripeGateway) -> None:  # noqa: F811
    intent = await stripe_gateway.call(stripe_call("create_payment_intent", amount=300, currency="eur",
                                                   metadata=order_metadata()))
    assert intent["status"] == "requires_payment_method" and intent["latest_charge"] is None
    cancel = stripe_call("cancel_payment_intent", payment_intent_id=intent["id"],
                         cancellation_reason="abandoned")  # not sent to localstripe
    assert await stripe_gateway.call(cancel) == {"id": intent["id"], "status": "canceled"}
    assert await stripe_gateway.call(cancel) == {"id": intent["id"], "status": "canceled"}  # a replay
    with pytest.raises(CallRefused):  # a new cancel of a canceled intent is a new request: refused
        await stripe_gateway.call(stripe_call("cancel_payment_intent", payment_intent_id=intent["id"]))


async def test_an_open_intent_follows_its_orders_new_amount(stripe_gateway: StripeGateway) -> None:  # noqa: F811
    intent = await stripe_gateway.call(stripe_call("create_payment_intent", amount=1000, currency="eur",
                                                   metadata=order_metadata()))
    updated = await stripe_gateway.call(stripe_call("update_payment_intent", payment_intent_id=intent["id"],
                                                    amount=2500, currency="EUR"))
    assert (updated["id"], updated["amount"], updated["currency"]) == (intent["id"], 2500, "eur")
    paid = await stripe_gateway.call(stripe_call("confirm_payment_intent", payment_intent_id=intent["id"],
                                                 payment_method="pm_card_visa"))
    assert (paid["status"], paid["amount"]) == ("succeeded", 2500)


async def test_cancelling_a_succeeded_intent_is_refused(stripe_gateway: StripeGateway) -> None:  # noqa: F811
    intent = await paid_intent(stripe_gateway)
    with pytest.raises(CallRefused) as refused:
        await stripe_gateway.call(stripe_call("cancel_payment_intent", payment_intent_id=intent["id"]))
    # Stripe: payment_intent_unexpected_state; localstripe: 400 "Bad request" without a code.
    assert refused.value.code == "invalid_request_error"
    assert not transient(refused.value)


async def test_localstripe_refuses_stripe_optional_reasons(localstripe: LocalStripe) -> None:  # noqa: F811
    """Why the adapter sends ``cancellation_reason``/``reason`` only to Stripe itself."""
    options = GatewayOptions(TEST_API_KEY, localstripe.url, 0, 10.0, send_reasons=True)
    async with StripeGateway(options) as gateway:
        intent = await gateway.call(stripe_call("create_payment_intent", amount=300, currency="eur"))
        with pytest.raises(CallRefused, match="Unexpected cancellation_reason"):
            await gateway.call(stripe_call("cancel_payment_intent", payment_intent_id=intent["id"],
                                           cancellation_reason="abandoned"))
        paid = await paid_intent(gateway)
        with pytest.raises(CallRefused, match="Unexpected reason"):
            await gateway.call(stripe_call("create_refund", payment_intent_id=paid["id"], amount=100,
                                           reason="requested_by_customer"))


async def test_the_user_confirms_a_server_created_intent(stripe_gateway: StripeGateway) -> None:  # noqa: F811
    intent = await stripe_gateway.call(stripe_call("create_payment_intent", amount=2500, currency="usd",
                                                   metadata=order_metadata()))
    assert intent["status"] == "requires_payment_method"
    confirm = stripe_call("confirm_payment_intent", payment_intent_id=intent["id"],
                          payment_method="pm_card_visa")
    confirmed = await stripe_gateway.call(confirm)
    assert confirmed["status"] == "succeeded" and confirmed["latest_charge"].startswith("ch_")
    assert confirmed["id"] == intent["id"]


async def test_a_declined_confirm_cannot_be_retried_on_localstripe(stripe_gateway: StripeGateway) -> None:  # noqa: F811
    """Stripe lets the customer try another card on the same intent; localstripe answers 400."""
    intent = await stripe_gateway.call(stripe_call("create_payment_intent", amount=900, currency="eur",
                                                   metadata=order_metadata()))
    with pytest.raises(CallRefused) as declined:
        await stripe_gateway.call(stripe_call("confirm_payment_intent", payment_intent_id=intent["id"],
                                              payment_method="pm_card_chargeCustomerFail"))
    assert declined.value.code == "card_declined"
    view = await stripe_gateway.call(stripe_call("retrieve_payment_intent", payment_intent_id=intent["id"]))
    assert (view["status"], view["last_payment_error"]) == ("requires_payment_method", "card_declined")
    with pytest.raises(CallRefused) as again:
        await stripe_gateway.call(stripe_call("confirm_payment_intent", payment_intent_id=intent["id"],
                                              payment_method="pm_card_visa"))
    assert again.value.code == "invalid_request_error"


async def test_an_unknown_intent_is_refused(stripe_gateway: StripeGateway) -> None:  # noqa: F811
    with pytest.raises(CallRefused) as refused:
        await stripe_gateway.call(stripe_call("retrieve_payment_intent", payment_intent_id="pi_doesnotexist"))
    assert refused.value.code == "invalid_request_error"  # 404; Stripe's code would be resource_missing


async def test_stripe_down_is_transient() -> None:
    settings = gateway_settings(f"http://127.0.0.1:{free_port()}", stripe_max_network_retries=1)
    async with StripeGateway.from_settings(settings) as gateway:
        with pytest.raises(StripeUnavailable) as down:
            await gateway.call(stripe_call("create_payment_intent", amount=500, currency="eur"))
    assert transient(down.value)


async def test_a_slow_stripe_times_out_as_transient() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/payment_intents", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        settings = gateway_settings(f"http://127.0.0.1:{port}", stripe_max_network_retries=0,
                                    stripe_timeout_seconds=0.3)
        async with StripeGateway.from_settings(settings) as gateway:
            started = asyncio.get_running_loop().time()
            with pytest.raises(StripeUnavailable) as slow_answer:
                await gateway.call(stripe_call("create_payment_intent", amount=500, currency="eur"))
            assert asyncio.get_running_loop().time() - started < 3
        assert transient(slow_answer.value)
    finally:
        await runner.cleanup()


async def test_a_rejected_key_holds_the_batch(localstripe: LocalStripe) -> None:  # noqa: F811
    # localstripe answers 401 to an sk_ key of 5 characters or fewer.
    async with StripeGateway(GatewayOptions("sk_xy", localstripe.url, 0, 10.0)) as gateway:
        with pytest.raises(StripeCredentialsRejected) as rejected:
            await gateway.call(stripe_call("create_payment_intent", amount=500, currency="eur"))
    assert transient(rejected.value)
    assert "sk_xy" not in str(rejected.value)


def test_a_missing_key_fails_before_any_call(localstripe: LocalStripe) -> None:  # noqa: F811
    with pytest.raises(StripeConfigError, match="STRIPE_API_KEY is not set"):
        StripeGateway.from_settings(gateway_settings(localstripe.url, stripe_api_key=""))


# --------------------------------------------------------------------------
# Customers, subscriptions and invoices (issue 9)

SUBSCRIPTION_KEYS = {
    "subscription_id", "customer_id", "user_id", "status", "plan_id", "quantity", "amount", "currency",
    "current_period_start", "current_period_end", "cancel_at_period_end", "cancel_at", "canceled_at",
    "ended_at", "latest_invoice_id", "metadata",
}


@pytest.fixture(scope="module")
def plans(localstripe: LocalStripe) -> dict[str, str]:  # noqa: F811
    """Two monthly EUR plans of this module's own (9.00 and 29.00), as an operator sets them up."""
    suffix = uuid.uuid4().hex[:8]
    return {"basic": localstripe.ensure_plan(f"plan_basic_{suffix}", 900, "eur", "month"),
            "pro": localstripe.ensure_plan(f"plan_pro_{suffix}", 2900, "EUR", "month")}


async def customer_with_card(gateway: StripeGateway, card: str = "pm_card_visa") -> tuple[str, str]:
    """A new customer (user id) with ``card`` as its invoices' payment method."""
    user_id = f"usr-{uuid.uuid4().hex[:12]}"
    customer = await gateway.call(stripe_call("create_customer", user_id=user_id,
                                              email=f"{user_id}@example.com"))
    await gateway.call(stripe_call("attach_payment_method", customer_id=customer["customer_id"],
                                   payment_method=card))
    return customer["customer_id"], user_id


async def subscribed(gateway: StripeGateway, plan_id: str, quantity: int = 1,
                     card: str = "pm_card_visa") -> dict[str, Any]:
    customer_id, user_id = await customer_with_card(gateway, card)
    return await gateway.call(stripe_call("create_subscription", customer_id=customer_id, plan_id=plan_id,
                                          quantity=quantity, metadata={"user_id": user_id}))


async def test_a_customer_with_a_card_subscribes_to_a_plan_and_pays_its_first_invoice(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient,  # noqa: F811
        plans: dict[str, str]) -> None:
    user_id = f"usr-{uuid.uuid4().hex[:12]}"
    customer = await stripe_gateway.call(stripe_call("create_customer", user_id=user_id))
    customer_id = customer["customer_id"]
    assert customer == {"customer_id": customer_id} and customer_id.startswith("cus_")
    attached = await stripe_gateway.call(stripe_call("attach_payment_method", customer_id=customer_id,
                                                     payment_method="pm_card_visa"))
    # Attaching a test token makes a payment method of its own (Stripe does the same).
    assert attached["customer_id"] == customer_id and attached["payment_method"].startswith("pm_")
    held = await raw_client.v1.customers.retrieve_async(customer_id)
    assert held.metadata.to_dict() == {"user_id": user_id}
    assert held.invoice_settings.default_payment_method == attached["payment_method"]

    view = await stripe_gateway.call(stripe_call("create_subscription", customer_id=customer_id,
                                                 plan_id=plans["basic"], quantity=2,
                                                 metadata={"user_id": user_id}))
    assert set(view) == SUBSCRIPTION_KEYS
    assert view["subscription_id"].startswith("sub_") and view["customer_id"] == customer_id
    assert (view["status"], view["plan_id"], view["quantity"]) == ("active", plans["basic"], 2)
    assert (view["amount"], view["currency"], view["user_id"]) == (1800, "EUR", user_id)
    assert view["current_period_end"] > view["current_period_start"] > 0
    assert view["cancel_at_period_end"] is False and view["ended_at"] is None
    first = await stripe_gateway.call(stripe_call("retrieve_invoice", invoice_id=view["latest_invoice_id"]))
    assert (first["status"], first["amount_paid"], first["subscription_id"]) == ("paid", 1800,
                                                                                 view["subscription_id"])
    assert first["payment_intent_id"].startswith("pi_") and first["charge_id"].startswith("ch_")
    again = await stripe_gateway.call(stripe_call("retrieve_subscription",
                                                  subscription_id=view["subscription_id"]))
    assert again == view


async def test_a_replayed_create_subscription_makes_one_subscription(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient,  # noqa: F811
        plans: dict[str, str]) -> None:
    customer_id, user_id = await customer_with_card(stripe_gateway)
    call = stripe_call("create_subscription", customer_id=customer_id, plan_id=plans["pro"],
                       metadata={"user_id": user_id})
    first, replay = await stripe_gateway.call(call), await stripe_gateway.call(call)
    assert replay["subscription_id"] == first["subscription_id"]
    listed = await raw_client.v1.subscriptions.list_async({"customer": customer_id})
    assert [s.id for s in listed.data] == [first["subscription_id"]]
    invoices = await raw_client.v1.invoices.list_async({"customer": customer_id})
    assert len(invoices.data) == 1  # charged once


async def test_a_declined_first_payment_leaves_the_subscription_incomplete_not_refused(
        stripe_gateway: StripeGateway, plans: dict[str, str]) -> None:  # noqa: F811
    view = await subscribed(stripe_gateway, plans["basic"], card="pm_card_chargeCustomerFail")
    assert view["status"] == "incomplete"
    invoice = await stripe_gateway.call(stripe_call("retrieve_invoice", invoice_id=view["latest_invoice_id"]))
    assert (invoice["status"], invoice["amount_paid"], invoice["amount_remaining"]) == ("open", 0, 900)


async def test_a_trial_subscription_has_no_invoice_and_no_paid_one(
        stripe_gateway: StripeGateway, plans: dict[str, str]) -> None:  # noqa: F811
    customer_id, user_id = await customer_with_card(stripe_gateway)
    view = await stripe_gateway.call(stripe_call("create_subscription", customer_id=customer_id,
                                                 plan_id=plans["basic"], metadata={"user_id": user_id},
                                                 trial_period_days=14))
    # Stripe: status trialing with a 0.00 invoice; localstripe makes no invoice and says incomplete.
    assert view["status"] == "incomplete" and view["latest_invoice_id"] is None
    assert await stripe_gateway.call(stripe_call("latest_paid_invoice",
                                                 subscription_id=view["subscription_id"])) == {}


async def test_a_plan_change_with_proration_keeps_the_subscription_and_a_replay_changes_nothing(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient,  # noqa: F811
        plans: dict[str, str]) -> None:
    view = await subscribed(stripe_gateway, plans["basic"], quantity=3)
    call = stripe_call("update_subscription", subscription_id=view["subscription_id"], plan_id=plans["pro"],
                       proration_behavior="create_prorations")
    changed = await stripe_gateway.call(call)
    assert changed["subscription_id"] == view["subscription_id"]
    assert (changed["plan_id"], changed["quantity"], changed["amount"]) == (plans["pro"], 3, 8700)
    assert changed["status"] == "active" and changed["current_period_end"] == view["current_period_end"]

    async def pending_items() -> list[Any]:
        listed = await raw_client.v1.invoice_items.list_async({"customer": view["customer_id"]})
        return [item for item in listed.data if item.invoice is None]

    # localstripe's proration: one pending credit of the whole last invoice (Stripe: the unused time).
    [credit] = await pending_items()
    assert (credit.amount, credit.description, credit.proration) == (-2700, "Unused time", True)
    assert await stripe_gateway.call(call) == changed  # the same call again (a replayed batch)
    assert len(await pending_items()) == 1
    quantity_only = await stripe_gateway.call(stripe_call(
        "update_subscription", subscription_id=view["subscription_id"], quantity=1,
        proration_behavior="none"))
    assert (quantity_only["plan_id"], quantity_only["quantity"], quantity_only["amount"]) == (plans["pro"], 1,
                                                                                              2900)


async def test_cancel_at_period_end_then_cancel_now(
        stripe_gateway: StripeGateway, plans: dict[str, str]) -> None:  # noqa: F811
    view = await subscribed(stripe_gateway, plans["basic"])
    at_end = await stripe_gateway.call(stripe_call(
        "update_subscription", subscription_id=view["subscription_id"], cancel_at_period_end=True,
        metadata={"reason": "user"}))
    assert at_end["cancel_at_period_end"] is True and at_end["status"] == "active"
    # Stripe merges the metadata given into the subscription's; localstripe ignores it on an update.
    assert at_end["ended_at"] is None and at_end["metadata"] == {"user_id": view["user_id"]}
    unchanged = await stripe_gateway.call(stripe_call("update_subscription",
                                                      subscription_id=view["subscription_id"]))
    assert unchanged == at_end

    cancel = stripe_call("cancel_subscription", subscription_id=view["subscription_id"], prorate=True,
                         invoice_now=False)
    canceled = await stripe_gateway.call(cancel)
    assert canceled["status"] == "canceled" and canceled["ended_at"] is not None
    # Again (a replayed batch, or the user cancelling twice): the canceled subscription, no error.
    assert await stripe_gateway.call(cancel) == canceled
    assert await stripe_gateway.call(stripe_call("cancel_subscription",
                                                 subscription_id=view["subscription_id"])) == canceled


async def test_an_overage_invoice_item_is_invoiced_and_charged(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient,  # noqa: F811
        plans: dict[str, str]) -> None:
    view = await subscribed(stripe_gateway, plans["basic"])
    item = await stripe_gateway.call(stripe_call(
        "create_invoice_item", customer_id=view["customer_id"], subscription_id=view["subscription_id"],
        amount=450, currency="EUR", description="usage over the plan", metadata={"event_id": "evt-usage-1"}))
    assert set(item) == {"invoice_item_id"} and item["invoice_item_id"].startswith("ii_")
    call = stripe_call("create_invoice", customer_id=view["customer_id"],
                       subscription_id=view["subscription_id"], metadata={"event_id": "evt-usage-1"},
                       days_until_due=30)
    invoice = await stripe_gateway.call(call)
    assert invoice["invoice_id"].startswith("in_") and invoice["invoice_id"] != view["latest_invoice_id"]
    assert invoice["customer_id"] == view["customer_id"]
    assert invoice["subscription_id"] == view["subscription_id"]
    assert (invoice["status"], invoice["currency"], invoice["amount_remaining"]) == ("paid", "EUR", 0)
    # localstripe bills the subscription's next period with the pending item (Stripe: the item only),
    # keeps no metadata and has no send_invoice collection (no due date).
    assert invoice["amount_paid"] == 900 + 450
    assert invoice["metadata"] == {} and invoice["due_date"] is None
    lines = await raw_client.v1.invoices.line_items.list_async(invoice["invoice_id"])
    assert sorted(line.amount for line in lines.data) == [450, 900]
    assert await stripe_gateway.call(call) == invoice  # replayed: the same invoice, charged once
    listed = await raw_client.v1.invoices.list_async({"customer": view["customer_id"]})
    assert len(listed.data) == 2


async def test_an_invoice_whose_charge_is_declined_is_answered_open(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient,  # noqa: F811
        plans: dict[str, str]) -> None:
    view = await subscribed(stripe_gateway, plans["basic"])
    await stripe_gateway.call(stripe_call("attach_payment_method", customer_id=view["customer_id"],
                                          payment_method="pm_card_chargeCustomerFail"))
    await stripe_gateway.call(stripe_call("create_invoice_item", customer_id=view["customer_id"],
                                          amount=300, currency="eur", description="overage"))
    invoice = await stripe_gateway.call(stripe_call("create_invoice", customer_id=view["customer_id"]))
    assert (invoice["status"], invoice["amount_paid"], invoice["amount_remaining"]) == ("open", 0, 1200)
    assert invoice["attempt_count"] == 1 and invoice["payment_intent_id"].startswith("pi_")
    intent = await raw_client.v1.payment_intents.retrieve_async(invoice["payment_intent_id"])
    assert intent.status == "requires_payment_method"


async def test_latest_paid_invoice_and_a_refund_by_its_charge(
        stripe_gateway: StripeGateway, raw_client: stripe.StripeClient,  # noqa: F811
        plans: dict[str, str]) -> None:
    view = await subscribed(stripe_gateway, plans["pro"])
    await stripe_gateway.call(stripe_call("create_invoice_item", customer_id=view["customer_id"],
                                          amount=100, currency="eur", description="overage"))
    second = await stripe_gateway.call(stripe_call("create_invoice", customer_id=view["customer_id"],
                                                   subscription_id=view["subscription_id"]))
    latest = await stripe_gateway.call(stripe_call("latest_paid_invoice",
                                                   subscription_id=view["subscription_id"]))
    # Both are paid and localstripe dates the second at the period's end: it is the newest.
    assert latest == second and latest["status"] == "paid"
    assert latest["charge_id"].startswith("ch_")

    refund = await stripe_gateway.call(stripe_call(
        "create_refund", charge=latest["charge_id"], amount=1000, reason="SUBSCRIPTION_PRORATION",
        metadata={"subscription_id": view["subscription_id"]}))
    assert (refund["status"], refund["amount"], refund["charge"]) == ("succeeded", 1000, latest["charge_id"])
    assert refund["payment_intent"] is None  # localstripe names only what it was given
    held = await raw_client.v1.refunds.retrieve_async(refund["id"])
    assert held.metadata.to_dict() == {"subscription_id": view["subscription_id"],
                                       "reason": "SUBSCRIPTION_PRORATION"}
    by_intent = await stripe_gateway.call(stripe_call(
        "create_refund", payment_intent=latest["payment_intent_id"], charge=latest["charge_id"], amount=200))
    assert by_intent["payment_intent"] == latest["payment_intent_id"]
    with pytest.raises(CallRefused) as neither:
        await stripe_gateway.call(stripe_call("create_refund", amount=100))
    assert neither.value.code == "missing_argument"


async def test_subscription_and_invoice_refusals(
        stripe_gateway: StripeGateway, plans: dict[str, str]) -> None:  # noqa: F811
    customer_id, user_id = await customer_with_card(stripe_gateway)
    with pytest.raises(CallRefused) as no_plan:
        await stripe_gateway.call(stripe_call("create_subscription", customer_id=customer_id,
                                              plan_id="plan_nobody_made", metadata={"user_id": user_id}))
    assert no_plan.value.code == "invalid_request_error" and not transient(no_plan.value)  # 404
    for operation, args in (("retrieve_subscription", {"subscription_id": "sub_doesnotexist"}),
                            ("cancel_subscription", {"subscription_id": "sub_doesnotexist"}),
                            ("retrieve_invoice", {"invoice_id": "in_doesnotexist"}),
                            ("latest_paid_invoice", {"subscription_id": "sub_doesnotexist"})):
        with pytest.raises(CallRefused) as missing:
            await stripe_gateway.call(stripe_call(operation, **args))
        assert missing.value.code == "invalid_request_error", operation
    with pytest.raises(CallRefused) as bad_behavior:
        await stripe_gateway.call(stripe_call("update_subscription", subscription_id="sub_x",
                                              proration_behavior="always_invoice"))
    assert bad_behavior.value.code == "invalid_argument"
    with pytest.raises(CallRefused) as no_user:
        await stripe_gateway.call(stripe_call("create_customer", email="x@example.com"))
    assert no_user.value.code == "missing_argument"
    with pytest.raises(CallRefused) as declined_attach:
        await stripe_gateway.call(stripe_call("attach_payment_method", customer_id=customer_id,
                                              payment_method="pm_card_visa_chargeDeclined"))
    assert not transient(declined_attach.value)
