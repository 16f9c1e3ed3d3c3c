"""The invoice aggregate as pure decisions: its row, its status order, its flow.

One row per Stripe Invoice, keyed by the invoice id (``in_...``).  Its inputs
arrive on ``paystream.invoice-commands``:

- ``stripe`` (``apply_invoice_fact``): every ``invoice.*`` webhook, re-keyed
  by :mod:`tables.stripe_intents` and carrying the invoice as
  :func:`tables.stripe_objects.invoice_view` made it (``invoice``), the
  Stripe event's id, type and time (``stripe_event_id``, ``stripe_type``,
  ``occurred_at_ms``);
- ``open`` (``open_invoice``): an invoice paystream itself created at Stripe
  (the subscription aggregate's usage overage), with the view of Stripe's
  answer (``invoice``);
- ``overdue`` (``handle_invoice_overdue``): the kernel's deadline hand-over.

Exactly once per business fact.  Every event id is derived from a Stripe id:
``invoice.created`` and ``invoice.paid`` from the invoice id (one each per
invoice, whichever input reports it first: our ``open``, Stripe's
``invoice.created``, ``invoice.finalized``, ``invoice.paid`` or
``invoice.payment_succeeded``), ``subscription.payment_failed`` from the
Stripe event id of the ``invoice.payment_failed`` (an invoice may fail several
times), ``invoice.overdue`` from the invoice id and the cadence day.  The row
also remembers what it announced, so a fact seen again publishes nothing.

Out of order.  Stripe delivers at least once and in any order, with event
times in whole seconds (``invoice.created``, ``.finalized`` and ``.paid`` often
share one).  A status never moves backwards along :data:`RANK`
(draft < open < uncollectible < paid, void); paid and void are final.  A fact
whose (status rank, event time) is below the row's changes none of its fields;
it only fills identity fields the row lacks (user, subscription, customer,
payment ids).  A fact whose time is unknown (our ``open``) counts as older
than any dated one of the same status.

The due date and ``invoice.overdue``.  An invoice's due date is Stripe's
``due_date``; an invoice collected automatically has none, and is due when it
is created (Stripe charges it at once): its ``created`` time is used, in the
events and for the cadence.  While the invoice is ``open``, :func:`deadline_of`
is the due date plus the next cadence day not yet announced (the setting
``INVOICE_OVERDUE_DAYS``, default days 1, 7 and 30).  The hand-over publishes
one ``invoice.overdue`` per cadence day reached and not announced before, with
``days_overdue`` = that day and ``occurred_at`` = due date + that many days: a
hand-over days late announces each day it passed once, in order, and never a
day it has not reached.  Paid, void and uncollectible invoices have no
deadline (the kernel cancels it).  Stripe's own ``invoice.overdue`` webhook is
applied as a fact like any other; the notices come from paystream's cadence.

What cannot be published.  Every invoice event names the user
(``user_id``, required by the contracts), which Stripe reports through the
invoice's (or its subscription's) ``metadata.user_id``.  An invoice without
one is kept, and its ``invoice.created``/``invoice.paid``/overdue notices are
published once a later fact brings the user (no deadline is pending before).
``subscription.payment_failed`` needs a subscription: a failed payment of a
one-off invoice is recorded (``attempt_count``) and not published; nor is a
failure reported after the invoice was paid or voided (a moot, late report).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas import contracts
from streams.catalog import INVOICE_COMMANDS, PAYMENT_SERVICE
from tables import aggregate
from tables.aggregate import DUPLICATE, NOOP, DeadlineEffect, Decision, Emission, Invalid, Step

INVOICE_CREATED = "invoice.created"
INVOICE_PAID = "invoice.paid"
INVOICE_OVERDUE = "invoice.overdue"
SUBSCRIPTION_PAYMENT_FAILED = "subscription.payment_failed"

DAY_MS = 24 * 60 * 60 * 1000
#: Days after the due date on which ``invoice.overdue`` is published (the setting's default).
DEFAULT_OVERDUE_DAYS: tuple[int, ...] = (1, 7, 30)

#: Stripe's invoice statuses in the order an invoice moves through them;
#: paid and void are final (neither follows the other).
RANK: Mapping[str, int] = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}
FINAL_STATUSES = frozenset({"paid", "void"})

#: Stripe event types that report the invoice paid (its view's status says so too).
PAID_TYPES = frozenset({"invoice.paid", "invoice.payment_succeeded"})
PAYMENT_FAILED_TYPE = "invoice.payment_failed"

#: Applied input ids a row remembers (an invoice sees a handful of inputs).
MAX_APPLIED_IDS = 64

#: Fields of an invoice view a fact of lower rank or older time may still fill in when unknown.
IDENTITY_FIELDS = ("customer_id", "subscription_id", "user_id", "payment_intent_id", "charge_id",
                   "billing_reason", "period_start", "period_end", "due_date", "currency")


def parse_overdue_days(text: str) -> tuple[int, ...]:
    """``"1,7,30"`` -> ``(1, 7, 30)``: whole days >= 0, sorted, each once; ValueError otherwise."""
    try:
        days = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"overdue days must be whole numbers separated by commas, not {text!r}") from None
    if not days or days[0] < 0:
        raise ValueError(f"overdue days must be one or more whole days >= 0, not {text!r}")
    return tuple(days)


def fact_event_id(topic: str, *parts: object) -> str:
    """The event id of ``topic`` reporting the Stripe fact named by ``parts``: one per fact."""
    return aggregate.derived_id("invoice-fact", topic, *parts)


# --------------------------------------------------------------------------
# The row


@dataclass
class Invoice:
    """One Stripe invoice as paystream last learned it, and what it announced of it."""

    invoice_id: str
    status: str
    customer_id: str | None = None
    subscription_id: str | None = None
    user_id: str | None = None
    amount_due: int = 0
    amount_paid: int = 0
    amount_remaining: int = 0
    currency: str | None = None
    due_date: int | None = None
    created: int | None = None
    attempt_count: int = 0
    next_payment_attempt: int | None = None
    payment_intent_id: str | None = None
    charge_id: str | None = None
    billing_reason: str | None = None
    period_start: int | None = None
    period_end: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Stripe event time (ms) of the fact whose fields the row holds (None: our own call's answer).
    fact_at_ms: int | None = None
    created_announced: bool = False
    paid_announced: bool = False
    #: Cadence days whose invoice.overdue was published.
    overdue_days_sent: list[int] = field(default_factory=list)
    #: How many subscription.payment_failed this invoice published.
    failures_announced: int = 0
    applied_ids: list[str] = field(default_factory=list)
    updated_at_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON object (a copy: no list or dict of the row is shared with it).

        Field by field rather than ``dataclasses.asdict``, whose recursive
        copy was most of the CPU of a decision (the hot path of a deadline
        burst).
        """
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["metadata"] = dict(self.metadata)
        data["overdue_days_sent"] = list(self.overdue_days_sent)
        data["applied_ids"] = list(self.applied_ids)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Invoice:
        """Read a stored row; unknown keys (a newer version's) are ignored."""
        return cls(**{k: v for k, v in data.items() if k in _KNOWN_FIELDS})

    @property
    def due_at(self) -> int | None:
        """When payment is due: Stripe's due date, else (collected automatically) its creation."""
        return self.due_date if self.due_date is not None else self.created


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Invoice))
_KNOWN_FIELDS = frozenset(_FIELD_NAMES)


