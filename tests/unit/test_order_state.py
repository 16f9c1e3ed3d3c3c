"""The order aggregate's decisions (tables.order_state), without a broker.

Every input event is built with ``new_event`` so it satisfies its contract, and
every decision goes through :func:`run`, which pushes each emission through
``new_event`` as well: a payload that drifts from its ``.avsc`` fails here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from schemas.contracts import payload_fields
from streams.catalog import ORDER_COMMANDS
from streams.envelope import new_event
from tables.aggregate import Invalid
from tables.order_state import (
    CANCEL_REASONS,
    EMITTED_TOPICS,
    MAX_APPLIED_IDS,
    OPEN_STATUSES,
    ORDER_TYPES,
    PATCHABLE_FIELDS,
    TRANSITIONS,
    Decision,
    IdempotencyKeyReused,
    IllegalTransition,
    InvalidCommand,
    Order,
    OrderNotFound,
    OrderStatus,
    awaiting_fulfilment,
    cancel,
    deadline_of,
    expire,
    fulfill,
    is_open,
    on_order_created,
    on_payment_completed,
    on_payment_failed,
    on_payment_intent_created,
    on_payment_refunded,
    order_flow,
    order_summary,
    order_view,
    update,
)
from tables.order_state import (
    create as create_order,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, when the order was placed
WINDOW_MS = 30 * 60 * 1000
DEADLINE = T0 + WINDOW_MS
LATER = T0 + 60_000  # processing time of the events after creation
ORDER_ID = "ord_1"
USER_ID = "usr_1"
TOTAL = 2500
ITEMS: list[dict[str, Any]] = [
    {"product_id": "credits-10", "quantity": 2, "unit_amount": 1000},
    {"product_id": "fee", "quantity": 1, "unit_amount": 500, "description": "service fee"},
]

S = OrderStatus

# --------------------------------------------------------------------------
# Inputs, all valid against their contracts.


def created_event(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "order_id": ORDER_ID,
        "user_id": USER_ID,
        "order_type": "WALLET_TOPUP",
        "total_amount": TOTAL,
        "currency": "EUR",
        "items": [dict(item) for item in ITEMS],
    }
    payload.update(overrides)
    return new_event("order.created", payload, producer="order_service", now_ms=T0)


def intent_event(intent: str = "pi_1", **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "payment_intent_id": intent,
        "order_id": ORDER_ID,
        "user_id": USER_ID,
        "amount": TOTAL,
        "currency": "EUR",
    }
    payload.update(overrides)
    return new_event("payment.intent.created", payload, producer="payment_service", now_ms=LATER)


def completed_event(intent: str = "pi_1", **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "payment_intent_id": intent,
        "order_id": ORDER_ID,
        "user_id": USER_ID,
        "amount": TOTAL,
        "currency": "EUR",
    }
    payload.update(overrides)
    return new_event("payment.completed", payload, producer="payment_service", now_ms=LATER)


def failed_event(intent: str = "pi_1", **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "payment_intent_id": intent,
        "order_id": ORDER_ID,
        "user_id": USER_ID,
        "amount": TOTAL,
        "currency": "EUR",
        "error_code": "card_declined",
        "error_message": "Your card was declined.",
    }
    payload.update(overrides)
    return new_event("payment.failed", payload, producer="payment_service", now_ms=LATER)


def refunded_event(
    amount: int, refund_id: str | None = None, payment_id: str = "pi_1", **overrides: Any
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "payment_id": payment_id,
        "refund_id": refund_id or f"re_{uuid.uuid4().hex[:10]}",
        "order_id": ORDER_ID,
        "user_id": USER_ID,
        "amount": amount,
        "currency": "EUR",
        "reason": "REQUESTED_BY_CUSTOMER",
    }
    payload.update(overrides)
    return new_event("payment.refunded", payload, producer="payment_service", now_ms=LATER)


def command(name: str, **args: Any) -> dict[str, Any]:
    if name == "expire":
        args.setdefault("deadline_ms", DEADLINE)
    return {"command_id": str(uuid.uuid4()), "command": name, "order_id": ORDER_ID, **args}


FLOW = order_flow(WINDOW_MS)


def apply_command(order: Order | None, message: Mapping[str, Any], now_ms: int) -> Decision:
    """Decide ``message`` by the flow table's step for its verb, as the kernel does."""
    return FLOW.step(ORDER_COMMANDS, message).decide(order, message, now_ms)


# --------------------------------------------------------------------------
# Running decisions with the invariants every decision must keep.


