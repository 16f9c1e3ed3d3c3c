"""The subscription part of the seed's payment service on the kernel.

Two aggregates, one per key their inputs arrive by; each a flow table of pure
decisions (``tables/``) run by the kernel's driver (:mod:`streams.kernel`):

- ``subscription_events`` (key subscription_id,
  :func:`tables.subscription_state.subscription_flow`), reading
  ``paystream.subscription-commands`` and ``subscription.usage_exceeded``:
  Stripe's ``customer.subscription.*`` facts, ``open``, ``cancel``, the user
  fan-outs' per-subscription work, ``handle_subscription_usage_exceeded`` and
  the hand-over of its expiry deadlines (``subscription-deadlines``).  It owns
  the ``subscriptions`` table and publishes ``subscription.created``,
  ``.updated``, ``.canceled``, ``.expired`` and the prorated ``payment.refunded``.
- ``user_subscription_events`` (key user_id,
  :data:`tables.subscription_index.USER_SUBSCRIPTIONS`), reading
  ``paystream.user-subscription-index``, ``user.deleted``, ``user.upgraded``
  and ``wallet.insufficient_funds``: ``create_subscription`` (with the user's
  Stripe customer), ``handle_user_deleted``, ``handle_user_upgraded``,
  ``handle_wallet_insufficient_funds``.  (``user.deleted`` is also read by
  the order index, ``user_order_events``: each agent gets every record.)

Stripe is called through the payment domain's gateway when that domain runs
in this worker (one HTTP client, one set of connections), else through one
built here the same way (:class:`connectors.stripe_gateway.StripeGateway`
from the settings, closed when the worker stops).  The payment domain is
registered first when both are named in ``PAYSTREAM_DOMAINS`` in that order
(the default); named the other way round, each builds its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agents.payments import GatewayLifecycle
from connectors.stripe_gateway import StripeGateway
from streams.kernel import Aggregate
from tables import subscription_index, subscription_state
from tables.payment_state import STRIPE

#: The deadline index of the subscription aggregate (a table and its changelog).
DEADLINES = "subscription-deadlines"


@dataclass(frozen=True)
class SubscriptionService:
    """The subscription aggregates on one app (the API reads and commands them)."""

    subscriptions: Aggregate
    user_subscriptions: Aggregate
    gateway: StripeGateway


def gateway_of(app: Any) -> StripeGateway:
    """The payment domain's Stripe gateway if it runs here, else one of our own."""
    payments = getattr(app, "payments", None)
    if payments is not None:
        return payments.gateway
    gateway = StripeGateway.from_settings(app.settings)
    app.add_dependency(GatewayLifecycle(gateway))
    return gateway


def register(app: Any) -> SubscriptionService:
    """Declare the subscription aggregates, their tables and deadlines on ``app``."""
    gateway = gateway_of(app)
    services = {STRIPE: gateway.call}
    service = SubscriptionService(
        subscriptions=Aggregate(app, subscription_state.subscription_flow(),
                                agent_name="subscription_events", deadlines=DEADLINES,
                                services=services),
        user_subscriptions=Aggregate(app, subscription_index.USER_SUBSCRIPTIONS,
                                     agent_name="user_subscription_events", services=services),
        gateway=gateway,
    )
    app.subscriptions = service
    return service
