"""NotificationClient: the notification service (receipts, invoices, order confirmations and status).

By the seed's decision matrix notifications never block a request: these
methods are for the notification sink, which calls them with the event id as
``idempotency_key``, so a redelivered event notifies once.
"""

from __future__ import annotations

from connectors.clients.base import BaseClient
from connectors.clients.spec import (
    InvoiceNotificationRequest,
    NotificationAccepted,
    OrderConfirmationRequest,
    OrderStatusRequest,
    PaymentReceiptRequest,
)


class NotificationClient(BaseClient):
    service = "notification"

    async def send_payment_receipt(self, user_id: str, payment_intent_id: str, amount: int, currency: str, *,
                                   idempotency_key: str, order_id: str | None = None,
                                   source_event_id: str | None = None) -> NotificationAccepted:
        return await self.request("send_payment_receipt", PaymentReceiptRequest(
            user_id=user_id, payment_intent_id=payment_intent_id, amount=amount, currency=currency,
            order_id=order_id, source_event_id=source_event_id), idempotency_key=idempotency_key)

    async def send_invoice(self, user_id: str, invoice_id: str, amount: int, currency: str,
                           invoice_status: str, *, idempotency_key: str, due_date: str | None = None,
                           source_event_id: str | None = None) -> NotificationAccepted:
        return await self.request("send_invoice", InvoiceNotificationRequest(
            user_id=user_id, invoice_id=invoice_id, amount=amount, currency=currency,
            invoice_status=invoice_status, due_date=due_date, source_event_id=source_event_id),
            idempotency_key=idempotency_key)

    async def send_order_confirmation(self, user_id: str, order_id: str, total_amount: int, currency: str, *,
                                      idempotency_key: str,
                                      source_event_id: str | None = None) -> NotificationAccepted:
        return await self.request("send_order_confirmation", OrderConfirmationRequest(
            user_id=user_id, order_id=order_id, total_amount=total_amount, currency=currency,
            source_event_id=source_event_id), idempotency_key=idempotency_key)

    async def send_order_status(self, user_id: str, order_id: str, order_status: str, *,
                                idempotency_key: str, reason: str | None = None,
                                source_event_id: str | None = None) -> NotificationAccepted:
        return await self.request("send_order_status", OrderStatusRequest(
            user_id=user_id, order_id=order_id, order_status=order_status, reason=reason,
            source_event_id=source_event_id), idempotency_key=idempotency_key)