def check_emissions(decision: Decision, cause: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each emission has exactly its topic's payload fields and passes new_event."""
    produced = []
    for emission in decision.emit:
        assert emission.topic in EMITTED_TOPICS
        assert set(emission.payload) == set(payload_fields(emission.topic)), emission.topic
        event = new_event(
            emission.topic,
            emission.payload,
            producer="order_service",
            cause=cause if "event_id" in cause else None,
            now_ms=LATER,
        )
        assert event["order_id"] == ORDER_ID
        produced.append(event)
    keys = [(e.topic, e.discriminator) for e in decision.emit]
    assert len(keys) == len(set(keys)), "two emissions of one topic need distinct discriminators"
    return produced


def run(
    decide: Callable[..., Decision],
    order: Order | None,
    message: Mapping[str, Any],
    now_ms: int = LATER,
    *extra: Any,
    **kwargs: Any,
) -> Decision:
    """Decide, then check: input row untouched, emissions valid, applied id recorded."""
    before = None if order is None else order.to_dict()
    decision = decide(order, message, now_ms, *extra, **kwargs)
    if order is not None:
        assert order.to_dict() == before, "a decision must not mutate the row it was given"
    check_emissions(decision, message)
    message_id = message.get("event_id") or message.get("command_id")
    if decision.row is not None:
        assert decision.row.applied_event_ids[-1] == message_id
        assert decision.row.updated_at_ms == now_ms
        assert not decision.duplicate
    else:
        assert decision.emit == ()
    if decision.duplicate:
        assert decision == Decision(duplicate=True)
    return decision


def create(**overrides: Any) -> Order:
    decision = run(on_order_created, None, created_event(**overrides), T0, WINDOW_MS)
    assert decision.row is not None
    return decision.row


def step(decide: Callable[..., Decision], order: Order, message: Mapping[str, Any],
         now_ms: int = LATER) -> Order:
    decision = run(decide, order, message, now_ms)
    assert decision.row is not None, f"{decide.__name__} changed nothing"
    return decision.row


def order_in(status: OrderStatus) -> Order:
    """An order brought to ``status`` through legal decisions only."""
    order = create()
    if status is S.PENDING:
        return order
    order = step(on_payment_intent_created, order, intent_event())
    if status is S.PAYMENT_PENDING:
        return order
    if status is S.CANCELED:
        return step(cancel, order, command("cancel"))
    if status is S.EXPIRED:
        return step(expire, order, command("expire"), DEADLINE)
    order = step(on_payment_completed, order, completed_event())
    if status is S.COMPLETED:
        return order
    if status is S.FULFILLED:
        return step(fulfill, order, command("fulfill", fulfillment_details={"wallet_id": "w1"}))
    if status is S.PARTIALLY_REFUNDED:
        return step(on_payment_refunded, order, refunded_event(1000))
    if status is S.REFUNDED:
        return step(on_payment_refunded, order, refunded_event(TOTAL))
    raise AssertionError(status)


# --------------------------------------------------------------------------
# The transition table


def test_transition_table_is_the_specified_one() -> None:
    assert dict(TRANSITIONS) == {
        S.PENDING: {S.PAYMENT_PENDING, S.COMPLETED, S.CANCELED, S.EXPIRED},
        S.PAYMENT_PENDING: {S.COMPLETED, S.CANCELED, S.EXPIRED},
        S.COMPLETED: {S.FULFILLED, S.PARTIALLY_REFUNDED, S.REFUNDED},
        S.FULFILLED: {S.PARTIALLY_REFUNDED, S.REFUNDED},
        S.PARTIALLY_REFUNDED: {S.PARTIALLY_REFUNDED, S.REFUNDED},
        S.CANCELED: set(),
        S.EXPIRED: set(),
        S.REFUNDED: set(),
    }


@pytest.mark.parametrize("status", list(OrderStatus))
def test_order_in_reaches_each_status(status: OrderStatus) -> None:
    assert order_in(status).status is status


def _probe_intent(order: Order) -> Decision:
    return run(on_payment_intent_created, order, intent_event("pi_new"))


def _probe_complete(order: Order) -> Decision:
    # A genuine attempt: the order's own intent while open, another payment once closed.
    intent = (order.payment_intent_id or "pi_1") if is_open(order) else "pi_other"
    return run(on_payment_completed, order, completed_event(intent))


def _probe_fail(order: Order) -> Decision:
    intent = (order.payment_intent_id or "pi_1") if is_open(order) else "pi_other"
    return run(on_payment_failed, order, failed_event(intent))


def _probe_cancel(order: Order) -> Decision:
    return run(cancel, order, command("cancel", reason="USER_REQUESTED"))


def _probe_fulfill(order: Order) -> Decision:
    return run(fulfill, order, command("fulfill", fulfillment_details={"wallet_id": "w1"}))


def _probe_refund_part(order: Order) -> Decision:
    return run(on_payment_refunded, order, refunded_event(1, payment_id=order.payment_id or "pi_1"))


def _probe_refund_full(order: Order) -> Decision:
    rest = max(order.total_amount - order.refunded_amount, 1)
    return run(on_payment_refunded, order, refunded_event(rest, payment_id=order.payment_id or "pi_1"))


def _probe_expire(order: Order) -> Decision:
    return run(expire, order, command("expire"), DEADLINE + 1)


ACTIONS: dict[str, tuple[Callable[[Order], Decision], OrderStatus, str]] = {
    "intent": (_probe_intent, S.PAYMENT_PENDING, "order.payment_pending"),
    "complete": (_probe_complete, S.COMPLETED, "order.completed"),
    "fail": (_probe_fail, S.CANCELED, "order.canceled"),
    "cancel": (_probe_cancel, S.CANCELED, "order.canceled"),
    "fulfill": (_probe_fulfill, S.FULFILLED, "order.fulfilled"),
    "refund_part": (_probe_refund_part, S.PARTIALLY_REFUNDED, "order.refunded"),
    "refund_full": (_probe_refund_full, S.REFUNDED, "order.refunded"),
    "expire": (_probe_expire, S.EXPIRED, "order.expired"),
}


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("status", list(OrderStatus))
def test_status_action_matrix_follows_the_table(status: OrderStatus, action: str) -> None:
    probe, target, topic = ACTIONS[action]
    order = order_in(status)
    if target in TRANSITIONS[status]:
        decision = probe(order)
        assert decision.row is not None
        assert decision.row.status is target
        assert [e.topic for e in decision.emit] == [topic]
    elif action == "expire":
        # A timer racing a payment or cancellation is not an error: nothing happens.
        decision = probe(order)
        assert decision.row is None and decision.emit == ()
    else:
        with pytest.raises(IllegalTransition) as caught:
            probe(order)
        assert caught.value.order_id == ORDER_ID
        assert caught.value.current is status


@pytest.mark.parametrize("status", list(OrderStatus))
def test_update_is_allowed_exactly_while_open(status: OrderStatus) -> None:
    order = order_in(status)
    patch = command("update", changes={"metadata": {"note": "gift"}})
    if status in OPEN_STATUSES:
        decision = run(update, order, patch)
        assert decision.row is not None and decision.row.status is status
    else:
        with pytest.raises(IllegalTransition, match="only before it is paid"):
            run(update, order, patch)


def test_illegal_transition_names_order_state_and_action() -> None:
    order = order_in(S.CANCELED)
    with pytest.raises(IllegalTransition) as caught:
        run(fulfill, order, command("fulfill"))
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.order_id, error.current, error.action, error.target) == (
        ORDER_ID, S.CANCELED, "fulfill", S.FULFILLED,
    )
    assert str(error) == "order 'ord_1' is CANCELED: cannot fulfill (to FULFILLED)"


# --------------------------------------------------------------------------
# order.created


