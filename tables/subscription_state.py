"""The subscription aggregate as pure decisions: its row, its transition table, its flow.

Keyed by Stripe's subscription id (``sub_...``): Stripe's
``customer.subscription.*`` webhooks (re-keyed by :mod:`tables.stripe_intents`
into ``stripe`` commands carrying a :func:`tables.stripe_objects.subscription_view`),
the ``open`` command of the user index that created the subscription, the
per-subscription work of the user fan-outs (:mod:`tables.subscription_index`),
the API's ``cancel`` and ``subscription.usage_exceeded`` (keyed by the
subscription) all meet in one partition, decided by one writer in order.

Stripe is the source of truth of a subscription's fields; the row mirrors the
newest view of it paystream has seen.  Stripe delivers at least once and in
any order, and our own calls' answers report what its webhooks report again:

- a fact older than the row's (``occurred_at_ms`` before :attr:`Subscription.fact_at_ms`)
  never moves the row, nor does a status move the transition table forbids
  (nothing leaves ``canceled``), nor does ``customer.subscription.created``
  once the row exists (it reports the first state); it is recorded as
  applied, nothing more.  Facts of the same second (Stripe's resolution)
  apply in the order they arrive;
- an event reporting a fact of the subscription's life has an id derived from
  the subscription (``subscription.created``, ``.canceled``, ``.expired``:
  :func:`fact_event_id`), so whoever reports it (our call's answer, Stripe's
  webhook, a replay) publishes it once; ``subscription.updated`` is published
  only when the row's plan, quantity or status really changed, under an id
  derived from the Stripe event (or from our command, for our own call's
  answer), so the webhook of a change our call already applied publishes nothing.

``handle_wallet_insufficient_funds``: mark past due, not pause
-----------------------------------------------------------------
The user index fans ``wallet.insufficient_funds`` out as ``mark_past_due``
commands; the subscription, if ``active`` or ``trialing``, becomes
``past_due`` in paystream and ``subscription.updated`` (status PAST_DUE) is
published.  Why not pause: pausing at Stripe (``pause_collection``) stops
Stripe collecting the invoices, so its dunning (retries, then unpaid or
canceled as the account is set up) would never run and the debt would stay
uncollected until someone resumes it, which no event of the seed does; it is
also a change of billing made on a wallet's say-so, which Stripe cannot
check.  Past due is what Stripe itself calls a subscription whose money is
missing, and it undoes itself: the next Stripe fact newer than the mark
(an invoice paid, status ``active``) moves the row back, and Stripe's own
dunning still decides about unpaid and cancellation.  The price of the
choice: until Stripe reports otherwise, paystream's status says ``past_due``
where Stripe's may still say ``active``.

Steps whose Stripe calls depend on an earlier call's answer
-----------------------------------------------------------
The kernel runs a step's calls in one concurrent round (``calls`` sees the
row and the message, not earlier outcomes).  Where Stripe needs one answer
before the next call, the step records the first answer in the row and sends
itself a follow-up command (derived id, same key): the prorated refund after
``cancel_for_user_deleted`` (``refund_unused``) and the overage invoice after
its invoice item (``invoice_overage``).  A crash between the two replays the
first step under the same idempotency keys and re-sends the same follow-up.

Seed names are the ``handler`` column of :func:`subscription_flow`:
``handle_subscription_usage_exceeded`` here, ``handle_user_deleted``,
``handle_user_upgraded``, ``handle_wallet_insufficient_funds`` and
``create_subscription`` in :mod:`tables.subscription_index`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from schemas import contracts
from streams.catalog import (
    INVOICE_COMMANDS,
    PAYMENT_SERVICE,
    SUBSCRIPTION_COMMANDS,
    USER_SUBSCRIPTION_INDEX,
)
from tables import aggregate
from tables.aggregate import (
    DUPLICATE,
    NOOP,
    Call,
    Conflict,
    DeadlineEffect,
    Decision,
    Emission,
    IdempotencyKeyReused,
    Invalid,
    NotFound,
    Outcome,
    Send,
    Step,
)
from tables.payment_state import PAYMENT_REFUNDED, STRIPE
from tables.payment_state import fact_event_id as payment_fact_event_id

SUBSCRIPTION_CREATED = "subscription.created"
SUBSCRIPTION_UPDATED = "subscription.updated"
SUBSCRIPTION_CANCELED = "subscription.canceled"
SUBSCRIPTION_EXPIRED = "subscription.expired"
USAGE_EXCEEDED = "subscription.usage_exceeded"
#: Stripe's event type of a subscription's first state.
CREATED_TYPE = "customer.subscription.created"

#: Stripe's subscription statuses (lower-case, as the row stores them).
STATUSES = frozenset({"incomplete", "incomplete_expired", "trialing", "active", "past_due",
                      "paused", "canceled", "unpaid", "ended"})
#: Statuses nothing leaves: the subscription is over.
TERMINAL = frozenset({"canceled", "incomplete_expired", "ended"})
#: Statuses of a subscription that is running (billing, or trialing).
LIVE = frozenset({"incomplete", "trialing", "active", "past_due", "unpaid", "paused"})

#: The legal status moves (a status "moving" to itself is no move and always allowed).
TRANSITIONS: Mapping[str, frozenset[str]] = MappingProxyType({
    "incomplete": frozenset({"active", "trialing", "past_due", "unpaid", "paused", "canceled",
                             "incomplete_expired"}),
    "trialing": frozenset({"active", "past_due", "unpaid", "paused", "canceled"}),
    "active": frozenset({"trialing", "past_due", "unpaid", "paused", "canceled"}),
    "past_due": frozenset({"active", "trialing", "unpaid", "paused", "canceled"}),
    "unpaid": frozenset({"active", "past_due", "paused", "canceled"}),
    "paused": frozenset({"active", "trialing", "past_due", "unpaid", "canceled"}),
    "canceled": frozenset(),
    "incomplete_expired": frozenset(),
    "ended": frozenset(),
})

#: The contract's status symbols; Stripe's ``ended`` is reported as CANCELED.
EVENT_STATUSES = frozenset(contracts.enum_symbols(SUBSCRIPTION_CREATED, "status")) - {"UNKNOWN"}
CANCEL_REASONS = frozenset(contracts.enum_symbols(SUBSCRIPTION_CANCELED, "reason"))

#: Statuses ``mark_past_due`` moves to past_due (see the module docstring).
MARKABLE = frozenset({"active", "trialing"})

#: The fields of a subscription view (:func:`tables.stripe_objects.subscription_view`) the row keeps.
VIEW_FIELDS = ("subscription_id", "customer_id", "user_id", "status", "plan_id", "quantity",
               "amount", "currency", "current_period_start", "current_period_end",
               "cancel_at_period_end", "cancel_at", "canceled_at", "ended_at",
               "latest_invoice_id", "metadata")

#: Applied input ids a row remembers (a subscription sees a few inputs per period).
MAX_APPLIED_IDS = 128
MAX_IDEMPOTENCY_KEYS = 50
#: Overage invoices a row remembers (by the usage event that caused them).
MAX_OVERAGES = 64
#: Stripe stamps its events in whole seconds: our own call's answer counts as
#: a fact of one second before the call, so a webhook of a later change made
#: in the same second still applies, while a delayed older one does not.
STRIPE_CLOCK_SLACK_MS = 1000


# --------------------------------------------------------------------------
# Pure rules


def prorated_refund(amount_paid: int, period_start_ms: int, period_end_ms: int, at_ms: int) -> int:
    """The unused share of ``amount_paid`` for a period cut short at ``at_ms``, in minor units.

    ``amount_paid * (period_end - at) / (period_end - period_start)``, rounded
    down (a fraction of a cent is never refunded), and 0..``amount_paid``: a
    cut before the period started refunds everything, one at or after its end
    nothing.  An empty or inverted period refunds nothing.
    """
    if amount_paid <= 0 or period_end_ms <= period_start_ms:
        return 0
    remaining = min(max(period_end_ms - at_ms, 0), period_end_ms - period_start_ms)
    return amount_paid * remaining // (period_end_ms - period_start_ms)


def event_status(status: str) -> str:
    """Stripe's status as the contracts spell it (``past_due`` -> PAST_DUE; ``ended`` -> CANCELED)."""
    symbol = "CANCELED" if status == "ended" else status.upper()
    if symbol not in EVENT_STATUSES:
        raise Invalid(f"unknown Stripe subscription status {status!r}")
    return symbol


