"""The payment aggregate as pure decisions: its row, its transition table, its flow.

One payment per order, keyed by the order id (payments outside any order, a
subscription invoice's, come with the subscription issue): ``order.created``
and the Stripe facts about the order's PaymentIntent then meet in one
partition, so every input of a payment is decided by one writer in order.
Stripe's own events reach this aggregate re-keyed, as ``stripe`` commands,
through the PaymentIntent index of :mod:`tables.stripe_intents`.

Stripe delivers at least once and in any order, and our own calls report
the same facts its webhooks do, so every published event's id is derived
from the Stripe object it reports (:func:`fact_event_id`): the intent for
``payment.intent.created`` and ``payment.completed``, the Stripe event for
``payment.failed`` (an intent may fail several times), the refund for
``payment.refunded``.  A fact reported twice, by our call and by a webhook,
or by two webhooks, is published once.  A fact older than the state
(``payment_failed`` after ``succeeded``) does not move it backwards: the
transition table has no edge back from a paid status.

External calls (the Stripe adapter, :mod:`connectors.stripe_gateway`) are
declared by the steps and run by the kernel for a whole batch; every call
that moves money carries an idempotency key derived from its cause (the
order for the PaymentIntent, the command for a refund or a retry), so a
replayed input never charges or refunds twice.

Seed names (``seed/payment-order-architecture.md``, payment service) are the
``handler`` column of :func:`payment_flow`: ``handle_order_created``,
``create_refund``, ``handle_stripe_webhook`` (in :mod:`tables.stripe_intents`,
whose facts arrive here as ``apply_stripe_fact``), and
``handle_wallet_balance_changed`` (:mod:`tables.payment_index`, whose
``retry`` commands land here).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from schemas import contracts
from streams.catalog import (
    PAYMENT_COMMANDS,
    PAYMENT_INTENT_LINKS,
    PAYMENT_SERVICE,
    USER_PAYMENT_INDEX,
)
from tables import aggregate
from tables.aggregate import (
    DUPLICATE,
    NOOP,
    Call,
    Conflict,
    Decision,
    Emission,
    IdempotencyKeyReused,
    Invalid,
    NotFound,
    Outcome,
    Send,
    Step,
)


class PaymentStatus(StrEnum):
    """Where a payment is; stored and shown by these names."""

    REQUIRES_PAYMENT = "REQUIRES_PAYMENT"  # the intent waits for the payer (or for Stripe)
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # the last attempt failed; the payer (or a retry) may still pay
    CANCELED = "CANCELED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"


S = PaymentStatus

#: The legal transitions, the one place they are written.
TRANSITIONS: Mapping[PaymentStatus, frozenset[PaymentStatus]] = MappingProxyType({
    S.REQUIRES_PAYMENT: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELED}),
    S.FAILED: frozenset({S.REQUIRES_PAYMENT, S.SUCCEEDED, S.FAILED, S.CANCELED}),
    S.SUCCEEDED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.PARTIALLY_REFUNDED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.REFUNDED: frozenset(),
    S.CANCELED: frozenset(),
})

#: Statuses whose intent can still be paid (and therefore canceled).
OPEN_STATUSES = frozenset({S.REQUIRES_PAYMENT, S.FAILED})
#: Statuses in which money was received.
PAID_STATUSES = frozenset({S.SUCCEEDED, S.PARTIALLY_REFUNDED, S.REFUNDED})

#: Decline codes after which the same payment method may succeed later, when
#: the payer has money again: ``handle_wallet_balance_changed`` retries these.
RETRYABLE_FAILURES = frozenset({"insufficient_funds"})

#: Order types paid by a PaymentIntent of their own.  A SUBSCRIPTION order is
#: paid by its subscription's invoices (Stripe bills those), not here.
INTENT_ORDER_TYPES = frozenset({"ONE_TIME", "WALLET_TOPUP", "STORAGE_UPGRADE"})

#: Refund statuses that may still end in money returned.
PENDING_REFUND = frozenset({"pending", "requires_action"})

#: Applied input ids a row remembers (a payment sees a few dozen inputs).
MAX_APPLIED_IDS = 128
#: Idempotency-Keys of refund requests a row remembers.
MAX_IDEMPOTENCY_KEYS = 100

PAYMENT_INTENT_CREATED = "payment.intent.created"
PAYMENT_COMPLETED = "payment.completed"
PAYMENT_FAILED = "payment.failed"
PAYMENT_REFUNDED = "payment.refunded"

REFUND_REASONS = frozenset(contracts.enum_symbols(PAYMENT_REFUNDED, "reason"))
#: Our refund reasons Stripe knows; others go to Stripe as metadata only.
STRIPE_REFUND_REASONS = {"REQUESTED_BY_CUSTOMER": "requested_by_customer",
                         "DUPLICATE": "duplicate", "FRAUDULENT": "fraudulent"}

STRIPE = "stripe"  # the service name the kernel's calls go to


class OverRefund(Invalid):
    """A refund larger than what remains refundable (400, as Stripe answers it)."""

    code = "amount_too_large"


# --------------------------------------------------------------------------
# The row


@dataclass
class Refund:
    refund_id: str
    amount: int
    status: str  # Stripe's: pending, succeeded, failed, canceled
    reason: str
    created_at_ms: int


@dataclass
class Payment:
    """One order's payment: its current intent, its status and its refunds."""

    order_id: str
    user_id: str
    amount: int
    currency: str
    status: PaymentStatus
    created_at_ms: int
    updated_at_ms: int
    payment_intent_id: str | None = None
    client_secret: str | None = None
    payment_method: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    attempts: int = 0
    refunded_amount: int = 0
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied_ids: list[str] = field(default_factory=list)
    idempotency_keys: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Payment:
        """Read a stored row; unknown keys (a newer version's) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = PaymentStatus(values["status"])
        return cls(**values)

    @property
    def pending_refunds(self) -> int:
        """Refunds Stripe took but has not completed: reserved, not yet returned."""
        return sum(r["amount"] for r in self.refunds.values() if r["status"] in PENDING_REFUND)

    @property
    def refundable(self) -> int:
        """What may still be refunded: the paid amount less refunds done or under way."""
        if self.status not in PAID_STATUSES:
            return 0
        return max(0, self.amount - self.refunded_amount - self.pending_refunds)

    def refund_of(self, command_id: str) -> dict[str, Any] | None:
        """The refund the refund command ``command_id`` made, if Stripe reported it already."""
        return next((r for r in self.refunds.values() if r.get("command_id") == command_id), None)

    @property
    def retryable(self) -> bool:
        """Failed for want of funds, with a payment method to try again."""
        return (self.status is S.FAILED and self.failure_code in RETRYABLE_FAILURES
                and self.payment_method is not None)


def payment_view(payment: Payment) -> dict[str, Any]:
    """The JSON body of GET /payments/...: the row without its bookkeeping."""
    view = payment.to_dict()
    # client_secret lets its holder confirm the intent: for the payer's client,
    # never for an API without authentication.
    for internal in ("applied_ids", "idempotency_keys", "client_secret"):
        del view[internal]
    view["refundable_amount"] = payment.refundable
    view["refunds"] = [_refund_shown(r) for r in
                       sorted(view["refunds"].values(), key=lambda r: (r["created_at_ms"], r["refund_id"]))]
    return view


def _refund_shown(refund: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in refund.items() if k != "command_id"}  # bookkeeping, not the refund


def payment_summary(payment: Payment) -> dict[str, Any]:
    """A row of the user -> payments index: what a wallet top-up needs to pick retries."""
    return {"order_id": payment.order_id, "payment_intent_id": payment.payment_intent_id,
            "status": payment.status.value, "failure_code": payment.failure_code,
            "retryable": payment.retryable}


def index_updates(before: Payment | None, after: Payment) -> tuple[Send, ...]:
    """The user -> payments index update a row change causes (only when its summary changed)."""
    summary = payment_summary(after)
    if before is not None and payment_summary(before) == summary:
        return ()
    return (Send(USER_PAYMENT_INDEX, after.user_id,
                 {"order": summary, "version": after.updated_at_ms, "user_id": after.user_id}),)


def fact_event_id(topic: str, fact_id: str) -> str:
    """The event id of ``topic`` reporting Stripe object (or event) ``fact_id``: one per fact."""
    return aggregate.derived_id("stripe-fact", topic, fact_id)


# --------------------------------------------------------------------------
# Helpers of the decisions


def _evolve(payment: Payment, applied_id: str, now_ms: int, **changes: Any) -> Payment:
    ids = aggregate.remembered(payment.applied_ids, applied_id, MAX_APPLIED_IDS)
    base = Payment.from_dict(payment.to_dict())  # a deep copy: the caller's row stays as it was
    return dataclasses.replace(base, **changes, applied_ids=ids, updated_at_ms=now_ms)


def _seen(payment: Payment | None, input_id: str) -> bool:
    return payment is not None and input_id in payment.applied_ids


def _require(payment: Payment, target: PaymentStatus, action: str) -> None:
    if target not in TRANSITIONS[payment.status]:
        raise Conflict(f"payment of order {payment.order_id} is {payment.status.value}: "
                       f"cannot {action}")


def _emit(topic: str, fact_id: str, occurred_at: int | None = None, **values: Any) -> Emission:
    return Emission(topic, contracts.payload(topic, **values), discriminator=fact_id,
                    occurred_at=occurred_at, event_id=fact_event_id(topic, fact_id))


def _money(payment: Payment) -> dict[str, Any]:
    return {"order_id": payment.order_id, "user_id": payment.user_id, "amount": payment.amount,
            "currency": payment.currency}


def _int(message: Mapping[str, Any], name: str) -> int:
    value = message.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} must be an integer, not {value!r}")
    return value


def _text(message: Mapping[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str) or not value:
        raise Invalid(f"{name} must be a non-empty string, not {value!r}")
    return value


def _succeeded(payment: Payment, input_id: str, now_ms: int, intent_id: str,
               occurred_at: int | None) -> Decision:
    updated = _evolve(payment, input_id, now_ms, status=S.SUCCEEDED, payment_intent_id=intent_id,
                      failure_code=None, failure_message=None)
    return Decision(row=updated, emit=(_emit(PAYMENT_COMPLETED, intent_id, occurred_at,
                                             payment_intent_id=intent_id, **_money(updated)),))


def _failed(payment: Payment, input_id: str, now_ms: int, intent_id: str, fact_id: str,
            code: str | None, message: str, payment_method: str | None,
            occurred_at: int | None) -> Decision:
    updated = _evolve(payment, input_id, now_ms, status=S.FAILED, payment_intent_id=intent_id,
                      failure_code=code, failure_message=message,
                      payment_method=payment_method or payment.payment_method)
    return Decision(row=updated, emit=(_emit(
        PAYMENT_FAILED, fact_id, occurred_at, payment_intent_id=intent_id, error_code=code,
        error_message=message, **_money(updated)),))


def _with_refund(payment: Payment, input_id: str, now_ms: int, refund: Mapping[str, Any]
                 ) -> tuple[Payment, tuple[Emission, ...]]:
    """``payment`` with ``refund`` recorded; payment.refunded once it has succeeded."""
    refund_id = refund["refund_id"]
    known = payment.refunds.get(refund_id)
    if known is not None and known["status"] == "succeeded":
        # Counted before: a later (or older, late) report of it changes nothing, so a
        # ``pending`` arriving after ``succeeded`` can neither move the refund back
        # nor let the next ``succeeded`` count it a second time.
        return _evolve(payment, input_id, now_ms), ()
    record = dict(refund) if known is None else {**refund, "created_at_ms": known["created_at_ms"]}
    refunds = {**payment.refunds, refund_id: record}
    if refund["status"] != "succeeded":  # recorded; the money has not moved yet
        return _evolve(payment, input_id, now_ms, refunds=refunds), ()
    refunded = payment.refunded_amount + refund["amount"]
    status = S.REFUNDED if refunded >= payment.amount else S.PARTIALLY_REFUNDED
    _require(payment, status, f"record refund {refund_id}")
    updated = _evolve(payment, input_id, now_ms, refunds=refunds, refunded_amount=refunded,
                      status=status)
    emission = _emit(PAYMENT_REFUNDED, refund_id, None, payment_id=payment.payment_intent_id,
                     refund_id=refund_id, order_id=payment.order_id, user_id=payment.user_id,
                     amount=refund["amount"], currency=payment.currency, reason=refund["reason"])
    return updated, (emission,)


# --------------------------------------------------------------------------
# handle_order_created


def _intent_key(order_id: str) -> str:
    # Derived from the order, not the event: even a re-published order.created
    # under another id cannot open a second PaymentIntent.
    return aggregate.derived_id("create_payment_intent", order_id)


def _wants_intent(payment: Payment | None, event: Mapping[str, Any]) -> bool:
    return (payment is None and event.get("order_type") in INTENT_ORDER_TYPES
            and event.get("payment_method") is None  # "wallet": paid with credits when placed
            and isinstance(event.get("total_amount"), int) and event["total_amount"] > 0)


def plan_order_created(payment: Payment | None, event: Mapping[str, Any]) -> list[Call]:
    if not _wants_intent(payment, event):
        return []
    order_id = _text(event, "order_id")
    args = {"amount": event["total_amount"], "currency": _text(event, "currency").lower(),
            "metadata": {"order_id": order_id, "user_id": _text(event, "user_id")}}
    return [Call(STRIPE, "create_payment_intent", args, _intent_key(order_id))]


def on_order_created(payment: Payment | None, event: Mapping[str, Any], now_ms: int,
                     outcomes: Mapping[str, Outcome]) -> Decision:
    """order.created (seed: ``handle_order_created``): open a PaymentIntent for the order.

    The intent carries the order and user ids in its metadata (its webhooks
    find their way back by them) and the order's amount and currency;
    ``payment.intent.created`` then moves the order to PAYMENT_PENDING.
    Subscription orders (paid by invoices), free orders and orders paid with
    wallet credits (``payment_method`` "wallet") get no intent.
    Stripe refusing the intent (an amount below its minimum, a currency it
    does not take) is a refusal: the event is dead-lettered with Stripe's
    reason and the order runs out its payment window.
    """
    if payment is not None:
        return DUPLICATE if _seen(payment, event["event_id"]) else NOOP
    if not _wants_intent(payment, event):
        return NOOP
    order_id = event["order_id"]
    outcome = outcomes[_intent_key(order_id)]
    if not outcome.ok:
        raise Invalid(f"Stripe refused a PaymentIntent for order {order_id}: {outcome.refused}")
    intent = outcome.value
    created = Payment(order_id=order_id, user_id=event["user_id"], amount=event["total_amount"],
                      currency=event["currency"], status=S.REQUIRES_PAYMENT, created_at_ms=now_ms,
                      updated_at_ms=now_ms, payment_intent_id=intent["id"],
                      client_secret=intent.get("client_secret"), attempts=1,
                      applied_ids=[event["event_id"]])
    emit = _emit(PAYMENT_INTENT_CREATED, intent["id"], payment_intent_id=intent["id"],
                 **_money(created))
    link = Send(PAYMENT_INTENT_LINKS, intent["id"], {
        "event_id": aggregate.derived_id("intent-link", intent["id"]),
        "payment_intent_id": intent["id"], "order_id": order_id, "user_id": created.user_id})
    return Decision(row=created, emit=(emit,), send=(link,))


# --------------------------------------------------------------------------
# order.updated: the open intent follows the order's amount


def _new_price(payment: Payment, event: Mapping[str, Any]) -> tuple[int, str] | None:
    """The order's amount and currency after ``event``, if they differ from the payment's."""
    changes = event.get("changes") or {}
    if "total_amount" not in changes and "currency" not in changes:
        return None
    try:  # order.updated carries each changed field as JSON text
        amount = json.loads(changes["total_amount"]) if "total_amount" in changes else payment.amount
        currency = json.loads(changes["currency"]) if "currency" in changes else payment.currency
    except (TypeError, ValueError) as exc:
        raise Invalid(f"order.updated with unreadable changes: {exc}") from None
    if isinstance(amount, bool) or not isinstance(amount, int) or not isinstance(currency, str):
        raise Invalid(f"order.updated with total_amount {amount!r} and currency {currency!r}")
    return None if (amount, currency) == (payment.amount, payment.currency) else (amount, currency)


def _update_key(event: Mapping[str, Any]) -> str:
    return aggregate.derived_id("update_payment_intent", event["event_id"])


def plan_order_updated(payment: Payment | None, event: Mapping[str, Any]) -> list[Call]:
    if payment is None or payment.status not in OPEN_STATUSES or _seen(payment, event["event_id"]):
        return []
    price = _new_price(payment, event)
    if price is None:
        return []
    return [Call(STRIPE, "update_payment_intent",
                 {"payment_intent_id": payment.payment_intent_id, "amount": price[0],
                  "currency": price[1].lower()}, _update_key(event))]


def on_order_updated(payment: Payment | None, event: Mapping[str, Any], now_ms: int,
                     outcomes: Mapping[str, Outcome]) -> Decision:
    """order.updated: an unpaid order's new total goes to its open PaymentIntent.

    The payer confirms the intent, so its amount must be the order's: a PATCH
    of an order awaiting payment changes the intent before the payer pays it
    (the order checks the amount of ``payment.completed`` against its own).
    Once paid, the order refuses such a PATCH, so a paid payment is left alone.
    Stripe refusing the change (an amount below its minimum) is a refusal:
    dead-lettered with Stripe's reason, for an operator.
    """
    if payment is None:
        return NOOP
    if _seen(payment, event["event_id"]):
        return DUPLICATE
    price = _new_price(payment, event) if payment.status in OPEN_STATUSES else None
    if price is None:
        return NOOP
    outcome = outcomes[_update_key(event)]
    if not outcome.ok:
        raise Conflict(f"Stripe refused to change the PaymentIntent of order {payment.order_id} "
                       f"to {price[0]} {price[1]}: {outcome.refused}")
    return Decision(row=_evolve(payment, event["event_id"], now_ms, amount=price[0],
                                currency=price[1]))


# --------------------------------------------------------------------------
# order.expired / order.canceled: the open intent is canceled


def _cancel_key(payment: Payment) -> str:
    return aggregate.derived_id("cancel_payment_intent", payment.payment_intent_id)


def plan_cancel(payment: Payment | None, event: Mapping[str, Any]) -> list[Call]:
    if payment is None or payment.status not in OPEN_STATUSES or _seen(payment, event["event_id"]):
        return []
    return [Call(STRIPE, "cancel_payment_intent",
                 {"payment_intent_id": payment.payment_intent_id}, _cancel_key(payment))]


def on_order_closed(payment: Payment | None, event: Mapping[str, Any], now_ms: int,
                    outcomes: Mapping[str, Outcome]) -> Decision:
    """order.expired / order.canceled: cancel the order's open PaymentIntent.

    An intent already paid cannot be canceled (Stripe refuses; its
    ``succeeded`` fact is on its way): the payment is left as it is, and the
    late payment of a closed order is the order's to refuse.
    """
    if payment is None:
        return NOOP
    if _seen(payment, event["event_id"]):
        return DUPLICATE
    if payment.status not in OPEN_STATUSES:
        return NOOP
    outcome = outcomes[_cancel_key(payment)]
    if not outcome.ok:
        return Decision(row=_evolve(payment, event["event_id"], now_ms))
    return Decision(row=_evolve(payment, event["event_id"], now_ms, status=S.CANCELED))


# --------------------------------------------------------------------------
# Stripe's facts (handle_stripe_webhook, re-keyed by tables.stripe_intents)


def on_stripe_fact(payment: Payment | None, fact: Mapping[str, Any], now_ms: int) -> Decision:
    """A fact Stripe reported about the order's PaymentIntent (``stripe`` command).

    ``kind`` is one of intent_created, succeeded, failed, canceled, refunded
    (:func:`tables.stripe_events.payment_fact`).  A fact about an intent that
    is not the payment's current one (an older attempt) changes nothing; a
    fact the state has moved past changes nothing (the transition table has
    no edge back).  A refund reported before the payment's success proves the
    success: both are recorded, in that order.  A fact for an order without a
    payment row makes the row (:func:`_payment_from_fact`).
    """
    command_id = _text(fact, "command_id")
    if payment is None:
        payment = _payment_from_fact(fact, now_ms)
        if payment is None:
            return NOOP  # not enough to know the payment; the raw event stays in stripe.events
        if fact.get("kind") == "intent_created":  # the intent is news: announce it as ours would
            intent_id = payment.payment_intent_id or ""
            created = _evolve(payment, command_id, now_ms)
            return Decision(row=created, emit=(_emit(
                PAYMENT_INTENT_CREATED, intent_id, payment_intent_id=intent_id, **_money(created)),))
    if _seen(payment, command_id):
        return DUPLICATE
    intent_id = _text(fact, "payment_intent_id")
    kind = _text(fact, "kind")
    occurred_at = fact.get("occurred_at_ms") if isinstance(fact.get("occurred_at_ms"), int) else None
    if intent_id != payment.payment_intent_id:
        return Decision(row=_evolve(payment, command_id, now_ms))  # an older attempt's news
    if kind == "succeeded":
        if payment.status not in OPEN_STATUSES:
            return Decision(row=_evolve(payment, command_id, now_ms))
        return _succeeded(payment, command_id, now_ms, intent_id, occurred_at)
    if kind == "failed":
        if payment.status not in OPEN_STATUSES:
            return Decision(row=_evolve(payment, command_id, now_ms))
        message = fact.get("error_message") or "payment failed"
        return _failed(payment, command_id, now_ms, intent_id, _text(fact, "stripe_event_id"),
                       fact.get("error_code"), message, fact.get("payment_method"), occurred_at)
    if kind == "canceled":
        if payment.status not in OPEN_STATUSES:
            return Decision(row=_evolve(payment, command_id, now_ms))
        return Decision(row=_evolve(payment, command_id, now_ms, status=S.CANCELED))
    if kind == "refunded":
        emitted: tuple[Emission, ...] = ()
        current = payment
        if current.status in OPEN_STATUSES and any(r.get("status") == "succeeded"
                                                   for r in fact.get("refunds") or ()):
            proved = _succeeded(current, command_id, now_ms, intent_id, occurred_at)
            current, emitted = proved.row, proved.emit
        for raw in fact.get("refunds") or ():
            refund = _refund_record(raw, now_ms)
            current, more = _with_refund(current, command_id, now_ms, refund)
            emitted += more
        return Decision(row=_evolve(current, command_id, now_ms), emit=emitted)
    if kind == "intent_created":
        return Decision(row=_evolve(payment, command_id, now_ms))
    raise Invalid(f"unknown Stripe fact kind {kind!r}")


def _payment_from_fact(fact: Mapping[str, Any], now_ms: int) -> Payment | None:
    """The payment a fact proves exists although this aggregate holds no row for it.

    After a crash the replayed ``order.created`` and the ``stripe`` command
    are read from two topics in either order, so Stripe's news of an intent
    paystream opened may come first; an intent opened for one of our orders
    outside paystream likewise.  The fact carries the intent's amount,
    currency and user (its metadata): enough for the row, which then takes
    the fact as usual.  A later ``order.created`` finds the row and opens no
    second intent.  Without those fields (a bare refund fact) nothing can be
    known: None.
    """
    amount, currency, user_id = fact.get("amount"), fact.get("currency"), fact.get("user_id")
    if not (isinstance(amount, int) and isinstance(currency, str) and isinstance(user_id, str)):
        return None
    return Payment(order_id=_text(fact, "order_id"), user_id=user_id, amount=amount,
                   currency=currency, status=S.REQUIRES_PAYMENT, created_at_ms=now_ms,
                   updated_at_ms=now_ms, payment_intent_id=_text(fact, "payment_intent_id"),
                   attempts=1)


def _refund_record(raw: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    reason = raw.get("reason")
    status = raw.get("status") or "pending"  # Stripe's status is nullable: not done yet
    return {"refund_id": _text(raw, "refund_id"), "amount": _int(raw, "amount"),
            "status": status if isinstance(status, str) else "pending",
            "reason": reason if reason in REFUND_REASONS else "OTHER", "created_at_ms": now_ms,
            "command_id": raw.get("command_id")}


# --------------------------------------------------------------------------
# create_refund (the API's refund command)


def _refund_key(command: Mapping[str, Any]) -> str:
    return aggregate.derived_id("create_refund", command["command_id"])


def _refund_amount(payment: Payment, command: Mapping[str, Any]) -> int:
    if payment.status not in PAID_STATUSES:
        raise Conflict(f"payment of order {payment.order_id} is {payment.status.value}: "
                       "only a paid payment can be refunded")
    if payment.status is S.REFUNDED:
        raise Conflict(f"payment of order {payment.order_id} is refunded in full")
    amount = command.get("amount")
    if amount is None:
        if payment.refundable <= 0:
            raise Conflict(f"payment of order {payment.order_id} has nothing left to refund "
                           "(refunded, or refunds under way)")
        return payment.refundable
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise Invalid(f"amount must be a positive integer (minor units), not {amount!r}")
    if amount > payment.refundable:
        raise OverRefund(f"refund of {amount} exceeds the {payment.refundable} "
                         f"{payment.currency} still refundable on order {payment.order_id}")
    return amount


def _reason(command: Mapping[str, Any]) -> str:
    reason = command.get("reason") or "REQUESTED_BY_CUSTOMER"
    if reason not in REFUND_REASONS:
        raise Invalid(f"reason must be one of {', '.join(sorted(REFUND_REASONS))}, not {reason!r}")
    return reason


def _repeated(payment: Payment, command: Mapping[str, Any]) -> dict[str, str] | None:
    """The earlier request under this command's Idempotency-Key; 422 if its parameters differ."""
    key = command.get("idempotency_key")
    known = payment.idempotency_keys.get(key) if key is not None else None
    if known is not None and known["fingerprint"] != str(command.get("fingerprint")):  # stored as str
        raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was used with other parameters on "
                                   f"the payment of order {payment.order_id}")
    return known