def test_created_order_is_pending_with_a_deadline_from_the_event_time() -> None:
    event = created_event()
    decision = run(on_order_created, None, event, LATER, WINDOW_MS)
    order = decision.row
    assert order is not None
    assert order.status is S.PENDING
    assert (order.order_id, order.user_id, order.order_type) == (ORDER_ID, USER_ID, "WALLET_TOPUP")
    assert (order.total_amount, order.currency) == (TOTAL, "EUR")
    assert order.items == [
        {"product_id": "credits-10", "quantity": 2, "unit_amount": 1000, "description": None},
        {"product_id": "fee", "quantity": 1, "unit_amount": 500, "description": "service fee"},
    ]
    assert order.created_at_ms == T0 and order.updated_at_ms == LATER
    assert order.payment_deadline_ms == DEADLINE
    assert deadline_of(order) == DEADLINE
    assert decision.emit == ()
    assert order.applied_event_ids == [event["event_id"]]


def test_order_types_come_from_the_contract_without_the_reader_fallback() -> None:
    assert ORDER_TYPES == {"ONE_TIME", "SUBSCRIPTION", "WALLET_TOPUP", "STORAGE_UPGRADE"}
    with pytest.raises(InvalidCommand, match="order_type"):
        run(on_order_created, None, created_event(order_type="UNKNOWN"), T0, WINDOW_MS)


def test_created_keeps_the_subscription_it_was_created_for() -> None:
    decision = run(
        on_order_created, None, created_event(order_type="SUBSCRIPTION"), T0, WINDOW_MS,
        subscription_id="sub_1",
    )
    assert decision.row is not None
    assert order_summary(decision.row)["subscription_id"] == "sub_1"


def test_same_order_id_under_another_event_is_a_duplicate_order_id() -> None:
    order = create()
    with pytest.raises(IllegalTransition, match="already taken"):
        run(on_order_created, order, created_event(), T0, WINDOW_MS)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"total_amount": TOTAL + 1}, "total_amount"),
        ({"items": []}, "items"),
        ({"items": [{"product_id": "x", "quantity": 0, "unit_amount": 5}], "total_amount": 0},
         "items"),
        ({"items": [{"product_id": "x", "quantity": 1, "unit_amount": -5}], "total_amount": -5},
         "items"),
        ({"currency": "eur"}, "currency"),
    ],
)
def test_malformed_order_created_is_invalid(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        run(on_order_created, None, created_event(**overrides), T0, WINDOW_MS)
    assert caught.value.field == field


# --------------------------------------------------------------------------
# Duplicates


DUPLICABLE: dict[str, tuple[OrderStatus, Callable[..., Decision], Callable[[], dict[str, Any]]]] = {
    "intent": (S.PENDING, on_payment_intent_created, intent_event),
    "completed": (S.PAYMENT_PENDING, on_payment_completed, completed_event),
    "failed": (S.PAYMENT_PENDING, on_payment_failed, failed_event),
    "refunded": (S.COMPLETED, on_payment_refunded, lambda: refunded_event(700)),
    "cancel": (S.PENDING, cancel, lambda: command("cancel")),
    "fulfill": (S.COMPLETED, fulfill, lambda: command("fulfill")),
    "update": (S.PENDING, update, lambda: command("update", changes={"metadata": {"a": "b"}})),
    "expire": (S.PENDING, expire, lambda: command("expire")),
}


@pytest.mark.parametrize("name", list(DUPLICABLE))
def test_an_applied_id_changes_nothing_and_emits_nothing(name: str) -> None:
    status, decide, make = DUPLICABLE[name]
    message = make()
    first = run(decide, order_in(status), message, DEADLINE)
    assert first.row is not None and first.emit
    again = run(decide, first.row, message, DEADLINE + 5)
    assert again == Decision(duplicate=True)


def test_redelivered_order_created_is_a_duplicate() -> None:
    event = created_event()
    order = run(on_order_created, None, event, T0, WINDOW_MS).row
    assert run(on_order_created, order, event, T0, WINDOW_MS) == Decision(duplicate=True)


# --------------------------------------------------------------------------
# Payments


def test_intent_moves_to_payment_pending_and_announces_the_order_amount() -> None:
    decision = run(on_payment_intent_created, create(), intent_event("pi_9", amount=999))
    assert decision.row is not None
    assert decision.row.status is S.PAYMENT_PENDING
    assert decision.row.payment_intent_id == "pi_9"
    (emission,) = decision.emit
    assert emission.payload == {
        "order_id": ORDER_ID, "user_id": USER_ID, "payment_intent_id": "pi_9",
        "amount": TOTAL, "currency": "EUR",
    }
    assert deadline_of(decision.row) == DEADLINE  # still unpaid: the deadline stays


@pytest.mark.parametrize("status", [S.PAYMENT_PENDING, S.COMPLETED, S.CANCELED])
def test_the_same_intent_reported_again_is_a_noop(status: OrderStatus) -> None:
    assert run(on_payment_intent_created, order_in(status), intent_event("pi_1")) == Decision()


def test_payment_completes_the_order_and_cancels_its_timer() -> None:
    decision = run(on_payment_completed, order_in(S.PAYMENT_PENDING), completed_event())
    order = decision.row
    assert order is not None
    assert order.status is S.COMPLETED and order.payment_id == "pi_1"
    assert order.completed_at_ms == LATER
    assert deadline_of(order) is None
    (emission,) = decision.emit
    assert emission.topic == "order.completed"
    assert emission.payload == {
        "order_id": ORDER_ID, "user_id": USER_ID, "order_type": "WALLET_TOPUP",
        "total_amount": TOTAL, "currency": "EUR", "payment_id": "pi_1",
    }


def test_payment_may_complete_a_pending_order_before_its_intent_is_seen() -> None:
    decision = run(on_payment_completed, create(), completed_event("pi_7"))
    assert decision.row is not None
    assert decision.row.payment_intent_id == decision.row.payment_id == "pi_7"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"amount": TOTAL - 1}, "paid 2499 EUR, the order totals 2500 EUR"),
        ({"currency": "USD"}, "paid 2500 USD"),
        ({"intent": "pi_2"}, "not the order's PaymentIntent pi_1"),
    ],
)
def test_payment_that_does_not_fit_the_order_is_refused(
    overrides: dict[str, Any], match: str
) -> None:
    order = order_in(S.PAYMENT_PENDING)
    with pytest.raises(IllegalTransition, match=match):
        run(on_payment_completed, order, completed_event(**overrides))


def test_second_payment_of_a_paid_order_is_refused_for_refund() -> None:
    with pytest.raises(IllegalTransition, match="second payment and must be refunded"):
        run(on_payment_completed, order_in(S.COMPLETED), completed_event("pi_2"))