def fact_event_id(topic: str, subscription_id: str) -> str:
    """The id of the one ``topic`` event of a subscription's life (created, canceled, expired)."""
    return aggregate.derived_id(topic, subscription_id)


# --------------------------------------------------------------------------
# The row


@dataclass
class Subscription:
    """One Stripe subscription as paystream knows it, and what paystream did about it."""

    subscription_id: str
    status: str
    created_at_ms: int
    updated_at_ms: int
    customer_id: str | None = None
    user_id: str | None = None
    plan_id: str | None = None
    quantity: int = 1
    amount: int | None = None
    currency: str | None = None
    current_period_start: int | None = None
    current_period_end: int | None = None
    cancel_at_period_end: bool = False
    cancel_at: int | None = None
    canceled_at: int | None = None
    ended_at: int | None = None
    latest_invoice_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: Time of the newest Stripe fact applied (0: none yet); older facts do not move the row.
    fact_at_ms: int = 0
    #: Bumped on every change: the version of the row's index summary.
    revision: int = 0
    #: Facts of the subscription's life already published ("created", "canceled").
    published: list[str] = field(default_factory=list)
    #: Why paystream canceled it (a SubscriptionCancelReason), when it did.
    cancel_reason: str | None = None
    #: The deadline subscription.expired was published for (None: not expired).
    expired_at_ms: int | None = None
    #: The prorated refund due after a cancel for user.deleted, until it is made.
    refund_due: dict[str, Any] | None = None
    #: The refund made for it.
    refund: dict[str, Any] | None = None
    #: Usage event id -> its overage invoice item and invoice.
    overages: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    idempotency_keys: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Subscription:
        """Read a stored row; unknown keys (a newer version's) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def subscription_view(row: Subscription) -> dict[str, Any]:
    """The JSON body of GET /subscriptions/{id}: the row without its bookkeeping."""
    view = row.to_dict()
    for internal in ("applied", "idempotency_keys", "fact_at_ms", "revision", "published",
                     "overages", "refund_due"):
        del view[internal]
    view["expired"] = row.expired_at_ms is not None
    return view


def summary(row: Subscription) -> dict[str, Any]:
    """A row of the user -> subscriptions index: what the user fan-outs choose by."""
    return {"subscription_id": row.subscription_id, "status": row.status, "plan_id": row.plan_id,
            "quantity": row.quantity, "cancel_at_period_end": row.cancel_at_period_end,
            "current_period_end": row.current_period_end, "created_at_ms": row.created_at_ms}


def index_updates(before: Subscription | None, after: Subscription) -> tuple[Send, ...]:
    """The user index's ``index`` command a row change causes (only when its summary changed)."""
    if after.user_id is None:
        return ()
    shown = summary(after)
    if before is not None and before.user_id == after.user_id and summary(before) == shown:
        return ()
    record = aggregate.command(
        "index", "user_id", after.user_id, cause=None, now_ms=after.updated_at_ms,
        command_id=aggregate.derived_id("subscription-summary", after.subscription_id,
                                        after.revision),
        subscription=shown, version=after.revision)
    return (Send(USER_SUBSCRIPTION_INDEX, after.user_id, record),)


