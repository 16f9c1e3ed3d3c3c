"""What the gateway sends in Stripe's own dialect (``stand_in=False``), request by request.

The integration tests run the gateway against localstripe, which is a
stand-in: there the gateway leaves out what localstripe does not know.  The
requests it makes of api.stripe.com itself (``proration_behavior``, the
invoice's collection parameters, finalize then pay, ``expand``) are checked
here against a local aiohttp server that records each request and answers
with Stripe-shaped objects from ``tests/fixtures/stripe``.  It is a recorder,
not Stripe: these tests say what is asked, not what Stripe would do.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from connectors.stripe_gateway import GatewayOptions, StripeGateway
from streams.kernel import CallRefused
from tables.aggregate import Call
from tables.stripe_objects import invoice_view, subscription_view

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe"


def fixture_object(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"docs_{name}.json").read_bytes())["data"]["object"]


SUBSCRIPTION = fixture_object("customer_subscription_updated_2025")
SUB_ID = SUBSCRIPTION["id"]
ITEM_ID = SUBSCRIPTION["items"]["data"][0]["id"]
INVOICE = fixture_object("invoice_paid_2025")
INVOICE_ID = INVOICE["id"]


@dataclass
class Recorded:
    method: str
    path: str
    form: dict[str, str]
    query: dict[str, str]
    idempotency_key: str | None


@dataclass
class Recorder:
    """The server's state: requests seen, and how ``/pay`` answers."""

    requests: list[Recorded] = field(default_factory=list)
    decline_pay: bool = False
    finalized_status: str = "open"

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]


def invoice(status: str, **changes: Any) -> dict[str, Any]:
    value = copy.deepcopy(INVOICE)
    value.update(status=status, **changes)
    if status != "paid":
        value.update(amount_paid=0, amount_remaining=value["amount_due"])
    return value