def test_payment_of_an_expired_order_is_refused_for_refund() -> None:
    with pytest.raises(IllegalTransition, match="must be refunded"):
        run(on_payment_completed, order_in(S.EXPIRED), completed_event("pi_1"))


@pytest.mark.parametrize("status", [S.COMPLETED, S.FULFILLED, S.REFUNDED])
def test_the_same_payment_reported_again_is_a_noop(status: OrderStatus) -> None:
    assert run(on_payment_completed, order_in(status), completed_event("pi_1")) == Decision()


def test_failed_payment_cancels_with_the_stripe_error_kept() -> None:
    decision = run(on_payment_failed, order_in(S.PAYMENT_PENDING), failed_event())
    order = decision.row
    assert order is not None
    assert order.status is S.CANCELED
    assert order.cancel_reason == "PAYMENT_FAILED"
    assert order.cancel_detail == "card_declined: Your card was declined."
    assert deadline_of(order) is None
    (emission,) = decision.emit
    assert emission.payload == {
        "order_id": ORDER_ID, "user_id": USER_ID, "reason": "PAYMENT_FAILED",
        "refund_amount": 0, "currency": "EUR",
    }


def test_stale_failure_of_the_intent_that_paid_is_a_noop() -> None:
    assert run(on_payment_failed, order_in(S.COMPLETED), failed_event("pi_1")) == Decision()


def test_failure_of_another_intent_is_refused() -> None:
    with pytest.raises(IllegalTransition, match="pi_2 is not the order's pi_1"):
        run(on_payment_failed, order_in(S.PAYMENT_PENDING), failed_event("pi_2"))


# --------------------------------------------------------------------------
# Refunds


def test_partial_refunds_add_up_to_refunded() -> None:
    order = order_in(S.FULFILLED)
    amounts = [1000, 700, 800]
    for index, amount in enumerate(amounts):
        decision = run(on_payment_refunded, order, refunded_event(amount, f"re_{index}"))
        assert decision.row is not None
        order = decision.row
        (emission,) = decision.emit
        assert emission.payload == {
            "order_id": ORDER_ID, "user_id": USER_ID, "refund_id": f"re_{index}",
            "payment_id": "pi_1", "amount": amount, "currency": "EUR",
        }
        assert order.refunded_amount == sum(amounts[: index + 1])
        last = index == len(amounts) - 1
        assert order.status is (S.REFUNDED if last else S.PARTIALLY_REFUNDED)
    assert order.refund_ids == ["re_0", "re_1", "re_2"]
    assert order.closed_at_ms == LATER


def test_refund_beyond_what_remains_is_illegal_and_changes_nothing() -> None:
    order = order_in(S.PARTIALLY_REFUNDED)  # 1000 of 2500 refunded
    before = order.to_dict()
    with pytest.raises(IllegalTransition, match="1501 exceeds the 1500 that remains"):
        run(on_payment_refunded, order, refunded_event(1501))
    assert order.to_dict() == before


def test_the_same_refund_under_another_event_id_counts_once() -> None:
    order = step(on_payment_refunded, order_in(S.COMPLETED), refunded_event(500, "re_a"))
    assert run(on_payment_refunded, order, refunded_event(500, "re_a")) == Decision()
    assert order.refunded_amount == 500


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"payment_id": "pi_other"}, "is of payment pi_other"),
        ({"currency": "USD"}, "is in USD, the order in EUR"),
    ],
)
def test_refund_that_does_not_fit_the_order_is_refused(
    overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(IllegalTransition, match=match):
        run(on_payment_refunded, order_in(S.COMPLETED), refunded_event(100, **overrides))


def test_refund_of_zero_is_invalid() -> None:
    with pytest.raises(InvalidCommand, match="amount"):
        run(on_payment_refunded, order_in(S.COMPLETED), refunded_event(0))


# --------------------------------------------------------------------------
# Commands


def test_cancel_defaults_to_user_requested() -> None:
    decision = run(cancel, order_in(S.PAYMENT_PENDING), command("cancel", detail="changed mind"))
    order = decision.row
    assert order is not None
    assert (order.status, order.cancel_reason, order.cancel_detail) == (
        S.CANCELED, "USER_REQUESTED", "changed mind",
    )
    assert deadline_of(order) is None
    assert decision.emit[0].payload["reason"] == "USER_REQUESTED"


@pytest.mark.parametrize("reason", sorted(CANCEL_REASONS))
def test_cancel_accepts_every_contract_reason(reason: str) -> None:
    decision = run(cancel, create(), command("cancel", reason=reason))
    assert decision.emit[0].payload["reason"] == reason


def test_cancel_if_open_loses_the_race_with_payment_quietly() -> None:
    order = order_in(S.COMPLETED)
    assert run(cancel, order, command("cancel", reason="USER_DELETED", if_open=True)) == Decision()
    with pytest.raises(IllegalTransition, match="only an unpaid order can be canceled"):
        run(cancel, order, command("cancel", reason="USER_DELETED"))


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"reason": "BORED"}, "reason"),
        ({"reson": "USER_REQUESTED"}, "reson"),
        ({"if_open": "yes"}, "if_open"),
        ({"detail": 5}, "detail"),
    ],
)
def test_malformed_cancel_is_invalid(args: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidCommand) as caught:
        run(cancel, create(), command("cancel", **args))
    assert caught.value.field == field


def test_fulfill_records_and_announces_the_details() -> None:
    details = {"wallet_id": "w1", "credited_amount": "2000"}
    decision = run(fulfill, order_in(S.COMPLETED), command("fulfill", fulfillment_details=details))
    order = decision.row
    assert order is not None
    assert order.status is S.FULFILLED and order.fulfillment_details == details
    assert order.fulfilled_at_ms == LATER
    assert awaiting_fulfilment(order_in(S.COMPLETED)) and not awaiting_fulfilment(order)
    assert decision.emit[0].payload == {
        "order_id": ORDER_ID, "user_id": USER_ID, "order_type": "WALLET_TOPUP",
        "fulfillment_details": details,
    }


def test_fulfill_details_must_be_strings() -> None:
    with pytest.raises(InvalidCommand, match="strings to strings"):
        run(fulfill, order_in(S.COMPLETED), command("fulfill", fulfillment_details={"n": 1}))


