"""The user -> payments index and handle_wallet_balance_changed (tables.payment_index), without a broker.

The index is fed as the kernel feeds it: by the index updates the payment rows'
``follow`` (:func:`tables.payment_state.index_updates`) sends, from payments made
by the payment aggregate's own decisions.  ``wallet.balance_changed`` is built
with ``new_event``; each ``retry`` command a decision sends is read back as the
payment agent reads it and decided by the payment flow, so a command the
payment rows would not take fails here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import pytest

from streams.catalog import PAYMENT_COMMANDS, PAYMENT_SERVICE, USER_PAYMENT_INDEX
from streams.envelope import new_event
from tables import aggregate, summary_index
from tables.aggregate import DUPLICATE, NOOP, Decision, Outcome
from tables.payment_index import USER_PAYMENTS, handle_wallet_balance_changed, retryable_payments
from tables.payment_state import (
    Payment,
    PaymentStatus,
    index_updates,
    payment_flow,
)

USER = "usr-1"
NOW = 1_767_225_600_000
PAYMENTS = payment_flow()
S = PaymentStatus


def payment(order_id: str, status: PaymentStatus, failure_code: str | None = None,
            payment_method: str | None = "pm_1", updated_at_ms: int = NOW) -> Payment:
    return Payment(order_id=order_id, user_id=USER, amount=1000, currency="EUR", status=status,
                   created_at_ms=NOW, updated_at_ms=updated_at_ms, payment_intent_id=f"pi_{order_id}",
                   payment_method=payment_method, failure_code=failure_code)


def indexed(*payments: Payment) -> dict[str, Any]:
    """The index row after the kernel delivered each payment's index update."""
    row = None
    for p in payments:
        (send,) = index_updates(None, p)
        assert (send.topic, send.key) == (USER_PAYMENT_INDEX, USER)
        decision = decide(row, json.loads(json.dumps(send.value)))
        row = decision.row if decision.row is not None else row
    return row


def balance_changed(delta: int, **overrides: Any) -> dict[str, Any]:
    payload = {"user_id": USER, "wallet_id": "w-1", "balance_amount": 5000, "delta_amount": delta,
               "currency": "EUR", **overrides}
    return new_event("wallet.balance_changed", payload, producer="wallet_service", now_ms=NOW)


def decide(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int = NOW) -> Decision:
    topic = message.get("event_type") or USER_PAYMENT_INDEX
    step = USER_PAYMENTS.step(topic, message)
    before = json.dumps(row)
    decision = step.decide(row, message, now_ms)  # type: ignore[call-arg]
    assert json.dumps(row) == before, "a decision must not change the row it was given"
    for send in decision.send:
        assert send.topic in step.sends
    if decision.row is not None:
        assert USER_PAYMENTS.load(json.loads(json.dumps(USER_PAYMENTS.dump(decision.row)))) == decision.row
    return decision


def retried(decision: Decision) -> dict[str, dict[str, Any]]:
    """The retry commands sent, by order, as the payment agent reads them."""
    commands = {}
    for send in decision.send:
        assert send.topic == PAYMENT_COMMANDS
        message = aggregate.command_message(json.loads(json.dumps(send.value)), "order_id")
        assert send.key == message["order_id"]
        assert PAYMENTS.step(PAYMENT_COMMANDS, message).input == "retry"
        commands[send.key] = message
    return commands


UNFUNDED = payment("ord-unfunded", S.FAILED, "insufficient_funds")
DECLINED = payment("ord-declined", S.FAILED, "card_declined")
PAID = payment("ord-paid", S.SUCCEEDED)
OPEN = payment("ord-open", S.REQUIRES_PAYMENT)
NO_METHOD = payment("ord-no-method", S.FAILED, "insufficient_funds", payment_method=None)


# --------------------------------------------------------------------------


def test_the_flow_table_names_the_seed_handler() -> None:
    assert USER_PAYMENTS.name == "user-payments" and USER_PAYMENTS.key_field == "user_id"
    assert USER_PAYMENTS.producer == PAYMENT_SERVICE
    steps = {s.input: (s.handler, s.emits, s.sends) for s in USER_PAYMENTS.steps}
    assert steps == {
        USER_PAYMENT_INDEX: ("merge_index_update", (), ()),
        "wallet.balance_changed": ("handle_wallet_balance_changed", (), (PAYMENT_COMMANDS,)),
    }
    assert USER_PAYMENTS.step("wallet.balance_changed", {}).decide is handle_wallet_balance_changed


