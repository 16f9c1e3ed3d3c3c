"""The notification sink's flow: which NotificationClient method each event becomes.

The seed's decision matrix sends notifications by event, never on a request
path; these are the events whose "Subscribers" column names
notification_service (plus ``payment.completed``, the payment receipt the
seed's payment service sends with ``send_payment_receipt``):

- ``order.completed`` -> ``send_order_confirmation`` (user_id, order_id,
  total_amount, currency);
- ``order.canceled`` / ``order.expired`` / ``order.fulfilled`` ->
  ``send_order_status`` with order_status "CANCELED" (reason: the cancel
  reason) / "EXPIRED" / "FULFILLED";
- ``payment.completed`` -> ``send_payment_receipt`` (user_id,
  payment_intent_id, amount, currency, order_id);
- ``payment.refunded`` -> ``send_order_status`` "REFUNDED" with reason
  "<refund reason>: <amount> <currency>", for a refund of an order only (no
  method notifies a refund of anything else: such a refund is skipped);
- ``invoice.created`` / ``invoice.paid`` / ``invoice.overdue`` ->
  ``send_invoice`` with invoice_status "created" / "paid" / "overdue",
  amount, currency and due_date (ISO-8601, when the event has one).

Every call carries the event id as idempotency key and ``source_event_id``
(:mod:`tables.sinks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tables.sinks import ArgsOf, SinkRoute, iso_date, sink_flow

SERVICE = "notification"


def _order_status(status: str, reason_field: str | None = None) -> ArgsOf:
    def args(event: Mapping[str, Any]) -> dict[str, Any]:
        reason = event.get(reason_field) if reason_field else None
        return {"user_id": event["user_id"], "order_id": event["order_id"], "order_status": status,
                "reason": str(reason) if reason is not None else None}
    return args


def _confirmation(event: Mapping[str, Any]) -> dict[str, Any]:
    return {"user_id": event["user_id"], "order_id": event["order_id"],
            "total_amount": event["total_amount"], "currency": event["currency"]}


def _receipt(event: Mapping[str, Any]) -> dict[str, Any]:
    return {"user_id": event["user_id"], "payment_intent_id": event["payment_intent_id"],
            "amount": event["amount"], "currency": event["currency"], "order_id": event.get("order_id")}


def _refund(event: Mapping[str, Any]) -> dict[str, Any] | None:
    if not event.get("order_id"):
        return None
    return {"user_id": event["user_id"], "order_id": event["order_id"], "order_status": "REFUNDED",
            "reason": f"{event['reason']}: {event['amount']} {event['currency']}"}


def _invoice(status: str) -> ArgsOf:
    def args(event: Mapping[str, Any]) -> dict[str, Any]:
        return {"user_id": event["user_id"], "invoice_id": event["invoice_id"], "amount": event["amount"],
                "currency": event["currency"], "invoice_status": status,
                "due_date": iso_date(event.get("due_date"))}
    return args


ROUTES: tuple[SinkRoute, ...] = (
    SinkRoute("order.completed", "notify_order_completed", SERVICE, "send_order_confirmation",
              _confirmation),
    SinkRoute("order.canceled", "notify_order_canceled", SERVICE, "send_order_status",
              _order_status("CANCELED", "reason")),
    SinkRoute("order.expired", "notify_order_expired", SERVICE, "send_order_status",
              _order_status("EXPIRED")),
    SinkRoute("order.fulfilled", "notify_order_fulfilled", SERVICE, "send_order_status",
              _order_status("FULFILLED")),
    SinkRoute("payment.completed", "notify_payment_completed", SERVICE, "send_payment_receipt", _receipt),
    SinkRoute("payment.refunded", "notify_payment_refunded", SERVICE, "send_order_status", _refund),
    SinkRoute("invoice.created", "notify_invoice_created", SERVICE, "send_invoice", _invoice("created")),
    SinkRoute("invoice.paid", "notify_invoice_paid", SERVICE, "send_invoice", _invoice("paid")),
    SinkRoute("invoice.overdue", "notify_invoice_overdue", SERVICE, "send_invoice", _invoice("overdue")),
)

#: The notification sink on the kernel (no table rows: the service remembers the keys).
NOTIFICATIONS = sink_flow("notification_sink", ROUTES)