def test_update_items_recomputes_the_total_and_reports_it_with_its_currency() -> None:
    items = [{"product_id": "credits-50", "quantity": 1, "unit_amount": 5000}]
    decision = run(update, order_in(S.PAYMENT_PENDING), command("update", changes={"items": items}))
    order = decision.row
    assert order is not None
    assert order.total_amount == 5000 and order.currency == "EUR"
    assert order.items == [{**items[0], "description": None}]
    assert order.status is S.PAYMENT_PENDING
    (emission,) = decision.emit
    assert emission.payload["updated_fields"] == ["items", "total_amount", "currency"]
    changes = {k: json.loads(v) for k, v in emission.payload["changes"].items()}
    assert changes == {"items": order.items, "total_amount": 5000, "currency": "EUR"}


def test_update_currency_together_with_new_prices() -> None:
    items = [{"product_id": "credits-10", "quantity": 1, "unit_amount": 2700}]
    decision = run(update, create(), command("update", changes={"items": items, "currency": "USD"}))
    assert decision.row is not None
    assert (decision.row.total_amount, decision.row.currency) == (2700, "USD")


def test_update_metadata_merges_and_null_removes() -> None:
    order = step(update, create(), command("update", changes={"metadata": {"a": "1", "b": "2"}}))
    decision = run(update, order, command("update", changes={"metadata": {"a": None, "c": "3"}}))
    assert decision.row is not None
    assert decision.row.metadata == {"b": "2", "c": "3"}
    assert decision.emit[0].payload["changes"] == {"metadata": '{"b":"2","c":"3"}'}
    assert decision.emit[0].payload["updated_fields"] == ["metadata"]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"items": [dict(item) for item in ITEMS]},
        {"total_amount": TOTAL},
        {"currency": "EUR"},
        {"metadata": {"gone": None}},
    ],
)
def test_update_that_changes_nothing_emits_nothing(changes: dict[str, Any]) -> None:
    assert run(update, create(), command("update", changes=changes)) == Decision()


@pytest.mark.parametrize(
    ("changes", "field", "match"),
    [
        ({"status": "COMPLETED"}, "status", "may not change"),
        ({"order_id": "ord_2"}, "order_id", "may not change"),
        ({"payment_id": "pi_x"}, "payment_id", "may not change"),
        ({"colour": "red"}, "colour", "not an order field"),
        ({"total_amount": 1}, "total_amount", "not the sum of the items"),
        ({"total_amount": -1}, "total_amount", "integer >= 0"),
        ({"currency": "USD"}, "currency", "only together with items"),
        ({"items": [{"product_id": "p", "quantity": 1, "unit_amount": -1}]}, "items", ">= 0"),
        ({"items": [{"product_id": "p", "quantity": 1, "unit_amount": 1, "x": 1}]}, "items",
         "unknown field"),
        ({"metadata": {"k": 1}}, "metadata", "must be a string"),
        ({"metadata": {f"k{i}": "v" for i in range(51)}}, "metadata", "at most 50 keys"),
    ],
)
def test_malformed_update_is_invalid(changes: dict[str, Any], field: str, match: str) -> None:
    with pytest.raises(InvalidCommand, match=match) as caught:
        run(update, create(), command("update", changes=changes))
    assert caught.value.field == field


def test_patchable_fields_are_the_documented_ones() -> None:
    assert PATCHABLE_FIELDS == ("items", "total_amount", "currency", "metadata")


def test_expire_before_the_deadline_is_a_noop_that_keeps_the_timer() -> None:
    decision = run(expire, create(), command("expire"), DEADLINE - 1)
    assert decision == Decision()  # the kernel re-asserts the row's deadline


@pytest.mark.parametrize("status", [S.PENDING, S.PAYMENT_PENDING])
def test_expire_at_the_deadline_closes_an_unpaid_order(status: OrderStatus) -> None:
    decision = run(expire, order_in(status), command("expire"), DEADLINE)
    order = decision.row
    assert order is not None and order.status is S.EXPIRED
    assert deadline_of(order) is None
    (emission,) = decision.emit
    assert emission.payload == {
        "order_id": ORDER_ID, "user_id": USER_ID, "expired_at": DEADLINE,
        "payment_intent_id": "pi_1" if status is S.PAYMENT_PENDING else None,
    }


def test_expire_after_payment_is_a_noop_that_drops_the_timer() -> None:
    decision = run(expire, order_in(S.COMPLETED), command("expire"), DEADLINE + 1)
    assert decision == Decision()
    assert deadline_of(order_in(S.COMPLETED)) is None  # so the kernel drops the handed-over one


def test_expire_of_a_missing_order_is_a_noop() -> None:
    assert run(expire, None, command("expire"), DEADLINE) == Decision()


@pytest.mark.parametrize("name", ["cancel", "fulfill", "update"])
def test_commands_for_a_missing_order_are_not_found(name: str) -> None:
    with pytest.raises(OrderNotFound) as caught:
        apply_command(None, command(name), LATER)
    assert caught.value.current is None and caught.value.order_id == ORDER_ID


def test_apply_command_dispatches_by_name() -> None:
    assert {s.input for s in FLOW.steps if "." not in s.input} == {
        "create", "cancel", "fulfill", "update", "expire"}
    decision = run(apply_command, order_in(S.COMPLETED), command("fulfill"))
    assert decision.row is not None and decision.row.status is S.FULFILLED
    decision = run(apply_command, create(), command("cancel"))
    assert decision.row is not None and decision.row.status is S.CANCELED


@pytest.mark.parametrize(
    "message",
    [
        {"command_id": "c1", "command": "refund", "order_id": ORDER_ID},
        {"command_id": "c1", "order_id": ORDER_ID},
    ],
)
def test_unknown_commands_are_invalid(message: dict[str, Any]) -> None:
    with pytest.raises(Invalid, match="unknown command"):
        apply_command(create(), message, LATER)


def test_a_command_without_an_id_is_invalid() -> None:
    with pytest.raises(InvalidCommand) as caught:
        apply_command(create(), {"command": "cancel", "order_id": ORDER_ID}, LATER)
    assert caught.value.field == "command_id"


