"""Stripe's webhooks, re-keyed to the payment, subscription or invoice they are about.

``stripe.events`` holds every webhook the ingress accepted, verbatim, keyed by
the PaymentIntent it is about (:func:`tables.stripe_events.event_key`).  The
payments are keyed by their order (:mod:`tables.payment_state`), so this
aggregate, keyed by the intent, sits between the two: it remembers which
order an intent belongs to (from the intent's metadata, which paystream sets
when it opens the intent), de-duplicates Stripe's event ids, and forwards each
new fact as a ``stripe`` command to the payment, under a command id derived
from the Stripe event id.  A charge or refund event whose object carries no
metadata (a refund made in Stripe's dashboard) still reaches its payment:
the intent's row knows the order.

An event about an intent no order claims (no ``order_id`` in its metadata,
and none learnt before) is counted in the row (``unlinked``) and otherwise
left where it is: the raw record stays in ``stripe.events``, which keeps a
year of Stripe's events.  An event that is not a well-formed Stripe event (the
ingress refuses those, so another writer put it there) is refused, hence
dead-lettered.

Subscription and invoice events (``customer.subscription.*``, ``invoice.*``)
are keyed on ``stripe.events`` by the subscription or invoice itself, so
their rows here are per subscription / invoice and hold only the Stripe event
ids already forwarded: each new one goes on as a ``stripe`` command to
``SUBSCRIPTION_COMMANDS`` / ``INVOICE_COMMANDS`` (see
:func:`object_command`), carrying the object as
:func:`tables.stripe_objects.subscription_view` / ``invoice_view`` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streams.catalog import (
    INVOICE_COMMANDS,
    PAYMENT_COMMANDS,
    PAYMENT_INTENT_LINKS,
    PAYMENT_SERVICE,
    STRIPE_EVENTS,
    SUBSCRIPTION_COMMANDS,
)
from tables import aggregate
from tables.aggregate import DUPLICATE, Decision, Flow, Invalid, Send, Step
from tables.stripe_events import (
    INVOICE_TYPES,
    SUBSCRIPTION_TYPES,
    NotAStripeEvent,
    PaymentFact,
    StripeEvent,
    event_from_dict,
    payment_fact,
)
from tables.stripe_objects import NotAStripeObject, invoice_view, subscription_view

#: Stripe event ids an intent's row remembers: an intent sees a handful of
#: events, and Stripe retries one for at most three days.
MAX_APPLIED = 64

Row = dict[str, Any]


def load(stored: Mapping[str, Any]) -> Row:
    return dict(stored)


def dump(row: Row) -> Row:
    return row


def fact_command(fact: PaymentFact, order_id: str, now_ms: int) -> dict[str, Any]:
    """The ``stripe`` command that carries ``fact`` to the payment of ``order_id``."""
    refunds = [{"refund_id": r.refund_id, "amount": r.amount, "currency": r.currency,
                "status": r.status, "reason": r.reason, "command_id": r.command_id}
               for r in fact.refunds]
    return aggregate.command(
        "stripe", "order_id", order_id, cause={"event_id": fact.stripe_event_id}, now_ms=now_ms,
        command_id=aggregate.derived_id("stripe", fact.stripe_event_id),
        kind=fact.kind, stripe_event_id=fact.stripe_event_id, occurred_at_ms=fact.occurred_at_ms,
        payment_intent_id=fact.payment_intent_id, user_id=fact.user_id, amount=fact.amount,
        currency=fact.currency, status=fact.status, error_code=fact.error_code,
        error_message=fact.error_message, payment_method=fact.payment_method, refunds=refunds,
    )


def object_command(event: StripeEvent, message: Mapping[str, Any], now_ms: int) -> Send | None:
    """The ``stripe`` command a subscription or invoice event becomes (None for other types).

    ``customer.subscription.*``: to ``SUBSCRIPTION_COMMANDS`` keyed by the
    subscription id, with ``subscription=<subscription_view>``;
    ``invoice.*``: to ``INVOICE_COMMANDS`` keyed by the invoice id, with
    ``invoice=<invoice_view>``.  Both carry ``stripe_event_id``,
    ``stripe_type``, ``occurred_at_ms`` (the event's ``created``) and
    ``previous``: the sorted names of ``data.previous_attributes`` (what an
    ``*.updated`` event changed; [] when there are none).  The command id is
    derived from the Stripe event id, so a redelivery is the same command.
    Raises :class:`~tables.stripe_objects.NotAStripeObject` when the object
    is not a readable Subscription / Invoice.
    """
    if event.type in SUBSCRIPTION_TYPES:
        topic, key_field, name = SUBSCRIPTION_COMMANDS, "subscription_id", "subscription"
        view = subscription_view(event.object)
    elif event.type in INVOICE_TYPES:
        topic, key_field, name = INVOICE_COMMANDS, "invoice_id", "invoice"
        view = invoice_view(event.object)
    else:
        return None
    data = message.get("data")
    previous = data.get("previous_attributes") if isinstance(data, Mapping) else None
    changed = sorted(k for k in previous if isinstance(k, str)) if isinstance(previous, Mapping) else []
    key = view[key_field]
    command = aggregate.command(
        "stripe", key_field, key, cause={"event_id": event.id}, now_ms=now_ms,
        command_id=aggregate.derived_id("stripe", event.id), stripe_event_id=event.id,
        stripe_type=event.type, occurred_at_ms=event.created * 1000, previous=changed,
        **{name: view},
    )
    return Send(topic, key, command)


def handle_stripe_webhook(row: Row | None, message: Mapping[str, Any], now_ms: int) -> Decision:
    """A Stripe event from ``stripe.events``: forward it to the payment, subscription or invoice.

    The row (one per record key: a PaymentIntent, a subscription or an
    invoice) remembers the last :data:`MAX_APPLIED` Stripe event ids, so a
    redelivered event is a duplicate and forwarded once.
    """
    try:
        event = event_from_dict(message)
        fact = payment_fact(event)
        send = object_command(event, message, now_ms)
    except (NotAStripeEvent, NotAStripeObject) as exc:
        raise Invalid(str(exc)) from None
    current = row or {}
    applied = list(current.get("applied") or [])
    if event.id in applied:
        return DUPLICATE
    updated = {**current, "applied": [*applied, event.id][-MAX_APPLIED:]}
    if send is not None:
        return Decision(row=updated, send=(send,))
    if fact is None:  # a type paystream does not read (the ingress lets none through)
        return Decision(row=updated)
    updated["payment_intent_id"] = fact.payment_intent_id
    order_id = fact.order_id or current.get("order_id")
    if order_id is None:
        updated["unlinked"] = int(current.get("unlinked") or 0) + 1
        return Decision(row=updated)
    updated["order_id"] = order_id
    updated["user_id"] = fact.user_id or current.get("user_id")
    command = fact_command(fact, order_id, now_ms)
    return Decision(row=updated, send=(Send(PAYMENT_COMMANDS, order_id, command),))


def link_payment_intent(row: Row | None, link: Mapping[str, Any], now_ms: int) -> Decision:
    """The payment service opened this intent for an order: remember which.

    Sent when the intent is created, so the intent's events find their
    payment even when their objects carry no metadata and arrive first.
    """
    order_id = link.get("order_id")
    if not isinstance(order_id, str) or not order_id:
        raise Invalid("intent link without an order_id")
    current = row or {}
    if current.get("order_id") == order_id:
        return DUPLICATE
    return Decision(row={**current, "payment_intent_id": link.get("payment_intent_id"),
                         "order_id": order_id, "user_id": link.get("user_id")})


STRIPE_INTENTS = Flow(
    name="stripe-intents",
    producer=PAYMENT_SERVICE,
    key_field="payment_intent_id",
    steps=(
        Step(STRIPE_EVENTS, "handle_stripe_webhook", handle_stripe_webhook,
             sends=(PAYMENT_COMMANDS, SUBSCRIPTION_COMMANDS, INVOICE_COMMANDS)),
        Step(PAYMENT_INTENT_LINKS, "link_payment_intent", link_payment_intent),
    ),
    load=load,
    dump=dump,
)
