"""The user -> orders and subscription -> orders indexes, and the fan-out handlers they serve.

Inbound events that concern "a user's orders" or "a subscription's orders"
(wallet.credits_added, storage.quota_exceeded, user.deleted,
subscription.created, subscription.canceled) are keyed by user or
subscription, not by order.  Each index is an aggregate of its own on the
kernel, keyed like those events, holding the summaries of its orders (fed by
the order aggregate's index updates) and the ids of the inbound events it
applied.  Its decisions turn an inbound event into order commands; the
kernel publishes them and waits for their acks before it writes the index
row with the event's id, so an event is marked applied only once its
commands are in Kafka (a crash in between re-decides it, and the commands
carry ids derived from the event, which the order rows recognise).

The domain rules the fan-out needs live here as pure functions, unit-tested
without a broker: which orders a credit fulfils, how a storage upgrade is
priced, what order a subscription gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streams.catalog import (
    ORDER_COMMANDS,
    ORDER_SERVICE,
    SUBSCRIPTION_ORDER_INDEX,
    USER_ORDER_INDEX,
)
from tables import aggregate, summary_index
from tables.aggregate import DUPLICATE, Decision, Flow, Invalid, Send, Step
from tables.order_state import OPEN_STATUSES, OrderStatus

#: The currency of a zero-amount (metered) subscription order whose
#: subscription.created names none: an order needs one, and no money is at
#: stake.  A priced subscription without a currency is refused instead.
METERED_ORDER_CURRENCY = "USD"


# --------------------------------------------------------------------------
# The row: tables.summary_index ({"orders": {order_id: summary + version}, "applied": [...]})

load, dump, merge = summary_index.load, summary_index.dump, summary_index.merge
orders_of = summary_index.summaries
_applied, _seen = summary_index.applied, summary_index.seen
MAX_APPLIED = summary_index.MAX_APPLIED


def _commands(
    row: dict[str, Any] | None, event: Mapping[str, Any], commands: list[dict[str, Any]]
) -> Decision:
    sends = tuple(Send(ORDER_COMMANDS, c["order_id"], c) for c in commands)
    return Decision(row=_applied(row, event["event_id"]), send=sends)


def _command(verb: str, order_id: str, event: Mapping[str, Any], now_ms: int, **args: Any) -> dict[str, Any]:
    return aggregate.command(verb, "order_id", order_id, cause=event, now_ms=now_ms, **args)


# --------------------------------------------------------------------------
# Pure domain rules of the fan-out


def orders_fulfilled_by_credit(row: dict[str, Any] | None, event: Mapping[str, Any]) -> list[str]:
    """The orders a wallet.credits_added delivers.

    The order it names, if it names one (the wallet service credited that
    top-up); otherwise every paid, undelivered WALLET_TOPUP order of the user.
    """
    if event.get("order_id"):
        return [str(event["order_id"])]
    return [s["order_id"] for s in orders_of(row)
            if s["order_type"] == "WALLET_TOPUP" and s["status"] == OrderStatus.COMPLETED]


def storage_upgrade_order(event: Mapping[str, Any]) -> dict[str, Any]:
    """The create arguments of the upgrade order a storage.quota_exceeded suggests.

    Priced by the storage service (``suggested_product_id``,
    ``suggested_amount``, ``currency``); without a complete price no order can
    be made, and the event is refused (dead-lettered, replayable once mended).
    """
    if event.get("suggested_product_id") is None or event.get("suggested_amount") is None:
        raise Invalid("storage.quota_exceeded without suggested_product_id and suggested_amount: "
                      "no upgrade order can be priced")
    if event.get("currency") is None:
        raise Invalid("storage.quota_exceeded with a suggested_amount but no currency: "
                      "no upgrade order can be priced")
    amount = int(event["suggested_amount"])
    return {"user_id": event["user_id"], "order_type": "STORAGE_UPGRADE", "total_amount": amount,
            "currency": event["currency"],
            "items": [{"product_id": event["suggested_product_id"], "quantity": 1,
                       "unit_amount": amount, "description": "storage upgrade"}]}


def subscription_order(event: Mapping[str, Any]) -> dict[str, Any]:
    """The create arguments of a subscription's recurring order record.

    A metered plan has no fixed price: a zero-amount order, in the event's
    currency or else :data:`METERED_ORDER_CURRENCY`.  A priced subscription
    without a currency is refused: its money cannot be recorded.
    """
    amount = event.get("amount") or 0
    currency = event.get("currency")
    if currency is None:
        if amount:
            raise Invalid(f"subscription.created of {amount} without a currency: "
                          "no order can be recorded")
        currency = METERED_ORDER_CURRENCY
    return {"user_id": event["user_id"], "order_type": "SUBSCRIPTION", "total_amount": amount,
            "currency": currency, "subscription_id": event["subscription_id"],
            "items": [{"product_id": event["plan_id"], "quantity": 1, "unit_amount": amount,
                       "description": "subscription"}]}


def open_orders(row: dict[str, Any] | None, subscription_id: str | None = None) -> list[str]:
    """The unpaid orders of an index row (of one subscription, if given)."""
    return [s["order_id"] for s in orders_of(row)
            if s["status"] in OPEN_STATUSES
            and (subscription_id is None or s.get("subscription_id") == subscription_id)]


# --------------------------------------------------------------------------
# Decisions (seed names in the flow tables below)


def on_wallet_credits_added(row: dict[str, Any] | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """wallet.credits_added: fulfil the top-up orders the credit delivers."""
    if _seen(row, event):
        return DUPLICATE
    details = {"wallet_id": event["wallet_id"], "credited_amount": str(event["amount"]),
               "currency": event["currency"]}
    if event.get("transaction_id"):
        details["transaction_id"] = event["transaction_id"]
    return _commands(row, event, [
        _command("fulfill", order_id, event, now_ms, fulfillment_details=details)
        for order_id in orders_fulfilled_by_credit(row, event)
    ])


def on_storage_quota_exceeded(row: dict[str, Any] | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """storage.quota_exceeded: create the storage upgrade order storage_service suggests."""
    args = storage_upgrade_order(event)  # validated before the event counts as seen
    if _seen(row, event):
        return DUPLICATE
    order_id = aggregate.derived_id(event["event_id"], "storage-upgrade-order")
    return _commands(row, event, [_command("create", order_id, event, now_ms, **args)])


def on_user_deleted(row: dict[str, Any] | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """user.deleted: cancel all of the user's unpaid orders."""
    if _seen(row, event):
        return DUPLICATE
    detail = event.get("reason") or "user deleted"
    return _commands(row, event, [
        _command("cancel", order_id, event, now_ms, reason="USER_DELETED", detail=detail, if_open=True)
        for order_id in open_orders(row)
    ])


