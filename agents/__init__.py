"""Stream handlers, one module per domain (orders, payments, subscriptions, invoices).

Each domain module exposes ``register(app)``, which declares its agents, tables
and web routes on a :class:`streams.app.PaystreamApp`; :data:`REGISTRARS` lists
them so the worker and the tests build the same app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agents import orders, orders_api

#: In order: the API binds to the aggregates ``orders.register`` declares.
REGISTRARS: list[Callable[[Any], Any]] = [orders.register, orders_api.register]