def invoice_view(invoice: Invoice) -> dict[str, Any]:
    """The JSON body of GET /invoices/{id}: the row without its bookkeeping."""
    view = invoice.to_dict()
    for internal in ("applied_ids", "fact_at_ms", "created_announced", "paid_announced",
                     "failures_announced"):
        del view[internal]
    view["due_at"] = invoice.due_at
    return view


def next_overdue_day(invoice: Invoice, days: Sequence[int]) -> int | None:
    """The first cadence day of ``days`` not announced yet (None: all were)."""
    return next((d for d in days if d not in invoice.overdue_days_sent), None)


def overdue_deadline(invoice: Invoice, days: Sequence[int]) -> int | None:
    """When the next ``invoice.overdue`` of ``invoice`` falls due, if one can.

    Only an open invoice with a known due date and user goes overdue.
    """
    if invoice.status != "open" or invoice.user_id is None or invoice.due_at is None:
        return None
    day = next_overdue_day(invoice, days)
    return None if day is None else invoice.due_at + day * DAY_MS


# --------------------------------------------------------------------------
# Reading inputs


def _text(source: Mapping[str, Any], name: str) -> str:
    value = source.get(name)
    if not isinstance(value, str) or not value:
        raise Invalid(f"{name} must be a non-empty string, not {value!r}")
    return value


def _optional_int(source: Mapping[str, Any], name: str) -> int | None:
    value = source.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"invoice {name} must be an integer or null, not {value!r}")
    return value


