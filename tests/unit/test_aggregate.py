"""The pure half of the kernel (tables.aggregate): refusals, ids, commands, fingerprints, flows."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tables.aggregate import (
    DUPLICATE,
    ID_NAMESPACE,
    NOOP,
    Conflict,
    DeadlineEffect,
    Decision,
    Emission,
    Flow,
    IdempotencyKeyReused,
    Invalid,
    NotFound,
    Outcome,
    Refusal,
    Step,
    command,
    command_message,
    derived_id,
    fingerprint,
)
from tables.order_state import IllegalTransition, InvalidCommand, OrderNotFound, OrderStatus

# --------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(("refusal", "status", "code"), [
    (Refusal, 400, "invalid"),
    (Invalid, 400, "invalid"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "illegal_transition"),
    (IdempotencyKeyReused, 422, "idempotency_key_reused"),
])
def test_each_refusal_has_its_http_status_and_code(refusal: type[Refusal], status: int, code: str) -> None:
    error = refusal("no")
    assert (error.status, error.code) == (status, code)
    assert isinstance(error, Refusal) and isinstance(error, ValueError)
    assert str(error) == "no"


def test_the_order_domains_refusals_are_kernel_refusals() -> None:
    illegal = IllegalTransition("o-1", OrderStatus.CANCELED, "complete", OrderStatus.COMPLETED)
    assert isinstance(illegal, Conflict) and illegal.status == 409
    missing = OrderNotFound("o-1", "cancel")
    assert isinstance(missing, Refusal) and (missing.status, missing.code) == (404, "not_found")
    invalid = InvalidCommand("bad", order_id="o-1", field="x")
    assert isinstance(invalid, Invalid) and invalid.status == 400


# --------------------------------------------------------------------------
# Decisions and outcomes


def test_a_decision_changes_nothing_by_default() -> None:
    assert Decision() == NOOP
    assert (NOOP.row, NOOP.emit, NOOP.send, NOOP.duplicate, NOOP.reply) == (None, (), (), False, None)
    assert DUPLICATE.duplicate and DUPLICATE.row is None and not DUPLICATE.emit


def test_an_outcome_is_ok_unless_refused() -> None:
    assert Outcome(value={"id": "ch_1"}).ok
    assert Outcome().ok
    refused = Outcome(refused="card declined")
    assert not refused.ok and refused.value is None


def test_an_emission_defaults_to_no_discriminator_and_the_batch_time() -> None:
    emission = Emission("order.created", {"order_id": "o-1"})
    assert (emission.discriminator, emission.occurred_at) == ("", None)


# --------------------------------------------------------------------------
# Derived ids


def test_a_derived_id_is_a_uuid5_of_the_parts() -> None:
    value = derived_id("evt-1", "order.created", "")
    assert value == str(uuid.uuid5(ID_NAMESPACE, "evt-1/order.created/"))
    assert uuid.UUID(value).version == 5


@pytest.mark.parametrize("parts", [
    ("a/b", "c"), ("a\\", "/b"), ("ünïcödé", "ä/ö", 7), ("",), (None, 1_700_000_000_000, "x"),
])
def test_a_derived_id_is_uuid5_of_the_escaped_parts(parts: tuple[object, ...]) -> None:
    escaped = "/".join(str(p).replace("\\", "\\\\").replace("/", "\\/") for p in parts)
    assert derived_id(*parts) == str(uuid.uuid5(ID_NAMESPACE, escaped))


def test_the_same_parts_always_derive_the_same_id() -> None:
    assert derived_id("evt-1", "fulfill", "o-1") == derived_id("evt-1", "fulfill", "o-1")
    assert derived_id("expire", "o-1", 1_700_000_000_000) == derived_id("expire", "o-1", 1_700_000_000_000)


@pytest.mark.parametrize("other", [
    ("evt-2", "fulfill", "o-1"),
    ("evt-1", "cancel", "o-1"),
    ("evt-1", "fulfill", "o-2"),
    ("evt-1", "fulfill"),
    ("evt-1", "fulfill", "o-1", ""),
])
def test_other_parts_derive_another_id(other: tuple[str, ...]) -> None:
    assert derived_id(*other) != derived_id("evt-1", "fulfill", "o-1")


def test_parts_that_contain_the_separator_do_not_collide() -> None:
    # e.g. the API's per-user order id derived_id("api-order", user_id, key): user "a/b" with key
    # "c" and user "a" with key "b/c" would share one order
    assert derived_id("api-order", "a/b", "c") != derived_id("api-order", "a", "b/c")


# --------------------------------------------------------------------------
# Commands


def test_a_command_caused_by_an_event_derives_its_id_and_carries_the_cause() -> None:
    cause = {"event_id": "evt-1", "correlation_id": "corr-1"}
    record = command("fulfill", "order_id", "o-1", cause=cause, now_ms=123, fulfillment_details={"a": "b"})
    assert record == {
        "command": "fulfill",
        "command_id": derived_id("evt-1", "fulfill", "o-1"),
        "order_id": "o-1",
        "correlation_id": "corr-1",
        "causation_id": "evt-1",
        "issued_at": 123,
        "args": {"fulfillment_details": {"a": "b"}},
    }
    again = command("fulfill", "order_id", "o-1", cause=cause, now_ms=456, fulfillment_details={"a": "b"})
    assert again["command_id"] == record["command_id"]  # re-deciding the event re-sends the same command


def test_a_command_without_a_cause_gets_a_fresh_id_that_correlates_itself() -> None:
    first = command("cancel", "order_id", "o-1", cause=None, now_ms=1)
    second = command("cancel", "order_id", "o-1", cause=None, now_ms=1)
    assert first["command_id"] != second["command_id"]
    assert uuid.UUID(first["command_id"]).version == 4
    assert first["correlation_id"] == first["command_id"]
    assert first["causation_id"] is None
    assert "origin" not in first


def test_a_cause_without_a_correlation_id_correlates_to_the_command() -> None:
    record = command("cancel", "order_id", "o-1", cause={"event_id": "evt-1"}, now_ms=1)
    assert record["correlation_id"] == record["command_id"] == derived_id("evt-1", "cancel", "o-1")


def test_a_given_command_id_and_origin_are_kept() -> None:
    record = command("create", "order_id", "o-1", cause=None, now_ms=1, command_id="c-1", origin="api",
                     user_id="u-1")
    assert (record["command_id"], record["origin"], record["args"]) == ("c-1", "api", {"user_id": "u-1"})


def test_the_message_a_step_decides_on_flattens_the_command() -> None:
    record = command("fulfill", "order_id", "o-1", cause=None, now_ms=77, command_id="c-1", origin="api",
                     fulfillment_details={"a": "b"})
    assert command_message(record, "order_id") == {
        "command_id": "c-1", "command": "fulfill", "order_id": "o-1", "issued_at": 77,
        "fulfillment_details": {"a": "b"},
    }


def test_a_command_message_without_args_or_an_integer_issue_time_has_neither() -> None:
    record = {"command": "expire", "command_id": "c-1", "order_id": "o-1", "issued_at": "soon",
              "args": None}
    assert command_message(record, "order_id") == {"command_id": "c-1", "command": "expire",
                                                   "order_id": "o-1"}


@pytest.mark.parametrize(("record", "problem"), [
    ({"command": "x", "command_id": "c", "order_id": "o", "args": ["a"]}, "args must be an object"),
    ({"command": "x", "command_id": "c", "args": {}}, "without a order_id"),
    ({"command": "x", "command_id": "c", "order_id": "", "args": {}}, "without a order_id"),
    ({"command": "x", "command_id": "c", "order_id": 7, "args": {}}, "without a order_id"),
    ({"command": "x", "command_id": "c", "order_id": "o", "args": {"command_id": "c2"}}, "command_id"),
    ({"command": "x", "command_id": "c", "order_id": "o", "args": {"order_id": "o2"}}, "order_id"),
    ({"command": "x", "command_id": "c", "order_id": "o", "args": {"command": "y", "issued_at": 1}},
     "may not set command, issued_at"),
])
def test_a_malformed_command_is_invalid(record: dict[str, Any], problem: str) -> None:
    with pytest.raises(Invalid, match=problem):
        command_message(record, "order_id")


# --------------------------------------------------------------------------
# Fingerprints


def test_a_fingerprint_ignores_the_order_of_keys_at_every_depth() -> None:
    one = {"items": [{"product_id": "p", "quantity": 1}], "currency": "EUR", "meta": {"a": 1, "b": 2}}
    two = {"meta": {"b": 2, "a": 1}, "currency": "EUR", "items": [{"quantity": 1, "product_id": "p"}]}
    assert fingerprint("create", one) == fingerprint("create", two)
    assert len(fingerprint("create", one)) == 32
    int(fingerprint("create", one), 16)  # hex


@pytest.mark.parametrize(("verb", "parameters"), [
    ("cancel", {"currency": "EUR", "total_amount": 100}),
    ("create", {"currency": "USD", "total_amount": 100}),
    ("create", {"currency": "EUR", "total_amount": 101}),
    ("create", {"currency": "EUR", "total_amount": 100, "extra": None}),
    ("create", {"currency": "EUR"}),
    ("create", {"currency": "EUR", "total_amount": "100"}),
])
def test_a_fingerprint_differs_for_another_verb_or_other_parameters(
        verb: str, parameters: dict[str, Any]) -> None:
    assert fingerprint(verb, parameters) != fingerprint("create", {"currency": "EUR", "total_amount": 100})


def test_a_fingerprint_tells_list_order_apart() -> None:
    assert fingerprint("create", {"items": [1, 2]}) != fingerprint("create", {"items": [2, 1]})


def test_a_fingerprint_accepts_values_json_cannot_hold() -> None:
    value = uuid.UUID(int=1)
    assert fingerprint("create", {"at": value}) == fingerprint("create", {"at": str(value)})


# --------------------------------------------------------------------------
# Flows


def _decide(row: Any, message: Any, now_ms: int) -> Decision:
    return NOOP


def _flow(*steps: Step, command_topic: str | None = "paystream.order-commands") -> Flow:
    return Flow(name="things", producer="order_service", key_field="thing_id", steps=steps,
                load=dict, dump=dict, command_topic=command_topic)


STEPS = (
    Step("payment.completed", "handle_payment_completed", _decide, ("order.completed",)),
    Step("create", "create_thing", _decide, ("order.created",), deadline=DeadlineEffect.SET),
    Step("cancel", "cancel_thing", _decide),
)


def test_a_step_is_found_by_its_topic_or_its_verb() -> None:
    flow = _flow(*STEPS)
    assert flow.step("payment.completed", {"command": "cancel"}) is STEPS[0]
    assert flow.step("paystream.order-commands", {"command": "create"}) is STEPS[1]
    assert flow.step("paystream.order-commands", {"command": "cancel"}) is STEPS[2]


@pytest.mark.parametrize("message", [{"command": "delete"}, {}, {"command": 3}])
def test_an_unknown_verb_is_invalid_and_names_the_known_ones(message: dict[str, Any]) -> None:
    with pytest.raises(Invalid, match=r"things: unknown command .*; known: create, cancel$"):
        _flow(*STEPS).step("paystream.order-commands", message)


def test_a_verb_naming_an_event_topic_is_not_a_command() -> None:
    with pytest.raises(Invalid, match=r"unknown command 'payment\.completed'"):
        _flow(*STEPS).step("paystream.order-commands", {"command": "payment.completed"})


def test_a_topic_the_flow_does_not_read_is_invalid() -> None:
    with pytest.raises(Invalid):
        _flow(*STEPS).step("payment.failed", {})


def test_a_flow_reads_its_event_topics_then_its_command_topic() -> None:
    assert _flow(*STEPS).topics == ("payment.completed", "paystream.order-commands")
    assert _flow(STEPS[0], command_topic=None).topics == ("payment.completed",)


def test_an_input_may_appear_once_in_a_flow_table() -> None:
    with pytest.raises(ValueError, match="things: an input appears twice"):
        _flow(*STEPS, Step("cancel", "cancel_again", _decide))


def test_a_step_declares_nothing_by_default_and_the_view_is_the_row() -> None:
    step = Step("cancel", "cancel_thing", _decide)
    assert (step.emits, step.sends, step.deadline, step.calls) == ((), (), DeadlineEffect.NONE, None)
    flow = _flow(step)
    row = {"a": 1}
    assert flow.view(row) is row
    assert (flow.deadline_of, flow.follow) == (None, None)


def test_deadline_effects_are_the_documented_four() -> None:
    assert [e.value for e in DeadlineEffect] == ["none", "set", "clear", "fire"]