def test_the_index_keeps_each_payments_summary() -> None:
    row = indexed(UNFUNDED, DECLINED, PAID)
    assert set(row["orders"]) == {"ord-unfunded", "ord-declined", "ord-paid"}
    assert row["orders"]["ord-unfunded"]["retryable"] is True
    assert row["orders"]["ord-declined"]["retryable"] is False
    assert retryable_payments(row) == ["ord-unfunded"]


def test_a_balance_that_rose_retries_only_the_unfunded_payments() -> None:
    row = indexed(UNFUNDED, DECLINED, PAID, OPEN, NO_METHOD)
    event = balance_changed(500)
    decision = decide(row, event)
    commands = retried(decision)
    assert set(commands) == {"ord-unfunded"}
    command = commands["ord-unfunded"]
    assert command["command"] == "retry"
    assert command["command_id"] == aggregate.derived_id(event["event_id"], "retry", "ord-unfunded")
    (send,) = decision.send
    assert send.value["causation_id"] == event["event_id"]
    assert send.value["correlation_id"] == event["correlation_id"]
    assert decision.row["applied"] == [event["event_id"]]


def test_every_unfunded_payment_of_the_user_is_retried() -> None:
    other = payment("ord-unfunded-2", S.FAILED, "insufficient_funds")
    commands = retried(decide(indexed(UNFUNDED, other, PAID), balance_changed(1)))
    assert set(commands) == {"ord-unfunded", "ord-unfunded-2"}


def test_the_retry_reaches_the_payment_and_confirms_it() -> None:
    (command,) = retried(decide(indexed(UNFUNDED), balance_changed(500))).values()
    step = PAYMENTS.step(PAYMENT_COMMANDS, command)
    assert step.calls is not None
    (call,) = step.calls(UNFUNDED, command)
    outcome = Outcome(value={"id": UNFUNDED.payment_intent_id, "status": "succeeded"})
    decision = step.decide(UNFUNDED, command, NOW + 1, {call.idempotency_key: outcome})  # type: ignore[call-arg]
    assert decision.row.status is S.SUCCEEDED


@pytest.mark.parametrize("delta", [0, -500])
def test_a_balance_that_did_not_rise_retries_nothing_but_is_applied(delta: int) -> None:
    event = balance_changed(delta)
    decision = decide(indexed(UNFUNDED), event)
    assert decision.send == ()
    assert decision.row["applied"] == [event["event_id"]]
    assert decision.row["orders"] == indexed(UNFUNDED)["orders"]
    assert decide(decision.row, event) == DUPLICATE


def test_a_redelivered_balance_change_is_a_duplicate() -> None:
    event = balance_changed(500)
    row = decide(indexed(UNFUNDED), event).row
    assert decide(row, event) == DUPLICATE


def test_a_replayed_balance_change_sends_the_same_commands() -> None:
    row = indexed(UNFUNDED)
    event = balance_changed(500)
    first = retried(decide(row, event))
    again = retried(decide(row, event, NOW + 1000))
    assert {k: v["command_id"] for k, v in first.items()} == {k: v["command_id"] for k, v in again.items()}


def test_a_user_without_an_index_row_retries_nothing() -> None:
    event = balance_changed(500)
    decision = decide(None, event)
    assert decision.send == () and decision.row == {"orders": {}, "applied": [event["event_id"]]}


def test_a_payment_paid_since_is_not_retried() -> None:
    paid_since = payment("ord-unfunded", S.SUCCEEDED, updated_at_ms=NOW + 10)
    (send,) = index_updates(UNFUNDED, paid_since)
    row = decide(indexed(UNFUNDED), json.loads(json.dumps(send.value))).row
    assert retried(decide(row, balance_changed(500))) == {}


def test_an_older_summary_arriving_late_is_ignored() -> None:
    paid_since = payment("ord-unfunded", S.SUCCEEDED, updated_at_ms=NOW + 10)
    (newer,) = index_updates(UNFUNDED, paid_since)
    row = decide(indexed(UNFUNDED), json.loads(json.dumps(newer.value))).row
    (older,) = index_updates(None, UNFUNDED)
    assert decide(row, json.loads(json.dumps(older.value))) == NOOP


def test_the_balance_event_ids_a_row_remembers_are_bounded() -> None:
    row = indexed(PAID)
    for _ in range(summary_index.MAX_APPLIED + 2):
        row = decide(row, balance_changed(1, transaction_id=str(uuid.uuid4()))).row
    assert len(row["applied"]) == summary_index.MAX_APPLIED
    assert set(row["orders"]) == {"ord-paid"}
