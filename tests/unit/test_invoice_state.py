"""The invoice aggregate's decisions (tables.invoice_state), without a broker or Stripe.

Inputs are what the kernel hands the decisions: ``stripe`` commands as the
webhook forwarding builds them (``aggregate.command`` with the Stripe event's
id, type and time and the invoice view), ``open`` commands as the
subscription aggregate sends them, and the timer's hand-over command, each
read back through :func:`tables.aggregate.command_message`.  Every decision
goes through :func:`run`, which checks what every decision must keep: the row
it was given is untouched, each emission is declared by its step and passes
``new_event`` (its contract), a new row survives the changelog's JSON round
trip.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from streams.catalog import INVOICE_COMMANDS, PAYMENT_SERVICE
from streams.envelope import new_event
from tables import aggregate
from tables.aggregate import DUPLICATE, NOOP, DeadlineEffect, Decision, Invalid
from tables.invoice_state import (
    DAY_MS,
    DEFAULT_OVERDUE_DAYS,
    INVOICE_CREATED,
    INVOICE_OVERDUE,
    INVOICE_PAID,
    MAX_APPLIED_IDS,
    SUBSCRIPTION_PAYMENT_FAILED,
    Invoice,
    fact_event_id,
    invoice_flow,
    invoice_view,
    parse_overdue_days,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the invoice is created
DUE = T0 + 14 * DAY_MS  # its due date (send_invoice, 14 days)
INVOICE = "in_1Qtest0000000000000001"
SUB = "sub_1Qtest000000000000001"
USER = "usr_42"

FLOW = invoice_flow()
STEPS = {s.input: s for s in FLOW.steps}


def deadline_of(row: Invoice | None) -> int | None:
    return FLOW.deadline_of(row) if row is not None and FLOW.deadline_of else None


def view(**changes: Any) -> dict[str, Any]:
    """An invoice view as :func:`tables.stripe_objects.invoice_view` makes it."""
    base = {
        "invoice_id": INVOICE, "customer_id": "cus_1", "subscription_id": SUB, "user_id": USER,
        "status": "open", "amount_due": 2900, "amount_paid": 0, "amount_remaining": 2900,
        "currency": "EUR", "due_date": DUE, "created": T0, "attempt_count": 0,
        "next_payment_attempt": None, "payment_intent_id": None, "charge_id": None,
        "billing_reason": "subscription_cycle", "period_start": T0, "period_end": T0 + 30 * DAY_MS,
        "metadata": {"user_id": USER},
    }
    base.update(changes)
    return base


def stripe(stripe_type: str, evt: str, at_ms: int, invoice: Mapping[str, Any] | None = None,
           **extra: Any) -> dict[str, Any]:
    """The ``stripe`` command the webhook forwarding sends, as the step reads it."""
    invoice = dict(invoice if invoice is not None else view())
    record = aggregate.command(
        "stripe", "invoice_id", invoice["invoice_id"], cause={"event_id": evt}, now_ms=at_ms,
        command_id=aggregate.derived_id("stripe", evt), stripe_event_id=evt, stripe_type=stripe_type,
        occurred_at_ms=at_ms, previous=[], invoice=invoice, **extra)
    return aggregate.command_message(json.loads(json.dumps(record)), "invoice_id")


def open_command(invoice: Mapping[str, Any] | None = None, cause: str = "evt-usage-1") -> dict[str, Any]:
    invoice = dict(invoice if invoice is not None else view())
    record = aggregate.command("open", "invoice_id", invoice["invoice_id"], cause={"event_id": cause},
                               now_ms=T0, invoice=invoice)
    return aggregate.command_message(json.loads(json.dumps(record)), "invoice_id")


def hand_over(deadline_ms: int, invoice_id: str = INVOICE) -> dict[str, Any]:
    """The timer's FIRE command, exactly as :meth:`streams.kernel.Aggregate.hand_over` builds it."""
    record = aggregate.command(
        "overdue", "invoice_id", invoice_id, cause=None, now_ms=deadline_ms,
        command_id=aggregate.derived_id("overdue", invoice_id, deadline_ms), deadline_ms=deadline_ms)
    return aggregate.command_message(json.loads(json.dumps(record)), "invoice_id")


