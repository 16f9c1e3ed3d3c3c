"""The subscription aggregate's decisions (tables.subscription_state), without a broker or Stripe.

Inputs are what the kernel hands the decisions: commands as
:func:`tables.aggregate.command_message` reads them off the JSON topic,
``stripe`` commands shaped as the webhook forwarding sends them (a
:func:`tables.stripe_objects.subscription_view` of a Stripe Subscription
object), events built with ``new_event``.  Stripe's answers are
:class:`Outcome` values given per operation.  :func:`run` does what the
kernel does with a step (calls first, then ``decide`` with their outcomes)
and checks what every decision keeps: the row it was given is untouched,
emissions and sends are declared by the step, payloads are exactly their
contracts' and pass ``new_event``, a new row survives the JSON round trip.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from schemas.contracts import payload_fields
from streams.catalog import (
    INVOICE_COMMANDS,
    PAYMENT_SERVICE,
    SUBSCRIPTION_COMMANDS,
    USER_SUBSCRIPTION_INDEX,
)
from streams.envelope import new_event
from tables import aggregate
from tables.aggregate import (
    DUPLICATE,
    NOOP,
    Call,
    Conflict,
    Decision,
    IdempotencyKeyReused,
    NotFound,
    Outcome,
)
from tables.payment_state import PAYMENT_REFUNDED, STRIPE
from tables.payment_state import fact_event_id as payment_fact_event_id
from tables.stripe_objects import subscription_view
from tables.subscription_state import (
    MAX_APPLIED_IDS,
    SUBSCRIPTION_CANCELED,
    SUBSCRIPTION_CREATED,
    SUBSCRIPTION_EXPIRED,
    SUBSCRIPTION_UPDATED,
    TERMINAL,
    TRANSITIONS,
    Subscription,
    deadline_of,
    event_status,
    fact_event_id,
    index_updates,
    prorated_refund,
    refund_of_invoice,
    subscription_flow,
)

SUB = "sub_1QfR2kLkdIwHu7ixS0b5c9Xy"
CUS = "cus_Pq3kLkdIwHu7ix"
USER = "usr_42b1e0c9"
T0 = 1_764_230_000_000
DAY = 86_400_000
PERIOD_START = T0
PERIOD_END = T0 + 30 * DAY
LATER = T0 + 10 * DAY
FLOW = subscription_flow()


# --------------------------------------------------------------------------
# Inputs


def stripe_subscription(status: str = "active", plan: str = "plan_basic", amount: int = 3000,
                        quantity: int = 1, **fields: Any) -> dict[str, Any]:
    """A Stripe Subscription object (the current API's shape: periods on the item)."""
    obj: dict[str, Any] = {
        "id": SUB, "object": "subscription", "customer": CUS, "status": status,
        "metadata": {"user_id": USER}, "cancel_at_period_end": False, "cancel_at": None,
        "canceled_at": None, "ended_at": None, "latest_invoice": "in_first",
        "items": {"data": [{"id": "si_1", "quantity": quantity,
                            "current_period_start": PERIOD_START // 1000,
                            "current_period_end": PERIOD_END // 1000,
                            "price": {"id": plan, "object": "price", "unit_amount": amount,
                                      "currency": "eur"}}]},
    }
    obj.update(fields)
    return obj


def view(**kwargs: Any) -> dict[str, Any]:
    return subscription_view(stripe_subscription(**kwargs))


def received(record: Mapping[str, Any]) -> dict[str, Any]:
    """A command record as the subscription agent decides it: JSON on the topic, then command_message."""
    return aggregate.command_message(json.loads(json.dumps(record)), "subscription_id")


def command(verb: str, cause_id: str = "cause-1", **args: Any) -> dict[str, Any]:
    return received(aggregate.command(verb, "subscription_id", SUB, cause={"event_id": cause_id},
                                      now_ms=LATER, **args))


def fact(stripe_type: str, evt: str, occurred_at_ms: int = LATER, previous: tuple[str, ...] = (),
         **subscription: Any) -> dict[str, Any]:
    """The ``stripe`` command the webhook forwarding sends for a customer.subscription.* event."""
    return received(aggregate.command(
        "stripe", "subscription_id", SUB, cause={"event_id": evt}, now_ms=LATER,
        command_id=aggregate.derived_id("stripe", evt), stripe_event_id=evt,
        stripe_type=stripe_type, occurred_at_ms=occurred_at_ms, previous=sorted(previous),
        subscription=view(**subscription)))


def api_command(verb: str, idempotency_key: str | None = None, **args: Any) -> dict[str, Any]:
    """A command as streams.aggregate_api.AggregateApi.keyed_command builds it."""
    command_id = "api-" + verb
    if idempotency_key is not None:
        fingerprint = aggregate.fingerprint(verb, args)
        args = {**args, "idempotency_key": idempotency_key, "fingerprint": fingerprint}
        command_id = aggregate.derived_id("api", SUB, verb, idempotency_key, fingerprint)
    return received(aggregate.command(verb, "subscription_id", SUB, cause=None, now_ms=LATER,
                                      command_id=command_id, origin="api", **args))


def usage_event(overage: int | None = 1500, currency: str | None = "EUR") -> dict[str, Any]:
    return new_event("subscription.usage_exceeded", {
        "subscription_id": SUB, "user_id": USER, "metric": "api_calls", "usage": 12000,
        "usage_limit": 10000, "overage_amount": overage, "currency": currency,
    }, producer="product_service", now_ms=LATER)


def answer(**kwargs: Any) -> Outcome:
    return Outcome(value=view(**kwargs))


def invoice_answer(amount_paid: int = 3000, **fields: Any) -> Outcome:
    value = {"invoice_id": "in_first", "customer_id": CUS, "subscription_id": SUB, "user_id": USER,
             "status": "paid", "amount_due": amount_paid, "amount_paid": amount_paid,
             "amount_remaining": 0, "currency": "EUR", "due_date": None, "created": T0,
             "attempt_count": 1, "next_payment_attempt": None, "payment_intent_id": None,
             "charge_id": "ch_first", "billing_reason": "subscription_create",
             "period_start": PERIOD_START, "period_end": PERIOD_START, "metadata": {}}
    value.update(fields)
    return Outcome(value=value)


# --------------------------------------------------------------------------
# Running decisions as the kernel does


@dataclass
class Ran:
    decision: Decision
    calls: list[Call]
    events: list[dict[str, Any]]

    @property
    def row(self) -> Subscription:
        assert self.decision.row is not None, "the decision changed nothing"
        return self.decision.row

    def emitted(self, topic: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event_type"] == topic]


Answer = Outcome | Callable[[Call], Outcome]


def run(row: Subscription | None, message: Mapping[str, Any], now_ms: int = LATER,
        **answers: Answer) -> Ran:
    topic = SUBSCRIPTION_COMMANDS if "command" in message else message["event_type"]
    step = FLOW.step(topic, message)
    before = None if row is None else copy.deepcopy(row.to_dict())
    calls: list[Call] = []
    if step.calls is not None:
        calls = list(step.calls(row, message))
        keys = [c.idempotency_key for c in calls]
        assert len(set(keys)) == len(keys) and all(keys)
        outcomes = {}
        for call in calls:
            assert call.service == STRIPE
            given = answers[call.operation]
            outcomes[call.idempotency_key] = given(call) if callable(given) else given
        assert [c for c in step.calls(row, message) if c.idempotency_key not in outcomes] == []
        decision = step.decide(row, message, now_ms, outcomes)  # type: ignore[call-arg]
    else:
        decision = step.decide(row, message, now_ms)  # type: ignore[call-arg]
    if row is not None:
        assert row.to_dict() == before, "a decision must not change the row it was given"
    events = []
    for emission in decision.emit:
        assert emission.topic in step.emits, (step.handler, emission.topic)
        assert set(emission.payload) == set(payload_fields(emission.topic)), emission.topic
        cause = {"event_id": message.get("event_id") or message["command_id"]}
        events.append(new_event(
            emission.topic, emission.payload, producer=PAYMENT_SERVICE, cause=cause,
            event_id=emission.event_id or aggregate.derived_id(cause["event_id"], emission.topic,
                                                               emission.discriminator),
            now_ms=emission.occurred_at if emission.occurred_at is not None else now_ms))
    assert len({e["event_id"] for e in events}) == len(events)
    for send in decision.send:
        assert send.topic in step.sends, (step.handler, send.topic)
        json.dumps(send.value)
    if decision.duplicate:
        assert decision.row is None and not decision.emit and not decision.send
    if decision.row is not None:
        new = decision.row
        assert new.applied[-1] == (message.get("event_id") or message["command_id"])
        assert Subscription.from_dict(json.loads(json.dumps(new.to_dict()))) == new
    else:
        assert decision.emit == () and decision.send == ()
    return Ran(decision, calls, events)


def opened(**kwargs: Any) -> Subscription:
    return run(None, command("open", "create-cmd", subscription=view(**kwargs)), T0).row


# --------------------------------------------------------------------------
# The flow table and the pure rules


def test_the_flow_table_names_every_step_of_the_design() -> None:
    assert FLOW.name == "subscriptions" and FLOW.key_field == "subscription_id"
    assert FLOW.command_topic == SUBSCRIPTION_COMMANDS and FLOW.producer == PAYMENT_SERVICE
    handlers = {s.input: s.handler for s in FLOW.steps}
    assert handlers["subscription.usage_exceeded"] == "handle_subscription_usage_exceeded"
    assert {"open", "stripe", "cancel", "cancel_for_user_deleted", "refund_unused", "change_plan",
            "mark_past_due", "invoice_overage", "expire"} <= set(handlers)
    assert handlers["stripe"] == "apply_subscription_fact"
    assert FLOW.topics == ("subscription.usage_exceeded", SUBSCRIPTION_COMMANDS)
    (fire,) = [s for s in FLOW.steps if s.deadline is aggregate.DeadlineEffect.FIRE]
    assert fire.input == "expire" and fire.emits == (SUBSCRIPTION_EXPIRED,)


def test_nothing_leaves_a_terminal_status_and_every_status_is_in_the_table() -> None:
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()
    for status, targets in TRANSITIONS.items():
        assert targets <= set(TRANSITIONS), status
        event_status(status)  # every Stripe status has a contract symbol


def test_event_status_upper_cases_and_reports_ended_as_canceled() -> None:
    assert event_status("past_due") == "PAST_DUE"
    assert event_status("ended") == "CANCELED"
    with pytest.raises(aggregate.Invalid):
        event_status("on_holiday")


@pytest.mark.parametrize(("paid", "at", "expected"), [
    (3000, PERIOD_START, 3000),  # canceled as the period starts: all of it
    (3000, PERIOD_START - DAY, 3000),  # before it started: never more than paid
    (3000, PERIOD_END, 0),
    (3000, PERIOD_END + DAY, 0),
    (3000, PERIOD_START + 10 * DAY, 2000),  # 20 of 30 days unused
    (1000, PERIOD_START + 10 * DAY + 1, 666),  # rounded down: 666.66...
    (0, PERIOD_START, 0),
])
def test_prorated_refund_is_the_unused_share_rounded_down(paid: int, at: int, expected: int) -> None:
    assert prorated_refund(paid, PERIOD_START, PERIOD_END, at) == expected


def test_prorated_refund_of_an_empty_or_inverted_period_is_nothing() -> None:
    assert prorated_refund(3000, T0, T0, T0) == 0
    assert prorated_refund(3000, T0 + 1, T0, T0) == 0


def test_refund_of_invoice_caps_the_basis_at_one_period_price() -> None:
    row = opened()  # 3000 per period
    due = refund_of_invoice(row, invoice_answer(amount_paid=4500).value, PERIOD_START + 10 * DAY)
    assert due is not None and due["amount"] == 2000 and due["payment_id"] == "ch_first"
    assert refund_of_invoice(row, invoice_answer(amount_paid=0).value, LATER) is None
    assert refund_of_invoice(row, invoice_answer(charge_id=None).value, LATER) is None
    assert refund_of_invoice(row, {}, LATER) is None


# --------------------------------------------------------------------------
# open and Stripe's facts


def test_open_publishes_subscription_created_under_an_id_derived_from_the_subscription() -> None:
    ran = run(None, command("open", "create-cmd", subscription=view()), T0)
    (created,) = ran.emitted(SUBSCRIPTION_CREATED)
    assert created["event_id"] == fact_event_id(SUBSCRIPTION_CREATED, SUB)
    assert created["user_id"] == USER and created["plan_id"] == "plan_basic"
    assert created["status"] == "ACTIVE" and created["amount"] == 3000 and created["currency"] == "EUR"
    assert created["current_period_end"] == PERIOD_END
    assert ran.row.customer_id == CUS and ran.row.published == ["created"]
    assert run(ran.row, command("open", "create-cmd", subscription=view()), T0).decision == DUPLICATE


def test_the_created_webhook_after_open_publishes_nothing_and_open_after_it_neither() -> None:
    row = opened()
    ran = run(row, fact("customer.subscription.created", "evt_created", T0))
    assert ran.events == []
    first = run(None, fact("customer.subscription.created", "evt_created", T0))
    assert [e["event_id"] for e in first.events] == [fact_event_id(SUBSCRIPTION_CREATED, SUB)]
    assert run(first.row, command("open", "create-cmd", subscription=view())).events == []


def test_a_created_webhook_never_moves_a_known_row_even_in_the_same_second() -> None:
    row = run(opened(), fact("customer.subscription.updated", "evt_end", T0,
                             cancel_at_period_end=True)).row
    late = run(row, fact("customer.subscription.created", "evt_created", T0))
    assert late.events == [] and late.row.cancel_at_period_end is True


def test_a_fact_seen_before_is_a_duplicate() -> None:
    row = run(opened(), fact("customer.subscription.updated", "evt_1", plan="plan_pro")).row
    assert run(row, fact("customer.subscription.updated", "evt_1", plan="plan_pro")).decision == DUPLICATE


def test_a_plan_change_publishes_subscription_updated_with_old_and_new_plan() -> None:
    ran = run(opened(), fact("customer.subscription.updated", "evt_up", previous=("items",),
                             plan="plan_pro", amount=9000))
    (updated,) = ran.emitted(SUBSCRIPTION_UPDATED)
    assert updated["old_plan"] == "plan_basic" and updated["new_plan"] == "plan_pro"
    assert updated["status"] == "ACTIVE"
    assert updated["event_id"] == aggregate.derived_id("stripe-fact", SUBSCRIPTION_UPDATED, "evt_up")
    assert ran.row.plan_id == "plan_pro" and ran.row.amount == 9000


def test_a_fact_changing_nothing_of_interest_publishes_nothing() -> None:
    ran = run(opened(), fact("customer.subscription.updated", "evt_meta", metadata={"user_id": USER,
                                                                                     "x": "y"}))
    assert ran.events == [] and ran.row.metadata == {"user_id": USER, "x": "y"}


def test_an_older_fact_never_moves_the_row_back() -> None:
    row = run(opened(), fact("customer.subscription.updated", "evt_new", LATER, plan="plan_pro")).row
    ran = run(row, fact("customer.subscription.updated", "evt_old", LATER - 5000, plan="plan_basic"))
    assert ran.events == [] and ran.row.plan_id == "plan_pro"
    assert ran.row.applied[-1] == aggregate.derived_id("stripe", "evt_old")


def test_a_fact_in_the_same_second_still_applies() -> None:
    row = run(opened(), fact("customer.subscription.updated", "evt_a", LATER, status="past_due")).row
    ran = run(row, fact("customer.subscription.updated", "evt_b", LATER, status="active"))
    assert ran.row.status == "active" and ran.emitted(SUBSCRIPTION_UPDATED)[0]["status"] == "ACTIVE"


def test_deleted_publishes_subscription_canceled_once_and_nothing_leaves_canceled() -> None:
    deleted = run(opened(status="past_due"), fact(
        "customer.subscription.deleted", "evt_del", status="canceled",
        canceled_at=LATER // 1000, ended_at=LATER // 1000))
    (canceled,) = deleted.emitted(SUBSCRIPTION_CANCELED)
    assert deleted.emitted(SUBSCRIPTION_UPDATED) == []
    assert canceled["event_id"] == fact_event_id(SUBSCRIPTION_CANCELED, SUB)
    assert canceled["reason"] == "PAYMENT_FAILED" and canceled["canceled_at"] == LATER
    later = run(deleted.row, fact("customer.subscription.updated", "evt_late", LATER + 1000,
                                  status="active"))
    assert later.events == [] and later.row.status == "canceled"


def test_a_subscription_first_known_from_a_webhook_gets_its_row_and_created() -> None:
    ran = run(None, fact("customer.subscription.updated", "evt_first", status="trialing"))
    assert [e["event_type"] for e in ran.events] == [SUBSCRIPTION_CREATED]
    assert ran.row.status == "trialing" and ran.row.fact_at_ms == LATER


def test_a_subscription_without_a_user_is_kept_and_publishes_nothing() -> None:
    ran = run(None, fact("customer.subscription.created", "evt_foreign", metadata={}))
    assert ran.events == [] and ran.row.user_id is None
    assert index_updates(None, ran.row) == ()
    assert deadline_of(ran.row) is None


def test_paused_and_resumed_are_status_changes() -> None:
    paused = run(opened(), fact("customer.subscription.paused", "evt_p", status="paused"))
    assert paused.emitted(SUBSCRIPTION_UPDATED)[0]["status"] == "PAUSED"
    resumed = run(paused.row, fact("customer.subscription.resumed", "evt_r", LATER + 1000))
    assert resumed.emitted(SUBSCRIPTION_UPDATED)[0]["status"] == "ACTIVE"


# --------------------------------------------------------------------------
# cancel (API)


def test_cancel_now_cancels_at_stripe_without_proration() -> None:
    ran = run(opened(), api_command("cancel", "key-1", at_period_end=False),
              cancel_subscription=answer(status="canceled", canceled_at=LATER // 1000,
                                         ended_at=LATER // 1000))
    (call,) = ran.calls
    assert call.operation == "cancel_subscription"
    assert call.args == {"subscription_id": SUB, "prorate": False, "invoice_now": False}
    (canceled,) = ran.emitted(SUBSCRIPTION_CANCELED)
    assert canceled["reason"] == "CANCELLATION_REQUESTED"
    assert ran.decision.reply["status"] == "canceled"
    again = run(ran.row, api_command("cancel", "key-1", at_period_end=False))
    assert again.decision.duplicate and again.decision.reply["status"] == "canceled"
    with pytest.raises(IdempotencyKeyReused):
        run(ran.row, api_command("cancel", "key-1", at_period_end=True))
    with pytest.raises(Conflict):
        run(ran.row, api_command("cancel", "key-2"))


def test_cancel_at_period_end_sets_the_expiry_deadline() -> None:
    row = opened()
    assert deadline_of(row) is None
    ran = run(row, api_command("cancel", at_period_end=True),
              update_subscription=answer(cancel_at_period_end=True))
    (call,) = ran.calls
    assert call.args == {"subscription_id": SUB, "cancel_at_period_end": True}
    assert ran.events == [] and ran.row.cancel_at_period_end
    assert deadline_of(ran.row) == PERIOD_END
    undone = run(ran.row, fact("customer.subscription.updated", "evt_undo", LATER + 60_000))
    assert deadline_of(undone.row) is None


def test_cancel_of_an_unknown_subscription_is_not_found_and_a_stripe_refusal_a_conflict() -> None:
    with pytest.raises(NotFound):
        run(None, api_command("cancel"))
    with pytest.raises(Conflict, match="Stripe refused"):
        run(opened(), api_command("cancel"), cancel_subscription=Outcome(refused="no such sub"))


# --------------------------------------------------------------------------
# cancel_for_user_deleted and refund_unused


def user_deleted_command(cause: str = "evt-user-deleted") -> dict[str, Any]:
    return command("cancel_for_user_deleted", cause, user_id=USER, deleted_at=LATER - 1000)


def test_user_deleted_cancels_then_refunds_the_unused_share_once() -> None:
    canceled_at = (PERIOD_START + 10 * DAY) // 1000
    ran = run(opened(), user_deleted_command(),
              cancel_subscription=answer(status="canceled", canceled_at=canceled_at,
                                         ended_at=canceled_at),
              latest_paid_invoice=invoice_answer())
    assert [c.operation for c in ran.calls] == ["cancel_subscription", "latest_paid_invoice"]
    assert ran.calls[0].args["prorate"] is False
    (canceled,) = ran.emitted(SUBSCRIPTION_CANCELED)
    assert canceled["reason"] == "USER_DELETED"
    assert ran.row.refund_due is not None and ran.row.refund_due["amount"] == 2000
    (follow,) = ran.decision.send
    assert follow.topic == SUBSCRIPTION_COMMANDS and follow.key == SUB
    refund_cmd = received(follow.value)
    refunded = run(ran.row, refund_cmd, create_refund=Outcome(value={
        "id": "re_pro", "amount": 2000, "status": "succeeded", "charge": "ch_first"}))
    (call,) = refunded.calls
    assert call.args["charge"] == "ch_first" and call.args["amount"] == 2000
    assert call.idempotency_key == aggregate.derived_id("subscription_proration_refund", SUB)
    (event,) = refunded.emitted(PAYMENT_REFUNDED)
    assert event["reason"] == "SUBSCRIPTION_PRORATION" and event["payment_id"] == "ch_first"
    assert event["amount"] == 2000 and event["currency"] == "EUR" and event["order_id"] is None
    assert event["event_id"] == payment_fact_event_id(PAYMENT_REFUNDED, "re_pro")
    row = refunded.row
    assert row.refund["refund_id"] == "re_pro" and row.refund_due is None
    # replayed: the same command is a duplicate; a new one (the event re-published) does nothing
    assert run(row, refund_cmd).decision == DUPLICATE
    again = run(row, user_deleted_command("evt-user-deleted-again"))
    assert again.calls == [] and again.events == [] and again.decision.send == ()


def test_user_deleted_refunds_when_our_cancel_webhook_overtook_the_replay() -> None:
    canceled_at = (PERIOD_START + 10 * DAY) // 1000
    row = run(opened(), fact("customer.subscription.deleted", "evt_del", status="canceled",
                             canceled_at=canceled_at, ended_at=canceled_at)).row
    ran = run(row, user_deleted_command(), latest_paid_invoice=invoice_answer())
    assert [c.operation for c in ran.calls] == ["latest_paid_invoice"]
    assert ran.row.refund_due["amount"] == 2000 and len(ran.decision.send) == 1


def test_user_deleted_leaves_a_subscription_that_ended_before_alone() -> None:
    row = run(opened(), fact("customer.subscription.deleted", "evt_del", T0 + DAY, status="canceled",
                             canceled_at=(T0 + DAY) // 1000, ended_at=(T0 + DAY) // 1000)).row
    ran = run(row, user_deleted_command())
    assert ran.calls == [] and ran.events == [] and ran.decision.send == ()


def test_user_deleted_without_a_paid_invoice_cancels_and_refunds_nothing() -> None:
    ran = run(opened(), user_deleted_command(),
              cancel_subscription=answer(status="canceled", canceled_at=LATER // 1000),
              latest_paid_invoice=Outcome(value={}))
    assert ran.emitted(SUBSCRIPTION_CANCELED) and ran.decision.send == ()
    assert ran.row.refund_due is None
    assert run(None, user_deleted_command()).decision == NOOP


# --------------------------------------------------------------------------
# change_plan and mark_past_due


def test_change_plan_moves_the_plan_with_proration() -> None:
    ran = run(opened(), command("change_plan", "evt-upgraded", plan_id="plan_pro"),
              update_subscription=answer(plan="plan_pro", amount=9000))
    (call,) = ran.calls
    assert call.args == {"subscription_id": SUB, "plan_id": "plan_pro",
                         "proration_behavior": "create_prorations"}
    (updated,) = ran.emitted(SUBSCRIPTION_UPDATED)
    assert (updated["old_plan"], updated["new_plan"]) == ("plan_basic", "plan_pro")
    # Stripe's webhook of the same change publishes nothing more
    webhook = run(ran.row, fact("customer.subscription.updated", "evt_same", LATER,
                                plan="plan_pro", amount=9000))
    assert webhook.events == []
    # already on the plan: nothing called
    same = run(ran.row, command("change_plan", "evt-upgraded-2", plan_id="plan_pro"))
    assert same.calls == [] and same.events == []


def test_mark_past_due_marks_an_active_subscription_until_stripe_says_newer() -> None:
    ran = run(opened(), command("mark_past_due", "evt-wallet", user_id=USER, occurred_at_ms=LATER))
    (updated,) = ran.emitted(SUBSCRIPTION_UPDATED)
    assert updated["status"] == "PAST_DUE" and ran.row.status == "past_due"
    older = run(ran.row, fact("customer.subscription.updated", "evt_older", LATER - 2000))
    assert older.row.status == "past_due" and older.events == []
    newer = run(ran.row, fact("customer.subscription.updated", "evt_newer", LATER + 2000))
    assert newer.row.status == "active"
    other_user = run(opened(), command("mark_past_due", "evt-w2", user_id="someone-else"))
    assert other_user.events == [] and other_user.row.status == "active"
    canceled = run(opened(status="canceled"), command("mark_past_due", "evt-w3", user_id=USER))
    assert canceled.events == [] and canceled.row.status == "canceled"


# --------------------------------------------------------------------------
# usage overage


def test_usage_overage_makes_an_invoice_item_then_an_invoice_then_opens_it() -> None:
    event = usage_event()
    ran = run(opened(), event, create_invoice_item=Outcome(value={"invoice_item_id": "ii_1"}))
    (call,) = ran.calls
    assert call.args["amount"] == 1500 and call.args["currency"] == "eur"
    assert call.args["customer_id"] == CUS and call.args["subscription_id"] == SUB
    assert call.idempotency_key == aggregate.derived_id("overage_invoice_item", event["event_id"])
    (follow,) = ran.decision.send
    invoice_view = {"invoice_id": "in_over", "customer_id": CUS, "subscription_id": SUB,
                    "status": "open", "amount_due": 1500, "amount_paid": 0, "currency": "EUR"}
    made = run(ran.row, received(follow.value), create_invoice=Outcome(value=invoice_view))
    (call,) = made.calls
    assert call.operation == "create_invoice"
    (opening,) = made.decision.send
    assert opening.topic == INVOICE_COMMANDS and opening.key == "in_over"
    assert opening.value["command"] == "open"
    # the user Stripe's answer lacks (localstripe keeps no invoice metadata) is the subscription's
    assert opening.value["args"]["invoice"] == {**invoice_view, "user_id": USER}
    assert made.row.overages[event["event_id"]]["invoice_id"] == "in_over"
    # the event replayed: a duplicate, nothing billed twice
    assert run(made.row, event).decision == DUPLICATE


def test_usage_without_an_overage_bills_nothing_and_of_an_unknown_subscription_is_refused() -> None:
    ran = run(opened(), usage_event(overage=None))
    assert ran.calls == [] and ran.decision.send == ()
    with pytest.raises(NotFound):
        run(None, usage_event())


# --------------------------------------------------------------------------
# expire


def test_expire_publishes_subscription_expired_once_at_the_period_end() -> None:
    row = run(opened(), api_command("cancel", at_period_end=True),
              update_subscription=answer(cancel_at_period_end=True)).row
    early = run(row, command("expire", deadline_ms=PERIOD_END), PERIOD_END - 1)
    assert early.decision == NOOP
    fired = run(row, command("expire", deadline_ms=PERIOD_END), PERIOD_END + 5)
    (expired,) = fired.emitted(SUBSCRIPTION_EXPIRED)
    assert expired["expiration_date"] == PERIOD_END and expired["plan_id"] == "plan_basic"
    assert expired["event_id"] == fact_event_id(SUBSCRIPTION_EXPIRED, SUB)
    assert deadline_of(fired.row) is None
    assert run(fired.row, command("expire", "other", deadline_ms=PERIOD_END), PERIOD_END + 9).decision == NOOP


def test_deadline_of_an_unpaid_or_canceled_subscription() -> None:
    unpaid = run(opened(), fact("customer.subscription.updated", "evt_u", status="unpaid")).row
    assert deadline_of(unpaid) == PERIOD_END
    canceled = run(unpaid, fact("customer.subscription.deleted", "evt_d", LATER + 1000,
                                status="canceled", ended_at=(LATER + 1000) // 1000)).row
    assert deadline_of(canceled) == LATER + 1000
    assert deadline_of(opened()) is None


# --------------------------------------------------------------------------
# index updates, the row's bookkeeping


def test_index_updates_only_when_the_summary_changes() -> None:
    row = opened()
    (send,) = index_updates(None, row)
    assert send.topic == USER_SUBSCRIPTION_INDEX and send.key == USER
    record = send.value
    assert record["command"] == "index" and record["args"]["subscription"]["status"] == "active"
    assert record["args"]["version"] == row.revision
    meta = run(row, fact("customer.subscription.updated", "evt_m", metadata={"user_id": USER, "a": "b"})).row
    assert index_updates(row, meta) == ()
    moved = run(row, fact("customer.subscription.updated", "evt_s", status="past_due")).row
    (again,) = index_updates(row, moved)
    assert again.value["command_id"] != record["command_id"]


def test_applied_ids_are_capped() -> None:
    row = opened()
    for n in range(MAX_APPLIED_IDS + 5):
        row = run(row, command("mark_past_due", f"evt-{n}", user_id="nobody")).row
    assert len(row.applied) == MAX_APPLIED_IDS
