"""Stripe webhook events -> payment facts: the pure half of the payment service.

The webhook ingress (``connectors.stripe_ingress``) stores every Stripe event
it accepts byte for byte on ``stripe.events``; the payment agent reads them
back and turns them into facts about one PaymentIntent with this module.
Subscription and invoice events (:data:`SUBSCRIPTION_TYPES`,
:data:`INVOICE_TYPES`) are consumed too: this module keys them by their
object and reads their envelope; their objects are read by
:mod:`tables.stripe_objects`.  Nothing here touches Kafka, aiohttp or the
network, so every rule is unit-tested against Stripe's payload shapes
(``tests/fixtures/stripe``).

Payload shapes are those of Stripe's API versions 2024 and later (the
``stripe`` package's resource classes and Stripe's API reference), and older
ones where they agree:

* ``payment_intent.*``: ``data.object`` is a PaymentIntent (``pi_...``) with
  ``amount``, ``currency`` (lower case), ``status``, ``metadata``,
  ``payment_method`` (an id, or the object when expanded) and, after a
  failure, ``last_payment_error`` (``code``, ``decline_code``, ``message``,
  ``payment_method`` as an object; ``payment_method`` on the intent is then
  null).
* ``charge.refunded``: ``data.object`` is a Charge (``ch_...``) with
  ``payment_intent``, ``amount``, ``amount_refunded`` (the running total).
  Since API version 2022-11-15 a Charge no longer carries its ``refunds``
  list unless the endpoint expands it, so a ``charge.refunded`` fact usually
  has *no* refunds: the refunds themselves arrive as ``refund.*`` events,
  and that is what the payment flow relies on.  When the list is present
  (older API versions, or an expanded endpoint), every refund in it becomes
  a :class:`RefundFact`.
* ``refund.created|updated|failed`` and the older ``charge.refund.updated``:
  ``data.object`` is a Refund (``re_...``) with ``payment_intent``,
  ``charge``, ``amount``, ``currency``, ``status`` (nullable), ``reason``,
  ``metadata``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Any

from schemas.contracts import enum_symbols
from tables.stripe_objects import currency_code, nonempty, ref_id, short_repr


class NotAStripeEvent(ValueError):
    """The bytes or the object are not a Stripe event this module can read.

    The message says what is wrong (never the payload itself, which may hold
    personal data).
    """


#: Event types about a payment (a PaymentIntent, its charge or a refund):
#: :func:`payment_fact` reads them.
PAYMENT_TYPES: frozenset[str] = frozenset({
    "payment_intent.created",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.canceled",
    "charge.refunded",
    "refund.created",
    "refund.updated",
    "refund.failed",
    "charge.refund.updated",
})

#: Event types whose ``data.object`` is a Subscription: the subscription
#: domain reads them (``tables.stripe_objects.subscription_view``).
#: localstripe 1.15.10 sends only ``.created`` and ``.deleted`` of these.
SUBSCRIPTION_TYPES: frozenset[str] = frozenset({
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.trial_will_end",
})

#: Event types whose ``data.object`` is an Invoice: the invoice domain reads
#: them (``tables.stripe_objects.invoice_view``).  localstripe 1.15.10 sends
#: only ``.created``, ``.payment_succeeded`` and (for a payment failing
#: later, e.g. a SEPA debit) ``.payment_failed`` of these.
INVOICE_TYPES: frozenset[str] = frozenset({
    "invoice.created",
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "invoice.voided",
    "invoice.marked_uncollectible",
    "invoice.overdue",
    "invoice.updated",
})

#: Event types paystream reads; the ingress answers every other type with
#: 200 and stores nothing.
CONSUMED_TYPES: frozenset[str] = PAYMENT_TYPES | SUBSCRIPTION_TYPES | INVOICE_TYPES

#: PaymentIntent event type -> :attr:`PaymentFact.kind`.
_INTENT_KINDS: Mapping[str, str] = MappingProxyType({
    "payment_intent.created": "intent_created",
    "payment_intent.succeeded": "succeeded",
    "payment_intent.payment_failed": "failed",
    "payment_intent.canceled": "canceled",
})

#: Event types whose ``data.object`` is a Refund.
_REFUND_TYPES = frozenset({"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"})

#: Stripe event ids: ``evt_`` and Stripe's id alphabet (letters, digits, and
#: ``_`` in test-mode and Connect ids).
_EVENT_ID = re.compile(r"evt_[A-Za-z0-9_]{1,250}")

#: Metadata key a refund paystream creates carries its own reason in (one of
#: :func:`refund_reasons`), since Stripe's ``reason`` knows only four values.
PAYSTREAM_REASON_KEY = "paystream_reason"


@cache
def refund_reasons() -> frozenset[str]:
    """The symbols of ``RefundReason`` (field ``reason`` of ``payment.refunded``)."""
    return frozenset(enum_symbols("payment.refunded", "reason"))


@dataclass(frozen=True, slots=True)
class StripeEvent:
    """The envelope of one Stripe event and its ``data.object``.

    ``object`` is a read-only view of the top level of ``data.object``
    (nested values are plain JSON values).
    """

    id: str
    type: str
    created: int
    api_version: str | None
    #: The connected account the event is about (Connect), else None.
    account: str | None
    livemode: bool
    object: Mapping[str, Any] = field(hash=False)


@dataclass(frozen=True, slots=True)
class RefundFact:
    """One Stripe Refund as a payment fact carries it."""

    refund_id: str
    #: This refund's amount in minor units (not the payment's running total).
    amount: int
    #: Upper-case ISO-4217 code ("EUR").
    currency: str
    #: Stripe's refund status (pending, requires_action, succeeded, failed,
    #: canceled); "" when Stripe sent none (the field is nullable).
    status: str
    #: A ``RefundReason`` symbol: ``metadata["paystream_reason"]`` when it is
    #: one, else Stripe's ``reason`` upper-cased when it is one, else OTHER.
    reason: str
    #: ``metadata["command_id"]``: the paystream refund command that made it
    #: (None for a refund made elsewhere, e.g. in Stripe's dashboard).
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentFact:
    """What one Stripe event says about one PaymentIntent."""

    #: "intent_created" | "succeeded" | "failed" | "canceled" | "refunded"
    kind: str
    stripe_event_id: str
    #: The event's ``created`` in epoch milliseconds.
    occurred_at_ms: int
    payment_intent_id: str
    #: ``metadata["order_id"]`` of the event's object, None when absent or empty.
    order_id: str | None
    #: ``metadata["user_id"]`` of the event's object, None when absent or empty.
    user_id: str | None
    #: The PaymentIntent's amount; for refund facts the charge's amount
    #: (``charge.refunded``) or None (``refund.*``).
    amount: int | None
    #: Upper-case ISO-4217 code, as our contracts carry it.
    currency: str | None
    #: The status of the event's object (PaymentIntent, Charge or Refund).
    status: str | None
    #: failed: ``last_payment_error.decline_code``, else its ``code``.
    error_code: str | None
    #: failed: ``last_payment_error.message``.
    error_message: str | None
    #: The id of the payment method: the object's ``payment_method``, else
    #: ``last_payment_error.payment_method.id``.
    payment_method: str | None
    #: refunded: every refund the event carries (see the module docstring:
    #: ``charge.refunded`` usually carries none in current API versions).
    refunds: tuple[RefundFact, ...] = ()


def parse_event(raw: bytes) -> StripeEvent:
    """Read a webhook body as a Stripe event; :class:`NotAStripeEvent` if it is not one.

    Required: UTF-8 JSON whose top level is an object with an ``evt_...``
    ``id``, a non-empty string ``type``, an integer ``created`` and a
    ``data.object`` that is an object.  ``object``, when present, must be
    ``"event"`` (so a thin ``v2.core.event`` notification or a bare resource
    is refused); ``api_version`` and ``account`` must be strings or null,
    ``livemode`` a boolean (False when absent).
    """
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotAStripeEvent(f"body is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise NotAStripeEvent(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise NotAStripeEvent("body is JSON nested too deeply to be a Stripe event") from None
    if not isinstance(value, dict):
        raise NotAStripeEvent(f"body is a JSON {_json_kind(value)}, not an event object")
    return event_from_dict(value)


def event_from_dict(value: Mapping[str, Any]) -> StripeEvent:
    """:func:`parse_event` for an already decoded JSON object."""
    event_id = value.get("id")
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise NotAStripeEvent("event has no Stripe event id (a string 'evt_...')")
    kind = value.get("object", "event")
    if kind != "event":
        raise NotAStripeEvent(f"{event_id}: object is {short_repr(kind)}, not 'event'")
    event_type = value.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise NotAStripeEvent(f"{event_id}: no event type")
    created = value.get("created")
    if not _is_int(created) or created < 0:
        raise NotAStripeEvent(f"{event_id}: 'created' is not a unix timestamp")
    data = value.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise NotAStripeEvent(f"{event_id}: data.object is not an object")
    api_version = value.get("api_version")
    account = value.get("account")
    livemode = value.get("livemode", False)
    if api_version is not None and not isinstance(api_version, str):
        raise NotAStripeEvent(f"{event_id}: api_version is not a string")
    if account is not None and not isinstance(account, str):
        raise NotAStripeEvent(f"{event_id}: account is not a string")
    if not isinstance(livemode, bool):
        raise NotAStripeEvent(f"{event_id}: livemode is not a boolean")
    return StripeEvent(
        id=event_id, type=event_type, created=created, api_version=api_version or None,
        account=account or None, livemode=livemode, object=MappingProxyType(obj),
    )


def event_key(event: StripeEvent) -> str:
    """The Kafka key of the event on ``stripe.events``: the object it is about.

    ``payment_intent.*``: the object's id; ``charge.*``: the charge's
    ``payment_intent``, else the charge id; ``refund.*`` and
    ``charge.refund.*`` (their object is a Refund): ``payment_intent``, else
    ``charge``, else the refund id (so every event of one payment lands in
    one partition, in the order it was accepted); ``customer.subscription.*``:
    the subscription id; ``invoice.*``: the invoice id; any other type: the
    object's id.  An object without an id (Stripe has a few, e.g. a Balance)
    falls back to the event id.
    """
    obj = event.object
    if event.type in _REFUND_TYPES or event.type.startswith("refund."):
        key = ref_id(obj.get("payment_intent")) or ref_id(obj.get("charge")) or ref_id(obj.get("id"))
    elif event.type.startswith("charge."):
        key = ref_id(obj.get("payment_intent")) or ref_id(obj.get("id"))
    else:
        key = ref_id(obj.get("id"))
    return key or event.id


def payment_fact(event: StripeEvent) -> PaymentFact | None:
    """The payment fact of a payment event; None for a type not in :data:`PAYMENT_TYPES`.

    Raises :class:`NotAStripeEvent` when a payment event's object lacks what
    its fact needs: a PaymentIntent id (the object's id for
    ``payment_intent.*``, ``payment_intent`` for charges and refunds), an
    object of the wrong kind, a refund without id, integer amount or currency.
    """
    if event.type not in PAYMENT_TYPES:
        return None
    obj = event.object
    if event.type in _INTENT_KINDS:
        _expect_object(event, "payment_intent")
        pi_id = ref_id(obj.get("id"))
        if pi_id is None:
            raise NotAStripeEvent(f"{event.id}: {event.type} without a PaymentIntent id")
        error = obj.get("last_payment_error")
        error = error if isinstance(error, dict) else {}
        failed = event.type == "payment_intent.payment_failed"
        return PaymentFact(
            kind=_INTENT_KINDS[event.type],
            **_common(event, pi_id),
            amount=_amount(event, obj, "amount"),
            error_code=(nonempty(error.get("decline_code")) or nonempty(error.get("code")))
            if failed else None,
            error_message=nonempty(error.get("message")) if failed else None,
            payment_method=ref_id(obj.get("payment_method")) or ref_id(error.get("payment_method")),
        )
    if event.type == "charge.refunded":
        _expect_object(event, "charge")
        pi_id = ref_id(obj.get("payment_intent"))
        if pi_id is None:
            raise NotAStripeEvent(f"{event.id}: charge.refunded for a charge without a PaymentIntent")
        listed = obj.get("refunds")
        data = listed.get("data") if isinstance(listed, dict) else None
        refunds = tuple(_refund_fact(event, r) for r in data) if isinstance(data, list) else ()
        return PaymentFact(
            kind="refunded", **_common(event, pi_id), amount=_amount(event, obj, "amount"),
            error_code=None, error_message=None, payment_method=ref_id(obj.get("payment_method")),
            refunds=refunds,
        )
    _expect_object(event, "refund")
    pi_id = ref_id(obj.get("payment_intent"))
    if pi_id is None:
        raise NotAStripeEvent(f"{event.id}: {event.type} for a refund without a PaymentIntent")
    return PaymentFact(
        kind="refunded", **_common(event, pi_id), amount=None,
        error_code=None, error_message=None, payment_method=ref_id(obj.get("payment_method")),
        refunds=(_refund_fact(event, obj),),
    )


def _common(event: StripeEvent, pi_id: str) -> dict[str, Any]:
    obj = event.object
    metadata = _metadata(event, obj)
    return {
        "stripe_event_id": event.id,
        "occurred_at_ms": event.created * 1000,
        "payment_intent_id": pi_id,
        "order_id": nonempty(metadata.get("order_id")),
        "user_id": nonempty(metadata.get("user_id")),
        "currency": currency_code(obj.get("currency")),
        "status": nonempty(obj.get("status")),
    }


def _refund_fact(event: StripeEvent, refund: Any) -> RefundFact:
    if not isinstance(refund, Mapping):
        raise NotAStripeEvent(f"{event.id}: a refund is not an object")
    refund_id = nonempty(refund.get("id"))
    if refund_id is None:
        raise NotAStripeEvent(f"{event.id}: a refund without an id")
    amount = refund.get("amount")
    if not _is_int(amount) or amount < 0:
        raise NotAStripeEvent(f"{event.id}: refund {refund_id} has no integer amount")
    currency = currency_code(refund.get("currency"))
    if currency is None:
        raise NotAStripeEvent(f"{event.id}: refund {refund_id} has no currency")
    return RefundFact(
        refund_id=refund_id, amount=amount, currency=currency,
        status=nonempty(refund.get("status")) or "", reason=_refund_reason(_metadata(event, refund),
                                                                       refund.get("reason")),
        command_id=nonempty(_metadata(event, refund).get("command_id")),
    )


def _refund_reason(metadata: Mapping[str, Any], stripe_reason: Any) -> str:
    reasons = refund_reasons()
    ours = metadata.get(PAYSTREAM_REASON_KEY)
    if isinstance(ours, str) and ours in reasons:
        return ours
    if isinstance(stripe_reason, str) and stripe_reason.upper() in reasons:
        return stripe_reason.upper()
    return "OTHER"


def _expect_object(event: StripeEvent, kind: str) -> None:
    found = event.object.get("object", kind)
    if found != kind:
        raise NotAStripeEvent(f"{event.id}: {event.type} carries {short_repr(found)}, not a {kind}")


def _metadata(event: StripeEvent, obj: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = obj.get("metadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise NotAStripeEvent(f"{event.id}: metadata is not an object")
    return metadata


def _amount(event: StripeEvent, obj: Mapping[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        # localstripe echoes an amount changed by an update as the form's text;
        # Stripe always sends an integer.
        return int(value)
    if not _is_int(value):
        raise NotAStripeEvent(f"{event.id}: {name} is not an integer")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
