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