def run(row: Invoice | None, message: Mapping[str, Any], now_ms: int, flow: aggregate.Flow = FLOW
        ) -> Decision:
    """Decide ``message`` as the kernel would, checking what every decision must keep."""
    step = flow.step(INVOICE_COMMANDS, message)
    before = copy.deepcopy(row)
    decision = step.decide(row, message, now_ms)
    assert row == before, "a decision changed the row it was given"
    for emission in decision.emit:
        assert emission.topic in step.emits, (step.input, emission.topic)
        assert emission.event_id is not None, "every invoice fact has an id derived from Stripe's"
        new_event(emission.topic, emission.payload, producer=PAYMENT_SERVICE,
                  now_ms=emission.occurred_at or now_ms, event_id=emission.event_id)
    if decision.row is not None:
        assert flow.load(json.loads(json.dumps(flow.dump(decision.row)))) == decision.row
    return decision


def apply(row: Invoice | None, message: Mapping[str, Any], now_ms: int, flow: aggregate.Flow = FLOW
          ) -> tuple[Invoice, list[tuple[str, dict[str, Any], str | None]]]:
    """The row after ``message`` (the old one if unchanged) and what it emitted."""
    decision = run(row, message, now_ms, flow)
    after = decision.row if decision.row is not None else row
    assert after is not None
    return after, [(e.topic, e.payload, e.event_id) for e in decision.emit]


def topics(emitted: list[tuple[str, dict[str, Any], str | None]]) -> list[str]:
    return [topic for topic, _payload, _id in emitted]


def opened(**changes: Any) -> Invoice:
    row, _emitted = apply(None, stripe("invoice.finalized", "evt_fin", T0, view(**changes)), T0)
    return row


# --------------------------------------------------------------------------
# The flow table


def test_the_flow_table_reads_the_invoice_commands_and_names_its_handlers() -> None:
    assert FLOW.name == "invoices" and FLOW.key_field == "invoice_id"
    assert FLOW.command_topic == INVOICE_COMMANDS and FLOW.producer == PAYMENT_SERVICE
    assert {s.input: s.handler for s in FLOW.steps} == {
        "open": "open_invoice", "stripe": "apply_invoice_fact", "overdue": "handle_invoice_overdue"}
    assert [s.input for s in FLOW.steps if s.deadline is DeadlineEffect.FIRE] == ["overdue"]
    with pytest.raises(Invalid):
        FLOW.step(INVOICE_COMMANDS, {"command": "pay"})


def test_each_step_has_its_deadline_effect() -> None:
    # open sets the row's deadline; stripe clears it when the invoice is paid;
    # the hand-over moves it to the next cadence day.
    row, _ = apply(None, open_command(), T0)
    assert deadline_of(row) == DUE + DAY_MS
    paid, _ = apply(row, stripe("invoice.paid", "evt_paid", T0 + DAY_MS, view(status="paid")), T0 + DAY_MS)
    assert deadline_of(paid) is None
    fired, emitted = apply(row, hand_over(DUE + DAY_MS), DUE + DAY_MS)
    assert topics(emitted) == [INVOICE_OVERDUE] and deadline_of(fired) == DUE + 7 * DAY_MS


# --------------------------------------------------------------------------
# invoice.created and invoice.paid: once per invoice, whoever reports them


def test_open_publishes_invoice_created_once_with_an_id_derived_from_the_invoice() -> None:
    row, emitted = apply(None, open_command(), T0)
    assert emitted == [(INVOICE_CREATED, {
        "invoice_id": INVOICE, "user_id": USER, "subscription_id": SUB, "amount": 2900,
        "currency": "EUR", "due_date": DUE}, fact_event_id(INVOICE_CREATED, INVOICE))]
    assert row.status == "open" and row.created_announced and not row.paid_announced
    assert run(row, open_command(), T0 + 5) == DUPLICATE
    # Stripe's own invoice.created / invoice.finalized for it announce nothing new
    later, again = apply(row, stripe("invoice.created", "evt_c", T0 + 1000, view(status="draft")), T0 + 2000)
    assert again == [] and later.status == "open"
    later, again = apply(later, stripe("invoice.finalized", "evt_f", T0 + 1000), T0 + 2000)
    assert again == []


def test_the_webhook_first_then_our_open_publishes_one_invoice_created() -> None:
    row, emitted = apply(None, stripe("invoice.created", "evt_c", T0, view(status="draft")), T0)
    assert topics(emitted) == [INVOICE_CREATED]
    row, again = apply(row, open_command(view(status="open")), T0 + 10)
    assert again == [] and row.status == "open"  # our answer moves a draft forward, never back


