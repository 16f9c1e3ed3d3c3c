"""The subscription handlers end to end, each with its effect checked at localstripe.

``handle_user_upgraded`` (the plan moved at Stripe, prorated),
``handle_wallet_insufficient_funds`` (past due in paystream, Stripe left
alone: why, in :mod:`tables.subscription_state`),
``handle_subscription_usage_exceeded`` (an overage invoice item and invoice at
Stripe -> ``invoice.created``), and ``subscription.expired`` from the
deadline of a subscription set to end.  (``handle_user_deleted`` is in
``test_subscription_flow.py``.)  Inbound events are written to the stack's
topics as their producers would; Stripe facts localstripe never sends
(``customer.subscription.updated``) are posted signed, in Stripe's shape.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from streams.devtools.localstripe import LocalStripe
from tables.invoice_state import fact_event_id as invoice_fact_event_id
from tables.subscription_state import fact_event_id
from tests.integration.payment_support import stripe_event
from tests.integration.pipeline_support import wait_until
from tests.integration.subscription_support import SubscriptionStack, subscription_stack

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def subs(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SubscriptionStack]:
    state: Path = tmp_path_factory.mktemp("subscription-handlers")
    async with subscription_stack(kafka_bootstrap, registry_url, localstripe, state,
                                  "sub-handlers") as stack:
        yield stack


def user() -> str:
    return f"u-subh-{uuid.uuid4().hex[:8]}"


async def test_user_upgraded_moves_the_subscription_to_the_new_plan_with_proration(
        subs: SubscriptionStack) -> None:
    buyer = user()
    view = await subs.subscribed(buyer, "plan-basic")
    sub_id = view["subscription_id"]
    await subs.wait_indexed(buyer, sub_id)
    writer = subs.stack.writer
    writer.send("user.upgraded", {"user_id": buyer, "old_tier": "basic", "new_tier": "pro",
                                  "plan_id": "plan-pro"}, producer="account_service")
    [updated] = await subs.events_of("subscription.updated", subscription_id=sub_id)
    assert (updated["old_plan"], updated["new_plan"], updated["status"]) == (
        "plan-basic", "plan-pro", "ACTIVE")
    stripe_sub = await subs.stripe_get(f"/v1/subscriptions/{sub_id}")
    assert stripe_sub["items"]["data"][0]["plan"]["id"] == "plan-pro"
    # Stripe's proration: a pending credit for the unused time of the old plan.
    items = (await subs.stripe_get("/v1/invoiceitems", customer=view["customer_id"]))["data"]
    assert [i for i in items if i.get("proration") and i["amount"] < 0], items
    row = await subs.subscription(sub_id)
    assert (row["plan_id"], row["amount"]) == ("plan-pro", 2999)

    writer.replay([writer.last()])
    await subs.settle()
    assert len(subs.events("subscription.updated", subscription_id=sub_id)) == 1
    assert subs.stack.dead_letters_of(sub_id.encode()) == []


async def test_wallet_insufficient_funds_marks_the_subscription_past_due(subs: SubscriptionStack) -> None:
    buyer = user()
    view = await subs.subscribed(buyer, "plan-basic")
    sub_id = view["subscription_id"]
    await subs.wait_indexed(buyer, sub_id)
    subs.stack.writer.send("wallet.insufficient_funds", {
        "user_id": buyer, "wallet_id": f"w-{buyer}", "required_amount": 999, "available_amount": 10,
        "currency": "EUR", "subscription_id": None, "order_id": None}, producer="wallet_service")
    [updated] = await subs.events_of("subscription.updated", subscription_id=sub_id)
    assert (updated["old_plan"], updated["new_plan"], updated["status"]) == (
        "plan-basic", "plan-basic", "PAST_DUE")
    assert (await subs.subscription(sub_id))["status"] == "past_due"
    # Stripe is not asked to pause: its own dunning still decides.
    stripe_sub = await subs.stripe_get(f"/v1/subscriptions/{sub_id}")
    assert stripe_sub["status"] == "active" and not stripe_sub.get("pause_collection")


async def test_usage_exceeded_bills_the_overage_at_stripe_and_announces_the_invoice(
        subs: SubscriptionStack) -> None:
    buyer = user()
    view = await subs.subscribed(buyer, "plan-basic")
    sub_id = view["subscription_id"]
    writer = subs.stack.writer
    usage = writer.send("subscription.usage_exceeded", {
        "subscription_id": sub_id, "user_id": buyer, "metric": "api_calls", "usage": 12_000,
        "usage_limit": 10_000, "overage_amount": 450, "currency": "EUR"}, producer="product_service")

    async def overage_invoice() -> dict[str, Any] | None:
        listed = (await subs.stripe_get("/v1/invoices", customer=view["customer_id"]))["data"]
        billed = [i for i in listed if i["id"] != view["latest_invoice_id"]]
        return billed[0] if billed else None

    invoice = await _wait(overage_invoice, "the overage invoice at localstripe")
    lines = (await subs.stripe_get(f"/v1/invoices/{invoice['id']}/lines"))["data"]
    assert 450 in [line["amount"] for line in lines], lines
    [created] = await subs.events_of("invoice.created", invoice_id=invoice["id"], timeout=60.0)
    assert created["event_id"] == invoice_fact_event_id("invoice.created", invoice["id"])
    assert (created["user_id"], created["subscription_id"], created["currency"]) == (buyer, sub_id, "EUR")

    writer.replay([writer.last()])
    writer.send_event({**usage})  # the same event (same id) sent again by its producer
    await subs.settle()
    listed = (await subs.stripe_get("/v1/invoices", customer=view["customer_id"]))["data"]
    assert len(listed) == 2, [i["id"] for i in listed]
    assert len(subs.events("invoice.created", invoice_id=invoice["id"])) == 1
    assert subs.stack.dead_letters_of(sub_id.encode()) == []


async def test_a_subscription_set_to_end_expires_once_at_its_period_end(subs: SubscriptionStack) -> None:
    buyer = user()
    view = await subs.subscribed(buyer, "plan-basic")
    sub_id = view["subscription_id"]
    answer = await subs.api.post(f"/subscriptions/{sub_id}/cancel", json={"at_period_end": True})
    assert answer.status_code == 200 and answer.json()["cancel_at_period_end"] is True, answer.text
    assert (await subs.stripe_get(f"/v1/subscriptions/{sub_id}"))["cancel_at_period_end"] is True
    # Stripe's periods are a month long; its customer.subscription.updated (which localstripe
    # never sends) reports this period ending in a few seconds.
    now = int(time.time())
    end = now + 3
    event = stripe_event("customer_subscription_updated", created=now)
    obj = event["data"]["object"]
    obj.update({"id": sub_id, "customer": view["customer_id"], "status": "active",
                "metadata": {"user_id": buyer}, "cancel_at_period_end": True,
                "cancel_at": end, "canceled_at": now, "ended_at": None,
                "current_period_start": end - 30 * 86_400, "current_period_end": end})
    _set_plan(obj, "plan-basic", end)
    event["data"]["previous_attributes"] = {"current_period_end": now + 30 * 86_400}
    await subs.stack.deliver(event)

    async def period_ending() -> bool:
        row = await subs.subscription(sub_id)
        return row["current_period_end"] == end * 1000 and row["cancel_at_period_end"] is True

    await wait_until(period_ending, timeout=30.0, what="the webhook's period end in the row")
    [expired] = await subs.events_of("subscription.expired", subscription_id=sub_id, timeout=60.0)
    assert expired["event_id"] == fact_event_id("subscription.expired", sub_id)
    assert int(expired["expiration_date"].timestamp()) == end
    assert (expired["user_id"], expired["plan_id"]) == (buyer, "plan-basic")
    assert time.time() >= end
    await asyncio.sleep(3.0)
    await subs.settle()
    assert len(subs.events("subscription.expired", subscription_id=sub_id)) == 1
    row = await subs.subscription(sub_id)
    assert row["expired"] is True and row["quantity"] == 1
    # Nothing but the period moved: no subscription.updated (localstripe's own created webhook,
    # of the same second maybe, does not move the row back either).
    assert subs.events("subscription.updated", subscription_id=sub_id) == []


def _set_plan(obj: dict[str, Any], plan_id: str, period_end: int) -> None:
    """The fixture's one item on ``plan_id`` (its price id too), with the period on it as well."""
    items = obj.get("items") or {"data": [{}]}
    item = items["data"][0]
    item["quantity"] = 1
    for field in ("price", "plan"):
        if isinstance(item.get(field), dict):
            item[field] = {**item[field], "id": plan_id, "unit_amount": 999, "amount": 999,
                           "currency": "eur"}
    if "current_period_end" in item:
        item["current_period_end"] = period_end
        item["current_period_start"] = period_end - 30 * 86_400
    obj["items"] = items


async def _wait(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} not there within {timeout}s")