def test_a_command_passed_to_the_wrong_function_is_invalid() -> None:
    with pytest.raises(InvalidCommand, match="'fulfill' passed to cancel"):
        cancel(create(), command("fulfill"), LATER)


def test_message_for_another_order_is_invalid() -> None:
    with pytest.raises(InvalidCommand, match="applied to order 'ord_1'"):
        on_payment_completed(create(), completed_event(order_id="ord_2"), LATER)


# --------------------------------------------------------------------------
# Every emitted topic, through the contract


def test_every_topic_the_aggregate_emits_is_exercised_against_its_contract() -> None:
    seen: set[str] = set()
    flows: list[tuple[Callable[..., Decision], Order, dict[str, Any], int]] = [
        (on_payment_intent_created, create(), intent_event(), LATER),
        (on_payment_completed, order_in(S.PAYMENT_PENDING), completed_event(), LATER),
        (on_payment_failed, order_in(S.PAYMENT_PENDING), failed_event(), LATER),
        (cancel, create(), command("cancel"), LATER),
        (on_payment_refunded, order_in(S.COMPLETED), refunded_event(10), LATER),
        (fulfill, order_in(S.COMPLETED), command("fulfill"), LATER),
        (update, create(), command("update", changes={"metadata": {"k": "v"}}), LATER),
        (expire, create(), command("expire"), DEADLINE),
    ]
    for decide, order, message, now_ms in flows:
        decision = run(decide, order, message, now_ms)
        events = check_emissions(decision, message)
        for event in events:
            if "event_id" in message:
                assert event["causation_id"] == message["event_id"]
                assert event["correlation_id"] == message["correlation_id"]
        seen.update(emission.topic for emission in decision.emit)
    created = create_order(None, create_command(), LATER, WINDOW_MS)
    check_emissions(created, {})
    seen.update(emission.topic for emission in created.emit)
    assert seen == set(EMITTED_TOPICS)


# --------------------------------------------------------------------------
# Storage


@pytest.mark.parametrize("status", list(OrderStatus))
def test_rows_round_trip_through_json(status: OrderStatus) -> None:
    order = order_in(status)
    order.metadata = {"note": "gift"}
    stored = json.loads(json.dumps(order.to_dict()))
    assert Order.from_dict(stored) == order


def test_to_dict_does_not_alias_the_row() -> None:
    order = create()
    data = order.to_dict()
    data["items"][0]["quantity"] = 99
    data["applied_event_ids"].append("x")
    assert order.items[0]["quantity"] == 2
    assert "x" not in order.applied_event_ids


def test_a_new_row_shares_no_mutable_state_with_the_old_one_or_its_events() -> None:
    old = order_in(S.COMPLETED)
    old.metadata = {"k": "v"}
    details = {"wallet_id": "w1"}
    decision = run(fulfill, old, command("fulfill", fulfillment_details=details))
    new = decision.row
    assert new is not None
    new.items[0]["quantity"] = 99
    new.metadata["k"] = "changed"
    new.refund_ids.append("re_x")
    new.fulfillment_details["wallet_id"] = "w2"
    assert old.items[0]["quantity"] == 2 and old.metadata == {"k": "v"}
    assert old.refund_ids == []
    assert decision.emit[0].payload["fulfillment_details"] == {"wallet_id": "w1"}
    assert details == {"wallet_id": "w1"}


def test_from_dict_tolerates_missing_optional_and_unknown_keys() -> None:
    minimal = {
        "order_id": ORDER_ID, "user_id": USER_ID, "order_type": "ONE_TIME",
        "status": "PENDING", "total_amount": 0, "currency": "EUR", "created_at_ms": T0,
        "added_by_a_newer_version": {"x": 1},
    }
    order = Order.from_dict(minimal)
    assert order.updated_at_ms == T0
    assert order.items == [] and order.applied_event_ids == [] and order.refunded_amount == 0
    assert order.payment_deadline_ms is None and order.metadata == {}


def test_from_dict_names_a_missing_required_key() -> None:
    with pytest.raises(ValueError, match="status"):
        Order.from_dict({"order_id": ORDER_ID})


def test_applied_ids_keep_only_the_most_recent() -> None:
    order = create()
    order.applied_event_ids = [f"id-{i}" for i in range(MAX_APPLIED_IDS)]
    patch = command("update", changes={"metadata": {"k": "v"}})
    updated = step(update, order, patch)
    assert len(updated.applied_event_ids) == MAX_APPLIED_IDS
    assert updated.applied_event_ids[0] == "id-1"
    assert updated.applied_event_ids[-1] == patch["command_id"]
    # A row stored with a longer list (older version) is trimmed when read.
    data = updated.to_dict()
    data["applied_event_ids"] = ["old", *data["applied_event_ids"]]
    assert Order.from_dict(data).applied_event_ids == updated.applied_event_ids


# --------------------------------------------------------------------------
# Queries


@pytest.mark.parametrize("status", list(OrderStatus))
def test_is_open_and_awaiting_fulfilment(status: OrderStatus) -> None:
    order = order_in(status)
    assert is_open(order) is (status in {S.PENDING, S.PAYMENT_PENDING})
    assert awaiting_fulfilment(order) is (status is S.COMPLETED)


def test_summary_and_view() -> None:
    order = order_in(S.PARTIALLY_REFUNDED)
    assert order_summary(order) == {
        "order_id": ORDER_ID, "status": "PARTIALLY_REFUNDED", "order_type": "WALLET_TOPUP",
        "subscription_id": None, "total_amount": TOTAL, "currency": "EUR", "created_at_ms": T0,
    }
    view = json.loads(json.dumps(order_view(order)))
    assert "applied_event_ids" not in view
    assert view["status"] == "PARTIALLY_REFUNDED"
    assert view["refunded_amount"] == 1000 and view["refundable_amount"] == 1500
    assert view["payment_id"] == "pi_1" and view["payment_deadline_ms"] == DEADLINE
    assert order_view(create())["refundable_amount"] == 0


def test_order_created_carries_its_own_payment_window_and_subscription() -> None:
    from streams.envelope import new_event

    event = new_event(
        "order.created",
        {
            "order_id": "o-window", "user_id": "u-1", "order_type": "SUBSCRIPTION",
            "total_amount": 500, "currency": "EUR",
            "items": [{"product_id": "plan-1", "quantity": 1, "unit_amount": 500}],
            "subscription_id": "sub_1", "expires_at": 1_000_000 + 90_000,
        },
        producer="order_service", now_ms=1_000_000,
    )
    decision = on_order_created(None, event, 1_000_000, 1_800_000)
    assert deadline_of(decision.row) == 1_090_000
    assert decision.row.payment_deadline_ms == 1_090_000
    assert decision.row.subscription_id == "sub_1"