def test_a_paid_invoice_publishes_invoice_paid_once_and_clears_its_deadline() -> None:
    row = opened(payment_intent_id="pi_1")
    assert deadline_of(row) == DUE + DAY_MS
    paid_view = view(status="paid", amount_paid=2900, amount_remaining=0, payment_intent_id="pi_1")
    paid_fact = stripe("invoice.paid", "evt_paid", T0 + DAY_MS, paid_view)
    row, emitted = apply(row, paid_fact, T0 + DAY_MS)
    assert emitted == [(INVOICE_PAID, {
        "invoice_id": INVOICE, "user_id": USER, "payment_id": "pi_1", "subscription_id": SUB,
        "amount": 2900, "currency": "EUR"}, fact_event_id(INVOICE_PAID, INVOICE))]
    assert row.status == "paid" and deadline_of(row) is None
    assert run(row, paid_fact, T0 + DAY_MS + 5) == DUPLICATE  # the same webhook again
    # invoice.payment_succeeded reports the same payment: no second invoice.paid
    row, again = apply(row, stripe("invoice.payment_succeeded", "evt_ps", T0 + DAY_MS, paid_view),
                       T0 + DAY_MS + 9)
    assert again == []


def test_invoice_paid_reports_payment_whatever_status_its_object_shows() -> None:
    row = opened()
    row, emitted = apply(row, stripe("invoice.payment_succeeded", "evt_ps", T0 + 5, view(status="open")),
                         T0 + 5)
    assert topics(emitted) == [INVOICE_PAID] and row.status == "paid"


def test_paid_reported_first_publishes_created_then_paid() -> None:
    paid_view = view(status="paid", amount_paid=2900, amount_remaining=0, charge_id="ch_1")
    row, emitted = apply(None, stripe("invoice.paid", "evt_paid", T0 + 60_000, paid_view), T0 + 70_000)
    assert topics(emitted) == [INVOICE_CREATED, INVOICE_PAID]
    assert emitted[1][1]["payment_id"] == "ch_1"  # no PaymentIntent: the charge that paid it
    # the older invoice.created and invoice.finalized arrive late: nothing moves back
    for stripe_type, evt, status in (("invoice.created", "evt_c", "draft"),
                                     ("invoice.finalized", "evt_f", "open")):
        row, again = apply(row, stripe(stripe_type, evt, T0, view(status=status)), T0 + 80_000)
        assert again == [] and row.status == "paid" and row.amount_paid == 2900
    assert deadline_of(row) is None


@pytest.mark.parametrize(("first", "then"), [("paid", "void"), ("void", "paid"), ("paid", "open"),
                                              ("void", "open"), ("uncollectible", "open"),
                                              ("open", "draft")])
def test_a_status_never_moves_backwards_nor_off_a_final_one(first: str, then: str) -> None:
    row, _ = apply(None, stripe("invoice.updated", "evt_1", T0, view(status=first)), T0)
    # even a fact Stripe dated later
    row, emitted = apply(row, stripe("invoice.updated", "evt_2", T0 + 5000, view(status=then)), T0 + 6000)
    assert row.status == first
    assert INVOICE_PAID not in topics(emitted)


def test_an_uncollectible_invoice_may_still_be_paid_and_has_no_overdue_deadline() -> None:
    marked = stripe("invoice.marked_uncollectible", "evt_u", T0 + 10, view(status="uncollectible"))
    row, _ = apply(opened(), marked, T0 + 10)
    assert row.status == "uncollectible" and deadline_of(row) is None
    row, emitted = apply(row, stripe("invoice.paid", "evt_p", T0 + 20, view(status="paid", amount_paid=2900)),
                         T0 + 20)
    assert row.status == "paid" and topics(emitted) == [INVOICE_PAID]


def test_of_two_facts_of_one_status_the_later_dated_wins_whatever_the_arrival_order() -> None:
    moved = DUE + 3 * DAY_MS
    row = opened()
    row, _ = apply(row, stripe("invoice.updated", "evt_new", T0 + 2000, view(due_date=moved)), T0 + 3000)
    assert row.due_date == moved and deadline_of(row) == moved + DAY_MS
    row, emitted = apply(row, stripe("invoice.updated", "evt_old", T0 + 1000, view(due_date=DUE)), T0 + 4000)
    assert emitted == [] and row.due_date == moved
    assert row.applied_ids[-1] == aggregate.derived_id("stripe", "evt_old")  # applied, changed nothing