def _optional_text(source: Mapping[str, Any], name: str) -> str | None:
    value = source.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Invalid(f"invoice {name} must be a string or null, not {value!r}")
    return value


def _from_view(message: Mapping[str, Any]) -> Invoice:
    """The invoice of a command's ``invoice`` argument (an invoice view), checked against its key."""
    view = message.get("invoice")
    if not isinstance(view, Mapping):
        raise Invalid("the command carries no invoice (argument 'invoice')")
    invoice_id = _text(view, "invoice_id")
    if invoice_id != message.get("invoice_id"):
        raise Invalid(f"invoice {invoice_id} was sent to the row of {message.get('invoice_id')!r}")
    status = view.get("status") or "draft"  # Stripe always says; a view without one adds nothing
    if status not in RANK:
        raise Invalid(f"invoice {invoice_id}: unknown status {status!r}; known: {', '.join(RANK)}")
    currency = _optional_text(view, "currency")
    metadata = view.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise Invalid(f"invoice {invoice_id}: metadata must be an object")
    return Invoice(
        invoice_id=invoice_id, status=status,
        customer_id=_optional_text(view, "customer_id"),
        subscription_id=_optional_text(view, "subscription_id"),
        user_id=_optional_text(view, "user_id"),
        amount_due=_optional_int(view, "amount_due") or 0,
        amount_paid=_optional_int(view, "amount_paid") or 0,
        amount_remaining=_optional_int(view, "amount_remaining") or 0,
        currency=currency.upper() if currency else None,
        due_date=_optional_int(view, "due_date"),
        created=_optional_int(view, "created"),
        attempt_count=_optional_int(view, "attempt_count") or 0,
        next_payment_attempt=_optional_int(view, "next_payment_attempt"),
        payment_intent_id=_optional_text(view, "payment_intent_id"),
        charge_id=_optional_text(view, "charge_id"),
        billing_reason=_optional_text(view, "billing_reason"),
        period_start=_optional_int(view, "period_start"),
        period_end=_optional_int(view, "period_end"),
        metadata={str(k): v for k, v in metadata.items()},
    )


# --------------------------------------------------------------------------
# Merging a fact into the row


def _newer(fact: Invoice, fact_at: int | None, row: Invoice) -> bool:
    """Whether ``fact`` (reported at ``fact_at``) is at least as recent as what ``row`` holds."""
    if row.status in FINAL_STATUSES and fact.status != row.status:
        return False  # paid and void are final: nothing moves the row off them
    if RANK[fact.status] != RANK[row.status]:
        return RANK[fact.status] > RANK[row.status]
    if fact_at is None:
        return row.fact_at_ms is None  # our call's answer: newer than nothing dated
    return row.fact_at_ms is None or fact_at >= row.fact_at_ms


def _merged(row: Invoice | None, fact: Invoice, fact_at: int | None) -> Invoice:
    """``row`` with ``fact`` applied (a fresh copy; the bookkeeping of ``row`` kept)."""
    if row is None:
        return dataclasses.replace(fact, fact_at_ms=fact_at)
    base = Invoice.from_dict(row.to_dict())
    if _newer(fact, fact_at, row):
        keep = {name: getattr(base, name) for name in
                ("created_announced", "paid_announced", "overdue_days_sent", "failures_announced",
                 "applied_ids", "updated_at_ms")}
        merged = dataclasses.replace(fact, fact_at_ms=fact_at, **keep)
        fill_from = base
    else:
        merged, fill_from = base, fact
    for name in IDENTITY_FIELDS:
        if getattr(merged, name) is None and getattr(fill_from, name) is not None:
            setattr(merged, name, getattr(fill_from, name))
    merged.attempt_count = max(base.attempt_count, fact.attempt_count)
    return merged


def _applied(invoice: Invoice, input_id: str, now_ms: int) -> Invoice:
    ids = aggregate.remembered(invoice.applied_ids, input_id, MAX_APPLIED_IDS)
    return dataclasses.replace(invoice, applied_ids=ids, updated_at_ms=now_ms)


def _seen(invoice: Invoice | None, input_id: str) -> bool:
    return invoice is not None and input_id in invoice.applied_ids


# --------------------------------------------------------------------------
# What the row owes the world


def _amount_paid(invoice: Invoice) -> int:
    return invoice.amount_paid if invoice.amount_paid > 0 else invoice.amount_due