# --------------------------------------------------------------------------
# The create command and Idempotency-Keys


def create_command(**overrides: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "command_id": "cmd-create", "command": "create", "order_id": ORDER_ID, "issued_at": T0,
        "user_id": USER_ID, "order_type": "WALLET_TOPUP", "total_amount": TOTAL, "currency": "EUR",
        "items": [dict(item) for item in ITEMS],
    }
    message.update(overrides)
    return message


def test_create_publishes_order_created_at_the_command_time_with_its_deadline() -> None:
    decision = create_order(None, create_command(), LATER, WINDOW_MS)
    order = decision.row
    assert order.status is S.PENDING and deadline_of(order) == DEADLINE
    (emission,) = decision.emit
    assert emission.topic == "order.created" and emission.occurred_at == T0
    assert emission.payload["expires_at"] == DEADLINE
    assert emission.payload["items"] == order.items
    # re-deciding the same command (a replay) is a duplicate, whatever the time
    assert create_order(order, create_command(), LATER + 999, WINDOW_MS) == Decision(duplicate=True)


def test_create_with_the_same_key_and_parameters_is_the_same_request() -> None:
    keyed = create_command(idempotency_key="k1", fingerprint="fp-a")
    order = create_order(None, keyed, LATER, WINDOW_MS).row
    assert order.idempotency_keys == {"k1": "fp-a"}
    again = create_command(command_id="other", idempotency_key="k1", fingerprint="fp-a")
    assert create_order(order, again, LATER, WINDOW_MS) == Decision(duplicate=True)


def test_create_with_the_same_key_and_other_parameters_is_refused_422() -> None:
    order = create_order(None, create_command(idempotency_key="k1", fingerprint="fp-a"), LATER,
                         WINDOW_MS).row
    with pytest.raises(IdempotencyKeyReused) as caught:
        create_order(order, create_command(idempotency_key="k1", fingerprint="fp-b", total_amount=1),
                     LATER, WINDOW_MS)
    assert caught.value.status == 422 and caught.value.code == "idempotency_key_reused"


def test_a_keyed_cancel_repeated_after_it_applied_is_a_duplicate_not_a_conflict() -> None:
    first = command("cancel", idempotency_key="c-1", fingerprint="fp")
    canceled = step(cancel, create(), first)
    retry = command("cancel", idempotency_key="c-1", fingerprint="fp")  # a new command id
    assert cancel(canceled, retry, LATER) == Decision(duplicate=True)
    with pytest.raises(IdempotencyKeyReused):
        cancel(canceled, command("cancel", idempotency_key="c-1", fingerprint="other"), LATER)


def test_an_order_remembers_a_bounded_number_of_keys() -> None:
    from tables.order_state import MAX_IDEMPOTENCY_KEYS

    order = create()
    for i in range(MAX_IDEMPOTENCY_KEYS + 5):
        order = step(update, order, command("update", changes={"metadata": {"n": str(i)}},
                                            idempotency_key=f"k{i}", fingerprint=f"f{i}"))
    assert len(order.idempotency_keys) == MAX_IDEMPOTENCY_KEYS
    assert f"k{MAX_IDEMPOTENCY_KEYS + 4}" in order.idempotency_keys and "k0" not in order.idempotency_keys


def test_the_view_hides_the_bookkeeping() -> None:
    view = order_view(create_order(None, create_command(idempotency_key="k", fingerprint="f"), LATER,
                                   WINDOW_MS).row)
    assert "idempotency_keys" not in view and "applied_event_ids" not in view


# --------------------------------------------------------------------------
# The flow table holds the decisions to what it declares


def test_the_flow_table_names_every_seed_handler_of_the_order_service() -> None:
    handlers = {s.handler for s in FLOW.steps}
    assert {"handle_payment_completed", "handle_payment_failed", "handle_payment_refunded"} <= handlers


def test_each_step_emits_only_what_it_declares_and_has_its_deadline_effect() -> None:
    from tables.aggregate import DeadlineEffect

    cases = {
        "create": (None, create_command(), LATER),
        "payment.intent.created": (create(), intent_event(), LATER),
        "payment.completed": (order_in(S.PAYMENT_PENDING), completed_event(), LATER),
        "payment.failed": (order_in(S.PAYMENT_PENDING), failed_event(), LATER),
        "payment.refunded": (order_in(S.COMPLETED), refunded_event(10), LATER),
        "cancel": (create(), command("cancel"), LATER),
        "fulfill": (order_in(S.COMPLETED), command("fulfill"), LATER),
        "update": (create(), command("update", changes={"metadata": {"k": "v"}}), LATER),
        "expire": (create(), command("expire"), DEADLINE),
    }
    assert set(cases) == {s.input for s in FLOW.steps}
    for flow_step in FLOW.steps:
        order, message, now_ms = cases[flow_step.input]
        decision = flow_step.decide(order, message, now_ms)
        assert {e.topic for e in decision.emit} <= set(flow_step.emits), flow_step.input
        before = deadline_of(order) if order is not None else None
        after = deadline_of(decision.row)
        effect = {
            DeadlineEffect.SET: before is None and after is not None,
            DeadlineEffect.CLEAR: before is not None and after is None,
            DeadlineEffect.FIRE: before is not None and after is None,
            DeadlineEffect.NONE: before == after,
        }[flow_step.deadline]
        assert effect, (flow_step.input, before, after)


def test_payment_events_outside_any_order_are_not_the_orders() -> None:
    step_ = FLOW.step("payment.completed", {})
    assert step_.decide(None, completed_event(order_id=None), LATER) == Decision()


# --------------------------------------------------------------------------
# A failure for want of funds: the payment service retries it (issue 7, item 5)


def unfunded_event(intent: str = "pi_1") -> dict[str, Any]:
    return failed_event(intent, error_code="insufficient_funds",
                        error_message="Your card has insufficient funds.")


