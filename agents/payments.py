"""The payment service of the seed ("Payment Service / Should Subscribe To") on the kernel.

Three aggregates, one per key their inputs arrive by; each is a flow table of
pure decisions (``tables/``) run by the kernel's driver (:mod:`streams.kernel`):

- ``payment_events`` (key order_id, :func:`tables.payment_state.payment_flow`):
  ``handle_order_created`` (opens the order's PaymentIntent with Stripe),
  ``order.expired``/``order.canceled`` (cancel the open intent),
  ``create_refund``, ``retry_payment`` and the Stripe facts.  It owns the
  ``payments`` table and publishes every ``payment.*`` event.
- ``stripe_events`` (key payment_intent_id, :data:`tables.stripe_intents.STRIPE_INTENTS`):
  ``handle_stripe_webhook``, reading the raw ``stripe.events`` the ingress
  writes and forwarding each new fact to its payment.
- ``user_payment_events`` (key user_id, :data:`tables.payment_index.USER_PAYMENTS`):
  the user -> payments index and ``handle_wallet_balance_changed``.

Stripe is called through :class:`connectors.stripe_gateway.StripeGateway`,
built from the settings when the worker is built, so a missing or wrong
``STRIPE_API_KEY`` stops the worker at start with a message saying so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mode import Service

from connectors.stripe_gateway import StripeGateway
from streams.kernel import Aggregate
from tables import payment_index, payment_state, stripe_intents


@dataclass(frozen=True)
class PaymentService:
    """The payment domain's aggregates on one app (the API reads and commands them)."""

    payments: Aggregate
    intents: Aggregate
    user_payments: Aggregate
    gateway: StripeGateway


class GatewayLifecycle(Service):
    """Closes the Stripe gateway's HTTP client when the worker stops."""

    logger = logging.getLogger("faust.paystream.stripe")

    def __init__(self, gateway: StripeGateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gateway = gateway

    async def on_stop(self) -> None:
        await self.gateway.close()


def register(app: Any) -> PaymentService:
    """Declare the payment domain's agents and tables on ``app``."""
    gateway = StripeGateway.from_settings(app.settings)
    app.add_dependency(GatewayLifecycle(gateway))
    service = PaymentService(
        payments=Aggregate(app, payment_state.payment_flow(), agent_name="payment_events",
                           services={payment_state.STRIPE: gateway.call}),
        intents=Aggregate(app, stripe_intents.STRIPE_INTENTS, agent_name="stripe_events"),
        user_payments=Aggregate(app, payment_index.USER_PAYMENTS, agent_name="user_payment_events"),
        gateway=gateway,
    )
    app.payments = service
    return service
