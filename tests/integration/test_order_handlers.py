"""Every order-service handler against the real broker and registry, app in-process.

One app serves the whole module (an app start costs seconds); each test makes
its own users and orders, so the tests do not see each other's state.  Inbound
events are written with confluent-kafka's AvroSerializer as the other services
would; what the app publishes is read back with its AvroDeserializer, the
dead-letter topic with a plain consumer, and the state through the HTTP API.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.pipeline_support import (
    Pipeline,
    assert_app_healthy,
    uid,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]




def now_ms() -> int:
    return int(time.time() * 1000)


async def user_orders(pipe: Pipeline, user_id: str) -> dict[str, dict[str, Any]]:
    response = await pipe.api.client.get(f"/users/{user_id}/orders")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == user_id
    return {o["order_id"]: o for o in body["orders"]}


async def wait_indexed(pipe: Pipeline, user_id: str, order_id: str, status: str) -> dict[str, Any]:
    """Wait until the user -> orders index shows ``order_id`` with ``status``."""

    async def indexed() -> Any:
        summary = (await user_orders(pipe, user_id)).get(order_id)
        return summary if summary and summary["status"] == status else None

    return await wait_until(indexed, what=f"{order_id} {status} in {user_id}'s index")


async def test_payment_intent_created_and_payment_completed(pipe: Pipeline) -> None:
    user = uid("u-pay")
    order = await pipe.create_order(user)
    order_id = order["order_id"]
    assert order["status"] == "PENDING" and order["total_amount"] == 2500

    intent = pipe.payment(order)
    pipe.writer.send("payment.intent.created", intent)
    [pending] = await pipe.reader.wait_for("order.payment_pending", order_id=order_id)
    assert (pending["payment_intent_id"], pending["amount"], pending["currency"], pending["user_id"]) \
        == (intent["payment_intent_id"], 2500, "EUR", user)
    got = await pipe.order(order_id)
    assert got["status"] == "PAYMENT_PENDING"
    assert got["payment_intent_id"] == intent["payment_intent_id"]

    completed_event = pipe.writer.send("payment.completed", pipe.payment(order))
    [completed] = await pipe.reader.wait_for("order.completed", order_id=order_id)
    assert completed["payment_id"] == intent["payment_intent_id"]
    assert (completed["total_amount"], completed["currency"], completed["order_type"]) \
        == (2500, "EUR", "ONE_TIME")
    assert completed["causation_id"] == completed_event["event_id"]
    assert completed["correlation_id"] == completed_event["correlation_id"]
    got = await pipe.order(order_id)
    assert (got["status"], got["payment_id"], got["refundable_amount"]) \
        == ("COMPLETED", intent["payment_intent_id"], 2500)

    # A payment of the wrong amount is refused: dead letter, order unchanged.
    short = await pipe.create_order(user)
    pipe.writer.send("payment.intent.created", pipe.payment(short))
    await pipe.reader.wait_for("order.payment_pending", order_id=short["order_id"])
    before = await pipe.order(short["order_id"])
    pipe.writer.send("payment.completed", pipe.payment(short, amount=2499))
    letter = await pipe.dead_letters.wait_for(pipe.writer.last())
    assert letter.header("dlq.reason") == "rejected"
    assert "IllegalTransition" in letter.header("dlq.error")
    assert "2499" in letter.header("dlq.error")
    assert letter.value == pipe.writer.last().value

    await pipe.settle()
    assert await pipe.order(short["order_id"]) == before
    assert before["status"] == "PAYMENT_PENDING" and before["payment_id"] is None
    assert pipe.order_events(order_id).count("order.completed") == 1
    assert pipe.order_events(order_id).count("order.payment_pending") == 1
    assert "order.completed" not in pipe.order_events(short["order_id"])
    assert_app_healthy(pipe.app)


async def test_payment_failed_cancels_with_the_reason(pipe: Pipeline) -> None:
    order = await pipe.create_order(uid("u-fail"))
    order_id = order["order_id"]
    pipe.writer.send("payment.intent.created", pipe.payment(order))
    await pipe.reader.wait_for("order.payment_pending", order_id=order_id)

    pipe.writer.send("payment.failed", pipe.payment(
        order, error_code="card_declined", error_message="Your card was declined."))
    [canceled] = await pipe.reader.wait_for("order.canceled", order_id=order_id)
    assert (canceled["reason"], canceled["refund_amount"], canceled["currency"]) \
        == ("PAYMENT_FAILED", 0, "EUR")
    got = await pipe.order(order_id)
    assert got["status"] == "CANCELED"
    assert got["cancel_reason"] == "PAYMENT_FAILED"
    assert got["cancel_detail"] == "card_declined: Your card was declined."

    await pipe.settle()
    assert pipe.order_events(order_id).count("order.canceled") == 1
    assert_app_healthy(pipe.app)


async def test_payment_refunded_partially_then_fully(pipe: Pipeline) -> None:
    order = await pipe.pay(await pipe.create_order(uid("u-refund")))
    order_id, payment_id = order["order_id"], order["payment_id"]

    def refund(refund_id: str, amount: int) -> dict[str, Any]:
        return {"payment_id": payment_id, "refund_id": refund_id, "order_id": order_id,
                "user_id": order["user_id"], "amount": amount, "currency": "EUR",
                "reason": "REQUESTED_BY_CUSTOMER"}

    pipe.writer.send("payment.refunded", refund("re_1", 1000))
    [first] = await pipe.reader.wait_for("order.refunded", order_id=order_id)
    assert (first["amount"], first["refund_id"], first["payment_id"]) == (1000, "re_1", payment_id)
    got = await pipe.order(order_id)
    assert (got["status"], got["refunded_amount"], got["refundable_amount"]) \
        == ("PARTIALLY_REFUNDED", 1000, 1500)

    # More than what remains: refused, nothing changes.
    pipe.writer.send("payment.refunded", refund("re_2", 2000))
    letter = await pipe.dead_letters.wait_for(pipe.writer.last())
    assert letter.header("dlq.reason") == "rejected"
    assert "exceeds" in letter.header("dlq.error")
    await pipe.settle()
    assert (await pipe.order(order_id))["refunded_amount"] == 1000

    pipe.writer.send("payment.refunded", refund("re_3", 1500))
    await pipe.reader.wait_for("order.refunded", count=2, order_id=order_id)
    got = await pipe.order(order_id)
    assert (got["status"], got["refunded_amount"], got["refundable_amount"]) == ("REFUNDED", 2500, 0)
    assert got["refund_ids"] == ["re_1", "re_3"]

    await pipe.settle()
    refunds = pipe.reader.events("order.refunded", order_id=order_id)
    assert sorted(r["amount"] for r in refunds) == [1000, 1500]
    assert_app_healthy(pipe.app)


async def test_wallet_credits_added_fulfils_paid_top_ups(pipe: Pipeline) -> None:
    user = uid("u-wallet")
    paid = await pipe.pay(await pipe.create_order(user, order_type="WALLET_TOPUP"))
    unpaid = await pipe.create_order(user, order_type="WALLET_TOPUP")
    await wait_indexed(pipe, user, paid["order_id"], "COMPLETED")
    await wait_indexed(pipe, user, unpaid["order_id"], "PENDING")

    # Without order_id: the user's paid top-ups are found through the index.
    pipe.writer.send("wallet.credits_added", {
        "user_id": user, "wallet_id": "w-1", "amount": 2500, "currency": "EUR",
        "balance_amount": 2500, "transaction_id": "tx-1"})
    [fulfilled] = await pipe.reader.wait_for("order.fulfilled", order_id=paid["order_id"])
    assert fulfilled["order_type"] == "WALLET_TOPUP"
    assert fulfilled["fulfillment_details"] == {
        "wallet_id": "w-1", "credited_amount": "2500", "currency": "EUR", "transaction_id": "tx-1"}
    assert (await pipe.order(paid["order_id"]))["status"] == "FULFILLED"

    # With order_id: that order is fulfilled.
    second = await pipe.pay(await pipe.create_order(user, order_type="WALLET_TOPUP"))
    pipe.writer.send("wallet.credits_added", {
        "user_id": user, "wallet_id": "w-1", "amount": 2500, "currency": "EUR",
        "balance_amount": 5000, "order_id": second["order_id"]})
    [fulfilled] = await pipe.reader.wait_for("order.fulfilled", order_id=second["order_id"])
    assert fulfilled["fulfillment_details"] == {
        "wallet_id": "w-1", "credited_amount": "2500", "currency": "EUR"}
    got = await pipe.order(second["order_id"])
    assert got["status"] == "FULFILLED" and got["fulfillment_details"]["wallet_id"] == "w-1"

    await pipe.settle()
    assert (await pipe.order(unpaid["order_id"]))["status"] == "PENDING"
    assert pipe.order_events(unpaid["order_id"]) == ["order.created"]
    assert pipe.order_events(paid["order_id"]).count("order.fulfilled") == 1
    assert pipe.order_events(second["order_id"]).count("order.fulfilled") == 1
    assert_app_healthy(pipe.app)


async def test_subscription_created_and_canceled(pipe: Pipeline) -> None:
    user = uid("u-sub")
    subscription_id = uid("sub")
    created_event = pipe.writer.send("subscription.created", {
        "subscription_id": subscription_id, "user_id": user, "plan_id": "plan-pro",
        "status": "ACTIVE", "amount": 990, "currency": "EUR"})
    [created] = await pipe.reader.wait_for("order.created", subscription_id=subscription_id)
    order_id = created["order_id"]
    assert (created["user_id"], created["order_type"], created["total_amount"], created["currency"]) \
        == (user, "SUBSCRIPTION", 990, "EUR")
    assert created["items"][0]["product_id"] == "plan-pro"
    assert created["correlation_id"] == created_event["correlation_id"]
    summary = await wait_indexed(pipe, user, order_id, "PENDING")
    assert (summary["order_type"], summary["subscription_id"]) == ("SUBSCRIPTION", subscription_id)

    # A second subscription of the user, already paid: its cancellation leaves the order alone.
    paid_subscription = uid("sub")
    pipe.writer.send("subscription.created", {
        "subscription_id": paid_subscription, "user_id": user, "plan_id": "plan-basic",
        "status": "ACTIVE", "amount": 500, "currency": "EUR"})
    [paid_created] = await pipe.reader.wait_for("order.created", subscription_id=paid_subscription)
    paid = await pipe.pay(await pipe.order(paid_created["order_id"]))
    await pipe.settle()  # the subscription index knows both orders now

    pipe.writer.send("subscription.canceled", {
        "subscription_id": subscription_id, "user_id": user, "reason": "CANCELLATION_REQUESTED",
        "comment": "too expensive", "canceled_at": now_ms()})
    pipe.writer.send("subscription.canceled", {
        "subscription_id": paid_subscription, "user_id": user, "reason": "CANCELLATION_REQUESTED",
        "canceled_at": now_ms()})
    [canceled] = await pipe.reader.wait_for("order.canceled", order_id=order_id)
    assert canceled["reason"] == "SUBSCRIPTION_CANCELED"
    got = await pipe.order(order_id)
    assert (got["status"], got["cancel_reason"], got["cancel_detail"]) \
        == ("CANCELED", "SUBSCRIPTION_CANCELED", "too expensive")

    await pipe.settle()
    assert (await pipe.order(paid["order_id"]))["status"] == "COMPLETED"
    assert "order.canceled" not in pipe.order_events(paid["order_id"])
    assert pipe.order_events(order_id).count("order.canceled") == 1
    assert_app_healthy(pipe.app)


async def test_storage_quota_exceeded_creates_a_priced_upgrade_order(pipe: Pipeline) -> None:
    user = uid("u-storage")
    pipe.writer.send("storage.quota_exceeded", {
        "user_id": user, "used_bytes": 11 << 30, "quota_bytes": 10 << 30,
        "suggested_product_id": "storage-100gb", "suggested_amount": 499, "currency": "EUR"})
    [created] = await pipe.reader.wait_for("order.created", user_id=user)
    assert (created["order_type"], created["total_amount"], created["currency"]) \
        == ("STORAGE_UPGRADE", 499, "EUR")
    assert [(i["product_id"], i["quantity"], i["unit_amount"]) for i in created["items"]] \
        == [("storage-100gb", 1, 499)]
    got = await pipe.order(created["order_id"])
    assert (got["status"], got["order_type"], got["total_amount"]) == ("PENDING", "STORAGE_UPGRADE", 499)

    # Nothing to price the upgrade with: the event itself is dead-lettered.
    unpriced_user = uid("u-storage")
    pipe.writer.send("storage.quota_exceeded", {
        "user_id": unpriced_user, "used_bytes": 11 << 30, "quota_bytes": 10 << 30})
    letter = await pipe.dead_letters.wait_for(pipe.writer.last())
    assert letter.header("dlq.reason") == "rejected"
    assert "suggested_amount" in letter.header("dlq.error")

    # A price without a currency cannot be an order either: the event is dead-lettered,
    # not a create command the order agent refuses later.
    no_currency_user = uid("u-storage")
    pipe.writer.send("storage.quota_exceeded", {
        "user_id": no_currency_user, "used_bytes": 11 << 30, "quota_bytes": 10 << 30,
        "suggested_product_id": "storage-100gb", "suggested_amount": 499})
    letter = await pipe.dead_letters.wait_for(pipe.writer.last())
    assert letter.header("dlq.reason") == "rejected"
    assert "currency" in letter.header("dlq.error")

    await pipe.settle()
    assert pipe.reader.events("order.created", user_id=unpriced_user) == []
    assert pipe.reader.events("order.created", user_id=no_currency_user) == []
    assert await user_orders(pipe, unpriced_user) == {}
    assert await user_orders(pipe, no_currency_user) == {}
    commands = pipe.settings.topic("paystream.order-commands")
    assert not [d for d in pipe.dead_letters.seen
                if d.headers.get("dlq.source.topic", b"").decode() == commands
                and no_currency_user.encode() in (d.value or b"")]
    assert_app_healthy(pipe.app)


async def test_user_deleted_cancels_only_unpaid_orders(pipe: Pipeline) -> None:
    user, bystander = uid("u-gone"), uid("u-stays")
    pending = await pipe.create_order(user)
    awaiting = await pipe.create_order(user)
    pipe.writer.send("payment.intent.created", pipe.payment(awaiting))
    await pipe.reader.wait_for("order.payment_pending", order_id=awaiting["order_id"])
    paid = await pipe.pay(await pipe.create_order(user))
    other = await pipe.create_order(bystander)
    await wait_indexed(pipe, user, awaiting["order_id"], "PAYMENT_PENDING")
    await wait_indexed(pipe, user, paid["order_id"], "COMPLETED")
    await wait_indexed(pipe, user, pending["order_id"], "PENDING")

    pipe.writer.send("user.deleted", {"user_id": user, "deleted_at": now_ms(), "reason": "GDPR request"})
    for order in (pending, awaiting):
        [canceled] = await pipe.reader.wait_for("order.canceled", order_id=order["order_id"])
        assert canceled["reason"] == "USER_DELETED"
        got = await pipe.order(order["order_id"])
        assert (got["status"], got["cancel_reason"], got["cancel_detail"]) \
            == ("CANCELED", "USER_DELETED", "GDPR request")

    await pipe.settle()
    assert (await pipe.order(paid["order_id"]))["status"] == "COMPLETED"
    assert "order.canceled" not in pipe.order_events(paid["order_id"])
    assert (await pipe.order(other["order_id"]))["status"] == "PENDING"
    statuses = {o: s["status"] for o, s in (await user_orders(pipe, user)).items()}
    assert statuses == {pending["order_id"]: "CANCELED", awaiting["order_id"]: "CANCELED",
                        paid["order_id"]: "COMPLETED"}
    assert_app_healthy(pipe.app)


async def test_replayed_events_change_nothing(pipe: Pipeline) -> None:
    """Runs last: replays every record this module's tests produced."""
    user = uid("u-replay")
    order = await pipe.create_order(user)
    order_id = order["order_id"]

    # The same event (same event_id) twice: applied once.
    intent = pipe.writer.event("payment.intent.created", pipe.payment(order))
    pipe.writer.send_event(intent)
    pipe.writer.send_event(intent)
    paid = pipe.writer.event("payment.completed", pipe.payment(order))
    pipe.writer.send_event(paid)
    pipe.writer.send_event(paid)
    subscription_id = uid("sub")
    created = pipe.writer.event("subscription.created", {
        "subscription_id": subscription_id, "user_id": user, "plan_id": "plan-pro",
        "status": "ACTIVE", "amount": 990, "currency": "EUR"})
    pipe.writer.send_event(created)
    pipe.writer.send_event(created)
    await pipe.reader.wait_for("order.completed", order_id=order_id)
    await pipe.reader.wait_for("order.created", subscription_id=subscription_id)
    await pipe.settle()
    # Each lifecycle event once. payment_pending and completed sit on two topics and may be
    # decided in one batch, so their arrival order at the reader is not defined.
    assert sorted(pipe.order_events(order_id)) == [
        "order.completed", "order.created", "order.payment_pending"]
    assert len(pipe.reader.events("order.created", subscription_id=subscription_id)) == 1
    assert (await pipe.order(order_id))["status"] == "COMPLETED"

    # Every input record of the module again, same bytes and event ids.
    order_ids = sorted({e["order_id"] for e in pipe.reader.seen})
    before = {o: await pipe.order(o) for o in order_ids}
    users = sorted({e["user_id"] for e in pipe.reader.seen})
    indexes = {u: await user_orders(pipe, u) for u in users}
    published = len(pipe.reader.seen)
    replayed = pipe.writer.replay(list(pipe.writer.sent))
    assert len(replayed) >= 10
    await pipe.settle()
    assert [e["event_type"] for e in pipe.reader.seen[published:]] == []
    assert {o: await pipe.order(o) for o in order_ids} == before
    assert {u: await user_orders(pipe, u) for u in users} == indexes
    assert_app_healthy(pipe.app)