def deadline_of(row: Subscription) -> int | None:
    """When the subscription's paid time runs out without a renewal (subscription.expired).

    Set only for a subscription that is going to end: canceled (its end, or
    the period's end), set to cancel at the period's end (or at ``cancel_at``),
    or ``unpaid`` after Stripe's last retry (the period's end).  None once
    expired, or while it renews (a cancel undone clears it), or without a
    user to address the event to.
    """
    if row.expired_at_ms is not None or row.user_id is None:
        return None
    if row.terminal:
        return row.ended_at or row.canceled_at or row.current_period_end
    if row.status == "unpaid" or row.cancel_at_period_end:
        return row.current_period_end
    return row.cancel_at


# --------------------------------------------------------------------------
# Helpers of the decisions


def _text(message: Mapping[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str) or not value:
        raise Invalid(f"{name} must be a non-empty string, not {value!r}")
    return value


def _seen(row: Subscription | None, input_id: str) -> bool:
    return row is not None and input_id in row.applied


def _evolve(row: Subscription, applied_id: str, now_ms: int, **changes: Any) -> Subscription:
    """A fresh copy of ``row`` with ``changes``, remembering ``applied_id``."""
    ids = aggregate.remembered(row.applied, applied_id, MAX_APPLIED_IDS)
    base = Subscription.from_dict(row.to_dict())  # a deep copy: the caller's row stays as it was
    return dataclasses.replace(base, **changes, applied=ids, updated_at_ms=now_ms,
                               revision=row.revision + 1)


def _view(message: Mapping[str, Any], name: str, subscription_id: str | None = None) -> Mapping[str, Any]:
    view = message.get(name)
    if not isinstance(view, Mapping) or not isinstance(view.get("subscription_id"), str):
        raise Invalid(f"{name} must be a subscription view with a subscription_id")
    if subscription_id is not None and view["subscription_id"] != subscription_id:
        raise Invalid(f"{name} is about {view['subscription_id']}, not {subscription_id}")
    status = view.get("status")
    if status not in STATUSES:
        raise Invalid(f"{name}: unknown Stripe subscription status {status!r}")
    return view


def _fields_of(view: Mapping[str, Any], row: Subscription | None) -> dict[str, Any]:
    """The row fields a view sets; what it does not know (a user, metadata) the row keeps."""
    values = {name: view.get(name) for name in VIEW_FIELDS}
    values["quantity"] = values["quantity"] if isinstance(values["quantity"], int) else 1
    values["cancel_at_period_end"] = bool(values["cancel_at_period_end"])
    values["metadata"] = dict(values["metadata"] or {})
    if row is not None:
        for kept in ("user_id", "customer_id", "plan_id"):
            if values[kept] is None:
                values[kept] = getattr(row, kept)
        if not values["metadata"]:
            values["metadata"] = dict(row.metadata)
    return values


def _new_row(view: Mapping[str, Any], input_id: str, now_ms: int, fact_at_ms: int) -> Subscription:
    return Subscription(**_fields_of(view, None), created_at_ms=now_ms, updated_at_ms=now_ms,
                        fact_at_ms=fact_at_ms, revision=1, applied=[input_id])


def _stale(row: Subscription, view: Mapping[str, Any], occurred_at_ms: int) -> bool:
    """Whether a fact may not move the row: older than the row's, or a status move backwards."""
    if occurred_at_ms < row.fact_at_ms:
        return True
    status = view["status"]
    return status != row.status and status not in TRANSITIONS[row.status]


def _cancel_reason(before: Subscription | None, after: Subscription) -> str:
    """Why a subscription ended: what paystream asked for, else what its past says, else OTHER."""
    if after.cancel_reason in CANCEL_REASONS:
        return after.cancel_reason
    given = str(after.metadata.get("cancellation_reason") or "").upper()
    if given in CANCEL_REASONS:
        return given
    if before is not None and before.status in ("past_due", "unpaid"):
        return "PAYMENT_FAILED"  # Stripe's dunning ends a subscription whose invoices stay unpaid
    return "OTHER"


def _life_events(before: Subscription | None, after: Subscription, occurred_at: int | None,
                 updated_id: str | None) -> tuple[Subscription, tuple[Emission, ...]]:
    """The events a row change publishes, and the row remembering the once-only ones.

    ``subscription.created`` the first time the row knows its user and plan;
    ``subscription.canceled`` the first time it is over; ``subscription.updated``
    when plan, quantity or status changed otherwise (``updated_id`` its id,
    None: derived from the input by the kernel).
    """
    emitted: list[Emission] = []
    published = list(after.published)
    known = after.user_id is not None and after.plan_id is not None
    created_now = False
    if known and "created" not in published:
        created_now = True
        published.append("created")
        emitted.append(Emission(SUBSCRIPTION_CREATED, contracts.payload(
            SUBSCRIPTION_CREATED, subscription_id=after.subscription_id, user_id=after.user_id,
            plan_id=after.plan_id, status=event_status(after.status), amount=after.amount,
            currency=after.currency, current_period_end=after.current_period_end),
            event_id=fact_event_id(SUBSCRIPTION_CREATED, after.subscription_id)))
    if after.terminal:
        if known and "canceled" not in published:
            published.append("canceled")
            canceled_at = after.canceled_at or after.ended_at or occurred_at or after.updated_at_ms
            emitted.append(Emission(SUBSCRIPTION_CANCELED, contracts.payload(
                SUBSCRIPTION_CANCELED, subscription_id=after.subscription_id, user_id=after.user_id,
                reason=_cancel_reason(before, after), canceled_at=canceled_at,
                comment=f"Stripe status {after.status}"),
                event_id=fact_event_id(SUBSCRIPTION_CANCELED, after.subscription_id)))
    elif known and before is not None and not created_now and (
            (before.plan_id, before.quantity, before.status)
            != (after.plan_id, after.quantity, after.status)):
        emitted.append(Emission(SUBSCRIPTION_UPDATED, contracts.payload(
            SUBSCRIPTION_UPDATED, subscription_id=after.subscription_id, user_id=after.user_id,
            old_plan=before.plan_id or after.plan_id, new_plan=after.plan_id,
            status=event_status(after.status), current_period_end=after.current_period_end),
            discriminator=after.subscription_id, event_id=updated_id))
    if published != after.published:
        after = dataclasses.replace(after, published=published)
    return after, tuple(emitted)


def _applied_view(row: Subscription, view: Mapping[str, Any], input_id: str, now_ms: int,
                  fact_at_ms: int, updated_id: str | None = None, occurred_at: int | None = None,
                  **changes: Any) -> Decision:
    """``row`` moved to Stripe's ``view`` (plus ``changes``), with the events that move publishes."""
    after = _evolve(row, input_id, now_ms, **{**_fields_of(view, row), **changes},
                    fact_at_ms=max(row.fact_at_ms, fact_at_ms))
    after, emitted = _life_events(row, after, occurred_at, updated_id)
    return Decision(row=after, emit=emitted)


def _answer_time(now_ms: int) -> int:
    """The fact time of our own call's answer (see :data:`STRIPE_CLOCK_SLACK_MS`)."""
    return now_ms - STRIPE_CLOCK_SLACK_MS


def _outcome_view(outcome: Outcome, subscription_id: str, action: str) -> Mapping[str, Any]:
    if not outcome.ok:
        raise Conflict(f"Stripe refused to {action} subscription {subscription_id}: "
                       f"{outcome.refused}")
    return _view({"answer": outcome.value}, "answer", subscription_id)


# --------------------------------------------------------------------------
# open (sent by the user index after create_subscription)


def open_subscription(row: Subscription | None, command: Mapping[str, Any], now_ms: int) -> Decision:
    """open: the subscription paystream just created at Stripe -> subscription.created.

    Its Stripe webhook ``customer.subscription.created`` may have been decided
    first: the event's id is derived from the subscription, and the row
    remembers it published it, so the fact is published once.
    """
    command_id = _text(command, "command_id")
    view = _view(command, "subscription", _text(command, "subscription_id"))
    if row is None:
        # fact time 0: any Stripe fact is at least as new as our answer; the
        # transition table keeps an older status from moving it back.
        after, emitted = _life_events(None, _new_row(view, command_id, now_ms, 0), None, None)
        return Decision(row=after, emit=emitted)
    if _seen(row, command_id):
        return DUPLICATE
    after, emitted = _life_events(row, _evolve(row, command_id, now_ms), None, None)
    return Decision(row=after, emit=emitted)


# --------------------------------------------------------------------------
# stripe (apply_subscription_fact: a webhook re-keyed by tables.stripe_intents)


def apply_subscription_fact(row: Subscription | None, fact: Mapping[str, Any], now_ms: int) -> Decision:
    """A Stripe ``customer.subscription.*`` event: the row follows, unless the fact is stale.

    created / updated / deleted / paused / resumed all carry the whole
    subscription; what changed is found by comparing it with the row.  A
    subscription first known from a webhook (created outside the API, or its
    webhook overtaking our ``open``) gets its row and ``subscription.created``.
    A subscription without ``metadata.user_id`` is recorded, and no event is
    published about it: the contracts need a user (the raw event stays in
    ``stripe.events``).
    """
    command_id = _text(fact, "command_id")
    view = _view(fact, "subscription", _text(fact, "subscription_id"))
    occurred = fact.get("occurred_at_ms")
    occurred_at = occurred if isinstance(occurred, int) and not isinstance(occurred, bool) else now_ms
    updated_id = None
    if isinstance(fact.get("stripe_event_id"), str):
        updated_id = aggregate.derived_id("stripe-fact", SUBSCRIPTION_UPDATED, fact["stripe_event_id"])
    if row is None:
        after, emitted = _life_events(None, _new_row(view, command_id, now_ms, occurred_at),
                                      occurred_at, updated_id)
        return Decision(row=after, emit=emitted)
    if _seen(row, command_id):
        return DUPLICATE
    if fact.get("stripe_type") == CREATED_TYPE or _stale(row, view, occurred_at):
        # ``created`` reports the first state, which a known row has already seen
        # (Stripe stamps events in whole seconds: a created and a later change of
        # the same second would otherwise tie, and the one arriving last win).
        after, emitted = _life_events(row, _evolve(row, command_id, now_ms), occurred_at, None)
        return Decision(row=after, emit=emitted)
    return _applied_view(row, view, command_id, now_ms, occurred_at, updated_id, occurred_at)


# --------------------------------------------------------------------------
# cancel (the API: now, or at the period's end)


def _cancel_key(command: Mapping[str, Any]) -> str:
    return aggregate.derived_id("cancel_subscription", command["command_id"])


def _at_period_end(command: Mapping[str, Any]) -> bool:
    value = command.get("at_period_end", False)
    if not isinstance(value, bool):
        raise Invalid(f"at_period_end must be true or false, not {value!r}")
    return value


def _repeated(row: Subscription, command: Mapping[str, Any]) -> bool:
    """Whether the command's Idempotency-Key was used before (422 if with other parameters)."""
    key = command.get("idempotency_key")
    known = row.idempotency_keys.get(key) if isinstance(key, str) else None
    if known is not None and known != str(command.get("fingerprint")):
        raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was used with other parameters on "
                                   f"subscription {row.subscription_id}")
    return known is not None