def plan_refund(payment: Payment | None, command: Mapping[str, Any]) -> list[Call]:
    if payment is None or _seen(payment, command["command_id"]) or _repeated(payment, command) \
            or payment.refund_of(command["command_id"]) is not None:
        return []
    amount = _refund_amount(payment, command)
    reason = _reason(command)
    args: dict[str, Any] = {
        "payment_intent_id": payment.payment_intent_id, "amount": amount,
        "metadata": {"order_id": payment.order_id, "user_id": payment.user_id,
                     "paystream_reason": reason, "command_id": command["command_id"]}}
    if reason in STRIPE_REFUND_REASONS:
        args["reason"] = STRIPE_REFUND_REASONS[reason]
    return [Call(STRIPE, "create_refund", args, _refund_key(command))]


def refund_view(payment: Payment, refund_id: str) -> dict[str, Any]:
    return {**_refund_shown(payment.refunds[refund_id]), "payment": payment_view(payment)}


def create_refund(payment: Payment | None, command: Mapping[str, Any], now_ms: int,
                  outcomes: Mapping[str, Outcome]) -> Decision:
    """refund (seed: ``create_refund``): a Stripe refund, then ``payment.refunded``.

    The refund's Stripe idempotency key is derived from the command, whose id
    the API derives from the request's Idempotency-Key and parameters: the
    same request retried makes one Stripe refund and answers it again; the
    same key with other parameters answers 422.  The amount defaults to all
    that remains; more than remains is refused (400), as is refunding a
    payment that was not paid (409).  Stripe's later ``charge.refunded`` /
    ``refund.updated`` for the refund publish nothing new (one event id per
    refund id).
    """
    if payment is None:
        raise NotFound(f"order {command.get('order_id')} has no payment")
    known = _repeated(payment, command)
    if known is not None:
        return Decision(duplicate=True, reply=refund_view(payment, known["refund_id"]))
    if _seen(payment, command["command_id"]):
        return DUPLICATE
    made = payment.refund_of(command["command_id"])
    if made is not None:  # Stripe's webhook for it was decided first (a replay after a crash)
        updated = _remember_key(_evolve(payment, command["command_id"], now_ms), command,
                                made["refund_id"])
        return Decision(row=updated, reply=refund_view(updated, made["refund_id"]))
    amount = _refund_amount(payment, command)
    outcome = outcomes[_refund_key(command)]
    if not outcome.ok:
        raise Conflict(f"Stripe refused the refund of order {payment.order_id}: {outcome.refused}")
    value = outcome.value
    refund = {"refund_id": value["id"], "amount": int(value.get("amount") or amount),
              "status": value.get("status") or "pending", "reason": _reason(command),
              "created_at_ms": now_ms, "command_id": command["command_id"]}
    updated, emitted = _with_refund(payment, command["command_id"], now_ms, refund)
    updated = _remember_key(updated, command, value["id"])
    return Decision(row=updated, emit=emitted, reply=refund_view(updated, value["id"]))


