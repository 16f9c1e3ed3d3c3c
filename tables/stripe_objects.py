"""Stripe Subscription and Invoice objects as the plain dicts paystream keeps.

One codec for both directions a Stripe object reaches paystream: the answers
of the gateway's calls (``connectors.stripe_gateway``, ``StripeObject.to_dict()``)
and the ``data.object`` of a webhook (``tables.stripe_intents``).  The
subscription and invoice aggregates only ever see these views, so a change
of Stripe's shape is handled here once.  Pure: no network, no Kafka.

Conventions of the views: times are epoch **milliseconds** (Stripe sends
seconds), currencies upper-case ISO-4217 codes, ids strings.  A field Stripe
may expand (``customer``, ``latest_invoice``, ``charge``, ...) is read as the
id either way.

Shapes read (stripe-python 16.1's resource classes, Stripe's API reference,
and localstripe 1.15.10's answers and webhooks, recorded in
``tests/fixtures/stripe/``):

* Subscription.  API versions before 2025-03-31 carry ``current_period_start``
  / ``current_period_end`` on the subscription; later ones only on each
  subscription item: the top level wins, the first item's is the fallback.
  The first item names its price as ``price`` (current) and/or ``plan``
  (legacy, and localstripe's only one); localstripe also puts ``plan`` and
  ``quantity`` on the subscription itself and has no top-level ``currency``.
* Invoice.  Before API version 2025-03-31 an invoice names ``subscription``,
  ``payment_intent`` and ``charge`` at its top level (and 2023-2024 versions
  a ``subscription_details.metadata``); from it on, the subscription is
  ``parent.subscription_details.subscription`` (with the subscription's
  ``metadata`` snapshot beside it) and the payments are listed in
  ``payments.data[].payment`` (only when the ``payments`` list is included in
  the answer; a webhook's object usually lacks it, then both ids are None).
  localstripe sends both the old top-level fields and ``parent``, its
  ``charge`` is the whole Charge object, and it has no ``amount_remaining``
  (derived here as ``amount_due - amount_paid``, never below 0) nor
  ``due_date``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class NotAStripeObject(ValueError):
    """The mapping is not the Stripe Subscription / Invoice the view needs.

    The message names the object's id (when it has one) and the field that
    is wrong, never the payload (which may hold personal data).
    """


def subscription_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The paystream view of a Stripe Subscription (see the module docstring).

    Keys: ``subscription_id``, ``customer_id``, ``user_id``
    (``metadata.user_id``), ``status`` (Stripe's, lower case), ``plan_id``
    (the first item's price id, else its plan id, else the subscription's
    ``plan``), ``quantity`` (the first item's, else the subscription's, else
    1), ``amount`` (unit amount of that price/plan times quantity, None when the
    price has no integer ``unit_amount``, e.g. tiered), ``currency``,
    ``current_period_start``, ``current_period_end``,
    ``cancel_at_period_end`` (True only when Stripe says ``true``),
    ``cancel_at``, ``canceled_at``, ``ended_at``, ``latest_invoice_id``,
    ``metadata`` (its string entries).

    Raises :class:`NotAStripeObject` when ``obj`` is not a mapping, has no
    string ``id``, says it is another kind of object, or carries a field of
    the wrong type (a time that is not an integer, metadata that is not an
    object, ...).
    """
    where = _identify(obj, "subscription")
    items = _items(where, obj)
    first = items[0] if items else {}
    price = _first_object(first.get("price"), first.get("plan"), obj.get("plan"))
    plan_id = ref_id(first.get("price")) or ref_id(first.get("plan")) or ref_id(obj.get("plan"))
    quantity = _int(where, "quantity", first.get("quantity"))
    if quantity is None:
        quantity = _int(where, "quantity", obj.get("quantity"))
    if quantity is None:
        quantity = 1
    unit = None
    if price is not None:
        unit = _int(where, "unit_amount", price.get("unit_amount"))
        if unit is None and price.get("object") != "price":  # a Plan names it ``amount``
            unit = _int(where, "amount", price.get("amount"))
    metadata = _metadata(where, obj.get("metadata"))
    return {
        "subscription_id": where,
        "customer_id": ref_id(obj.get("customer")),
        "user_id": nonempty(metadata.get("user_id")),
        "status": nonempty(obj.get("status")),
        "plan_id": plan_id,
        "quantity": quantity,
        "amount": unit * quantity if unit is not None else None,
        "currency": (currency_code(obj.get("currency"))
                     or (currency_code(price.get("currency")) if price else None)),
        "current_period_start": _period(where, obj, first, "current_period_start"),
        "current_period_end": _period(where, obj, first, "current_period_end"),
        "cancel_at_period_end": obj.get("cancel_at_period_end") is True,
        "cancel_at": _ms(where, "cancel_at", obj.get("cancel_at")),
        "canceled_at": _ms(where, "canceled_at", obj.get("canceled_at")),
        "ended_at": _ms(where, "ended_at", obj.get("ended_at")),
        "latest_invoice_id": ref_id(obj.get("latest_invoice")),
        "metadata": metadata,
    }