def _remember_key(row: Subscription, command: Mapping[str, Any]) -> Subscription:
    key = command.get("idempotency_key")
    if isinstance(key, str):
        keys = {**row.idempotency_keys, key: str(command.get("fingerprint"))}
        row.idempotency_keys = dict(list(keys.items())[-MAX_IDEMPOTENCY_KEYS:])
    return row


def _cancel_needed(row: Subscription, at_period_end: bool) -> bool:
    return not row.terminal and not (at_period_end and row.cancel_at_period_end)


def plan_cancel(row: Subscription | None, command: Mapping[str, Any]) -> list[Call]:
    if row is None or _seen(row, command["command_id"]) or _repeated(row, command):
        return []
    at_period_end = _at_period_end(command)
    if not _cancel_needed(row, at_period_end):
        return []
    if at_period_end:
        return [Call(STRIPE, "update_subscription",
                     {"subscription_id": row.subscription_id, "cancel_at_period_end": True},
                     _cancel_key(command))]
    return [Call(STRIPE, "cancel_subscription",
                 {"subscription_id": row.subscription_id, "prorate": False, "invoice_now": False},
                 _cancel_key(command))]


def cancel(row: Subscription | None, command: Mapping[str, Any], now_ms: int,
           outcomes: Mapping[str, Outcome]) -> Decision:
    """cancel (API): cancel at Stripe now, or at the end of the paid period.

    Now: Stripe cancels without proration (the customer asked to stop; what
    was paid is not refunded) -> ``subscription.canceled`` (CANCELLATION_REQUESTED).
    At period end: the subscription stays active, set to end, and its
    ``subscription.expired`` deadline is the period's end.  A subscription
    already over is 409; one already set to end at its period's end answers
    as it is.
    """
    if row is None:
        raise NotFound(f"subscription {command.get('subscription_id')} does not exist")
    if _repeated(row, command) or _seen(row, command["command_id"]):
        return Decision(duplicate=True, reply=subscription_view(row))
    at_period_end = _at_period_end(command)
    if row.terminal:
        raise Conflict(f"subscription {row.subscription_id} is {row.status}: nothing to cancel")
    if not _cancel_needed(row, at_period_end):
        updated = _remember_key(_evolve(row, command["command_id"], now_ms), command)
        return Decision(row=updated, reply=subscription_view(updated))
    view = _outcome_view(outcomes[_cancel_key(command)], row.subscription_id, "cancel")
    decision = _applied_view(row, view, command["command_id"], now_ms, _answer_time(now_ms),
                             cancel_reason="CANCELLATION_REQUESTED")
    updated = _remember_key(decision.row, command)
    return Decision(row=updated, emit=decision.emit, reply=subscription_view(updated))