def _remember_key(payment: Payment, command: Mapping[str, Any], refund_id: str) -> Payment:
    """``payment`` (a fresh copy) remembering the command's Idempotency-Key, if it had one."""
    key = command.get("idempotency_key")
    if key is not None:
        keys = {**payment.idempotency_keys,
                key: {"fingerprint": str(command.get("fingerprint")), "refund_id": refund_id}}
        payment.idempotency_keys = dict(list(keys.items())[-MAX_IDEMPOTENCY_KEYS:])
    return payment


# --------------------------------------------------------------------------
# retry (sent by handle_wallet_balance_changed)


def _retry_key(command: Mapping[str, Any]) -> str:
    return aggregate.derived_id("retry_payment_intent", command["command_id"])


def plan_retry(payment: Payment | None, command: Mapping[str, Any]) -> list[Call]:
    if payment is None or not payment.retryable or _seen(payment, command["command_id"]):
        return []
    return [Call(STRIPE, "confirm_payment_intent",
                 {"payment_intent_id": payment.payment_intent_id,
                  "payment_method": payment.payment_method}, _retry_key(command))]


def retry(payment: Payment | None, command: Mapping[str, Any], now_ms: int,
          outcomes: Mapping[str, Outcome]) -> Decision:
    """retry: confirm the failed intent again with its payment method (funds came in).

    Only a payment that failed for want of funds is retried; anything else
    (paid since, canceled, declined for another reason) is left alone.  A
    succeeded confirmation is the payment; a declined one is recorded, and
    announced by Stripe's ``payment_failed`` webhook (one ``payment.failed``
    per decline); an intent that needs the payer again waits for them.
    """
    if payment is None:
        return NOOP
    if _seen(payment, command["command_id"]):
        return DUPLICATE
    if not payment.retryable:
        return NOOP
    command_id = command["command_id"]
    outcome = outcomes[_retry_key(command)]
    intent_id = payment.payment_intent_id or ""
    attempts = payment.attempts + 1
    if not outcome.ok:
        # Recorded, not published: a decline is reported by Stripe's
        # payment_intent.payment_failed webhook, whose fact publishes
        # payment.failed under the Stripe event's id; publishing here too would
        # announce one decline twice under two ids.  (A refusal that is no
        # decline, e.g. an intent Stripe will not confirm again, is no payment
        # failure to announce.)
        return Decision(row=_evolve(payment, command_id, now_ms, attempts=attempts,
                                    failure_code=outcome.code or payment.failure_code,
                                    failure_message=outcome.refused or payment.failure_message))
    status = outcome.value.get("status")
    if status == "succeeded":
        return _succeeded(dataclasses.replace(payment, attempts=attempts), command_id, now_ms,
                          intent_id, None)
    return Decision(row=_evolve(payment, command_id, now_ms, status=S.REQUIRES_PAYMENT,
                                attempts=attempts))


