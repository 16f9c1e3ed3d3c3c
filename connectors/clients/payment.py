"""PaymentClient: the seed's order-service view of the payment service.

paystream's own order path does not use it: orders and payments talk through
events (``order.created`` -> the payment aggregate opens the PaymentIntent
with Stripe -> ``payment.*``), so no order request waits on the payment
service.  The client is here for callers outside that path (another
service, tools) and for the stand-in, both of which speak the spec's
``/payments/intents`` endpoints.
"""

from __future__ import annotations

from connectors.clients.base import BaseClient
from connectors.clients.spec import (
    CancelPaymentRequest,
    PaymentIntent,
    PaymentIntentRequest,
    PaymentRef,
    PaymentStatus,
)


class PaymentClient(BaseClient):
    service = "payment"

    async def create_payment_intent(self, order_id: str, user_id: str, amount: int, currency: str, *,
                                    idempotency_key: str, description: str | None = None) -> PaymentIntent:
        """Open a PaymentIntent for the order (one per key: a retry answers the same intent)."""
        return await self.request("create_payment_intent", PaymentIntentRequest(
            order_id=order_id, user_id=user_id, amount=amount, currency=currency, description=description),
            idempotency_key=idempotency_key)

    async def get_payment_status(self, payment_intent_id: str) -> PaymentStatus:
        """The intent's status; :class:`NotFound` ("payment_not_found") for an unknown intent."""
        return await self.request("get_payment_status", PaymentRef(payment_intent_id=payment_intent_id))

    async def cancel_payment(self, payment_intent_id: str, *, idempotency_key: str,
                             reason: str | None = None) -> PaymentStatus:
        """Cancel an open intent; :class:`Rejected` ("payment_not_cancelable") once it succeeded."""
        return await self.request("cancel_payment", CancelPaymentRequest(
            payment_intent_id=payment_intent_id, reason=reason), idempotency_key=idempotency_key)