# --------------------------------------------------------------------------
# cancel_for_user_deleted (handle_user_deleted's fan-out) and refund_unused


def _user_cancel_key(row: Subscription) -> str:
    return aggregate.derived_id("cancel_subscription_user_deleted", row.subscription_id)


def _invoice_key(row: Subscription) -> str:
    return aggregate.derived_id("latest_paid_invoice", row.subscription_id)


def _refund_key(subscription_id: str) -> str:
    return aggregate.derived_id("subscription_proration_refund", subscription_id)


def _ended_before(row: Subscription, command: Mapping[str, Any]) -> bool:
    """Over before the user was deleted: not ours to cancel or refund.

    A subscription that ended at or after ``deleted_at`` is one our cancel
    ended (its webhook can overtake a replay of the command): it still gets
    its refund.
    """
    deleted_at = command.get("deleted_at")
    ended = row.canceled_at or row.ended_at
    if not row.terminal:
        return False
    return not isinstance(deleted_at, int) or ended is None or ended < deleted_at


def plan_cancel_for_user_deleted(row: Subscription | None, command: Mapping[str, Any]) -> list[Call]:
    if row is None or _seen(row, command["command_id"]) or row.refund is not None \
            or row.refund_due is not None or _ended_before(row, command):
        return []
    calls = [Call(STRIPE, "latest_paid_invoice", {"subscription_id": row.subscription_id},
                  _invoice_key(row))]
    if not row.terminal:
        calls.insert(0, Call(STRIPE, "cancel_subscription",
                             {"subscription_id": row.subscription_id, "prorate": False,
                              "invoice_now": False}, _user_cancel_key(row)))
    return calls


def refund_of_invoice(row: Subscription, invoice: Mapping[str, Any], at_ms: int) -> dict[str, Any] | None:
    """The prorated refund a subscription canceled at ``at_ms`` is owed from its last paid invoice.

    The basis is what the invoice paid, at most one period's price (an
    overage billed on the same invoice was used, not prepaid); the share is
    the unused part of the current period (:func:`prorated_refund`).  None
    when nothing is owed or nothing can be refunded (no paid invoice, no
    charge or intent to refund against, no period known).
    """
    paid = invoice.get("amount_paid")
    payment_id = invoice.get("payment_intent_id") or invoice.get("charge_id")
    start, end = row.current_period_start, row.current_period_end
    if not isinstance(paid, int) or paid <= 0 or not payment_id or start is None or end is None:
        return None
    basis = min(paid, row.amount) if isinstance(row.amount, int) and row.amount > 0 else paid
    amount = prorated_refund(basis, start, end, at_ms)
    if amount <= 0:
        return None
    return {"invoice_id": invoice.get("invoice_id"), "amount": amount,
            "currency": str(invoice.get("currency") or row.currency or "").upper(),
            "charge_id": invoice.get("charge_id"),
            "payment_intent_id": invoice.get("payment_intent_id"),
            "payment_id": payment_id, "canceled_at_ms": at_ms}