def test_an_insufficient_funds_failure_keeps_the_order_waiting_for_payment() -> None:
    order = order_in(S.PAYMENT_PENDING)
    decision = run(on_payment_failed, order, unfunded_event())
    updated = decision.row
    assert updated is not None and decision.emit == ()
    assert updated.status is S.PAYMENT_PENDING and updated.payment_intent_id == "pi_1"
    assert updated.payment_error == "insufficient_funds: Your card has insufficient funds."
    assert updated.cancel_reason is None and updated.closed_at_ms is None
    assert deadline_of(updated) == deadline_of(order) == DEADLINE  # the payment window keeps running
    assert Order.from_dict(json.loads(json.dumps(updated.to_dict()))) == updated
    assert order_view(updated)["payment_error"] == updated.payment_error


def test_the_retry_that_pays_completes_the_order() -> None:
    waiting = step(on_payment_failed, order_in(S.PAYMENT_PENDING), unfunded_event())
    completed = step(on_payment_completed, waiting, completed_event())
    assert completed.status is S.COMPLETED and completed.payment_id == "pi_1"


def test_a_retry_declined_for_want_of_funds_again_keeps_waiting() -> None:
    waiting = step(on_payment_failed, order_in(S.PAYMENT_PENDING), unfunded_event())
    again = run(on_payment_failed, waiting, unfunded_event())
    assert again.row is not None and again.emit == () and again.row.status is S.PAYMENT_PENDING


def test_a_retry_declined_for_another_reason_cancels_the_order() -> None:
    waiting = step(on_payment_failed, order_in(S.PAYMENT_PENDING), unfunded_event())
    decision = run(on_payment_failed, waiting, failed_event())
    assert decision.row is not None and decision.row.status is S.CANCELED
    assert decision.row.cancel_reason == "PAYMENT_FAILED"
    assert [e.topic for e in decision.emit] == ["order.canceled"]


def test_an_unfunded_order_still_expires_at_its_deadline() -> None:
    waiting = step(on_payment_failed, order_in(S.PAYMENT_PENDING), unfunded_event())
    expired = step(expire, waiting, command("expire"), DEADLINE)
    assert expired.status is S.EXPIRED


def test_an_insufficient_funds_failure_of_another_intent_is_still_refused() -> None:
    with pytest.raises(IllegalTransition, match="pi_2 is not the order's pi_1"):
        run(on_payment_failed, order_in(S.PAYMENT_PENDING), unfunded_event("pi_2"))


def test_an_insufficient_funds_failure_after_payment_is_a_noop() -> None:
    assert run(on_payment_failed, order_in(S.COMPLETED), unfunded_event()) == Decision()


def test_an_insufficient_funds_failure_before_the_intent_event_waits_for_payment() -> None:
    decision = run(on_payment_failed, create(), unfunded_event())
    assert decision.row is not None
    assert decision.row.status is S.PAYMENT_PENDING and decision.row.payment_intent_id == "pi_1"


def test_an_unfunded_failure_before_the_intent_event_still_announces_payment_pending() -> None:
    first = run(on_payment_failed, create(), unfunded_event())
    assert first.row is not None
    then = run(on_payment_intent_created, first.row, intent_event())
    topics = [e.topic for e in first.emit + then.emit]
    assert topics.count("order.payment_pending") == 1


def test_the_payment_error_is_cleared_once_the_order_is_paid() -> None:
    waiting = step(on_payment_failed, order_in(S.PAYMENT_PENDING), unfunded_event())
    completed = step(on_payment_completed, waiting, completed_event())
    assert completed.payment_error is None



def test_an_order_paid_with_wallet_credits_is_created_completed() -> None:
    """The API deducted the credits before sending the create: the order is paid when placed."""
    decision = create_order(None, create_command(order_type="ONE_TIME", payment_method="wallet",
                                                 wallet_transaction_id="wtx-1"), LATER, WINDOW_MS)
    created, completed = decision.emit
    assert created.topic == "order.created" and created.payload["payment_method"] == "wallet"
    assert completed.topic == "order.completed" and completed.payload["payment_id"] == "wtx-1"
    order = decision.row
    assert order.status is S.COMPLETED and order.payment_id == "wtx-1"
    assert order.payment_intent_id is None and order.payment_method == "wallet"
    assert deadline_of(order) is None  # nothing left to expire
    assert Order.from_dict(order.to_dict()) == order


def test_a_card_order_says_so_in_order_created() -> None:
    (created,) = create_order(None, create_command(), LATER, WINDOW_MS).emit
    assert created.payload["payment_method"] is None


@pytest.mark.parametrize("overrides", [{"payment_method": "wallet"},
                                       {"payment_method": "cash", "wallet_transaction_id": "wtx"}])
def test_a_wallet_payment_needs_its_transaction_and_no_other_method_exists(overrides: dict[str, Any]) -> None:
    with pytest.raises(Invalid):
        create_order(None, create_command(**overrides), LATER, WINDOW_MS)


def test_evolve_copies_every_list_and_map_field() -> None:
    """_evolve copies the fields listed in _CONTAINER_FIELDS only: every list or map field must be there."""
    import dataclasses

    from tables.order_state import _CONTAINER_FIELDS, _evolve

    fields = {f.name: f.type for f in dataclasses.fields(Order)}
    containers = {name for name, kind in fields.items() if str(kind).startswith(("list", "dict"))}
    assert containers == {*_CONTAINER_FIELDS, "applied_event_ids"}
    order = Order(order_id="o-1", user_id="u-1", order_type="ONE_TIME", status=OrderStatus.PENDING,
                  total_amount=5, currency="EUR",
                  items=[{"product_id": "p", "quantity": 1, "unit_amount": 5}],
                  created_at_ms=1, updated_at_ms=1, refund_ids=["r"], fulfillment_details={"a": "b"},
                  metadata={"c": "d"}, applied_event_ids=["e"], idempotency_keys={"k": "f"})
    before = order.to_dict()
    evolved = _evolve(order, "e2", 2, status=OrderStatus.CANCELED)
    for name in containers:
        assert getattr(evolved, name) is not getattr(order, name)
    assert evolved.items[0] is not order.items[0]
    evolved.items[0]["quantity"] = 9
    evolved.metadata["x"] = "y"
    assert order.to_dict() == before
    assert evolved.applied_event_ids == ["e", "e2"] and evolved.updated_at_ms == 2
