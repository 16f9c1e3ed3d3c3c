"""The payment aggregate's decisions (tables.payment_state), without a broker or Stripe.

Inputs are what the kernel hands the decisions: order events built with
``new_event`` (so they satisfy their contracts); Stripe facts made from the
whole webhook bodies of ``tests/fixtures/stripe`` by the intent index
(:mod:`tables.stripe_intents`), as the ``stripe`` command it sends; API and
retry commands as :func:`tables.aggregate.command_message` reads them.
Stripe's answers are :class:`Outcome` values given per operation.

Every decision goes through :func:`run`, which does what the kernel does with a
step (its calls first, then ``decide`` with their outcomes) and checks what
every decision must keep: the row it was given is untouched, each emission and
send is declared by the step, each payload is exactly its contract's and
passes ``new_event``, a new row survives the changelog's JSON round trip.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas.contracts import payload_fields
from streams.catalog import (
    PAYMENT_COMMANDS,
    PAYMENT_INTENT_LINKS,
    PAYMENT_SERVICE,
    USER_PAYMENT_INDEX,
)
from streams.envelope import new_event
from tables import aggregate, stripe_intents
from tables.aggregate import (
    DUPLICATE,
    NOOP,
    Call,
    Conflict,
    Decision,
    IdempotencyKeyReused,
    Invalid,
    NotFound,
    Outcome,
    Refusal,
)
from tables.order_state import ORDER_TYPES
from tables.payment_state import (
    INTENT_ORDER_TYPES,
    MAX_APPLIED_IDS,
    MAX_IDEMPOTENCY_KEYS,
    OPEN_STATUSES,
    PAID_STATUSES,
    PAYMENT_COMPLETED,
    PAYMENT_FAILED,
    PAYMENT_INTENT_CREATED,
    PAYMENT_REFUNDED,
    REFUND_REASONS,
    STRIPE,
    STRIPE_REFUND_REASONS,
    TRANSITIONS,
    OverRefund,
    Payment,
    PaymentStatus,
    fact_event_id,
    index_updates,
    payment_flow,
    payment_summary,
    payment_view,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe"
# The ids and amounts of the fixtures' payment (docs_*.json).
ORDER = "ord_7f3c2a9e1b5d4c08"
USER = "usr_42b1e0c9"
PI = "pi_3QfR2kLkdIwHu7ix0Zb8aQ1T"
CH = "ch_3QfR2kLkdIwHu7ix0nKq6yZr"
PM = "pm_1QfR2jLkdIwHu7ixHc4Vx3Lp"
SECRET = f"{PI}_secret_Vb4k1DkQp0xY7mZ2oLcE9sHnR"
AMOUNT = 4999
RE_3499 = "re_3QfR2kLkdIwHu7ix0zA3bC4d"  # charge_refunded_with_refunds: 3499, reason duplicate
RE_1500 = "re_3QfR2kLkdIwHu7ix0uV1wX2y"  # also refund_created: 1500, paystream reason ORDER_CANCELED
RE_700 = "re_3QfR2kLkdIwHu7ix0gH5iJ6k"  # refund_updated / charge_refund_updated: 700, fraudulent
RE_FAILED = "re_3QfR2kLkdIwHu7ix0lM7nO8p"  # refund_failed: 1000

T0 = 1_764_230_000_000
LATER = T0 + 60_000
FLOW = payment_flow()
S = PaymentStatus

# --------------------------------------------------------------------------
# Inputs


def order_created(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "order_id": ORDER, "user_id": USER, "order_type": "ONE_TIME", "total_amount": AMOUNT,
        "currency": "EUR", "items": [{"product_id": "p-1", "quantity": 1, "unit_amount": AMOUNT}],
    }
    payload.update(overrides)
    return new_event("order.created", payload, producer="order_service", now_ms=T0)


def order_closed(topic: str) -> dict[str, Any]:
    if topic == "order.expired":
        payload: dict[str, Any] = {"order_id": ORDER, "user_id": USER, "payment_intent_id": PI,
                                   "expired_at": LATER}
    else:
        payload = {"order_id": ORDER, "user_id": USER, "reason": "USER_REQUESTED",
                   "refund_amount": 0, "currency": "EUR"}
    return new_event(topic, payload, producer="order_service", now_ms=LATER)


def webhook(name: str, event_id: str | None = None, **object_changes: Any) -> dict[str, Any]:
    """A fixture's webhook body, with another event id and object fields if given."""
    event = json.loads((FIXTURES / f"docs_{name}.json").read_bytes())
    if event_id is not None:
        event["id"] = event_id
    event["data"]["object"].update(object_changes)
    return event


LINK = {"payment_intent_id": PI, "order_id": ORDER, "user_id": USER}


def received(record: Mapping[str, Any]) -> dict[str, Any]:
    """A command record as the payment agent decides it: JSON on the topic, then command_message."""
    return aggregate.command_message(json.loads(json.dumps(record)), "order_id")


def fact(name: str, event_id: str | None = None, **object_changes: Any) -> dict[str, Any]:
    """The ``stripe`` command the intent index sends for a fixture's webhook."""
    decision = stripe_intents.handle_stripe_webhook(dict(LINK), webhook(name, event_id, **object_changes),
                                                    LATER)
    (send,) = decision.send
    assert send.topic == PAYMENT_COMMANDS and send.key == ORDER
    return received(send.value)


def api_command(verb: str, idempotency_key: str | None = None, **args: Any) -> dict[str, Any]:
    """A command as the API builds it (streams.aggregate_api.AggregateApi.keyed_command)."""
    if idempotency_key is not None:
        fingerprint = aggregate.fingerprint(verb, args)
        args = {**args, "idempotency_key": idempotency_key, "fingerprint": fingerprint}
        command_id = aggregate.derived_id("api", ORDER, verb, idempotency_key, fingerprint)
    else:
        command_id = str(uuid.uuid4())
    return received(aggregate.command(verb, "order_id", ORDER, cause=None, now_ms=LATER,
                                      command_id=command_id, origin="api", **args))


def retry_command(cause_id: str | None = None) -> dict[str, Any]:
    """A retry as handle_wallet_balance_changed sends it (its id derived from the wallet event)."""
    cause = {"event_id": cause_id or str(uuid.uuid4())}
    return received(aggregate.command("retry", "order_id", ORDER, cause=cause, now_ms=LATER))


# Stripe's answers


