"""Stream handlers, one module per domain (orders, payments, subscriptions, invoices).

Each domain module exposes ``register(app)``, which declares its agents, tables
and web routes on a :class:`streams.app.PaystreamApp`; :data:`DOMAINS` lists
them by domain so the worker and the tests build the same app, with the
domains ``PAYSTREAM_DOMAINS`` names.  The sinks (``notifications``,
``billing``) are domains too, run by a worker group of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from agents import (
    invoices,
    invoices_api,
    orders,
    orders_api,
    payments,
    payments_api,
    subscriptions,
    subscriptions_api,
)
from connectors import sinks

Registrar = Callable[[Any], Any]

#: Domain -> its registrars, in order (an API binds to the aggregates before it).
DOMAINS: dict[str, list[Registrar]] = {
    "orders": [orders.register, orders_api.register],
    "payments": [payments.register, payments_api.register],
    # After "payments" so that its Stripe gateway is reused (agents.subscriptions).
    "subscriptions": [subscriptions.register, subscriptions_api.register,
                      invoices.register, invoices_api.register],
    # The event sinks: not in the default PAYSTREAM_DOMAINS; they run in a
    # worker group of their own (``paystream sinks``; see connectors.sinks).
    "notifications": [sinks.register_notifications],
    "billing": [sinks.register_billing],
}

#: Every domain's registrars.
REGISTRARS: list[Registrar] = [r for registrars in DOMAINS.values() for r in registrars]


def registrars_for(domains: Iterable[str]) -> list[Registrar]:
    """The registrars of ``domains``; ValueError naming an unknown one."""
    chosen: list[Registrar] = []
    for domain in domains:
        if domain not in DOMAINS:
            raise ValueError(f"PAYSTREAM_DOMAINS: unknown domain {domain!r}; "
                             f"known: {', '.join(DOMAINS)}")
        chosen.extend(DOMAINS[domain])
    return chosen
