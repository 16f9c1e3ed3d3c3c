"""The payment API on the worker's web server: ``create_refund`` and payment queries.

- ``GET /payments/{payment_intent_id}``: the payment a PaymentIntent pays.
- ``GET /orders/{order_id}/payment``: the payment of an order.
- ``POST /payments/{payment_intent_id}/refunds`` ``{"amount"?: int, "reason"?: str}``
  (seed: ``create_refund``): a Stripe refund of the payment; 201 with the
  refund and the payment.  ``amount`` defaults to all that remains; more than
  remains is 400 ``amount_too_large``; a payment that was not paid, 409.

A payment is keyed by its order.  A request naming an intent is routed first
to the worker owning the intent in the intent index (which knows its order),
then to the owner of the order's payment: a request hops at most once per
table.  Answers and Idempotency-Key handling are the kernel API's
(:mod:`streams.aggregate_api`): a refund retried under its key makes one
Stripe refund and answers it again; the key with other parameters is 422.
A key is scoped to the payment and remembered for the payment's last
:data:`tables.payment_state.MAX_IDEMPOTENCY_KEYS` keyed refunds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agents.payments import PaymentService
from streams.aggregate_api import AggregateApi, BadRequest, error, json_body, router_of, serve
from streams.routing import Router

REFUND_FIELDS = frozenset({"amount", "reason"})


class PaymentApi(AggregateApi):
    """The handlers; the Faust views below only bind them to paths."""

    def __init__(self, app: Any, service: PaymentService, router: Router) -> None:
        super().__init__(app, router)
        self.service = service

    async def _by_intent(self, request: web.Request, intent_id: str,
                         then: Callable[[str], Awaitable[web.Response]]) -> web.Response:
        """Find the order of ``intent_id`` on the intent's owner, then go on with it."""

        async def here() -> web.Response:
            row = self.service.intents.row(intent_id)
            order_id = (row or {}).get("order_id")
            if order_id is None:
                return self.not_readable(f"payment intent {intent_id}") or error(
                    404, "not_found", f"no payment of paystream uses PaymentIntent {intent_id}")
            return await then(order_id)

        return await self.owned(self.service.intents, intent_id, request, here)

    async def payment(self, request: web.Request, order_id: str) -> web.Response:
        return await self.row_view(self.service.payments, order_id, request,
                                   what=f"payment of order {order_id}",
                                   missing=f"order {order_id} has no payment")

    async def get(self, request: web.Request, payment_intent_id: str) -> web.Response:
        return await self._by_intent(request, payment_intent_id,
                                     lambda order_id: self.payment(request, order_id))

    async def refund(self, request: web.Request, payment_intent_id: str) -> web.Response:
        try:
            body = await json_body(request)
            unknown = sorted(set(body) - REFUND_FIELDS)
            if unknown:
                raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
        except BadRequest as exc:
            return error(400, "bad_request", str(exc))

        async def on_owner(order_id: str) -> web.Response:
            async def here() -> web.Response:
                payments = self.service.payments
                record = self.keyed_command(payments, "refund", order_id, request, body)
                return await self.command_on(payments, record, success=201)

            return await self.owned(self.service.payments, order_id, request, here)

        return await self._by_intent(request, payment_intent_id, on_owner)


def register(app: Any) -> PaymentApi:
    """Bind the payment endpoints to the Faust app's web server (after ``agents.payments``)."""
    api = PaymentApi(app, app.payments, router_of(app))

    serve(app, {
        "/payments/{payment_intent_id}": {"get": api.get},
        "/payments/{payment_intent_id}/refunds": {"post": api.refund},
        "/orders/{order_id}/payment": {"get": api.payment},
    })
    return api