def intent_answer(status: str = "requires_payment_method", intent_id: str = PI) -> Outcome:
    return Outcome(value={"id": intent_id, "status": status, "amount": AMOUNT, "currency": "eur",
                          "client_secret": SECRET, "latest_charge": None, "last_payment_error": None})


def refund_answer(refund_id: str, amount: int, status: str = "succeeded") -> Outcome:
    return Outcome(value={"id": refund_id, "status": status, "amount": amount, "currency": "eur",
                          "payment_intent": PI, "charge": CH})


def refused(message: str = "Stripe said no", code: str = "invalid_request_error") -> Outcome:
    return Outcome(refused=message, code=code)


# --------------------------------------------------------------------------
# Running decisions as the kernel does, with the invariants every decision keeps


@dataclass
class Ran:
    decision: Decision
    calls: list[Call]
    events: list[dict[str, Any]]

    @property
    def row(self) -> Payment:
        assert self.decision.row is not None, "the decision changed nothing"
        return self.decision.row

    def emitted(self, topic: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event_type"] == topic]


Answer = Outcome | Callable[[Call], Outcome]


def step_of(message: Mapping[str, Any]) -> aggregate.Step:
    topic = PAYMENT_COMMANDS if "command" in message else message["event_type"]
    return FLOW.step(topic, message)


def run(row: Payment | None, message: Mapping[str, Any], now_ms: int = LATER, **answers: Answer) -> Ran:
    """Plan the step's calls, answer them from ``answers`` (by operation), decide, check."""
    step = step_of(message)
    before = None if row is None else copy.deepcopy(row.to_dict())
    calls: list[Call] = []
    if step.calls is not None:
        calls = list(step.calls(row, message))
        keys = [c.idempotency_key for c in calls]
        assert len(set(keys)) == len(keys) and all(keys)
        outcomes = {}
        for call in calls:
            assert call.service == STRIPE
            answer = answers[call.operation]
            outcomes[call.idempotency_key] = answer(call) if callable(answer) else answer
        # the kernel asks again once it has the outcomes: nothing more may be needed
        assert [c for c in step.calls(row, message) if c.idempotency_key not in outcomes] == []
        decision = step.decide(row, message, now_ms, outcomes)  # type: ignore[call-arg]
    else:
        decision = step.decide(row, message, now_ms)  # type: ignore[call-arg]
    if row is not None:
        assert row.to_dict() == before, "a decision must not change the row it was given"
    input_id = message.get("event_id") or message.get("command_id")
    events = check(step, decision, message, now_ms)
    if decision.duplicate:
        assert decision.row is None and not decision.emit and not decision.send
    if decision.row is not None:
        new = decision.row
        assert new.applied_ids[-1] == input_id
        assert new.updated_at_ms == now_ms
        assert Payment.from_dict(json.loads(json.dumps(new.to_dict()))) == new
    else:
        assert decision.emit == () and decision.send == ()
    return Ran(decision, calls, events)


def check(step: aggregate.Step, decision: Decision, cause: Mapping[str, Any],
          now_ms: int) -> list[dict[str, Any]]:
    events = []
    for emission in decision.emit:
        assert emission.topic in step.emits, (step.handler, emission.topic)
        assert set(emission.payload) == set(payload_fields(emission.topic)), emission.topic
        assert emission.event_id is not None, "a payment event's id is derived from its Stripe fact"
        causing = {"event_id": cause.get("event_id") or cause["command_id"]}
        events.append(new_event(emission.topic, emission.payload, producer=PAYMENT_SERVICE,
                                cause=causing, event_id=emission.event_id,
                                now_ms=emission.occurred_at if emission.occurred_at is not None else now_ms))
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    for send in decision.send:
        assert send.topic in step.sends, (step.handler, send.topic)
        json.dumps(send.value)
    return events


def opened() -> Payment:
    return run(None, order_created(), T0, create_payment_intent=intent_answer()).row


def payment_in(status: PaymentStatus) -> Payment:
    """A payment brought to ``status`` through legal decisions only."""
    payment = opened()
    if status is S.REQUIRES_PAYMENT:
        return payment
    if status is S.FAILED:  # for want of funds, with a payment method: retryable
        return run(payment, fact("payment_intent_payment_failed")).row
    if status is S.CANCELED:
        return run(payment, order_closed("order.canceled"),
                   cancel_payment_intent=Outcome(value={"id": PI, "status": "canceled"})).row
    payment = run(payment, fact("payment_intent_succeeded")).row
    if status is S.SUCCEEDED:
        return payment
    if status is S.PARTIALLY_REFUNDED:
        return run(payment, api_command("refund", amount=1000),
                   create_refund=refund_answer("re_part", 1000)).row
    if status is S.REFUNDED:
        return run(payment, api_command("refund"), create_refund=refund_answer("re_all", AMOUNT)).row
    raise AssertionError(status)


# --------------------------------------------------------------------------
# The flow table


def test_the_flow_table_is_keyed_by_order_and_names_the_seed_handlers() -> None:
    assert FLOW.name == "payments" and FLOW.key_field == "order_id"
    assert FLOW.command_topic == PAYMENT_COMMANDS and FLOW.producer == PAYMENT_SERVICE
    handlers = {s.input: s.handler for s in FLOW.steps}
    assert handlers == {
        "order.created": "handle_order_created",
        "order.updated": "handle_order_updated",
        "order.expired": "handle_order_expired",
        "order.canceled": "handle_order_canceled",
        "stripe": "apply_stripe_fact",
        "refund": "create_refund",
        "retry": "retry_payment",
    }
    assert set(FLOW.topics) == {"order.created", "order.updated", "order.expired", "order.canceled",
                                PAYMENT_COMMANDS}


def test_each_step_declares_what_it_emits_sends_and_calls() -> None:
    declared = {s.input: (set(s.emits), set(s.sends), s.calls is not None) for s in FLOW.steps}
    assert declared == {
        "order.created": ({PAYMENT_INTENT_CREATED}, {PAYMENT_INTENT_LINKS}, True),
        "order.updated": (set(), set(), True),
        "order.expired": (set(), set(), True),
        "order.canceled": (set(), set(), True),
        "stripe": ({PAYMENT_INTENT_CREATED, PAYMENT_COMPLETED, PAYMENT_FAILED, PAYMENT_REFUNDED},
                   set(), False),
        "refund": ({PAYMENT_REFUNDED}, set(), True),
        "retry": ({PAYMENT_COMPLETED}, set(), True),
    }
    assert FLOW.follow is index_updates and FLOW.view is payment_view
    assert FLOW.load == Payment.from_dict and FLOW.dump is Payment.to_dict


def test_an_unknown_verb_is_invalid() -> None:
    with pytest.raises(Invalid, match="unknown command"):
        FLOW.step(PAYMENT_COMMANDS, {"command": "charge"})


def test_no_paid_status_leads_back_to_an_open_one() -> None:
    for status in PAID_STATUSES:
        assert not TRANSITIONS[status] & OPEN_STATUSES
    assert TRANSITIONS[S.CANCELED] == TRANSITIONS[S.REFUNDED] == frozenset()


@pytest.mark.parametrize("status", list(S))
def test_payment_in_reaches_each_status(status: PaymentStatus) -> None:
    assert payment_in(status).status is status


# --------------------------------------------------------------------------
# handle_order_created


def test_order_created_opens_one_intent_with_the_order_in_its_metadata() -> None:
    ran = run(None, order_created(), T0, create_payment_intent=intent_answer())
    (call,) = ran.calls
    assert call.operation == "create_payment_intent"
    assert call.args == {"amount": AMOUNT, "currency": "eur",
                         "metadata": {"order_id": ORDER, "user_id": USER}}
    payment = ran.row
    assert payment.status is S.REQUIRES_PAYMENT
    assert (payment.order_id, payment.user_id) == (ORDER, USER)
    assert (payment.amount, payment.currency) == (AMOUNT, "EUR")
    assert (payment.payment_intent_id, payment.client_secret, payment.attempts) == (PI, SECRET, 1)
    assert payment.refunded_amount == 0 and payment.refunds == {} and payment.failure_code is None


def test_the_intents_idempotency_key_comes_from_the_order_not_the_event() -> None:
    plan = FLOW.step("order.created", {}).calls
    assert plan is not None
    first, again = order_created(), order_created()
    assert first["event_id"] != again["event_id"]
    (a,), (b,) = plan(None, first), plan(None, again)
    assert a.idempotency_key == b.idempotency_key
    (other,) = plan(None, order_created(order_id="ord_other"))
    assert other.idempotency_key != a.idempotency_key


def test_order_created_announces_the_intent_under_an_id_derived_from_it() -> None:
    ran = run(None, order_created(), T0, create_payment_intent=intent_answer())
    (event,) = ran.emitted(PAYMENT_INTENT_CREATED)
    assert event["event_id"] == fact_event_id(PAYMENT_INTENT_CREATED, PI)
    assert {k: event[k] for k in payload_fields(PAYMENT_INTENT_CREATED)} == {
        "payment_intent_id": PI, "order_id": ORDER, "user_id": USER, "amount": AMOUNT, "currency": "EUR"}
    # replaying the event (a crash before the row was written) announces it under the same id
    again = run(None, order_created(), T0 + 5, create_payment_intent=intent_answer())
    assert again.events[0]["event_id"] == event["event_id"]


def test_order_created_links_the_intent_to_the_order_for_the_intent_index() -> None:
    ran = run(None, order_created(), T0, create_payment_intent=intent_answer())
    (link,) = ran.decision.send
    assert (link.topic, link.key) == (PAYMENT_INTENT_LINKS, PI)
    assert link.value == {"event_id": aggregate.derived_id("intent-link", PI), "payment_intent_id": PI,
                          "order_id": ORDER, "user_id": USER}
    # and the intent index takes it
    linked = stripe_intents.link_payment_intent(None, link.value, LATER)
    assert linked.row["order_id"] == ORDER


@pytest.mark.parametrize("overrides", [
    {"order_type": "SUBSCRIPTION", "subscription_id": "sub_1"},
    {"total_amount": 0},
])
def test_subscription_and_free_orders_get_no_intent(overrides: dict[str, Any]) -> None:
    ran = run(None, order_created(**overrides), T0)
    assert ran.calls == [] and ran.decision == NOOP


def test_every_order_type_of_the_contract_is_either_paid_by_an_intent_or_a_subscription() -> None:
    assert INTENT_ORDER_TYPES | {"SUBSCRIPTION"} == ORDER_TYPES
    assert "SUBSCRIPTION" not in INTENT_ORDER_TYPES


@pytest.mark.parametrize("order_type", sorted(INTENT_ORDER_TYPES))
def test_every_intent_order_type_opens_an_intent(order_type: str) -> None:
    ran = run(None, order_created(order_type=order_type), T0, create_payment_intent=intent_answer())
    assert len(ran.calls) == 1 and ran.row.status is S.REQUIRES_PAYMENT


def test_stripe_refusing_the_intent_is_a_refusal_with_its_reason() -> None:
    with pytest.raises(Refusal, match="Amount must be at least"):
        run(None, order_created(), T0,
            create_payment_intent=refused("Amount must be at least 50 cents", "amount_too_small"))


def test_a_redelivered_order_created_is_a_duplicate_and_calls_nothing() -> None:
    event = order_created()
    payment = run(None, event, T0, create_payment_intent=intent_answer()).row
    ran = run(payment, event)
    assert ran.calls == [] and ran.decision == DUPLICATE


def test_a_republished_order_created_opens_no_second_intent() -> None:
    ran = run(opened(), order_created())
    assert ran.calls == [] and ran.decision == NOOP


def test_an_order_created_without_a_user_is_invalid() -> None:
    event = order_created()
    del event["user_id"]
    with pytest.raises(Invalid, match="user_id"):
        run(None, event, T0, create_payment_intent=intent_answer())


def test_stripes_own_intent_created_webhook_publishes_nothing_more() -> None:
    ran = run(opened(), fact("payment_intent_created"))
    assert ran.events == [] and ran.row.status is S.REQUIRES_PAYMENT


# --------------------------------------------------------------------------
# order.expired / order.canceled


@pytest.mark.parametrize("topic", ["order.expired", "order.canceled"])
@pytest.mark.parametrize("status", sorted(OPEN_STATUSES))
def test_closing_the_order_cancels_its_open_intent(topic: str, status: PaymentStatus) -> None:
    payment = payment_in(status)
    ran = run(payment, order_closed(topic),
              cancel_payment_intent=Outcome(value={"id": PI, "status": "canceled"}))
    (call,) = ran.calls
    assert (call.operation, dict(call.args)) == ("cancel_payment_intent", {"payment_intent_id": PI})
    assert call.idempotency_key == aggregate.derived_id("cancel_payment_intent", PI)
    assert ran.row.status is S.CANCELED and ran.events == []


@pytest.mark.parametrize("topic", ["order.expired", "order.canceled"])
@pytest.mark.parametrize("status", sorted(set(S) - OPEN_STATUSES))
def test_closing_the_order_leaves_a_closed_payment_alone(topic: str, status: PaymentStatus) -> None:
    ran = run(payment_in(status), order_closed(topic))
    assert ran.calls == [] and ran.decision == NOOP


def test_a_refused_cancel_leaves_the_payment_for_its_success_to_arrive() -> None:
    ran = run(opened(), order_closed("order.expired"),
              cancel_payment_intent=refused("This PaymentIntent's status is succeeded",
                                            "payment_intent_unexpected_state"))
    assert ran.row.status is S.REQUIRES_PAYMENT and ran.events == []
    paid = run(ran.row, fact("payment_intent_succeeded"))
    assert paid.row.status is S.SUCCEEDED and len(paid.emitted(PAYMENT_COMPLETED)) == 1


def test_a_redelivered_close_is_a_duplicate_and_calls_nothing() -> None:
    event = order_closed("order.expired")
    payment = run(opened(), event, cancel_payment_intent=refused()).row
    ran = run(payment, event)
    assert ran.calls == [] and ran.decision == DUPLICATE


@pytest.mark.parametrize("topic", ["order.expired", "order.canceled"])
def test_closing_an_order_without_a_payment_is_a_noop(topic: str) -> None:
    ran = run(None, order_closed(topic))
    assert ran.calls == [] and ran.decision == NOOP


# --------------------------------------------------------------------------
# Stripe's facts


def test_succeeded_completes_the_payment_once_under_the_intents_id() -> None:
    ran = run(opened(), fact("payment_intent_succeeded"))
    assert ran.row.status is S.SUCCEEDED
    (event,) = ran.events
    assert event["event_type"] == PAYMENT_COMPLETED
    assert event["event_id"] == fact_event_id(PAYMENT_COMPLETED, PI)
    assert event["occurred_at"] == (1764230400 + 4) * 1000  # the Stripe event's time
    assert {k: event[k] for k in payload_fields(PAYMENT_COMPLETED)} == {
        "payment_intent_id": PI, "order_id": ORDER, "user_id": USER, "amount": AMOUNT, "currency": "EUR"}


def test_a_second_success_webhook_publishes_nothing() -> None:
    paid = run(opened(), fact("payment_intent_succeeded")).row
    again = run(paid, fact("payment_intent_succeeded", event_id="evt_resent_by_stripe"))
    assert again.events == [] and again.row.status is S.SUCCEEDED


def test_the_same_stripe_command_twice_is_a_duplicate() -> None:
    command = fact("payment_intent_succeeded")
    paid = run(opened(), command).row
    assert run(paid, command).decision == DUPLICATE


def test_failed_records_the_decline_and_reports_it_under_the_stripe_events_id() -> None:
    ran = run(opened(), fact("payment_intent_payment_failed"))
    payment = ran.row
    assert payment.status is S.FAILED
    assert (payment.failure_code, payment.failure_message) == ("insufficient_funds",
                                                               "Your card has insufficient funds.")
    assert payment.payment_method == PM and payment.retryable
    (event,) = ran.events
    assert event["event_type"] == PAYMENT_FAILED
    assert event["event_id"] == fact_event_id(PAYMENT_FAILED, "evt_3QfR2kLkdIwHu7ix0i7j8k9l")
    assert (event["error_code"], event["error_message"]) == ("insufficient_funds",
                                                             "Your card has insufficient funds.")


def test_a_second_failure_of_the_intent_is_another_payment_failed() -> None:
    failed = run(opened(), fact("payment_intent_payment_failed")).row
    again = run(failed, fact("payment_intent_payment_failed", event_id="evt_second_attempt"))
    (event,) = again.events
    assert event["event_id"] == fact_event_id(PAYMENT_FAILED, "evt_second_attempt")


def test_a_card_decline_is_not_retryable() -> None:
    command = fact("payment_intent_payment_failed",
                   last_payment_error={"code": "card_declined", "decline_code": "generic_decline",
                                       "message": "Your card was declined.",
                                       "payment_method": {"id": PM, "object": "payment_method"}})
    payment = run(opened(), command).row
    assert payment.failure_code == "generic_decline" and not payment.retryable


@pytest.mark.parametrize("name", ["payment_intent_payment_failed", "payment_intent_canceled",
                                  "payment_intent_created"])
def test_an_older_fact_after_success_changes_nothing(name: str) -> None:
    paid = payment_in(S.SUCCEEDED)
    ran = run(paid, fact(name))
    assert ran.events == []
    assert ran.row.status is S.SUCCEEDED and ran.row.failure_code is None


def test_failed_after_a_refund_changes_nothing() -> None:
    refunded = payment_in(S.PARTIALLY_REFUNDED)
    ran = run(refunded, fact("payment_intent_payment_failed"))
    assert ran.events == [] and ran.row.status is S.PARTIALLY_REFUNDED and ran.row.refunded_amount == 1000


@pytest.mark.parametrize("status", sorted(OPEN_STATUSES))
def test_canceled_cancels_an_open_payment_without_an_event(status: PaymentStatus) -> None:
    ran = run(payment_in(status), fact("payment_intent_canceled"))
    assert ran.row.status is S.CANCELED and ran.events == []


def test_success_after_cancel_changes_nothing() -> None:
    ran = run(payment_in(S.CANCELED), fact("payment_intent_succeeded"))
    assert ran.row.status is S.CANCELED and ran.events == []


def test_a_fact_about_another_intent_changes_nothing_but_is_remembered() -> None:
    command = fact("payment_intent_succeeded")
    command["payment_intent_id"] = "pi_an_older_attempt"
    payment = opened()
    ran = run(payment, command)
    assert ran.events == [] and ran.row.status is S.REQUIRES_PAYMENT
    assert ran.row.payment_intent_id == PI
    assert run(ran.row, command).decision == DUPLICATE


def test_an_unknown_fact_kind_is_invalid() -> None:
    command = fact("payment_intent_succeeded")
    command["kind"] = "disputed"
    with pytest.raises(Invalid, match="disputed"):
        run(opened(), command)


# Refunds reported by Stripe


def test_charge_refunded_with_its_refunds_list_reports_each_refund_once() -> None:
    ran = run(payment_in(S.SUCCEEDED), fact("charge_refunded_with_refunds"))
    payment = ran.row
    assert payment.status is S.REFUNDED and payment.refunded_amount == 3499 + 1500 == AMOUNT
    events = {e["refund_id"]: e for e in ran.emitted(PAYMENT_REFUNDED)}
    assert set(events) == {RE_3499, RE_1500}
    for refund_id, event in events.items():
        assert event["event_id"] == fact_event_id(PAYMENT_REFUNDED, refund_id)
        assert (event["payment_id"], event["order_id"], event["user_id"], event["currency"]) == (
            PI, ORDER, USER, "EUR")
    assert (events[RE_3499]["amount"], events[RE_3499]["reason"]) == (3499, "DUPLICATE")
    assert (events[RE_1500]["amount"], events[RE_1500]["reason"]) == (1500, "ORDER_CANCELED")
    assert {r["refund_id"]: r["status"] for r in payment.refunds.values()} == {
        RE_3499: "succeeded", RE_1500: "succeeded"}


def test_charge_refunded_without_a_refunds_list_waits_for_the_refund_events() -> None:
    ran = run(payment_in(S.SUCCEEDED), fact("charge_refunded"))
    assert ran.events == [] and ran.row.status is S.SUCCEEDED and ran.row.refunded_amount == 0


def test_a_refund_pending_then_succeeded_counts_once() -> None:
    paid = payment_in(S.SUCCEEDED)
    pending = run(paid, fact("refund_updated", event_id="evt_refund_pending", status="pending"))
    assert pending.events == [] and pending.row.refunded_amount == 0
    assert pending.row.refunds[RE_700]["status"] == "pending"
    assert pending.row.refundable == AMOUNT - 700  # reserved while under way
    done = run(pending.row, fact("refund_updated"))
    (event,) = done.events
    assert event["event_id"] == fact_event_id(PAYMENT_REFUNDED, RE_700)
    assert (event["amount"], event["reason"]) == (700, "FRAUDULENT")
    assert done.row.status is S.PARTIALLY_REFUNDED and done.row.refunded_amount == 700
    # the older charge.refund.updated for the same refund: nothing new
    late = run(done.row, fact("charge_refund_updated"))
    assert late.events == [] and late.row.refunded_amount == 700


def test_the_same_refund_reported_by_two_events_counts_once() -> None:
    first = run(payment_in(S.SUCCEEDED), fact("refund_created"))
    assert first.row.refunded_amount == 1500 and len(first.events) == 1
    listed = run(first.row, fact("charge_refunded_with_refunds"))
    (event,) = listed.events  # only the refund not seen before
    assert event["refund_id"] == RE_3499
    assert listed.row.refunded_amount == AMOUNT and listed.row.status is S.REFUNDED


def test_a_refund_reported_pending_after_it_succeeded_is_not_counted_twice() -> None:
    done = run(payment_in(S.SUCCEEDED), fact("refund_updated")).row
    created_at = done.refunds[RE_700]["created_at_ms"]
    late = run(done, fact("refund_updated", event_id="evt_older_pending", status="pending"), LATER + 1)
    assert late.events == []
    assert late.row.refunds[RE_700]["status"] == "succeeded"
    again = run(late.row, fact("charge_refund_updated"), LATER + 2)
    assert again.events == [] and again.row.refunded_amount == 700
    assert again.row.refunds[RE_700]["created_at_ms"] == created_at


def test_a_failed_refund_is_recorded_and_not_counted() -> None:
    ran = run(payment_in(S.SUCCEEDED), fact("refund_failed"))
    assert ran.events == [] and ran.row.refunded_amount == 0 and ran.row.status is S.SUCCEEDED
    assert ran.row.refunds[RE_FAILED]["status"] == "failed"


def test_a_refund_before_the_success_proves_it_and_both_are_published_in_order() -> None:
    ran = run(opened(), fact("refund_created"))
    assert [e["event_type"] for e in ran.events] == [PAYMENT_COMPLETED, PAYMENT_REFUNDED]
    assert ran.events[0]["event_id"] == fact_event_id(PAYMENT_COMPLETED, PI)
    assert ran.row.status is S.PARTIALLY_REFUNDED and ran.row.refunded_amount == 1500
    # the success webhook arriving afterwards publishes nothing
    late = run(ran.row, fact("payment_intent_succeeded"))
    assert late.events == [] and late.row.status is S.PARTIALLY_REFUNDED


def test_a_pending_refund_before_the_success_proves_nothing_yet() -> None:
    ran = run(opened(), fact("refund_updated", event_id="evt_pending_first", status="pending"))
    assert ran.events == [] and ran.row.status is S.REQUIRES_PAYMENT


def test_a_refund_without_a_status_is_recorded_as_not_yet_succeeded() -> None:
    ran = run(payment_in(S.SUCCEEDED), fact("refund_updated", status=None))
    assert ran.events == [] and ran.row.refunded_amount == 0


# --------------------------------------------------------------------------
# create_refund


def test_a_refund_defaults_to_what_remains_and_carries_the_order() -> None:
    command = api_command("refund")
    ran = run(payment_in(S.SUCCEEDED), command, create_refund=refund_answer("re_1", AMOUNT))
    (call,) = ran.calls
    assert call.operation == "create_refund"
    assert call.idempotency_key == aggregate.derived_id("create_refund", command["command_id"])
    assert call.args == {"payment_intent_id": PI, "amount": AMOUNT, "reason": "requested_by_customer",
                         "metadata": {"order_id": ORDER, "user_id": USER,
                                      "paystream_reason": "REQUESTED_BY_CUSTOMER",
                                      "command_id": command["command_id"]}}
    assert ran.row.status is S.REFUNDED and ran.row.refunded_amount == AMOUNT and ran.row.refundable == 0


def test_partial_then_full_refund() -> None:
    part = run(payment_in(S.SUCCEEDED), api_command("refund", amount=1000),
               create_refund=refund_answer("re_1", 1000))
    assert part.calls[0].args["amount"] == 1000
    assert part.row.status is S.PARTIALLY_REFUNDED and part.row.refundable == AMOUNT - 1000
    rest = run(part.row, api_command("refund"), create_refund=refund_answer("re_2", AMOUNT - 1000))
    assert rest.calls[0].args["amount"] == AMOUNT - 1000
    assert rest.row.status is S.REFUNDED and rest.row.refunded_amount == AMOUNT
    events = part.events + rest.events
    assert [(e["refund_id"], e["amount"]) for e in events] == [("re_1", 1000), ("re_2", AMOUNT - 1000)]
    assert [e["event_id"] for e in events] == [fact_event_id(PAYMENT_REFUNDED, "re_1"),
                                               fact_event_id(PAYMENT_REFUNDED, "re_2")]
    assert events[0]["reason"] == "REQUESTED_BY_CUSTOMER" and events[0]["payment_id"] == PI


def test_the_refund_reply_is_the_refund_with_its_payment() -> None:
    ran = run(payment_in(S.SUCCEEDED), api_command("refund", amount=1000, reason="DUPLICATE"),
              create_refund=refund_answer("re_1", 1000))
    reply = ran.decision.reply
    assert reply["refund_id"] == "re_1" and reply["amount"] == 1000 and reply["status"] == "succeeded"
    assert reply["reason"] == "DUPLICATE"
    assert reply["payment"] == payment_view(ran.row)
    assert ran.calls[0].args["reason"] == "duplicate"


def test_a_refund_for_a_reason_stripe_does_not_know_goes_as_metadata_only() -> None:
    ran = run(payment_in(S.SUCCEEDED), api_command("refund", reason="ORDER_CANCELED"),
              create_refund=refund_answer("re_1", AMOUNT))
    args = ran.calls[0].args
    assert "reason" not in args and args["metadata"]["paystream_reason"] == "ORDER_CANCELED"
    assert ran.events[0]["reason"] == "ORDER_CANCELED"
    assert set(STRIPE_REFUND_REASONS) <= REFUND_REASONS


@pytest.mark.parametrize("status", [S.SUCCEEDED, S.PARTIALLY_REFUNDED])
def test_more_than_remains_is_an_over_refund_and_calls_nothing(status: PaymentStatus) -> None:
    payment = payment_in(status)
    with pytest.raises(OverRefund, match="exceeds") as caught:
        run(payment, api_command("refund", amount=payment.refundable + 1))
    assert (caught.value.status, caught.value.code) == (400, "amount_too_large")


@pytest.mark.parametrize("status", [S.REQUIRES_PAYMENT, S.FAILED, S.CANCELED, S.REFUNDED])
def test_refunding_an_unpaid_or_fully_refunded_payment_is_a_conflict(status: PaymentStatus) -> None:
    with pytest.raises(Conflict) as caught:
        run(payment_in(status), api_command("refund", amount=100))
    assert caught.value.status == 409


@pytest.mark.parametrize("amount", [0, -1, "100", True, 10.5])
def test_a_refund_amount_must_be_a_positive_integer(amount: Any) -> None:
    with pytest.raises(Invalid, match="amount"):
        run(payment_in(S.SUCCEEDED), api_command("refund", amount=amount))


def test_a_refund_reason_must_be_one_of_the_contracts() -> None:
    with pytest.raises(Invalid, match="reason"):
        run(payment_in(S.SUCCEEDED), api_command("refund", reason="BECAUSE"))


def test_a_refund_of_an_order_without_a_payment_is_not_found() -> None:
    with pytest.raises(NotFound) as caught:
        run(None, api_command("refund"))
    assert caught.value.status == 404


def test_the_same_key_and_request_answer_the_same_refund_without_a_second_call() -> None:
    first = run(payment_in(S.SUCCEEDED), api_command("refund", "key-1", amount=1000),
                create_refund=refund_answer("re_1", 1000))
    again = run(first.row, api_command("refund", "key-1", amount=1000))
    assert again.calls == [] and again.decision.duplicate and again.events == []
    assert again.decision.reply == first.decision.reply


def test_the_same_key_answers_the_refund_even_after_more_refunds() -> None:
    first = run(payment_in(S.SUCCEEDED), api_command("refund", "key-1", amount=1000),
                create_refund=refund_answer("re_1", 1000))
    second = run(first.row, api_command("refund", "key-2"),
                 create_refund=refund_answer("re_2", AMOUNT - 1000))
    again = run(second.row, api_command("refund", "key-1", amount=1000))
    assert again.calls == [] and again.decision.reply["refund_id"] == "re_1"


def test_the_same_key_with_other_parameters_is_refused_422() -> None:
    first = run(payment_in(S.SUCCEEDED), api_command("refund", "key-1", amount=1000),
                create_refund=refund_answer("re_1", 1000))
    with pytest.raises(IdempotencyKeyReused) as caught:
        run(first.row, api_command("refund", "key-1", amount=2000))
    assert (caught.value.status, caught.value.code) == (422, "idempotency_key_reused")
    step = FLOW.step(PAYMENT_COMMANDS, {"command": "refund"})
    with pytest.raises(IdempotencyKeyReused):  # decide alone says so too
        step.decide(first.row, api_command("refund", "key-1", amount=2000), LATER, {})


def test_a_keyless_refund_command_seen_before_is_a_duplicate() -> None:
    command = api_command("refund", amount=1000)
    payment = run(payment_in(S.SUCCEEDED), command, create_refund=refund_answer("re_1", 1000)).row
    ran = run(payment, command)
    assert ran.calls == [] and ran.decision == DUPLICATE


def test_stripe_refusing_the_refund_is_a_refusal_and_remembers_nothing() -> None:
    payment = payment_in(S.SUCCEEDED)
    with pytest.raises(Refusal, match="already been refunded"):
        run(payment, api_command("refund", "key-1"),
            create_refund=refused("Charge has already been refunded.", "charge_already_refunded"))
    # nothing was kept: the same key is tried again (under the same Stripe key)
    ran = run(payment, api_command("refund", "key-1"), create_refund=refund_answer("re_1", AMOUNT))
    assert len(ran.calls) == 1 and ran.row.status is S.REFUNDED


def test_a_pending_refund_is_published_when_stripe_reports_it_succeeded() -> None:
    ran = run(payment_in(S.SUCCEEDED), api_command("refund", amount=700),
              create_refund=refund_answer(RE_700, 700, status="pending"))
    assert ran.events == [] and ran.row.refunded_amount == 0
    assert ran.decision.reply["status"] == "pending"
    done = run(ran.row, fact("refund_updated"))
    (event,) = done.events
    assert event["event_id"] == fact_event_id(PAYMENT_REFUNDED, RE_700)
    assert done.row.refunded_amount == 700


def test_stripes_webhooks_for_our_refund_publish_nothing_new() -> None:
    ran = run(payment_in(S.SUCCEEDED), api_command("refund", amount=1500, reason="ORDER_CANCELED"),
              create_refund=refund_answer(RE_1500, 1500))
    (ours,) = ran.events
    assert ours["event_id"] == fact_event_id(PAYMENT_REFUNDED, RE_1500)
    webhook_run = run(ran.row, fact("refund_created"))
    assert webhook_run.events == [] and webhook_run.row.refunded_amount == 1500
    # had the webhook come first, it would have published the very same event id
    first = run(payment_in(S.SUCCEEDED), fact("refund_created"))
    assert first.events[0]["event_id"] == ours["event_id"]


def test_a_payment_remembers_a_bounded_number_of_refund_keys() -> None:
    payment = payment_in(S.SUCCEEDED)
    for n in range(MAX_IDEMPOTENCY_KEYS + 1):
        payment = run(payment, api_command("refund", f"key-{n}", amount=1),
                      create_refund=refund_answer(f"re_{n}", 1)).row
    assert len(payment.idempotency_keys) == MAX_IDEMPOTENCY_KEYS
    assert "key-0" not in payment.idempotency_keys
    assert f"key-{MAX_IDEMPOTENCY_KEYS}" in payment.idempotency_keys


def test_a_pending_refund_is_not_refundable_again() -> None:
    pending = run(payment_in(S.SUCCEEDED), api_command("refund"),
                  create_refund=refund_answer("re_1", AMOUNT, status="pending")).row
    with pytest.raises(OverRefund):
        run(pending, api_command("refund", amount=1), create_refund=refused("exceeds", "amount_too_large"))
    with pytest.raises(Conflict, match="nothing left to refund"):
        run(pending, api_command("refund"), create_refund=refused("exceeds", "amount_too_large"))


# --------------------------------------------------------------------------
# retry (from handle_wallet_balance_changed)


def test_a_retry_confirms_the_unfunded_intent_with_its_payment_method() -> None:
    command = retry_command()
    ran = run(payment_in(S.FAILED), command, confirm_payment_intent=intent_answer("succeeded"))
    (call,) = ran.calls
    assert (call.operation, dict(call.args)) == ("confirm_payment_intent",
                                                 {"payment_intent_id": PI, "payment_method": PM})
    assert call.idempotency_key == aggregate.derived_id("retry_payment_intent", command["command_id"])
    assert ran.row.status is S.SUCCEEDED and ran.row.attempts == 2 and ran.row.failure_code is None
    (event,) = ran.events
    assert event["event_type"] == PAYMENT_COMPLETED
    assert event["event_id"] == fact_event_id(PAYMENT_COMPLETED, PI)


def test_a_retried_payment_reported_again_by_stripe_publishes_nothing() -> None:
    paid = run(payment_in(S.FAILED), retry_command(), confirm_payment_intent=intent_answer("succeeded")).row
    ran = run(paid, fact("payment_intent_succeeded"))
    assert ran.events == [] and ran.row.status is S.SUCCEEDED


def test_a_declined_retry_is_recorded_and_stays_retryable() -> None:
    """Stripe's payment_failed webhook announces the decline; the retry itself publishes nothing."""
    ran = run(payment_in(S.FAILED), retry_command(),
              confirm_payment_intent=refused("Your card has insufficient funds.", "insufficient_funds"))
    assert ran.row.status is S.FAILED and ran.row.attempts == 2 and ran.row.retryable
    assert ran.events == []
    assert (ran.row.failure_code, ran.row.failure_message) == ("insufficient_funds",
                                                               "Your card has insufficient funds.")


def test_a_retry_declined_for_another_reason_is_not_retried_again() -> None:
    ran = run(payment_in(S.FAILED), retry_command(),
              confirm_payment_intent=refused("Your card was declined.", "card_declined"))
    assert ran.row.status is S.FAILED and not ran.row.retryable
    assert run(ran.row, retry_command()).calls == []


def test_a_retry_that_needs_the_payer_waits_for_them() -> None:
    ran = run(payment_in(S.FAILED), retry_command(), confirm_payment_intent=intent_answer("requires_action"))
    assert ran.row.status is S.REQUIRES_PAYMENT and ran.events == [] and ran.row.attempts == 2


@pytest.mark.parametrize("status", [S.REQUIRES_PAYMENT, S.SUCCEEDED, S.CANCELED, S.REFUNDED])
def test_only_a_retryable_payment_is_retried(status: PaymentStatus) -> None:
    ran = run(payment_in(status), retry_command())
    assert ran.calls == [] and ran.decision == NOOP


def test_a_retry_of_a_missing_payment_is_a_noop() -> None:
    ran = run(None, retry_command())
    assert ran.calls == [] and ran.decision == NOOP


def test_a_redelivered_retry_is_a_duplicate_and_calls_nothing() -> None:
    command = retry_command("wallet-event-1")
    failed = run(payment_in(S.FAILED), command,
                 confirm_payment_intent=refused("insufficient", "insufficient_funds")).row
    ran = run(failed, retry_command("wallet-event-1"))
    assert ran.calls == [] and ran.decision == DUPLICATE


def test_a_failure_without_a_payment_method_is_not_retryable() -> None:
    command = fact("payment_intent_payment_failed",
                   last_payment_error={"code": "card_declined", "decline_code": "insufficient_funds",
                                       "message": "Your card has insufficient funds."})
    payment = run(opened(), command).row
    assert payment.failure_code == "insufficient_funds" and payment.payment_method is None
    assert not payment.retryable


def test_a_declined_retry_and_stripes_webhook_for_it_publish_one_payment_failed() -> None:
    declined = run(payment_in(S.FAILED), retry_command(),
                   confirm_payment_intent=refused("Your card has insufficient funds.", "insufficient_funds"))
    webhook_run = run(declined.row, fact("payment_intent_payment_failed", event_id="evt_retry_declined"))
    assert len(declined.events) + len(webhook_run.events) == 1


# --------------------------------------------------------------------------
# Rows, views and the index


@pytest.mark.parametrize("status", list(S))
def test_rows_round_trip_through_the_table_codec(status: PaymentStatus) -> None:
    payment = payment_in(status)
    stored = json.loads(json.dumps(FLOW.dump(payment)))
    assert FLOW.load(stored) == payment


def test_a_row_with_refunds_and_keys_round_trips() -> None:
    payment = run(payment_in(S.SUCCEEDED), api_command("refund", "k", amount=10),
                  create_refund=refund_answer("re_1", 10)).row
    payment = run(payment, fact("refund_updated", event_id="evt_p", status="pending")).row
    assert set(payment.refunds) == {"re_1", RE_700} and payment.idempotency_keys
    assert Payment.from_dict(json.loads(json.dumps(payment.to_dict()))) == payment


def test_from_dict_ignores_keys_of_a_newer_version() -> None:
    payment = payment_in(S.SUCCEEDED)
    assert Payment.from_dict({**payment.to_dict(), "added_later": 1}) == payment


def test_to_dict_does_not_alias_the_row() -> None:
    payment = payment_in(S.PARTIALLY_REFUNDED)
    data = payment.to_dict()
    data["refunds"].clear()
    data["applied_ids"].append("x")
    assert payment.refunds and "x" not in payment.applied_ids


def test_a_row_remembers_a_bounded_number_of_applied_ids() -> None:
    payment = payment_in(S.SUCCEEDED)
    for n in range(MAX_APPLIED_IDS + 5):
        payment = run(payment, fact("payment_intent_succeeded", event_id=f"evt_again_{n}")).row
    assert len(payment.applied_ids) == MAX_APPLIED_IDS


def test_the_view_hides_the_bookkeeping_and_lists_refunds_oldest_first() -> None:
    payment = run(payment_in(S.SUCCEEDED), api_command("refund", "k", amount=10),
                  create_refund=refund_answer("re_b", 10), now_ms=LATER + 2).row
    payment = run(payment, api_command("refund", amount=20), create_refund=refund_answer("re_a", 20),
                  now_ms=LATER + 3).row
    view = payment_view(payment)
    assert "applied_ids" not in view and "idempotency_keys" not in view
    assert view["refundable_amount"] == AMOUNT - 30
    assert [r["refund_id"] for r in view["refunds"]] == ["re_b", "re_a"]
    assert view["status"] == "PARTIALLY_REFUNDED"
    json.dumps(view)


def test_a_new_payment_is_indexed_for_its_user() -> None:
    payment = opened()
    (send,) = index_updates(None, payment)
    assert (send.topic, send.key) == (USER_PAYMENT_INDEX, USER)
    assert send.value == {"order": payment_summary(payment), "version": payment.updated_at_ms,
                          "user_id": USER}
    assert send.value["order"] == {"order_id": ORDER, "payment_intent_id": PI, "status": "REQUIRES_PAYMENT",
                                   "failure_code": None, "retryable": False}


def test_the_index_is_updated_only_when_the_summary_changed() -> None:
    payment = opened()
    same = run(payment, fact("payment_intent_created")).row
    assert index_updates(payment, same) == ()
    failed = run(payment, fact("payment_intent_payment_failed")).row
    (send,) = index_updates(payment, failed)
    assert send.value["order"]["retryable"] is True and send.value["version"] == failed.updated_at_ms
    # a refund that leaves the status as it was changes nothing the index keeps
    part = payment_in(S.PARTIALLY_REFUNDED)
    more = run(part, api_command("refund", amount=1), create_refund=refund_answer("re_x", 1)).row
    assert index_updates(part, more) == ()


def order_updated(**changes: Any) -> dict[str, Any]:
    return new_event("order.updated", {"order_id": ORDER, "user_id": USER,
                                       "changes": {k: json.dumps(v) for k, v in changes.items()},
                                       "updated_fields": sorted(changes)},
                     producer="order_service", now_ms=LATER)


def test_an_order_total_changed_after_the_intent_reaches_the_payment() -> None:
    event = order_updated(total_amount=AMOUNT + 1000, currency="EUR")
    ran = run(opened(), event, update_payment_intent=intent_answer())
    (call,) = ran.calls
    assert call.args == {"payment_intent_id": PI, "amount": AMOUNT + 1000, "currency": "eur"}
    assert call.idempotency_key == aggregate.derived_id("update_payment_intent", event["event_id"])
    assert ran.row.amount == AMOUNT + 1000 and ran.events == []


def test_an_order_update_that_leaves_the_price_or_a_paid_payment_calls_nothing() -> None:
    assert run(opened(), order_updated(metadata={"a": "b"})).calls == []
    assert run(opened(), order_updated(total_amount=AMOUNT)).calls == []
    assert run(payment_in(S.SUCCEEDED), order_updated(total_amount=AMOUNT + 5)).calls == []


def test_stripe_refusing_the_new_amount_is_a_refusal() -> None:
    with pytest.raises(Conflict, match="refused to change"):
        run(opened(), order_updated(total_amount=1), update_payment_intent=refused("too small",
                                                                                   "amount_too_small"))


def test_a_success_read_before_the_payment_row_is_not_dropped_silently() -> None:
    try:
        decision = run(None, fact("payment_intent_succeeded")).decision
    except Refusal:
        return
    assert decision != NOOP


def test_a_keyed_refund_without_a_fingerprint_repeated_is_the_same_request() -> None:
    # The API always sends a fingerprint with a key; a command without one must still match itself.
    command = received(aggregate.command("refund", "order_id", ORDER, cause=None, now_ms=LATER,
                                         command_id="cmd-1", origin="api", idempotency_key="k"))
    first = run(payment_in(S.SUCCEEDED), command, create_refund=refund_answer("re_1", AMOUNT))
    again = run(first.row, command)
    assert again.calls == [] and again.decision.reply["refund_id"] == "re_1"


def test_a_refund_retried_after_stripe_reported_it_first_answers_the_refund() -> None:
    paid = payment_in(S.SUCCEEDED)
    command = api_command("refund", "key-1")
    # the webhook of our refund: the gateway put the command's id in its metadata
    metadata = {"order_id": ORDER, "paystream_reason": "ORDER_CANCELED",
                "command_id": command["command_id"]}
    reported = run(paid, fact("refund_created", amount=AMOUNT, metadata=metadata)).row
    assert reported.status is S.REFUNDED
    ran = run(reported, command, create_refund=refund_answer(RE_1500, AMOUNT))
    assert ran.decision.reply["refund_id"] == RE_1500 and ran.events == []


def test_news_of_an_intent_before_its_payment_row_makes_the_row_and_announces_it_once() -> None:
    """After a crash, Stripe's payment_intent.created may be decided before the replayed order.created."""
    ran = run(None, fact("payment_intent_created"))
    (event,) = ran.events
    assert event["event_type"] == PAYMENT_INTENT_CREATED
    assert event["event_id"] == fact_event_id(PAYMENT_INTENT_CREATED, PI)  # what our call's answer uses
    assert ran.row.status is S.REQUIRES_PAYMENT and ran.row.payment_intent_id == PI
    assert run(ran.row, order_created()).calls == []  # the replayed order.created opens no second intent


def test_an_order_paid_with_wallet_credits_gets_no_intent() -> None:
    ran = run(None, order_created(payment_method="wallet"))
    assert ran.calls == [] and ran.decision == NOOP
