"""The billing sink's flow: which BillingClient method each event becomes.

The events whose "Subscribers" column names billing_service and move money,
plus the order's billing record the seed's order service makes with
``create_order_billing_record``:

- ``payment.completed`` -> ``create_billing_record`` kind "payment" (user_id,
  amount, currency, payment_intent_id);
- ``payment.refunded`` -> ``create_billing_record`` kind "refund" (the amount
  refunded; payment_intent_id = the event's payment_id);
- ``order.completed`` -> ``create_order_billing_record`` (order_id, user_id,
  total_amount, currency, order_status "COMPLETED", payment_intent_id = the
  event's payment_id);
- ``invoice.created`` -> ``create_billing_record`` kind "invoice" (invoice_id,
  the amount owed);
- ``invoice.paid`` -> ``create_billing_record`` kind "payment" (invoice_id,
  payment_intent_id = the event's payment_id).

Not read: ``invoice.overdue`` (no money moves: it is a notification's
business), ``payment.intent.created`` (an intent is not yet a payment),
``subscription.*`` (no producer yet; the invoices are what is billed).

A paid order gives two records, as in the seed: the payment received
(payment.completed, kind "payment") and the order billed (order.completed).
Every call carries the event id as idempotency key and ``source_event_id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tables.sinks import SinkRoute, sink_flow

SERVICE = "billing"


def _payment(event: Mapping[str, Any]) -> dict[str, Any]:
    order = event.get("order_id")
    return {"user_id": event["user_id"], "amount": event["amount"], "currency": event["currency"],
            "kind": "payment", "payment_intent_id": event["payment_intent_id"],
            "description": f"order {order}" if order else None}


def _refund(event: Mapping[str, Any]) -> dict[str, Any]:
    order = event.get("order_id")
    return {"user_id": event["user_id"], "amount": event["amount"], "currency": event["currency"],
            "kind": "refund", "payment_intent_id": event["payment_id"],
            "description": f"refund {event['refund_id']} ({event['reason']})"
                           + (f" of order {order}" if order else "")}


def _order(event: Mapping[str, Any]) -> dict[str, Any]:
    return {"order_id": event["order_id"], "user_id": event["user_id"], "amount": event["total_amount"],
            "currency": event["currency"], "order_status": "COMPLETED",
            "payment_intent_id": event.get("payment_id")}


def _invoice_created(event: Mapping[str, Any]) -> dict[str, Any]:
    return {"user_id": event["user_id"], "amount": event["amount"], "currency": event["currency"],
            "kind": "invoice", "invoice_id": event["invoice_id"], "description": "invoice created"}


def _invoice_paid(event: Mapping[str, Any]) -> dict[str, Any]:
    return {"user_id": event["user_id"], "amount": event["amount"], "currency": event["currency"],
            "kind": "payment", "invoice_id": event["invoice_id"],
            "payment_intent_id": event.get("payment_id"), "description": "invoice paid"}


ROUTES: tuple[SinkRoute, ...] = (
    SinkRoute("payment.completed", "bill_payment_completed", SERVICE, "create_billing_record", _payment),
    SinkRoute("payment.refunded", "bill_payment_refunded", SERVICE, "create_billing_record", _refund),
    SinkRoute("order.completed", "bill_order_completed", SERVICE, "create_order_billing_record", _order),
    SinkRoute("invoice.created", "bill_invoice_created", SERVICE, "create_billing_record", _invoice_created),
    SinkRoute("invoice.paid", "bill_invoice_paid", SERVICE, "create_billing_record", _invoice_paid),
)

#: The billing sink on the kernel (no table rows: the service remembers the keys).
BILLING = sink_flow("billing_sink", ROUTES)
