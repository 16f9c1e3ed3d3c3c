"""The invoice API on the worker's web server: ``GET /invoices/{invoice_id}``.

Answers the invoice as paystream last learned it from Stripe
(:func:`tables.invoice_state.invoice_view`: status, amounts, due date,
attempt count, the overdue days announced), from the worker that owns the
invoice's partition (a request reaching another worker is forwarded once).
404 for an invoice paystream has not heard of; 503 while partitions move.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agents.invoices import InvoiceService
from streams.aggregate_api import AggregateApi, router_of, serve
from streams.routing import Router


class InvoiceApi(AggregateApi):
    """The handlers; the Faust view below only binds them to a path."""

    def __init__(self, app: Any, service: InvoiceService, router: Router) -> None:
        super().__init__(app, router)
        self.service = service

    async def get(self, request: web.Request, invoice_id: str) -> web.Response:
        return await self.row_view(self.service.invoices, invoice_id, request,
                                   what=f"invoice {invoice_id}",
                                   missing=f"paystream knows no invoice {invoice_id}")


def register(app: Any) -> InvoiceApi:
    """Bind the invoice endpoint to the Faust app's web server (after ``agents.invoices``)."""
    api = InvoiceApi(app, app.invoices, router_of(app))

    serve(app, {"/invoices/{invoice_id}": {"get": api.get}})
    return api