def cancel_for_user_deleted(row: Subscription | None, command: Mapping[str, Any], now_ms: int,
                            outcomes: Mapping[str, Outcome]) -> Decision:
    """cancel_for_user_deleted: cancel at Stripe, then refund the unused share of the period.

    Stripe cancels without proration: the refund below is the proration (a
    Stripe proration would be a credit on the deleted customer's balance,
    the unused time credited twice).  -> ``subscription.canceled``
    (USER_DELETED); the refund is made by the follow-up ``refund_unused``
    command (its amount needs the invoice Stripe answers here).
    """
    command_id = _text(command, "command_id")
    if row is None:
        return NOOP  # the index knew a subscription this partition never saw: nothing to cancel
    if _seen(row, command_id):
        return DUPLICATE
    if row.refund is not None or row.refund_due is not None or _ended_before(row, command):
        return Decision(row=_evolve(row, command_id, now_ms))
    current = row
    emitted: tuple[Emission, ...] = ()
    if not row.terminal:
        view = _outcome_view(outcomes[_user_cancel_key(row)], row.subscription_id, "cancel")
        moved = _applied_view(row, view, command_id, now_ms, _answer_time(now_ms),
                              cancel_reason="USER_DELETED")
        current, emitted = moved.row, moved.emit
    invoice = outcomes[_invoice_key(row)]
    if not invoice.ok:
        raise Conflict(f"Stripe refused the paid invoices of {row.subscription_id}: {invoice.refused}")
    at_ms = current.canceled_at or current.ended_at or now_ms
    due = refund_of_invoice(current, invoice.value or {}, at_ms)
    updated = _evolve(current, command_id, now_ms, refund_due=due)
    if due is None:
        return Decision(row=updated, emit=emitted)
    follow = aggregate.command("refund_unused", "subscription_id", row.subscription_id,
                               cause={"event_id": command_id}, now_ms=now_ms)
    return Decision(row=updated, emit=emitted,
                    send=(Send(SUBSCRIPTION_COMMANDS, row.subscription_id, follow),))


def plan_refund_unused(row: Subscription | None, command: Mapping[str, Any]) -> list[Call]:
    if row is None or row.refund_due is None or row.refund is not None \
            or _seen(row, command["command_id"]):
        return []
    due = row.refund_due
    args: dict[str, Any] = {
        "amount": due["amount"],
        "metadata": {"subscription_id": row.subscription_id, "user_id": row.user_id or "",
                     "invoice_id": due.get("invoice_id") or "",
                     "paystream_reason": "SUBSCRIPTION_PRORATION"}}
    if due.get("charge_id"):
        args["charge"] = due["charge_id"]
    else:
        args["payment_intent"] = due["payment_intent_id"]
    return [Call(STRIPE, "create_refund", args, _refund_key(row.subscription_id))]


def refund_unused(row: Subscription | None, command: Mapping[str, Any], now_ms: int,
                  outcomes: Mapping[str, Outcome]) -> Decision:
    """refund_unused: the prorated refund at Stripe -> payment.refunded (SUBSCRIPTION_PRORATION).

    Its idempotency key is derived from the subscription, so a subscription is
    refunded once however often user.deleted is replayed; the event's id is
    derived from Stripe's refund id, as the payment domain derives it.  A
    refund Stripe reports ``pending`` is published too: no later refund event
    reaches this aggregate (Stripe's refund webhooks route to the
    PaymentIntent index), and Stripe completes nearly all of them.
    """
    command_id = _text(command, "command_id")
    if row is None:
        return NOOP
    if _seen(row, command_id):
        return DUPLICATE
    if row.refund_due is None or row.refund is not None:
        return Decision(row=_evolve(row, command_id, now_ms))
    outcome = outcomes[_refund_key(row.subscription_id)]
    if not outcome.ok:
        raise Conflict(f"Stripe refused the prorated refund of {row.subscription_id}: "
                       f"{outcome.refused}")
    due = row.refund_due
    refund_id = _text(outcome.value, "id")
    amount = outcome.value.get("amount") if isinstance(outcome.value.get("amount"), int) else due["amount"]
    status = outcome.value.get("status") or "pending"
    refund = {"refund_id": refund_id, "amount": amount, "status": status,
              "invoice_id": due.get("invoice_id"), "payment_id": due["payment_id"],
              "created_at_ms": now_ms}
    updated = _evolve(row, command_id, now_ms, refund=refund, refund_due=None)
    if status not in ("succeeded", "pending"):
        return Decision(row=updated)
    emission = Emission(PAYMENT_REFUNDED, contracts.payload(
        PAYMENT_REFUNDED, payment_id=due["payment_id"], refund_id=refund_id, order_id=None,
        user_id=row.user_id, amount=amount, currency=due["currency"],
        reason="SUBSCRIPTION_PRORATION"),
        discriminator=refund_id, event_id=payment_fact_event_id(PAYMENT_REFUNDED, refund_id))
    return Decision(row=updated, emit=(emission,))


# --------------------------------------------------------------------------
# change_plan (handle_user_upgraded's fan-out)


def _plan(command: Mapping[str, Any]) -> str:
    return _text(command, "plan_id")


def _change_key(command: Mapping[str, Any]) -> str:
    return aggregate.derived_id("change_plan", command["command_id"])


def _changes_plan(row: Subscription | None, command: Mapping[str, Any]) -> bool:
    return row is not None and not row.terminal and row.plan_id != _plan(command) \
        and not _seen(row, command["command_id"])


def plan_change_plan(row: Subscription | None, command: Mapping[str, Any]) -> list[Call]:
    if row is None or not _changes_plan(row, command):
        return []
    return [Call(STRIPE, "update_subscription",
                 {"subscription_id": row.subscription_id, "plan_id": _plan(command),
                  "proration_behavior": "create_prorations"}, _change_key(command))]