def invoice_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The paystream view of a Stripe Invoice (see the module docstring).

    Keys: ``invoice_id``, ``customer_id``, ``subscription_id`` (top-level
    ``subscription``, else ``parent.subscription_details.subscription``),
    ``user_id`` (``metadata.user_id``, else the subscription metadata the
    invoice carries, else None), ``status`` (draft/open/paid/uncollectible/
    void, or None), ``amount_due``, ``amount_paid``, ``amount_remaining``,
    ``currency``, ``due_date``, ``created``, ``attempt_count`` (0 when
    absent), ``next_payment_attempt``, ``payment_intent_id``, ``charge_id``
    (top-level fields, else the first paid entry of ``payments``, else its
    first entry), ``billing_reason``, ``period_start``, ``period_end``,
    ``metadata``.

    Raises :class:`NotAStripeObject` when ``obj`` is not a mapping, has no
    string ``id``, says it is another kind of object, lacks an integer
    ``amount_due``, ``amount_paid`` or ``created``, or carries a field of the
    wrong type.
    """
    where = _identify(obj, "invoice")
    metadata = _metadata(where, obj.get("metadata"))
    parent = obj.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, Mapping) else None
    details = details if isinstance(details, Mapping) else {}
    legacy_details = obj.get("subscription_details")
    legacy_details = legacy_details if isinstance(legacy_details, Mapping) else {}
    sub_metadata = {**_metadata(where, legacy_details.get("metadata")),
                    **_metadata(where, details.get("metadata"))}
    amount_due = _required_int(where, "amount_due", obj.get("amount_due"))
    amount_paid = _required_int(where, "amount_paid", obj.get("amount_paid"))
    remaining = _int(where, "amount_remaining", obj.get("amount_remaining"))
    payment = _invoice_payment(where, obj.get("payments"))
    created = _ms(where, "created", obj.get("created"))
    if created is None:
        raise NotAStripeObject(f"invoice {where}: no 'created' time")
    return {
        "invoice_id": where,
        "customer_id": ref_id(obj.get("customer")),
        "subscription_id": ref_id(obj.get("subscription")) or ref_id(details.get("subscription")),
        "user_id": nonempty(metadata.get("user_id")) or nonempty(sub_metadata.get("user_id")),
        "status": nonempty(obj.get("status")),
        "amount_due": amount_due,
        "amount_paid": amount_paid,
        "amount_remaining": remaining if remaining is not None else max(amount_due - amount_paid, 0),
        "currency": currency_code(obj.get("currency")),
        "due_date": _ms(where, "due_date", obj.get("due_date")),
        "created": created,
        "attempt_count": _int(where, "attempt_count", obj.get("attempt_count")) or 0,
        "next_payment_attempt": _ms(where, "next_payment_attempt", obj.get("next_payment_attempt")),
        "payment_intent_id": ref_id(obj.get("payment_intent")) or ref_id(payment.get("payment_intent")),
        "charge_id": ref_id(obj.get("charge")) or ref_id(payment.get("charge")),
        "billing_reason": nonempty(obj.get("billing_reason")),
        "period_start": _ms(where, "period_start", obj.get("period_start")),
        "period_end": _ms(where, "period_end", obj.get("period_end")),
        "metadata": metadata,
    }


def _identify(obj: Any, kind: str) -> str:
    if not isinstance(obj, Mapping):
        raise NotAStripeObject(f"a {kind} must be a JSON object, not {type(obj).__name__}")
    object_id = obj.get("id")
    if not isinstance(object_id, str) or not object_id:
        raise NotAStripeObject(f"a {kind} without a string id")
    found = obj.get("object", kind)
    if found != kind:
        raise NotAStripeObject(f"{object_id}: object is {short_repr(found)}, not a Stripe {kind}")
    return object_id


def _items(where: str, obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = obj.get("items")
    if items is None:
        return []
    data = items.get("data") if isinstance(items, Mapping) else items
    if not isinstance(data, list) or not all(isinstance(i, Mapping) for i in data):
        raise NotAStripeObject(f"subscription {where}: items is not a list of objects")
    return data


def _first_object(*candidates: Any) -> Mapping[str, Any] | None:
    for candidate in candidates:
        if isinstance(candidate, Mapping):
            return candidate
    return None


def _period(where: str, obj: Mapping[str, Any], item: Mapping[str, Any], name: str) -> int | None:
    top = _ms(where, name, obj.get(name))
    return top if top is not None else _ms(where, name, item.get(name))


def _invoice_payment(where: str, payments: Any) -> Mapping[str, Any]:
    """The ``payment`` of the first paid entry of ``payments`` (else the first entry)."""
    if payments is None:
        return {}
    data = payments.get("data") if isinstance(payments, Mapping) else None
    if not isinstance(data, list):
        raise NotAStripeObject(f"invoice {where}: payments is not a list object")
    entries = [e for e in data if isinstance(e, Mapping) and isinstance(e.get("payment"), Mapping)]
    paid = [e for e in entries if e.get("status") == "paid"]
    chosen = (paid or entries or [{}])[0]
    return chosen.get("payment") or {}


def _metadata(where: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise NotAStripeObject(f"{where}: metadata is not an object")
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _int(where: str, name: str, value: Any) -> int | None:
    """An integer field; None when absent or null.

    localstripe echoes a number given in a form as its text; Stripe always
    sends an integer, so a string of digits is accepted and nothing else.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise NotAStripeObject(f"{where}: {name} is not an integer")
    return value


def _required_int(where: str, name: str, value: Any) -> int:
    number = _int(where, name, value)
    if number is None:
        raise NotAStripeObject(f"{where}: no integer {name}")
    return number


def _ms(where: str, name: str, value: Any) -> int | None:
    seconds = _int(where, name, value)
    return seconds * 1000 if seconds is not None else None


def ref_id(value: Any) -> str | None:
    """An id field: the id string, or the id of an expanded object; None otherwise."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def nonempty(value: Any) -> str | None:
    """A non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def currency_code(value: Any) -> str | None:
    """A currency as our contracts carry it (upper case), None when not a non-empty string."""
    return value.upper() if isinstance(value, str) and value else None


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to 40 characters, for an error message that must not carry a payload."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
