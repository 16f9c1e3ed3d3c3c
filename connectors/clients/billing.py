"""BillingClient: the billing service (billing records of payments, refunds, invoices and orders).

The record-creating methods take an ``idempotency_key`` derived from their
cause (the sinks pass the event id), so a redelivered event makes one record.
"""

from __future__ import annotations

from connectors.clients.base import BaseClient
from connectors.clients.spec import (
    BillingHistory,
    BillingHistoryRequest,
    BillingRecord,
    BillingRecordRequest,
    OrderBillingRecordRequest,
)


class BillingClient(BaseClient):
    service = "billing"

    async def create_billing_record(self, user_id: str, amount: int, currency: str, kind: str, *,
                                    idempotency_key: str, description: str | None = None,
                                    payment_intent_id: str | None = None, invoice_id: str | None = None,
                                    source_event_id: str | None = None) -> BillingRecord:
        """Record a payment, refund, invoice or credit (``kind``) for the user."""
        return await self.request("create_billing_record", BillingRecordRequest(
            user_id=user_id, amount=amount, currency=currency, kind=kind, description=description,
            payment_intent_id=payment_intent_id, invoice_id=invoice_id, source_event_id=source_event_id),
            idempotency_key=idempotency_key)

    async def get_billing_history(self, user_id: str, *, limit: int | None = None) -> BillingHistory:
        """The user's records, newest first (at most ``limit``); empty for a user without any."""
        return await self.request("get_billing_history", BillingHistoryRequest(user_id=user_id, limit=limit))

    async def create_order_billing_record(self, order_id: str, user_id: str, amount: int, currency: str,
                                          order_status: str, *, idempotency_key: str,
                                          payment_intent_id: str | None = None,
                                          source_event_id: str | None = None) -> BillingRecord:
        """Record an order's billing at ``order_status`` (e.g. "COMPLETED")."""
        return await self.request("create_order_billing_record", OrderBillingRecordRequest(
            order_id=order_id, user_id=user_id, amount=amount, currency=currency, order_status=order_status,
            payment_intent_id=payment_intent_id, source_event_id=source_event_id),
            idempotency_key=idempotency_key)