def change_plan(row: Subscription | None, command: Mapping[str, Any], now_ms: int,
                outcomes: Mapping[str, Outcome]) -> Decision:
    """change_plan: move the subscription to the new plan at Stripe, prorated -> subscription.updated.

    Stripe credits the unused time of the old plan and charges the new one on
    the next invoice (``create_prorations``).  A subscription that is over,
    or already on the plan, is left alone.  Stripe refusing (an unknown plan)
    is a refusal: dead-lettered with its reason.
    """
    command_id = _text(command, "command_id")
    if row is None:
        return NOOP
    if _seen(row, command_id):
        return DUPLICATE
    if not _changes_plan(row, command):
        return Decision(row=_evolve(row, command_id, now_ms))
    view = _outcome_view(outcomes[_change_key(command)], row.subscription_id, "change the plan of")
    return _applied_view(row, view, command_id, now_ms, _answer_time(now_ms))


# --------------------------------------------------------------------------
# mark_past_due (handle_wallet_insufficient_funds's fan-out)


def mark_past_due(row: Subscription | None, command: Mapping[str, Any], now_ms: int) -> Decision:
    """mark_past_due: an active (or trialing) subscription whose wallet is short becomes past_due.

    See the module docstring for why past due and not paused.  The mark
    counts as a fact of the wallet event's time (``occurred_at_ms``): a
    Stripe fact from before it does not undo it, a newer one (the invoice
    paid after all) does.
    """
    command_id = _text(command, "command_id")
    if row is None:
        return NOOP
    if _seen(row, command_id):
        return DUPLICATE
    user_id = command.get("user_id")
    if row.status not in MARKABLE or (user_id is not None and user_id != row.user_id):
        return Decision(row=_evolve(row, command_id, now_ms))
    occurred = command.get("occurred_at_ms")
    at = occurred if isinstance(occurred, int) and not isinstance(occurred, bool) else now_ms
    after = _evolve(row, command_id, now_ms, status="past_due", fact_at_ms=max(row.fact_at_ms, at))
    after, emitted = _life_events(row, after, at, None)
    return Decision(row=after, emit=emitted)


# --------------------------------------------------------------------------
# subscription.usage_exceeded (handle_subscription_usage_exceeded) and invoice_overage


def _overage(event: Mapping[str, Any]) -> int | None:
    amount = event.get("overage_amount")
    return amount if isinstance(amount, int) and not isinstance(amount, bool) and amount > 0 else None


def _item_key(event_id: str) -> str:
    return aggregate.derived_id("overage_invoice_item", event_id)


def _overage_invoice_key(event_id: str) -> str:
    return aggregate.derived_id("overage_invoice", event_id)


def _overage_currency(row: Subscription, event: Mapping[str, Any]) -> str:
    currency = event.get("currency") or row.currency
    if not isinstance(currency, str) or not currency:
        raise Invalid(f"usage overage of {row.subscription_id} without a currency: "
                      "no invoice item can be priced")
    return currency.upper()


def plan_usage_exceeded(row: Subscription | None, event: Mapping[str, Any]) -> list[Call]:
    if row is None or _seen(row, event["event_id"]) or event["event_id"] in row.overages \
            or _overage(event) is None or row.customer_id is None:
        return []
    args = {"customer_id": row.customer_id, "subscription_id": row.subscription_id,
            "amount": _overage(event), "currency": _overage_currency(row, event).lower(),
            "description": (f"{event.get('metric')} overage: {event.get('usage')} "
                            f"of {event.get('usage_limit')}"),
            "metadata": {"subscription_id": row.subscription_id, "user_id": row.user_id or "",
                         "usage_event_id": event["event_id"]}}
    return [Call(STRIPE, "create_invoice_item", args, _item_key(event["event_id"]))]


def handle_subscription_usage_exceeded(row: Subscription | None, event: Mapping[str, Any],
                                       now_ms: int, outcomes: Mapping[str, Outcome]) -> Decision:
    """subscription.usage_exceeded: bill the overage at Stripe -> invoice.created (by the invoice).

    An invoice item for the overage (``overage_amount``, in the event's
    currency or else the subscription's), then the invoice that bills it
    (``invoice_overage``, sent to this subscription), whose ``open`` command
    makes the invoice aggregate publish ``invoice.created``.  Both Stripe keys
    are derived from the usage event.  A usage event without an overage
    amount bills nothing; one about a subscription paystream does not know is
    refused (dead-lettered, replayable once the subscription is known).
    """
    event_id = _text(event, "event_id")
    if row is None:
        raise NotFound(f"usage of subscription {event.get('subscription_id')}, which paystream "
                       "does not know")
    if _seen(row, event_id):
        return DUPLICATE
    amount = _overage(event)
    if amount is None or event_id in row.overages:
        return Decision(row=_evolve(row, event_id, now_ms))
    if row.customer_id is None:
        raise Invalid(f"subscription {row.subscription_id} has no Stripe customer to bill")
    outcome = outcomes[_item_key(event_id)]
    if not outcome.ok:
        raise Conflict(f"Stripe refused the overage item of {row.subscription_id}: {outcome.refused}")
    overage = {"invoice_item_id": outcome.value.get("invoice_item_id"), "amount": amount,
               "currency": _overage_currency(row, event), "invoice_id": None}
    overages = dict(list({**row.overages, event_id: overage}.items())[-MAX_OVERAGES:])
    follow = aggregate.command("invoice_overage", "subscription_id", row.subscription_id,
                               cause=event, now_ms=now_ms, usage_event_id=event_id)
    return Decision(row=_evolve(row, event_id, now_ms, overages=overages),
                    send=(Send(SUBSCRIPTION_COMMANDS, row.subscription_id, follow),))