def test_a_late_older_fact_still_fills_in_what_the_row_did_not_know() -> None:
    paid = stripe("invoice.paid", "evt_p", T0 + 9000, view(status="paid", subscription_id=None))
    row, _ = apply(None, paid, T0 + 9000)
    row, _ = apply(row, stripe("invoice.created", "evt_c", T0, view(status="draft")), T0 + 9500)
    assert row.subscription_id == SUB and row.status == "paid"


def test_attempt_count_only_grows() -> None:
    row, _ = apply(opened(), stripe("invoice.updated", "evt_2", T0 + 2000, view(attempt_count=3)), T0 + 2000)
    row, _ = apply(row, stripe("invoice.updated", "evt_1", T0 + 1000, view(attempt_count=1)), T0 + 3000)
    assert row.attempt_count == 3


# --------------------------------------------------------------------------
# subscription.payment_failed


def test_a_failed_payment_publishes_subscription_payment_failed_once_per_stripe_event() -> None:
    row = opened()
    failed_view = view(attempt_count=1, next_payment_attempt=T0 + 3 * DAY_MS, payment_intent_id="pi_1")
    first = stripe("invoice.payment_failed", "evt_fail_1", T0 + 100, failed_view)
    row, emitted = apply(row, first, T0 + 100)
    assert emitted == [(SUBSCRIPTION_PAYMENT_FAILED, {
        "subscription_id": SUB, "user_id": USER, "invoice_id": INVOICE, "attempt_count": 1,
        "amount": 2900, "currency": "EUR", "next_attempt_at": T0 + 3 * DAY_MS, "error_message": None},
        fact_event_id(SUBSCRIPTION_PAYMENT_FAILED, "evt_fail_1"))]
    assert run(row, first, T0 + 200) == DUPLICATE
    second = stripe("invoice.payment_failed", "evt_fail_2", T0 + 3 * DAY_MS,
                    view(attempt_count=2, next_payment_attempt=None))
    row, emitted = apply(row, second, T0 + 3 * DAY_MS)
    assert [(p["attempt_count"], p["next_attempt_at"]) for _t, p, _i in emitted] == [(2, None)]
    assert emitted[0][2] == fact_event_id(SUBSCRIPTION_PAYMENT_FAILED, "evt_fail_2")
    assert row.failures_announced == 2


def test_a_failure_reported_after_the_payment_or_of_a_one_off_invoice_is_not_published() -> None:
    paid, _ = apply(opened(), stripe("invoice.paid", "evt_p", T0 + 500, view(status="paid")), T0 + 500)
    late, emitted = apply(paid, stripe("invoice.payment_failed", "evt_f", T0 + 100, view(attempt_count=1)),
                          T0 + 600)
    assert emitted == [] and late.status == "paid"
    one_off = opened(subscription_id=None)
    row, emitted = apply(one_off, stripe("invoice.payment_failed", "evt_f", T0 + 100, view(
        subscription_id=None, attempt_count=1)), T0 + 100)
    assert emitted == [] and row.attempt_count == 1


def test_the_fixtures_of_stripe_make_the_facts_they_report() -> None:
    from tables.stripe_objects import invoice_view as stripe_view

    def from_fixture(name: str) -> dict[str, Any]:
        event = json.loads((FIXTURES / name).read_text())
        return stripe(event["type"], event["id"], event["created"] * 1000,
                      stripe_view(event["data"]["object"]))

    _row, emitted = apply(None, from_fixture("docs_invoice_payment_failed.json"), T0)
    assert topics(emitted) == [INVOICE_CREATED, SUBSCRIPTION_PAYMENT_FAILED]
    assert emitted[1][1]["attempt_count"] == 2 and emitted[1][1]["next_attempt_at"] == 1767085200000
    # collected automatically (no due_date): due when created
    assert emitted[0][1]["due_date"] == 1766822400000
    _row, emitted = apply(None, from_fixture("docs_invoice_paid_2025.json"), T0)
    assert topics(emitted) == [INVOICE_CREATED, INVOICE_PAID]
    assert emitted[1][1]["user_id"] == "usr_9d0c1e77" and emitted[1][1]["amount"] == 6000


# --------------------------------------------------------------------------
# An invoice whose user is not known yet