def app_for(recorder: Recorder) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        recorder.requests.append(Recorded(request.method, request.path, form, dict(request.query),
                                          request.headers.get("Idempotency-Key")))
        path = request.path
        if path == f"/v1/subscriptions/{SUB_ID}":
            return web.json_response(SUBSCRIPTION)
        if path == "/v1/invoices" and request.method == "POST":
            return web.json_response(invoice("draft"))
        if path == "/v1/invoices":
            return web.json_response({"object": "list", "url": "/v1/invoices", "has_more": False, "data": [
                invoice("open", id="in_open", created=1764230500),
                invoice("paid", id="in_old", created=1764230000),
                invoice("paid", id="in_new", created=1764230400),
            ]})
        if path == f"/v1/invoices/{INVOICE_ID}/finalize":
            return web.json_response(invoice(recorder.finalized_status, due_date=1766822400))
        if path == f"/v1/invoices/{INVOICE_ID}/pay":
            if recorder.decline_pay:
                return web.json_response({"error": {
                    "type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
                    "message": "Your card has insufficient funds."}}, status=402)
            return web.json_response(invoice("paid"))
        if path == f"/v1/invoices/{INVOICE_ID}":
            return web.json_response(invoice("open", attempt_count=1))
        return web.json_response({"error": {"type": "invalid_request_error", "message": "no route"}},
                                 status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest_asyncio.fixture
async def recorder() -> AsyncIterator[Recorder]:
    yield Recorder()


@pytest_asyncio.fixture
async def gateway(recorder: Recorder) -> AsyncIterator[StripeGateway]:
    runner = web.AppRunner(app_for(recorder), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    options = GatewayOptions("sk_test_recorder", f"http://127.0.0.1:{port}", 0, 5.0, send_reasons=True,
                             stand_in=False)
    try:
        async with StripeGateway(options) as instance:
            yield instance
    finally:
        await runner.cleanup()


async def test_a_plan_change_keeps_the_item_and_sends_proration_behavior(
        gateway: StripeGateway, recorder: Recorder) -> None:
    view = await gateway.call(Call("stripe", "update_subscription", {
        "subscription_id": SUB_ID, "plan_id": "price_new", "proration_behavior": "create_prorations",
        "cancel_at_period_end": False, "metadata": {"tier": "pro"}}, "key-1"))
    assert view == subscription_view(SUBSCRIPTION)
    assert recorder.calls() == [("GET", f"/v1/subscriptions/{SUB_ID}"),
                                ("POST", f"/v1/subscriptions/{SUB_ID}")]
    update = recorder.requests[1]
    assert update.form == {
        "items[0][id]": ITEM_ID, "items[0][plan]": "price_new", "items[0][quantity]": "5",
        "proration_behavior": "create_prorations", "cancel_at_period_end": "false", "metadata[tier]": "pro"}
    assert update.idempotency_key == f"key-1:{ITEM_ID}"


async def test_a_cancel_at_period_end_alone_needs_no_read(gateway: StripeGateway, recorder: Recorder) -> None:
    await gateway.call(Call("stripe", "update_subscription",
                            {"subscription_id": SUB_ID, "cancel_at_period_end": True}, "key-2"))
    [update] = recorder.requests
    assert (update.method, update.form, update.idempotency_key) == (
        "POST", {"cancel_at_period_end": "true"}, "key-2")


async def test_an_invoice_to_charge_is_created_finalized_and_paid(
        gateway: StripeGateway, recorder: Recorder) -> None:
    view = await gateway.call(Call("stripe", "create_invoice", {
        "customer_id": "cus_1", "subscription_id": SUB_ID, "metadata": {"event_id": "e1"}}, "key-3"))
    assert view == invoice_view(invoice("paid"))
    assert recorder.calls() == [("POST", "/v1/invoices"), ("POST", f"/v1/invoices/{INVOICE_ID}/finalize"),
                                ("POST", f"/v1/invoices/{INVOICE_ID}/pay")]
    create, finalize, pay = recorder.requests
    assert create.form == {"customer": "cus_1", "subscription": SUB_ID, "metadata[event_id]": "e1",
                           "pending_invoice_items_behavior": "include", "auto_advance": "true",
                           "collection_method": "charge_automatically"}
    assert [r.idempotency_key for r in recorder.requests] == ["key-3", "key-3:finalize", "key-3:pay"]
    assert finalize.form == {} and pay.form == {}


async def test_an_invoice_to_send_is_finalized_with_its_due_date_and_not_charged(
        gateway: StripeGateway, recorder: Recorder) -> None:
    view = await gateway.call(Call("stripe", "create_invoice",
                                   {"customer_id": "cus_1", "days_until_due": 14}, "key-4"))
    assert (view["status"], view["due_date"]) == ("open", 1766822400_000)
    assert recorder.calls() == [("POST", "/v1/invoices"), ("POST", f"/v1/invoices/{INVOICE_ID}/finalize")]
    assert recorder.requests[0].form == {
        "customer": "cus_1", "pending_invoice_items_behavior": "include", "auto_advance": "true",
        "collection_method": "send_invoice", "days_until_due": "14"}


async def test_a_declined_invoice_payment_is_answered_with_the_open_invoice(
        gateway: StripeGateway, recorder: Recorder) -> None:
    recorder.decline_pay = True
    view = await gateway.call(Call("stripe", "create_invoice", {"customer_id": "cus_1"}, "key-5"))
    assert (view["status"], view["attempt_count"], view["amount_paid"]) == ("open", 1, 0)
    assert recorder.calls()[-1] == ("GET", f"/v1/invoices/{INVOICE_ID}")


async def test_an_invoice_with_nothing_due_is_not_charged(gateway: StripeGateway, recorder: Recorder) -> None:
    recorder.finalized_status = "paid"  # Stripe marks a 0.00 invoice paid when it finalizes it
    view = await gateway.call(Call("stripe", "create_invoice", {"customer_id": "cus_1"}, "key-9"))
    assert view["status"] == "paid"
    assert recorder.calls() == [("POST", "/v1/invoices"), ("POST", f"/v1/invoices/{INVOICE_ID}/finalize")]


async def test_invoice_reads_expand_the_payments(gateway: StripeGateway, recorder: Recorder) -> None:
    await gateway.call(Call("stripe", "retrieve_invoice", {"invoice_id": INVOICE_ID}, "key-6"))
    latest = await gateway.call(Call("stripe", "latest_paid_invoice", {"subscription_id": SUB_ID}, "key-7"))
    assert latest["invoice_id"] == "in_new"  # the newest paid one, not the newer open one
    retrieve, listing = recorder.requests
    assert retrieve.query == {"expand[0]": "payments"}
    assert listing.query == {"subscription": SUB_ID, "limit": "100", "expand[0]": "data.payments"}


async def test_a_refund_by_charge_sends_the_charge_only(gateway: StripeGateway, recorder: Recorder) -> None:
    with pytest.raises(CallRefused):  # the recorder has no refunds: 404
        await gateway.call(Call("stripe", "create_refund", {"charge": "ch_1", "amount": 300,
                                                            "reason": "requested_by_customer"}, "key-8"))
    [refund] = recorder.requests
    assert refund.path == "/v1/refunds"
    assert refund.form == {"charge": "ch_1", "amount": "300", "reason": "requested_by_customer",
                           "metadata[reason]": "requested_by_customer"}