def _announcements(invoice: Invoice) -> tuple[Invoice, list[Emission]]:
    """invoice.created, then invoice.paid, if the row can tell them and has not yet."""
    emitted: list[Emission] = []
    if invoice.user_id is None or invoice.currency is None:
        return invoice, emitted
    if not invoice.created_announced and invoice.due_at is not None:
        emitted.append(Emission(
            INVOICE_CREATED,
            contracts.payload(INVOICE_CREATED, invoice_id=invoice.invoice_id, user_id=invoice.user_id,
                              subscription_id=invoice.subscription_id, amount=invoice.amount_due,
                              currency=invoice.currency, due_date=invoice.due_at),
            discriminator=invoice.invoice_id, occurred_at=invoice.created,
            event_id=fact_event_id(INVOICE_CREATED, invoice.invoice_id)))
        invoice = dataclasses.replace(invoice, created_announced=True)
    if invoice.status == "paid" and invoice.created_announced and not invoice.paid_announced:
        emitted.append(Emission(
            INVOICE_PAID,
            contracts.payload(INVOICE_PAID, invoice_id=invoice.invoice_id, user_id=invoice.user_id,
                              payment_id=invoice.payment_intent_id or invoice.charge_id,
                              subscription_id=invoice.subscription_id, amount=_amount_paid(invoice),
                              currency=invoice.currency),
            discriminator=invoice.invoice_id,
            event_id=fact_event_id(INVOICE_PAID, invoice.invoice_id)))
        invoice = dataclasses.replace(invoice, paid_announced=True)
    return invoice, emitted


def _payment_failure(invoice: Invoice, stripe_event_id: str, occurred_at: int | None,
                     error_message: str | None) -> Emission | None:
    """subscription.payment_failed for Stripe's ``invoice.payment_failed``, when it can be told."""
    if (invoice.status in FINAL_STATUSES or invoice.subscription_id is None
            or invoice.user_id is None or invoice.currency is None):
        return None
    amount = invoice.amount_remaining if invoice.amount_remaining > 0 else invoice.amount_due
    return Emission(
        SUBSCRIPTION_PAYMENT_FAILED,
        contracts.payload(SUBSCRIPTION_PAYMENT_FAILED, subscription_id=invoice.subscription_id,
                          user_id=invoice.user_id, invoice_id=invoice.invoice_id,
                          attempt_count=max(1, invoice.attempt_count), amount=amount,
                          currency=invoice.currency, next_attempt_at=invoice.next_payment_attempt,
                          error_message=error_message),
        discriminator=stripe_event_id, occurred_at=occurred_at,
        event_id=fact_event_id(SUBSCRIPTION_PAYMENT_FAILED, stripe_event_id))


def _apply(row: Invoice | None, message: Mapping[str, Any], now_ms: int, fact_at: int | None,
           paid: bool = False) -> tuple[Invoice, list[Emission]]:
    fact = _from_view(message)
    if not (message.get("invoice") or {}).get("status") and row is not None:
        fact.status = row.status
    if paid and fact.status not in FINAL_STATUSES:  # the event type says what the view may lag on
        fact.status = "paid"
    merged = _merged(row, fact, fact_at)
    return _announcements(_applied(merged, _text(message, "command_id"), now_ms))


# --------------------------------------------------------------------------
# The steps


def open_invoice(invoice: Invoice | None, command: Mapping[str, Any], now_ms: int) -> Decision:
    """open: an invoice paystream created at Stripe (argument ``invoice``, the view of Stripe's answer).

    Publishes ``invoice.created`` (and ``invoice.paid`` if Stripe collected it
    at once) unless a webhook about the invoice did first: both use the ids
    derived from the invoice id.
    """
    if _seen(invoice, _text(command, "command_id")):
        return DUPLICATE
    updated, emitted = _apply(invoice, command, now_ms, None)
    return Decision(row=updated, emit=tuple(emitted))