def test_without_a_user_nothing_is_announced_until_a_fact_names_the_user() -> None:
    anonymous = view(user_id=None, metadata={})
    row, emitted = apply(None, stripe("invoice.finalized", "evt_f", T0, anonymous), T0)
    assert emitted == [] and deadline_of(row) is None
    paid = stripe("invoice.paid", "evt_p", T0 + 10, {**anonymous, "status": "paid"})
    row, emitted = apply(row, paid, T0 + 10)
    assert emitted == [] and row.status == "paid"
    row, emitted = apply(row, open_command(view(status="paid")), T0 + 20)  # names the user
    assert topics(emitted) == [INVOICE_CREATED, INVOICE_PAID] and row.user_id == USER


def test_an_open_invoice_whose_user_comes_late_is_overdue_from_its_due_date() -> None:
    row, _ = apply(None, stripe("invoice.finalized", "evt_f", T0, view(user_id=None, metadata={})), T0)
    row, emitted = apply(row, stripe("invoice.updated", "evt_u", T0 + 100, view()), T0 + 100)
    assert topics(emitted) == [INVOICE_CREATED] and deadline_of(row) == DUE + DAY_MS


# --------------------------------------------------------------------------
# The overdue cadence


def test_the_deadline_is_the_due_date_plus_the_next_unsent_cadence_day() -> None:
    row = opened()
    assert DEFAULT_OVERDUE_DAYS == (1, 7, 30)
    assert deadline_of(row) == DUE + DAY_MS
    assert invoice_view(row)["due_at"] == DUE and "applied_ids" not in invoice_view(row)


def test_each_cadence_day_is_published_once_when_reached() -> None:
    row = opened()
    assert run(row, hand_over(DUE + DAY_MS), DUE + DAY_MS - 1) == NOOP  # early: the kernel re-asserts
    seen: list[int] = []
    for day in (1, 7, 30):
        deadline = deadline_of(row)
        assert deadline == DUE + day * DAY_MS
        fired, emitted = apply(row, hand_over(deadline), deadline + 250)
        assert emitted == [(INVOICE_OVERDUE, {
            "invoice_id": INVOICE, "user_id": USER, "days_overdue": day, "due_date": DUE,
            "amount": 2900, "currency": "EUR"}, fact_event_id(INVOICE_OVERDUE, INVOICE, day))]
        assert run(fired, hand_over(deadline), deadline + 500) == DUPLICATE  # handed over twice
        seen.append(day)
        assert fired.overdue_days_sent == seen
        row = fired
    assert deadline_of(row) is None  # every day announced: nothing pending
    assert run(row, hand_over(DUE + 30 * DAY_MS + 1), DUE + 90 * DAY_MS) == NOOP


def test_a_late_hand_over_publishes_each_day_reached_once_and_no_day_not_reached() -> None:
    row = opened()
    fired, emitted = apply(row, hand_over(DUE + DAY_MS), DUE + 8 * DAY_MS)  # the worker was down a week
    assert [(p["days_overdue"], event_id) for _t, p, event_id in emitted] == [
        (1, fact_event_id(INVOICE_OVERDUE, INVOICE, 1)), (7, fact_event_id(INVOICE_OVERDUE, INVOICE, 7))]
    decision = run(row, hand_over(DUE + DAY_MS), DUE + 8 * DAY_MS)
    assert [e.occurred_at for e in decision.emit] == [DUE + DAY_MS, DUE + 7 * DAY_MS]
    assert fired.overdue_days_sent == [1, 7] and deadline_of(fired) == DUE + 30 * DAY_MS
    # the redelivered hand-over, and the one for day 7's deadline, publish nothing again
    assert run(fired, hand_over(DUE + DAY_MS), DUE + 8 * DAY_MS) == DUPLICATE
    assert run(fired, hand_over(DUE + 7 * DAY_MS), DUE + 8 * DAY_MS) == NOOP


def test_paid_or_void_clears_the_deadline_and_a_racing_hand_over_is_a_no_op() -> None:
    for status, stripe_type in (("paid", "invoice.paid"), ("void", "invoice.voided")):
        fact = stripe(stripe_type, f"evt_{status}", DUE + 10, view(status=status))
        row, _ = apply(opened(), fact, DUE + 10)
        assert deadline_of(row) is None
        assert run(row, hand_over(DUE + DAY_MS), DUE + DAY_MS) == NOOP
    assert run(None, hand_over(DUE + DAY_MS), DUE + DAY_MS) == NOOP  # an unknown invoice


