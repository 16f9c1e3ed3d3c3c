"""The user -> subscriptions index's decisions (tables.subscription_index), without a broker or Stripe.

Commands are read as the kernel reads them (JSON on the topic, then
:func:`tables.aggregate.command_message`), events are built with
``new_event``; Stripe's answers are :class:`Outcome` values per operation.
The subscription rows' own ``index`` commands come from
:func:`tables.subscription_state.index_updates`, so the two modules are held
to one summary shape.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import pytest

from streams.catalog import SUBSCRIPTION_COMMANDS, USER_SUBSCRIPTION_INDEX
from streams.envelope import new_event
from tables import aggregate, subscription_state
from tables.aggregate import DUPLICATE, NOOP, Call, Conflict, Decision, IdempotencyKeyReused, Outcome
from tables.payment_state import STRIPE
from tables.subscription_index import (
    USER_SUBSCRIPTIONS,
    subscriptions_of,
    upgrade_target,
)

USER = "usr_42b1e0c9"
CUS = "cus_Pq3kLkdIwHu7ix"
T0 = 1_764_230_000_000
FLOW = USER_SUBSCRIPTIONS


def received(record: Mapping[str, Any]) -> dict[str, Any]:
    return aggregate.command_message(json.loads(json.dumps(record)), "user_id")


def api_command(verb: str, command_id: str = "req-1", idempotency_key: str | None = None,
                **args: Any) -> dict[str, Any]:
    if idempotency_key is not None:
        args = {**args, "idempotency_key": idempotency_key,
                "fingerprint": aggregate.fingerprint("create", args)}
    return received(aggregate.command(verb, "user_id", USER, cause=None, now_ms=T0,
                                      command_id=f"{command_id}/{verb}", origin="api", **args))


def sub_view(sub_id: str = "sub_1", status: str = "active", plan: str = "plan_basic") -> dict[str, Any]:
    return {"subscription_id": sub_id, "customer_id": CUS, "user_id": USER, "status": status,
            "plan_id": plan, "quantity": 1, "amount": 3000, "currency": "EUR",
            "current_period_start": T0, "current_period_end": T0 + 30 * 86_400_000,
            "cancel_at_period_end": False, "cancel_at": None, "canceled_at": None,
            "ended_at": None, "latest_invoice_id": "in_1", "metadata": {"user_id": USER}}


def index_command(sub_id: str, status: str = "active", created_at: int = T0,
                  **changes: Any) -> dict[str, Any]:
    """The ``index`` command a subscription row sends (subscription_state.index_updates)."""
    row = subscription_state.Subscription.from_dict({
        **sub_view(sub_id, status), "created_at_ms": created_at, "updated_at_ms": created_at,
        "revision": 1, **changes})
    (send,) = subscription_state.index_updates(None, row)
    assert send.topic == USER_SUBSCRIPTION_INDEX and send.key == USER
    return received(send.value)


def event(topic: str, **payload: Any) -> dict[str, Any]:
    return new_event(topic, {"user_id": USER, **payload}, producer="account_service", now_ms=T0)


def run(row: dict[str, Any] | None, message: Mapping[str, Any],
        **answers: Outcome) -> tuple[Decision, list[Call]]:
    topic = USER_SUBSCRIPTION_INDEX if "command" in message else message["event_type"]
    step = FLOW.step(topic, message)
    before = copy.deepcopy(row)
    calls: list[Call] = []
    if step.calls is not None:
        calls = list(step.calls(row, message))
        outcomes = {}
        for call in calls:
            assert call.service == STRIPE
            outcomes[call.idempotency_key] = answers[call.operation]
        decision = step.decide(row, message, T0, outcomes)  # type: ignore[call-arg]
    else:
        decision = step.decide(row, message, T0)  # type: ignore[call-arg]
    assert row == before, "a decision must not change the row it was given"
    for send in decision.send:
        assert send.topic in step.sends
        json.dumps(send.value)
    if decision.row is not None:
        assert json.loads(json.dumps(decision.row)) == decision.row
    return decision, calls


def indexed(*subs: tuple[str, str, int]) -> dict[str, Any] | None:
    row = None
    for sub_id, status, created_at in subs:
        decision, _ = run(row, index_command(sub_id, status, created_at))
        row = decision.row
    return row


# --------------------------------------------------------------------------


def test_the_flow_table_names_the_seed_handlers() -> None:
    handlers = {s.input: s.handler for s in FLOW.steps}
    assert handlers["user.deleted"] == "handle_user_deleted"
    assert handlers["user.upgraded"] == "handle_user_upgraded"
    assert handlers["wallet.insufficient_funds"] == "handle_wallet_insufficient_funds"
    assert handlers["create_subscription"] == "create_subscription"
    assert FLOW.key_field == "user_id" and FLOW.command_topic == USER_SUBSCRIPTION_INDEX
    assert FLOW.topics == ("user.deleted", "user.upgraded", "wallet.insufficient_funds",
                           USER_SUBSCRIPTION_INDEX)


def test_index_keeps_the_newest_summary() -> None:
    row = indexed(("sub_1", "active", T0))
    newer = index_command("sub_1", "past_due", revision=5)
    decision, _ = run(row, newer)
    assert decision.row["subscriptions"]["sub_1"]["status"] == "past_due"
    older = index_command("sub_1", "active", revision=3)
    assert run(decision.row, older)[0] == NOOP
    with pytest.raises(aggregate.Invalid):
        run(row, received(aggregate.command("index", "user_id", USER, cause=None, now_ms=T0,
                                            command_id="x", subscription={"no": "id"}, version=1)))


def test_ensure_customer_makes_one_customer_per_user() -> None:
    decision, calls = run(None, api_command("ensure_customer"),
                          create_customer=Outcome(value={"customer_id": CUS}))
    (call,) = calls
    assert call.args == {"user_id": USER}
    assert call.idempotency_key == aggregate.derived_id("create_customer", USER)
    assert decision.row["customer_id"] == CUS and decision.reply["customer_id"] == CUS
    again, calls = run(decision.row, api_command("ensure_customer", "req-2"))
    assert calls == [] and again.reply == {"user_id": USER, "customer_id": CUS}
    assert again.row is None and not again.send


def test_attach_needs_the_customer_and_runs_once() -> None:
    with pytest.raises(Conflict):
        run(None, api_command("attach_payment_method", payment_method="pm_card_visa"))
    row = customer_row()
    decision, calls = run(row, api_command("attach_payment_method", payment_method="pm_card_visa"),
                          attach_payment_method=Outcome(value={"customer_id": CUS,
                                                               "payment_method": "pm_1"}))
    (call,) = calls
    assert call.args == {"customer_id": CUS, "payment_method": "pm_card_visa"}
    again, calls = run(decision.row, api_command("attach_payment_method", payment_method="pm_card_visa"))
    assert calls == [] and again.duplicate
    with pytest.raises(Conflict, match="card_declined"):
        run(row, api_command("attach_payment_method", "req-9", payment_method="pm_bad"),
            attach_payment_method=Outcome(refused="card_declined", code="card_declined"))


def customer_row() -> dict[str, Any]:
    made = Outcome(value={"customer_id": CUS})
    return run(None, api_command("ensure_customer"), create_customer=made)[0].row


def test_create_subscription_opens_the_subscription_and_answers_a_retry_with_it() -> None:
    command = api_command("create_subscription", idempotency_key="k1", plan_id="plan_basic", quantity=2)
    decision, calls = run(customer_row(), command, create_subscription=Outcome(value=sub_view()))
    (call,) = calls
    assert call.args == {"customer_id": CUS, "plan_id": "plan_basic", "quantity": 2,
                         "metadata": {"user_id": USER}}
    assert call.idempotency_key == aggregate.derived_id("create_subscription", command["command_id"])
    assert decision.reply["subscription_id"] == "sub_1"
    (opening,) = decision.send
    assert opening.topic == SUBSCRIPTION_COMMANDS and opening.key == "sub_1"
    assert opening.value["command"] == "open" and opening.value["args"]["subscription"] == sub_view()
    row = decision.row
    assert [s["subscription_id"] for s in subscriptions_of(row)] == ["sub_1"]
    again, calls = run(row, command)
    assert calls == [] and again.duplicate and again.reply == sub_view()
    # the same key, other parameters: 422, nothing made
    other = api_command("create_subscription", "req-2", idempotency_key="k1", plan_id="plan_pro")
    with pytest.raises(IdempotencyKeyReused):
        run(row, other)
    # the row's own summary replaces the placeholder
    merged = run(row, index_command("sub_1", "active"))[0].row
    assert merged["subscriptions"]["sub_1"]["version"] == 1


def test_create_subscription_refusals() -> None:
    with pytest.raises(Conflict, match="no Stripe customer"):
        run(None, api_command("create_subscription", plan_id="plan_basic"))
    with pytest.raises(Conflict, match="No such plan"):
        run(customer_row(), api_command("create_subscription", plan_id="plan_x"),
            create_subscription=Outcome(refused="No such plan", code="resource_missing"))
    with pytest.raises(aggregate.Invalid):
        run(customer_row(), api_command("create_subscription", plan_id="plan_basic", quantity=0))


def test_user_deleted_fans_out_to_every_subscription_once() -> None:
    row = indexed(("sub_a", "active", T0), ("sub_b", "trialing", T0 + 1), ("sub_old", "canceled", T0 - 9))
    deleted = event("user.deleted", deleted_at=T0 + 5, reason="gdpr")
    decision, _ = run(row, deleted)
    targets = [s.key for s in decision.send]
    assert sorted(targets) == ["sub_a", "sub_b", "sub_old"]
    for send in decision.send:
        assert send.value["command"] == "cancel_for_user_deleted"
        assert send.value["args"]["deleted_at"] == T0 + 5
        assert send.value["command_id"] == aggregate.derived_id(deleted["event_id"],
                                                                "cancel_for_user_deleted", send.key)
    assert run(decision.row, deleted)[0] == DUPLICATE


def test_user_upgraded_moves_the_newest_running_subscription() -> None:
    row = indexed(("sub_a", "active", T0), ("sub_b", "active", T0 + 1), ("sub_c", "canceled", T0 + 2))
    assert upgrade_target(row) == "sub_b"
    decision, _ = run(row, event("user.upgraded", old_tier="basic", new_tier="pro", plan_id="plan_pro"))
    (send,) = decision.send
    assert send.key == "sub_b" and send.value["command"] == "change_plan"
    assert send.value["args"]["plan_id"] == "plan_pro"
    without_plan, _ = run(row, event("user.upgraded", new_tier="pro"))
    assert without_plan.send == () and without_plan.row is not None
    assert run(None, event("user.upgraded", new_tier="pro", plan_id="p"))[0].send == ()


def test_wallet_insufficient_funds_marks_the_named_or_every_active_subscription() -> None:
    row = indexed(("sub_a", "active", T0), ("sub_b", "paused", T0 + 1), ("sub_c", "trialing", T0 + 2))
    common = {"wallet_id": "w1", "required_amount": 3000, "available_amount": 10, "currency": "EUR"}
    decision, _ = run(row, event("wallet.insufficient_funds", **common))
    assert sorted(s.key for s in decision.send) == ["sub_a", "sub_c"]
    assert all(s.value["command"] == "mark_past_due" for s in decision.send)
    assert decision.send[0].value["args"]["occurred_at_ms"] == T0
    named, _ = run(row, event("wallet.insufficient_funds", subscription_id="sub_b", **common))
    assert [s.key for s in named.send] == ["sub_b"]
    about_an_order, _ = run(row, event("wallet.insufficient_funds", order_id="ord-1", **common))
    assert about_an_order.send == () and about_an_order.row is not None