def apply_invoice_fact(invoice: Invoice | None, fact: Mapping[str, Any], now_ms: int) -> Decision:
    """stripe: a Stripe ``invoice.*`` webhook about this invoice (see the module docstring).

    ``invoice.paid`` and ``invoice.payment_succeeded`` report the invoice paid
    whatever status their object shows (unless void).

    ``invoice.payment_failed`` also publishes ``subscription.payment_failed``
    (attempt count and next retry as Stripe reports them; event id from the
    Stripe event id) for a subscription's invoice still unpaid.
    """
    command_id = _text(fact, "command_id")
    if _seen(invoice, command_id):
        return DUPLICATE
    stripe_type = _text(fact, "stripe_type")
    occurred_at = fact.get("occurred_at_ms")
    if isinstance(occurred_at, bool) or not isinstance(occurred_at, int):
        occurred_at = None
    updated, emitted = _apply(invoice, fact, now_ms, occurred_at, paid=stripe_type in PAID_TYPES)
    if stripe_type == PAYMENT_FAILED_TYPE:
        failure = _payment_failure(updated, _text(fact, "stripe_event_id"), occurred_at,
                                   _optional_text(fact, "error_message"))
        if failure is not None:
            emitted.append(failure)
            updated = dataclasses.replace(updated, failures_announced=updated.failures_announced + 1)
    return Decision(row=updated, emit=tuple(emitted))


def overdue_step(days: Sequence[int]) -> Any:
    """The hand-over step of the overdue deadline for cadence ``days``."""

    def handle_invoice_overdue(invoice: Invoice | None, command: Mapping[str, Any], now_ms: int) -> Decision:
        """overdue: the timer handed over a deadline (argument ``deadline_ms``).

        Publishes one ``invoice.overdue`` per cadence day reached (due date +
        day <= now) and not announced yet, in order.  Not an error when there is
        none, because a timer races with payment and with changes of the due
        date: a paid, voided or unknown invoice is a no-op (the kernel drops
        the handed deadline, which :func:`deadline_of` no longer wants), and
        an early hand-over is a no-op whose deadline the kernel re-asserts.
        """
        command_id = _text(command, "command_id")
        if _seen(invoice, command_id):
            return DUPLICATE
        deadline = command.get("deadline_ms")
        if isinstance(deadline, bool) or not isinstance(deadline, int):
            raise Invalid(f"deadline_ms must be an integer, not {deadline!r}")
        if invoice is None or overdue_deadline(invoice, days) is None:
            return NOOP
        due_at = invoice.due_at
        assert due_at is not None and invoice.user_id is not None and invoice.currency is not None
        reached = [d for d in days if d not in invoice.overdue_days_sent and due_at + d * DAY_MS <= now_ms]
        if not reached:
            return NOOP
        amount = invoice.amount_remaining if invoice.amount_remaining > 0 else invoice.amount_due
        emitted = tuple(Emission(
            INVOICE_OVERDUE,
            contracts.payload(INVOICE_OVERDUE, invoice_id=invoice.invoice_id, user_id=invoice.user_id,
                              days_overdue=day, due_date=due_at, amount=amount,
                              currency=invoice.currency),
            discriminator=str(day), occurred_at=due_at + day * DAY_MS,
            event_id=fact_event_id(INVOICE_OVERDUE, invoice.invoice_id, day)) for day in reached)
        updated = _applied(invoice, command_id, now_ms)
        sent = sorted({*invoice.overdue_days_sent, *reached})
        updated = dataclasses.replace(updated, overdue_days_sent=sent)
        return Decision(row=updated, emit=emitted)

    return handle_invoice_overdue


# --------------------------------------------------------------------------
# The flow table


def invoice_flow(overdue_days: Iterable[int] = DEFAULT_OVERDUE_DAYS) -> aggregate.Flow:
    """The invoice aggregate on the kernel (key: the Stripe invoice id).

    ``overdue_days``: days after the due date on which ``invoice.overdue`` is
    published (``Settings.invoice_overdue_days``).
    """
    days = parse_overdue_days(",".join(str(d) for d in overdue_days))
    E = DeadlineEffect

    def deadline_of(invoice: Invoice) -> int | None:
        return overdue_deadline(invoice, days)

    return aggregate.Flow(
        name="invoices",
        producer=PAYMENT_SERVICE,
        key_field="invoice_id",
        steps=(
            Step("open", "open_invoice", open_invoice, (INVOICE_CREATED, INVOICE_PAID),
                 deadline=E.SET),
            # Also sets the deadline when it is the first news of an open invoice.
            Step("stripe", "apply_invoice_fact", apply_invoice_fact,
                 (INVOICE_CREATED, INVOICE_PAID, SUBSCRIPTION_PAYMENT_FAILED), deadline=E.CLEAR),
            Step("overdue", "handle_invoice_overdue", overdue_step(days), (INVOICE_OVERDUE,),
                 deadline=E.FIRE),
        ),
        load=Invoice.from_dict,
        dump=Invoice.to_dict,
        command_topic=INVOICE_COMMANDS,
        deadline_of=deadline_of,
        view=invoice_view,
    )