def _pending_overage(row: Subscription | None, command: Mapping[str, Any]) -> str | None:
    """The usage event whose overage still needs its invoice, if the command is about one."""
    usage_id = command.get("usage_event_id")
    if row is None or not isinstance(usage_id, str) or _seen(row, command["command_id"]):
        return None
    overage = row.overages.get(usage_id)
    return usage_id if overage is not None and overage.get("invoice_id") is None else None


def plan_invoice_overage(row: Subscription | None, command: Mapping[str, Any]) -> list[Call]:
    usage_id = _pending_overage(row, command)
    if row is None or usage_id is None:
        return []
    return [Call(STRIPE, "create_invoice",
                 {"customer_id": row.customer_id, "subscription_id": row.subscription_id,
                  "metadata": {"subscription_id": row.subscription_id, "user_id": row.user_id or "",
                               "usage_event_id": usage_id}},
                 _overage_invoice_key(usage_id))]


def invoice_overage(row: Subscription | None, command: Mapping[str, Any], now_ms: int,
                    outcomes: Mapping[str, Outcome]) -> Decision:
    """invoice_overage: the invoice that bills an overage item -> ``open`` to the invoice aggregate."""
    command_id = _text(command, "command_id")
    if row is None:
        return NOOP
    if _seen(row, command_id):
        return DUPLICATE
    usage_id = _pending_overage(row, command)
    if usage_id is None:
        return Decision(row=_evolve(row, command_id, now_ms))
    outcome = outcomes[_overage_invoice_key(usage_id)]
    if not outcome.ok:
        raise Conflict(f"Stripe refused the overage invoice of {row.subscription_id}: "
                       f"{outcome.refused}")
    # What the subscription knows and Stripe's answer may lack (localstripe keeps
    # no invoice metadata): whose invoice it is.
    invoice = {**outcome.value, "user_id": outcome.value.get("user_id") or row.user_id,
               "subscription_id": outcome.value.get("subscription_id") or row.subscription_id}
    invoice_id = _text(invoice, "invoice_id")
    overages = {**row.overages, usage_id: {**row.overages[usage_id], "invoice_id": invoice_id}}
    record = aggregate.command("open", "invoice_id", invoice_id, cause={"event_id": usage_id},
                               now_ms=now_ms, invoice=dict(invoice))
    return Decision(row=_evolve(row, command_id, now_ms, overages=overages),
                    send=(Send(INVOICE_COMMANDS, invoice_id, record),))


# --------------------------------------------------------------------------
# expire (the deadline timer's hand-over)


def expire(row: Subscription | None, command: Mapping[str, Any], now_ms: int) -> Decision:
    """expire: the paid time of a subscription set to end has run out -> subscription.expired once.

    A timer races with renewals and un-cancels: a subscription no longer set
    to end, or not due yet (a timer that fired early), is a no-op whose
    deadline the kernel drops or re-asserts from :func:`deadline_of`.
    """
    command_id = _text(command, "command_id")
    if row is None:
        return NOOP
    if _seen(row, command_id):
        return DUPLICATE
    deadline = deadline_of(row)
    if deadline is None or now_ms < deadline:
        return NOOP
    after = _evolve(row, command_id, now_ms, expired_at_ms=deadline)
    emission = Emission(SUBSCRIPTION_EXPIRED, contracts.payload(
        SUBSCRIPTION_EXPIRED, subscription_id=row.subscription_id, user_id=row.user_id,
        plan_id=row.plan_id, expiration_date=deadline),
        occurred_at=deadline, event_id=fact_event_id(SUBSCRIPTION_EXPIRED, row.subscription_id))
    return Decision(row=after, emit=(emission,))


# --------------------------------------------------------------------------
# The flow table


def subscription_flow() -> aggregate.Flow:
    """The subscription aggregate on the kernel (key: Stripe's subscription id)."""
    E = DeadlineEffect
    life = (SUBSCRIPTION_CREATED, SUBSCRIPTION_UPDATED, SUBSCRIPTION_CANCELED)
    return aggregate.Flow(
        name="subscriptions",
        producer=PAYMENT_SERVICE,
        key_field="subscription_id",
        steps=(
            Step("open", "open_subscription", open_subscription, life, deadline=E.SET),
            Step("stripe", "apply_subscription_fact", apply_subscription_fact, life,
                 deadline=E.SET),
            Step("cancel", "cancel_subscription", cancel, life, deadline=E.SET, calls=plan_cancel),
            Step("cancel_for_user_deleted", "cancel_for_user_deleted", cancel_for_user_deleted,
                 life, sends=(SUBSCRIPTION_COMMANDS,), deadline=E.SET,
                 calls=plan_cancel_for_user_deleted),
            Step("refund_unused", "refund_unused_period", refund_unused, (PAYMENT_REFUNDED,),
                 calls=plan_refund_unused),
            Step("change_plan", "change_plan", change_plan, life, deadline=E.SET,
                 calls=plan_change_plan),
            Step("mark_past_due", "mark_past_due", mark_past_due, life),
            Step(USAGE_EXCEEDED, "handle_subscription_usage_exceeded",
                 handle_subscription_usage_exceeded, sends=(SUBSCRIPTION_COMMANDS,),
                 calls=plan_usage_exceeded),
            Step("invoice_overage", "invoice_overage", invoice_overage, sends=(INVOICE_COMMANDS,),
                 calls=plan_invoice_overage),
            Step("expire", "expire_subscription", expire, (SUBSCRIPTION_EXPIRED,), deadline=E.FIRE),
        ),
        load=Subscription.from_dict,
        dump=Subscription.to_dict,
        command_topic=SUBSCRIPTION_COMMANDS,
        deadline_of=deadline_of,
        follow=index_updates,
        view=subscription_view,
    )