def test_paid_after_some_notices_keeps_them_and_stops_the_rest() -> None:
    row, _ = apply(opened(), hand_over(DUE + DAY_MS), DUE + DAY_MS)
    row, emitted = apply(row, stripe("invoice.paid", "evt_p", DUE + 2 * DAY_MS, view(status="paid")),
                         DUE + 2 * DAY_MS)
    assert topics(emitted) == [INVOICE_PAID] and row.overdue_days_sent == [1] and deadline_of(row) is None


def test_a_moved_due_date_moves_the_deadline_and_keeps_the_days_sent() -> None:
    row, _ = apply(opened(), hand_over(DUE + DAY_MS), DUE + DAY_MS)
    later = DUE + 10 * DAY_MS
    moved = stripe("invoice.updated", "evt_u", DUE + 2 * DAY_MS, view(due_date=later))
    row, _ = apply(row, moved, DUE + 2 * DAY_MS)
    assert deadline_of(row) == later + 7 * DAY_MS and row.overdue_days_sent == [1]


def test_an_invoice_collected_automatically_is_due_when_created() -> None:
    row = opened(due_date=None)
    assert row.due_at == T0 and deadline_of(row) == T0 + DAY_MS


def test_a_draft_is_not_overdue() -> None:
    row, emitted = apply(None, stripe("invoice.created", "evt_c", T0, view(status="draft")), T0)
    assert topics(emitted) == [INVOICE_CREATED] and deadline_of(row) is None


def test_the_cadence_is_a_setting() -> None:
    flow = invoice_flow((0, 2))
    row, _ = apply(None, open_command(), T0, flow)
    assert flow.deadline_of is not None and flow.deadline_of(row) == DUE
    fired, emitted = apply(row, hand_over(DUE), DUE + 5, flow)
    assert [p["days_overdue"] for _t, p, _i in emitted] == [0]
    assert flow.deadline_of(fired) == DUE + 2 * DAY_MS
    assert parse_overdue_days("30, 1,7,1") == (1, 7, 30)
    for bad in ("", "x", "-1,3"):
        with pytest.raises(ValueError):
            parse_overdue_days(bad)


def test_the_settings_read_the_cadence() -> None:
    from streams.settings import ENVIRONMENT, Settings

    assert ENVIRONMENT["INVOICE_OVERDUE_DAYS"] == ("invoice_overdue_days", "1,7,30")
    assert Settings.from_env(env={}).overdue_days == DEFAULT_OVERDUE_DAYS
    assert Settings.from_env(env={"INVOICE_OVERDUE_DAYS": "0, 3"}).overdue_days == (0, 3)
    with pytest.raises(ValueError, match="INVOICE_OVERDUE_DAYS"):
        Settings.from_env(env={"INVOICE_OVERDUE_DAYS": "soon"})


# --------------------------------------------------------------------------
# Bad input and bookkeeping


def test_malformed_commands_are_refused() -> None:
    with pytest.raises(Invalid, match="sent to the row"):
        other = stripe("invoice.paid", "evt_x", T0, view(invoice_id="in_other"))
        run(None, {**other, "invoice_id": INVOICE}, T0)
    with pytest.raises(Invalid, match="carries no invoice"):
        run(None, {**open_command(), "invoice": None}, T0)
    with pytest.raises(Invalid, match="unknown status"):
        run(None, stripe("invoice.updated", "evt_x", T0, view(status="deleted")), T0)
    with pytest.raises(Invalid, match="amount_due"):
        run(None, stripe("invoice.updated", "evt_x", T0, view(amount_due="12")), T0)
    with pytest.raises(Invalid, match="deadline_ms"):
        run(opened(), {**hand_over(DUE), "deadline_ms": "soon"}, DUE)


def test_a_row_remembers_a_bounded_number_of_applied_ids() -> None:
    row = opened()
    for index in range(MAX_APPLIED_IDS + 10):
        row, _ = apply(row, stripe("invoice.updated", f"evt_{index}", T0 + index, view()), T0 + index)
    assert len(row.applied_ids) == MAX_APPLIED_IDS
    assert row.applied_ids[-1] == aggregate.derived_id("stripe", f"evt_{MAX_APPLIED_IDS + 9}")


def test_a_stored_row_of_a_newer_version_loads() -> None:
    stored = {**opened().to_dict(), "a_field_of_tomorrow": 1}
    assert Invoice.from_dict(stored) == opened()