# --------------------------------------------------------------------------
# The flow table


def payment_flow() -> aggregate.Flow:
    """The payment aggregate on the kernel (key: the order id)."""
    return aggregate.Flow(
        name="payments",
        producer=PAYMENT_SERVICE,
        key_field="order_id",
        steps=(
            Step("order.created", "handle_order_created", on_order_created,
                 (PAYMENT_INTENT_CREATED,), sends=(PAYMENT_INTENT_LINKS,),
                 calls=plan_order_created),
            Step("order.updated", "handle_order_updated", on_order_updated,
                 calls=plan_order_updated),
            Step("order.expired", "handle_order_expired", on_order_closed, calls=plan_cancel),
            Step("order.canceled", "handle_order_canceled", on_order_closed, calls=plan_cancel),
            Step("stripe", "apply_stripe_fact", on_stripe_fact,
                 (PAYMENT_INTENT_CREATED, PAYMENT_COMPLETED, PAYMENT_FAILED, PAYMENT_REFUNDED)),
            Step("refund", "create_refund", create_refund, (PAYMENT_REFUNDED,), calls=plan_refund),
            Step("retry", "retry_payment", retry, (PAYMENT_COMPLETED,), calls=plan_retry),
        ),
        load=Payment.from_dict,
        dump=Payment.to_dict,
        command_topic=PAYMENT_COMMANDS,
        follow=index_updates,
        view=payment_view,
    )
