"""The user -> orders and subscription -> orders indexes (tables.order_index), without a broker.

Inbound events are built with ``new_event`` so they satisfy their contracts;
the order commands a decision sends are fed to the order aggregate's own
decisions (:func:`tables.order_state.order_flow`), so a command the order rows
would refuse fails here rather than in the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from streams.catalog import ORDER_COMMANDS, SUBSCRIPTION_ORDER_INDEX, USER_ORDER_INDEX
from streams.envelope import new_event
from tables import aggregate
from tables.aggregate import DUPLICATE, NOOP, Decision, Invalid
from tables.order_index import (
    MAX_APPLIED,
    METERED_ORDER_CURRENCY,
    SUBSCRIPTION_ORDERS,
    USER_ORDERS,
    dump,
    load,
    merge,
    on_storage_quota_exceeded,
    on_subscription_canceled,
    on_subscription_created,
    on_user_deleted,
    on_wallet_credits_added,
    open_orders,
    orders_fulfilled_by_credit,
    orders_of,
    storage_upgrade_order,
    subscription_order,
)
from tables.order_state import Order, OrderStatus, order_flow, order_summary

NOW = 1_767_225_600_000
USER = "usr-1"
SUB = "sub-1"
ORDERS = order_flow(30 * 60 * 1000)


def summary(order_id: str, status: str = "PENDING", order_type: str = "ONE_TIME", *,
            subscription_id: str | None = None, created_at_ms: int = 1, version: int = 1) -> dict[str, Any]:
    return {"order_id": order_id, "status": status, "order_type": order_type,
            "subscription_id": subscription_id, "total_amount": 1000, "currency": "EUR",
            "created_at_ms": created_at_ms, "version": version}


def index(*summaries: dict[str, Any], applied: list[str] | None = None) -> dict[str, Any]:
    return {"orders": {s["order_id"]: s for s in summaries}, "applied": list(applied or [])}


def credits_added(correlation_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    payload = {"user_id": USER, "wallet_id": "w-1", "amount": 1000, "currency": "EUR",
               "balance_amount": 1000, **overrides}
    return new_event("wallet.credits_added", payload, producer="wallet_service",
                     correlation_id=correlation_id)


def quota_exceeded(**overrides: Any) -> dict[str, Any]:
    payload = {"user_id": USER, "used_bytes": 11, "quota_bytes": 10, "suggested_product_id": "storage-100",
               "suggested_amount": 499, "currency": "EUR", **overrides}
    return new_event("storage.quota_exceeded", payload, producer="storage_service")


def user_deleted(**overrides: Any) -> dict[str, Any]:
    return new_event("user.deleted", {"user_id": USER, "deleted_at": NOW, **overrides},
                     producer="account_service")


def subscription_created(**overrides: Any) -> dict[str, Any]:
    payload = {"subscription_id": SUB, "user_id": USER, "plan_id": "plan-pro", "status": "ACTIVE",
               "amount": 900, "currency": "EUR", **overrides}
    return new_event("subscription.created", payload, producer="payment_service")


def subscription_canceled(**overrides: Any) -> dict[str, Any]:
    payload = {"subscription_id": SUB, "user_id": USER, "reason": "CANCELLATION_REQUESTED",
               "canceled_at": NOW, **overrides}
    return new_event("subscription.canceled", payload, producer="payment_service")


def commands(decision: Decision) -> list[dict[str, Any]]:
    """The order commands a decision sends, checked to be keyed and addressed right."""
    for send in decision.send:
        assert send.topic == ORDER_COMMANDS
        assert send.key == send.value["order_id"]
    return [dict(send.value) for send in decision.send]


def order_decides(record: Mapping[str, Any], order: Order | None, now_ms: int = NOW) -> Decision:
    """What the order aggregate decides on ``record`` (as the kernel would hand it over)."""
    message = aggregate.command_message(record, "order_id")
    return ORDERS.step(ORDER_COMMANDS, message).decide(order, message, now_ms)  # type: ignore[call-arg]


def an_order(order_id: str, status: OrderStatus, order_type: str = "WALLET_TOPUP",
             subscription_id: str | None = None) -> Order:
    return Order(order_id=order_id, user_id=USER, order_type=order_type, status=status, total_amount=1000,
                 currency="EUR", items=[{"product_id": "p", "quantity": 1, "unit_amount": 1000,
                                         "description": None}],
                 created_at_ms=1, updated_at_ms=1, payment_deadline_ms=NOW + 60_000,
                 subscription_id=subscription_id)


# --------------------------------------------------------------------------
# The row


def test_rows_load_with_defaults_and_dump_as_they_are() -> None:
    assert load({}) == {"orders": {}, "applied": []}
    row = index(summary("o-1"), applied=["e-1"])
    assert load(row) == row and load(row) is not row
    assert dump(row) is row


def test_orders_are_listed_oldest_first_then_by_id() -> None:
    row = index(summary("o-3", created_at_ms=5), summary("o-2", created_at_ms=1),
                summary("o-1", created_at_ms=5), summary("o-0", created_at_ms=None))  # type: ignore[arg-type]
    assert [s["order_id"] for s in orders_of(row)] == ["o-0", "o-2", "o-1", "o-3"]
    assert orders_of(None) == []


# --------------------------------------------------------------------------
# merge: the order aggregate's index updates


def test_merge_adds_a_summary_with_its_version() -> None:
    order = an_order("o-1", OrderStatus.PENDING)
    decision = merge(None, {"order": order_summary(order), "version": 7, "user_id": USER}, NOW)
    assert decision.row == {"orders": {"o-1": {**order_summary(order), "version": 7}}, "applied": []}
    assert not decision.send and not decision.emit


def test_merge_keeps_the_newer_summary_whatever_the_arrival_order() -> None:
    row = index(summary("o-1", "COMPLETED", version=9), applied=["e-1"])
    assert merge(row, {"order": summary("o-1", "PENDING"), "version": 3}, NOW) == NOOP
    newer = merge(row, {"order": summary("o-1", "FULFILLED"), "version": 10}, NOW).row
    assert newer["orders"]["o-1"]["status"] == "FULFILLED" and newer["orders"]["o-1"]["version"] == 10
    assert newer["applied"] == ["e-1"]
    assert row["orders"]["o-1"]["status"] == "COMPLETED"  # the loaded row is not mutated


def test_merge_of_the_same_version_takes_the_update() -> None:
    row = index(summary("o-1", "PENDING", version=4))
    assert merge(row, {"order": summary("o-1", "CANCELED"), "version": 4}, NOW).row["orders"]["o-1"][
        "status"] == "CANCELED"


def test_merge_keeps_other_orders() -> None:
    row = index(summary("o-1"))
    merged = merge(row, {"order": summary("o-2"), "version": 1}, NOW).row
    assert set(merged["orders"]) == {"o-1", "o-2"}


@pytest.mark.parametrize("update", [
    {},
    {"order": summary("o-1")},
    {"order": summary("o-1"), "version": "3"},
    {"order": {"status": "PENDING"}, "version": 3},
    {"order": "o-1", "version": 3},
])
def test_a_malformed_index_update_is_invalid(update: dict[str, Any]) -> None:
    with pytest.raises(Invalid):
        merge(None, update, NOW)


# --------------------------------------------------------------------------
# wallet.credits_added


def test_a_credit_naming_its_order_fulfils_that_order() -> None:
    event = credits_added(order_id="o-9", transaction_id="tx-1")
    decision = on_wallet_credits_added(index(summary("o-1", "COMPLETED", "WALLET_TOPUP")), event, NOW)
    [fulfil] = commands(decision)
    assert (fulfil["command"], fulfil["order_id"]) == ("fulfill", "o-9")
    assert fulfil["args"] == {"fulfillment_details": {"wallet_id": "w-1", "credited_amount": "1000",
                                                      "currency": "EUR", "transaction_id": "tx-1"}}
    assert decision.row["applied"] == [event["event_id"]]


def test_a_credit_without_an_order_fulfils_every_paid_undelivered_top_up() -> None:
    row = index(summary("o-1", "COMPLETED", "WALLET_TOPUP", created_at_ms=2),
                summary("o-2", "PENDING", "WALLET_TOPUP"),
                summary("o-3", "COMPLETED", "ONE_TIME"),
                summary("o-4", "FULFILLED", "WALLET_TOPUP"),
                summary("o-5", "COMPLETED", "WALLET_TOPUP", created_at_ms=1))
    event = credits_added()
    assert orders_fulfilled_by_credit(row, event) == ["o-5", "o-1"]
    decision = on_wallet_credits_added(row, event, NOW)
    assert [c["order_id"] for c in commands(decision)] == ["o-5", "o-1"]
    assert "transaction_id" not in commands(decision)[0]["args"]["fulfillment_details"]


def test_a_credit_that_fulfils_nothing_is_still_marked_applied() -> None:
    event = credits_added()
    decision = on_wallet_credits_added(None, event, NOW)
    assert decision.send == ()
    assert decision.row == {"orders": {}, "applied": [event["event_id"]]}


def test_a_credit_seen_before_sends_nothing() -> None:
    event = credits_added()
    row = index(summary("o-1", "COMPLETED", "WALLET_TOPUP"), applied=[event["event_id"]])
    assert on_wallet_credits_added(row, event, NOW) == DUPLICATE


def test_the_fulfil_commands_derive_their_ids_from_the_credit_and_the_order_applies_them() -> None:
    event = credits_added(correlation_id="corr-7")
    row = index(summary("o-1", "COMPLETED", "WALLET_TOPUP"))
    first = commands(on_wallet_credits_added(row, event, NOW))
    again = commands(on_wallet_credits_added(row, event, NOW + 5_000))  # re-decided after a crash
    assert [c["command_id"] for c in first] == [c["command_id"] for c in again]
    [fulfil] = first
    assert fulfil["command_id"] == aggregate.derived_id(event["event_id"], "fulfill", "o-1")
    assert (fulfil["causation_id"], fulfil["correlation_id"]) == (event["event_id"], "corr-7")

    paid = an_order("o-1", OrderStatus.COMPLETED)
    fulfilled = order_decides(fulfil, paid)
    assert fulfilled.row.status is OrderStatus.FULFILLED
    assert order_decides(fulfil, fulfilled.row) == DUPLICATE  # the re-sent command is recognised


# --------------------------------------------------------------------------
# storage.quota_exceeded


def test_quota_exceeded_creates_the_suggested_upgrade_order() -> None:
    event = quota_exceeded()
    decision = on_storage_quota_exceeded(None, event, NOW)
    [create] = commands(decision)
    order_id = aggregate.derived_id(event["event_id"], "storage-upgrade-order")
    assert (create["command"], create["order_id"]) == ("create", order_id)
    assert create["command_id"] == aggregate.derived_id(event["event_id"], "create", order_id)
    assert create["args"] == {
        "user_id": USER, "order_type": "STORAGE_UPGRADE", "total_amount": 499, "currency": "EUR",
        "items": [{"product_id": "storage-100", "quantity": 1, "unit_amount": 499,
                   "description": "storage upgrade"}]}
    assert decision.row["applied"] == [event["event_id"]]
    assert commands(on_storage_quota_exceeded(None, event, NOW + 1)) == [
        {**create, "issued_at": NOW + 1}]  # same ids when re-decided

    created = order_decides(create, None)
    assert created.row.status is OrderStatus.PENDING and created.row.total_amount == 499
    assert order_decides(create, created.row) == DUPLICATE


@pytest.mark.parametrize(("overrides", "problem"), [
    ({"suggested_product_id": None}, "without suggested_product_id"),
    ({"suggested_amount": None}, "without suggested_product_id and suggested_amount"),
    ({"currency": None}, "no currency"),
])
def test_an_upgrade_that_cannot_be_priced_is_refused(overrides: dict[str, Any], problem: str) -> None:
    event = quota_exceeded(**overrides)
    with pytest.raises(Invalid, match=problem):
        storage_upgrade_order(event)
    with pytest.raises(Invalid, match=problem):  # refused even once seen: a mended replay applies
        on_storage_quota_exceeded(index(applied=[event["event_id"]]), event, NOW)


def test_quota_exceeded_seen_before_sends_nothing() -> None:
    event = quota_exceeded()
    assert on_storage_quota_exceeded(index(applied=[event["event_id"]]), event, NOW) == DUPLICATE


# --------------------------------------------------------------------------
# user.deleted


def test_user_deleted_cancels_only_the_unpaid_orders_if_still_open() -> None:
    row = index(summary("o-1", "PENDING"), summary("o-2", "PAYMENT_PENDING"), summary("o-3", "COMPLETED"),
                summary("o-4", "CANCELED"), summary("o-5", "EXPIRED"))
    event = user_deleted(reason="gdpr request")
    assert open_orders(row) == ["o-1", "o-2"]
    decision = on_user_deleted(row, event, NOW)
    sent = commands(decision)
    assert [(c["command"], c["order_id"]) for c in sent] == [("cancel", "o-1"), ("cancel", "o-2")]
    assert all(c["args"] == {"reason": "USER_DELETED", "detail": "gdpr request", "if_open": True}
               for c in sent)
    assert [c["command_id"] for c in sent] == [
        aggregate.derived_id(event["event_id"], "cancel", o) for o in ("o-1", "o-2")]
    assert decision.row["applied"] == [event["event_id"]]


def test_user_deleted_without_a_reason_says_so_and_a_paid_order_survives_the_race() -> None:
    event = user_deleted()
    [cancel] = commands(on_user_deleted(index(summary("o-1", "PENDING")), event, NOW))
    assert cancel["args"]["detail"] == "user deleted"
    # the order was paid meanwhile: if_open makes the cancel a quiet no-op there
    assert order_decides(cancel, an_order("o-1", OrderStatus.COMPLETED)) == NOOP
    canceled = order_decides(cancel, an_order("o-1", OrderStatus.PENDING))
    assert canceled.row.status is OrderStatus.CANCELED and canceled.row.cancel_reason == "USER_DELETED"


def test_user_deleted_seen_before_sends_nothing() -> None:
    event = user_deleted()
    assert on_user_deleted(index(summary("o-1"), applied=[event["event_id"]]), event, NOW) == DUPLICATE


# --------------------------------------------------------------------------
# subscription.created / subscription.canceled


def test_subscription_created_records_the_subscriptions_order() -> None:
    event = subscription_created()
    decision = on_subscription_created(None, event, NOW)
    [create] = commands(decision)
    order_id = aggregate.derived_id(event["event_id"], "subscription-order")
    assert (create["command"], create["order_id"]) == ("create", order_id)
    assert create["args"] == {
        "user_id": USER, "order_type": "SUBSCRIPTION", "total_amount": 900, "currency": "EUR",
        "subscription_id": SUB,
        "items": [{"product_id": "plan-pro", "quantity": 1, "unit_amount": 900,
                   "description": "subscription"}]}
    created = order_decides(create, None)
    assert created.row.subscription_id == SUB and created.row.order_type == "SUBSCRIPTION"
    assert on_subscription_created(decision.row, event, NOW) == DUPLICATE


def test_a_metered_subscription_without_a_currency_gets_a_zero_order_in_the_default_currency() -> None:
    args = subscription_order(subscription_created(amount=None, currency=None))
    assert (args["total_amount"], args["currency"]) == (0, METERED_ORDER_CURRENCY)
    assert args["items"][0]["unit_amount"] == 0
    zero = subscription_order(subscription_created(amount=0, currency=None))
    assert (zero["total_amount"], zero["currency"]) == (0, METERED_ORDER_CURRENCY)


def test_a_metered_subscription_keeps_its_own_currency() -> None:
    args = subscription_order(subscription_created(amount=None, currency="GBP"))
    assert (args["total_amount"], args["currency"]) == (0, "GBP")


def test_a_priced_subscription_without_a_currency_is_refused_even_if_seen() -> None:
    event = subscription_created(amount=900, currency=None)
    with pytest.raises(Invalid, match="of 900 without a currency"):
        subscription_order(event)
    with pytest.raises(Invalid):
        on_subscription_created(index(applied=[event["event_id"]]), event, NOW)


def test_subscription_canceled_cancels_that_subscriptions_unpaid_orders() -> None:
    row = index(summary("o-1", "PENDING", "SUBSCRIPTION", subscription_id=SUB),
                summary("o-2", "COMPLETED", "SUBSCRIPTION", subscription_id=SUB),
                summary("o-3", "PENDING", "SUBSCRIPTION", subscription_id="sub-other"))
    event = subscription_canceled(comment="too expensive")
    decision = on_subscription_canceled(row, event, NOW)
    [cancel] = commands(decision)
    assert cancel["order_id"] == "o-1"
    assert cancel["args"] == {"reason": "SUBSCRIPTION_CANCELED", "detail": "too expensive", "if_open": True}
    assert cancel["command_id"] == aggregate.derived_id(event["event_id"], "cancel", "o-1")
    canceled = order_decides(cancel, an_order("o-1", OrderStatus.PENDING, "SUBSCRIPTION", SUB))
    assert canceled.row.status is OrderStatus.CANCELED
    assert on_subscription_canceled(decision.row, event, NOW) == DUPLICATE


def test_subscription_canceled_without_a_comment_names_the_subscription() -> None:
    row = index(summary("o-1", "PENDING", subscription_id=SUB))
    [cancel] = commands(on_subscription_canceled(row, subscription_canceled(), NOW))
    assert cancel["args"]["detail"] == f"subscription {SUB} canceled"


# --------------------------------------------------------------------------
# The applied window and the flow tables


def test_an_index_row_remembers_the_most_recent_applied_ids_only() -> None:
    row: dict[str, Any] | None = None
    events = [user_deleted() for _ in range(MAX_APPLIED + 5)]
    for event in events:
        row = on_user_deleted(row, event, NOW).row
    assert row is not None and row["applied"] == [e["event_id"] for e in events[-MAX_APPLIED:]]
    assert on_user_deleted(row, events[-1], NOW) == DUPLICATE
    assert on_user_deleted(row, events[0], NOW) != DUPLICATE  # outside the window


def test_the_decisions_do_not_mutate_the_loaded_row() -> None:
    row = index(summary("o-1", "COMPLETED", "WALLET_TOPUP"), applied=["e-0"])
    before = {"orders": {k: dict(v) for k, v in row["orders"].items()}, "applied": list(row["applied"])}
    on_wallet_credits_added(row, credits_added(), NOW)
    on_user_deleted(row, user_deleted(), NOW)
    merge(row, {"order": summary("o-1", "FULFILLED"), "version": 99}, NOW)
    assert row == before


@pytest.mark.parametrize(("flow", "key_field", "index_topic", "handlers"), [
    (USER_ORDERS, "user_id", USER_ORDER_INDEX,
     {"wallet.credits_added": "handle_wallet_credits_added",
      "storage.quota_exceeded": "handle_storage_quota_exceeded",
      "user.deleted": "handle_user_deleted"}),
    (SUBSCRIPTION_ORDERS, "subscription_id", SUBSCRIPTION_ORDER_INDEX,
     {"subscription.created": "handle_subscription_created",
      "subscription.canceled": "handle_subscription_canceled"}),
])
def test_the_index_flow_tables(flow: Any, key_field: str, index_topic: str, handlers: dict[str, str]) -> None:
    assert flow.key_field == key_field
    assert flow.command_topic is None
    steps = {step.input: step for step in flow.steps}
    assert steps[index_topic].handler == "merge_index_update" and steps[index_topic].sends == ()
    assert {i: s.handler for i, s in steps.items() if i != index_topic} == handlers
    for name in handlers:
        assert steps[name].sends == (ORDER_COMMANDS,) and steps[name].emits == ()
    assert set(flow.topics) == {index_topic, *handlers}
