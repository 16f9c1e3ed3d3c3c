"""The order service of the seed ("Order Service / Should Subscribe To") on the kernel.

Three aggregates, one per key their inputs arrive by, so each row has exactly
one writer and no locks are needed; each is a flow table of pure decisions
(``tables/``) run by the kernel's driver (:mod:`streams.kernel`):

- ``order_events`` (key order_id, :func:`tables.order_state.order_flow`):
  the order commands (create, cancel, fulfill, update, expire) and
  ``handle_payment_intent_created``, ``handle_payment_completed``,
  ``handle_payment_failed``, ``handle_payment_refunded``.  It owns the
  ``orders`` table and the payment deadlines (``order-deadlines``), and
  publishes every ``order.*`` event.
- ``user_order_events`` (key user_id, :data:`tables.order_index.USER_ORDERS`):
  the user -> orders index, ``handle_wallet_credits_added``,
  ``handle_storage_quota_exceeded``, ``handle_user_deleted``.
- ``subscription_order_events`` (key subscription_id,
  :data:`tables.order_index.SUBSCRIPTION_ORDERS`): the subscription -> orders
  index, ``handle_subscription_created``, ``handle_subscription_canceled``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streams.kernel import Aggregate
from tables import order_index, order_state


@dataclass(frozen=True)
class OrderService:
    """The order domain's aggregates on one app (the API reads and commands them)."""

    orders: Aggregate
    user_orders: Aggregate
    subscription_orders: Aggregate


def register(app: Any) -> OrderService:
    """Declare the order domain's agents, tables and deadlines on ``app``."""
    window_ms = int(app.settings.order_payment_window_seconds * 1000)
    service = OrderService(
        orders=Aggregate(app, order_state.order_flow(window_ms), agent_name="order_events",
                         deadlines="order-deadlines"),
        user_orders=Aggregate(app, order_index.USER_ORDERS, agent_name="user_order_events"),
        subscription_orders=Aggregate(app, order_index.SUBSCRIPTION_ORDERS,
                                      agent_name="subscription_order_events"),
    )
    app.orders = service
    return service
