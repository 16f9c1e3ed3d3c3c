"""The subscription flow end to end: POST /subscriptions -> Stripe -> subscription.created -> the order.

Everything runs as deployed (:mod:`tests.integration.subscription_support`):
the worker (domains orders, payments, subscriptions) and the ingress are
subprocesses, Stripe is localstripe (whose signed ``customer.subscription.*``
and ``invoice.*`` webhooks reach the ingress), the account and product
services are the session's stand-ins.  The verdict is read from the topics,
from localstripe and from the API.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from streams import catalog
from streams.devtools.localstripe import LocalStripe
from tables import aggregate
from tables.payment_state import fact_event_id as payment_fact_event_id
from tables.subscription_state import fact_event_id
from tests.integration.pipeline_support import wait_until
from tests.integration.subscription_support import SubscriptionStack, subscription_stack

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def subs(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SubscriptionStack]:
    state: Path = tmp_path_factory.mktemp("subscriptions")
    async with subscription_stack(kafka_bootstrap, registry_url, localstripe, state,
                                  "subscriptions") as stack:
        yield stack


def user() -> str:
    return f"u-sub-{uuid.uuid4().hex[:8]}"


async def stripe_types_of(subs: SubscriptionStack, subscription_id: str) -> list[str]:
    """The types of the Stripe events stored on stripe.events about ``subscription_id``."""
    records = await subs.stack.stripe_records()
    return [json.loads(r.value)["type"] for r in records if r.key == subscription_id.encode()]


async def test_a_subscription_is_created_at_stripe_announced_once_and_gets_its_order(
        subs: SubscriptionStack) -> None:
    buyer = user()
    key = uuid.uuid4().hex
    answer = await subs.subscribe(buyer, "plan-basic", key=key)
    assert answer.status_code == 201, answer.text
    view = answer.json()
    sub_id = view["subscription_id"]
    assert sub_id.startswith("sub_")
    assert (view["status"], view["plan_id"], view["amount"], view["currency"], view["user_id"]) == (
        "active", "plan-basic", 999, "EUR", buyer)

    # At Stripe: one customer for the user, the card its default, the subscription paid.
    [customer] = await subs.stripe_customers_of(buyer)
    assert customer["invoice_settings"]["default_payment_method"].startswith("pm_")
    stripe_sub = await subs.stripe_get(f"/v1/subscriptions/{sub_id}")
    assert (stripe_sub["status"], stripe_sub["customer"]) == ("active", customer["id"])
    assert stripe_sub["metadata"] == {"user_id": buyer}

    # subscription.created, its id derived from the subscription ...
    [created] = await subs.events_of("subscription.created", subscription_id=sub_id)
    assert created["event_id"] == fact_event_id("subscription.created", sub_id)
    assert (created["user_id"], created["plan_id"], created["status"], created["amount"],
            created["currency"]) == (buyer, "plan-basic", "ACTIVE", 999, "EUR")
    assert created["producer"] == catalog.PAYMENT_SERVICE

    # ... read by the order service: the subscription's order
    [order] = await subs.events_of("order.created", subscription_id=sub_id)
    assert order["order_id"] == aggregate.derived_id(created["event_id"], "subscription-order")
    assert (order["order_type"], order["user_id"], order["total_amount"], order["currency"]) == (
        "SUBSCRIPTION", buyer, 999, "EUR")
    assert order["correlation_id"] == created["correlation_id"]

    # localstripe's own customer.subscription.created reached the worker and published nothing more.
    async def webhook_stored() -> bool:
        return "customer.subscription.created" in await stripe_types_of(subs, sub_id)

    await wait_until(webhook_stored, timeout=30.0, what="localstripe's subscription webhook stored")
    await subs.settle()
    assert len(subs.events("subscription.created", subscription_id=sub_id)) == 1
    assert len(subs.events("order.created", subscription_id=sub_id)) == 1
    assert subs.stack.dead_letters_of(sub_id.encode()) == []

    # The queries.
    row = await subs.subscription(sub_id)
    assert (row["status"], row["user_id"], row["customer_id"], row["expired"]) == (
        "active", buyer, customer["id"], False)
    listed = (await subs.api.get(f"/users/{buyer}/subscriptions")).json()
    assert [s["subscription_id"] for s in listed["subscriptions"]] == [sub_id]

    # The request retried under its Idempotency-Key: the same subscription, nothing new at Stripe.
    again = await subs.subscribe(buyer, "plan-basic", key=key)
    assert again.status_code == 201, again.text
    assert again.json()["subscription_id"] == sub_id
    assert [s["id"] for s in await subs.stripe_subscriptions_of(customer["id"])] == [sub_id]
    other = await subs.subscribe(buyer, "plan-pro", key=key)
    assert (other.status_code, other.json()["error"]) == (422, "idempotency_key_reused")


async def test_a_second_subscription_reuses_the_users_stripe_customer(subs: SubscriptionStack) -> None:
    buyer = user()
    first = await subs.subscribed(buyer, "plan-basic")
    second = await subs.subscribed(buyer, "plan-pro")
    [customer] = await subs.stripe_customers_of(buyer)
    assert first["customer_id"] == second["customer_id"] == customer["id"]
    ids = sorted(s["id"] for s in await subs.stripe_subscriptions_of(customer["id"]))
    assert ids == sorted([first["subscription_id"], second["subscription_id"]])


@pytest.mark.parametrize(("who", "plan", "code"), [
    (None, "plan-legacy", "plan_inactive"),
    (None, "plan-nope", "plan_not_found"),
    ("u-disabled", "plan-basic", "user_disabled"),
    ("u-pro", "plan-pro", "already_subscribed"),
])
async def test_a_refused_user_or_plan_is_400_and_nothing_is_made_at_stripe(
        subs: SubscriptionStack, who: str | None, plan: str, code: str) -> None:
    buyer = who or user()
    before = await subs.stripe_customers_of(buyer)
    answer = await subs.subscribe(buyer, plan)
    assert (answer.status_code, answer.json()["error"]) == (400, code), answer.text
    assert await subs.stripe_customers_of(buyer) == before


async def test_cancel_now_cancels_at_stripe_and_announces_it_once(subs: SubscriptionStack) -> None:
    view = await subs.subscribed(user())
    sub_id = view["subscription_id"]
    answer = await subs.api.post(f"/subscriptions/{sub_id}/cancel", json={"at_period_end": False},
                                 headers={"Idempotency-Key": "cancel-1"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "canceled"
    assert (await subs.stripe_get(f"/v1/subscriptions/{sub_id}"))["status"] == "canceled"
    [canceled] = await subs.events_of("subscription.canceled", subscription_id=sub_id)
    assert canceled["reason"] == "CANCELLATION_REQUESTED"
    assert canceled["event_id"] == fact_event_id("subscription.canceled", sub_id)

    # localstripe's customer.subscription.deleted arrives later: nothing new is published.
    async def deleted_stored() -> bool:
        return "customer.subscription.deleted" in await stripe_types_of(subs, sub_id)

    await wait_until(deleted_stored, timeout=30.0, what="localstripe's deleted webhook stored")
    again = await subs.api.post(f"/subscriptions/{sub_id}/cancel", json={"at_period_end": False},
                                headers={"Idempotency-Key": "cancel-1"})
    assert again.status_code == 200 and again.json()["status"] == "canceled"
    await subs.settle()
    assert len(subs.events("subscription.canceled", subscription_id=sub_id)) == 1
    refused = await subs.api.post(f"/subscriptions/{sub_id}/cancel", json={})
    assert (refused.status_code, refused.json()["error"]) == (409, "illegal_transition")


async def test_user_deleted_cancels_both_subscriptions_and_refunds_each_once_even_replayed(
        subs: SubscriptionStack) -> None:
    buyer = user()
    first = await subs.subscribed(buyer, "plan-basic")
    second = await subs.subscribed(buyer, "plan-pro")
    ids = {first["subscription_id"]: 999, second["subscription_id"]: 2999}

    await subs.wait_indexed(buyer, *ids)
    writer = subs.stack.writer
    deleted = writer.send("user.deleted", {"user_id": buyer, "deleted_at": _now_ms(),
                                           "reason": "account closed"})

    for sub_id in ids:
        [canceled] = await subs.events_of("subscription.canceled", subscription_id=sub_id, timeout=60.0)
        assert canceled["reason"] == "USER_DELETED"
        assert (await subs.stripe_get(f"/v1/subscriptions/{sub_id}"))["status"] == "canceled"
    found = await subs.events_of("payment.refunded", 2, timeout=60.0, user_id=buyer)
    assert len(found) == 2
    for event in found:
        assert event["reason"] == "SUBSCRIPTION_PRORATION" and event["currency"] == "EUR"
        assert event["event_id"] == payment_fact_event_id("payment.refunded", event["refund_id"])
        assert event["order_id"] is None
    # Canceled within a minute of a month's start: nearly all of each period's price comes back.
    amounts = sorted(e["amount"] for e in found)
    assert 999 - 5 <= amounts[0] <= 999 and 2999 - 5 <= amounts[1] <= 2999, amounts

    # Replayed: the same record, and the same fact re-published under a new event id.
    writer.replay([writer.last()])
    writer.send("user.deleted", {"user_id": buyer, "deleted_at": deleted["deleted_at"],
                                 "reason": "account closed"})
    await asyncio.sleep(3.0)
    await subs.settle()
    assert len(subs.events("payment.refunded", user_id=buyer)) == 2
    for sub_id in ids:
        assert len(subs.events("subscription.canceled", subscription_id=sub_id)) == 1
        invoice = await subs.stripe_get("/v1/invoices", subscription=sub_id)
        charges = {_charge(i) for i in invoice["data"] if i.get("status") == "paid"}
        made = [r for c in charges for r in await subs.stripe_refunds_of_charge(c)]
        assert len(made) == 1, made
        assert subs.stack.dead_letters_of(sub_id.encode()) == []
    assert subs.stack.dead_letters_of(buyer.encode()) == []


def _now_ms() -> int:
    return int(time.time() * 1000)


def _charge(invoice: dict[str, Any]) -> str:
    charge = invoice.get("charge")
    return charge["id"] if isinstance(charge, dict) else charge
