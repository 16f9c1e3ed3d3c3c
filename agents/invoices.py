"""The invoice part of the seed's payment service on the kernel.

One aggregate, ``invoice_events`` (key invoice_id,
:func:`tables.invoice_state.invoice_flow`), reading
``paystream.invoice-commands``: Stripe's ``invoice.*`` webhooks re-keyed by
``handle_stripe_webhook`` (:mod:`tables.stripe_intents`), the overage
invoices the subscription aggregate opens at Stripe (``open``), and the
hand-over of its overdue deadlines (``invoice-deadlines``, the kernel's
persisted deadlines of :mod:`tables.deadlines`).  It owns the ``invoices``
table and publishes ``invoice.created``, ``invoice.paid``,
``invoice.overdue`` and ``subscription.payment_failed``.

No step calls Stripe: every input carries the invoice as Stripe reported it,
so the aggregate needs no service.  The cadence of ``invoice.overdue`` is the
setting ``INVOICE_OVERDUE_DAYS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streams.kernel import Aggregate
from tables import invoice_state

#: The deadline index of the invoice aggregate (a table and its changelog).
DEADLINES = "invoice-deadlines"


@dataclass(frozen=True)
class InvoiceService:
    """The invoice aggregate on one app (the API reads it)."""

    invoices: Aggregate


def register(app: Any) -> InvoiceService:
    """Declare the invoice aggregate, its table and its deadlines on ``app``."""
    flow = invoice_state.invoice_flow(app.settings.overdue_days)
    service = InvoiceService(
        invoices=Aggregate(app, flow, agent_name="invoice_events", deadlines=DEADLINES))
    app.invoices = service
    return service