def on_subscription_created(row: dict[str, Any] | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """subscription.created: create the subscription's recurring order record."""
    args = subscription_order(event)
    if _seen(row, event):
        return DUPLICATE
    order_id = aggregate.derived_id(event["event_id"], "subscription-order")
    return _commands(row, event, [_command("create", order_id, event, now_ms, **args)])


def on_subscription_canceled(row: dict[str, Any] | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """subscription.canceled: cancel that subscription's unpaid orders."""
    if _seen(row, event):
        return DUPLICATE
    subscription_id = event["subscription_id"]
    detail = event.get("comment") or f"subscription {subscription_id} canceled"
    return _commands(row, event, [
        _command("cancel", order_id, event, now_ms, reason="SUBSCRIPTION_CANCELED", detail=detail,
                 if_open=True)
        for order_id in open_orders(row, subscription_id)
    ])


# --------------------------------------------------------------------------
# The flow tables


def _index_flow(name: str, key_field: str, index_topic: str, steps: tuple[Step, ...]) -> Flow:
    return Flow(
        name=name,
        producer=ORDER_SERVICE,
        key_field=key_field,
        steps=(Step(index_topic, "merge_index_update", merge), *steps),
        load=load,
        dump=dump,
        shares_rows=True,  # merge and the fan-out handlers return new rows
    )


_C = (ORDER_COMMANDS,)

USER_ORDERS = _index_flow("user-orders", "user_id", USER_ORDER_INDEX, (
    Step("wallet.credits_added", "handle_wallet_credits_added", on_wallet_credits_added, sends=_C),
    Step("storage.quota_exceeded", "handle_storage_quota_exceeded", on_storage_quota_exceeded,
         sends=_C),
    Step("user.deleted", "handle_user_deleted", on_user_deleted, sends=_C),
))

SUBSCRIPTION_ORDERS = _index_flow("subscription-orders", "subscription_id", SUBSCRIPTION_ORDER_INDEX, (
    Step("subscription.created", "handle_subscription_created", on_subscription_created, sends=_C),
    Step("subscription.canceled", "handle_subscription_canceled", on_subscription_canceled, sends=_C),
))
