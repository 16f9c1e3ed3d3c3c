"""The PaymentIntent index that re-keys Stripe's webhooks (tables.stripe_intents), without a broker.

Inputs are whole webhook bodies in Stripe's API shape (``tests/fixtures/stripe/docs_*.json``)
as the kernel decodes them from ``stripe.events``, and the intent links the payment
aggregate sends.  Each forwarded command is read back as the payment agent reads
it (JSON, then :func:`tables.aggregate.command_message`) and must land on the
payment flow's ``stripe`` step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from streams.catalog import (
    INVOICE_COMMANDS,
    PAYMENT_COMMANDS,
    PAYMENT_INTENT_LINKS,
    PAYMENT_SERVICE,
    STRIPE_EVENTS,
    SUBSCRIPTION_COMMANDS,
    id_field,
)
from tables import aggregate
from tables.aggregate import DUPLICATE, Decision, Invalid
from tables.payment_state import payment_flow
from tables.stripe_events import (
    INVOICE_TYPES,
    PAYMENT_TYPES,
    SUBSCRIPTION_TYPES,
    event_from_dict,
    payment_fact,
)
from tables.stripe_intents import (
    MAX_APPLIED,
    STRIPE_INTENTS,
    dump,
    fact_command,
    handle_stripe_webhook,
    link_payment_intent,
    load,
)
from tables.stripe_objects import invoice_view, subscription_view

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe"
ORDER = "ord_7f3c2a9e1b5d4c08"
USER = "usr_42b1e0c9"
PI = "pi_3QfR2kLkdIwHu7ix0Zb8aQ1T"
NOW = 1_764_240_000_000
PAYMENTS = payment_flow()

#: Fixtures of consumed types whose object names the order in its metadata.
WITH_METADATA = ["payment_intent_created", "payment_intent_succeeded", "payment_intent_payment_failed",
                 "payment_intent_canceled", "charge_refunded", "charge_refunded_with_refunds",
                 "refund_created"]
#: Fixtures of consumed types whose object carries no order (a Refund made in the dashboard).
WITHOUT_METADATA = ["refund_updated", "refund_failed", "charge_refund_updated"]


def webhook(name: str, event_id: str | None = None, **object_changes: Any) -> dict[str, Any]:
    event = json.loads((FIXTURES / f"docs_{name}.json").read_bytes())
    if event_id is not None:
        event["id"] = event_id
    event["data"]["object"].update(object_changes)
    return event


def link(order_id: str = ORDER) -> dict[str, Any]:
    return {"event_id": aggregate.derived_id("intent-link", PI), "payment_intent_id": PI,
            "order_id": order_id, "user_id": USER}


def decide(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int = NOW) -> Decision:
    """Decide as the kernel does (the step for the topic), checking the row is not mutated
    and survives the table's JSON round trip."""
    topic = STRIPE_EVENTS if "type" in message else PAYMENT_INTENT_LINKS
    step = STRIPE_INTENTS.step(topic, message)
    before = json.dumps(row)
    decision = step.decide(row, message, now_ms)  # type: ignore[call-arg]
    assert json.dumps(row) == before, "a decision must not change the row it was given"
    for send in decision.send:
        assert send.topic in step.sends
    if decision.row is not None:
        assert load(json.loads(json.dumps(dump(decision.row)))) == decision.row
    if decision.duplicate:
        assert decision.row is None and decision.send == ()
    return decision


def forwarded(decision: Decision) -> dict[str, Any]:
    """The one command a decision forwards, as the payment agent reads it."""
    (send,) = decision.send
    assert send.topic == PAYMENT_COMMANDS
    record = json.loads(json.dumps(send.value))
    assert send.key == record["order_id"]
    message = aggregate.command_message(record, "order_id")
    assert PAYMENTS.step(PAYMENT_COMMANDS, message).handler == "apply_stripe_fact"
    return message


# --------------------------------------------------------------------------
# The flow table


def test_the_flow_table_is_keyed_by_the_intent_and_names_the_seed_handler() -> None:
    assert STRIPE_INTENTS.name == "stripe-intents" and STRIPE_INTENTS.key_field == "payment_intent_id"
    assert STRIPE_INTENTS.producer == PAYMENT_SERVICE and STRIPE_INTENTS.command_topic is None
    steps = {s.input: (s.handler, s.emits, s.sends, s.calls) for s in STRIPE_INTENTS.steps}
    assert steps == {
        STRIPE_EVENTS: ("handle_stripe_webhook", (), (PAYMENT_COMMANDS, SUBSCRIPTION_COMMANDS,
                                                      INVOICE_COMMANDS), None),
        PAYMENT_INTENT_LINKS: ("link_payment_intent", (), (), None),
    }
    assert set(STRIPE_INTENTS.topics) == {STRIPE_EVENTS, PAYMENT_INTENT_LINKS}
    assert STRIPE_INTENTS.step(STRIPE_EVENTS, {}).decide is handle_stripe_webhook
    assert STRIPE_INTENTS.step(PAYMENT_INTENT_LINKS, {}).decide is link_payment_intent


def test_the_kernel_identifies_a_stripe_event_by_its_stripe_id() -> None:
    assert id_field(STRIPE_EVENTS) == "id"


def test_every_payment_type_has_a_fixture_here() -> None:
    types = {webhook(name)["type"] for name in WITH_METADATA + WITHOUT_METADATA}
    assert types == PAYMENT_TYPES


# --------------------------------------------------------------------------
# Forwarding facts


@pytest.mark.parametrize("name", WITH_METADATA)
def test_an_event_naming_its_order_is_forwarded_to_that_payment(name: str) -> None:
    event = webhook(name)
    decision = decide(None, event)
    command = forwarded(decision)
    fact = payment_fact(event_from_dict(event))
    assert fact is not None
    assert command["command_id"] == aggregate.derived_id("stripe", event["id"])
    assert command["order_id"] == ORDER and command["command"] == "stripe"
    assert command["kind"] == fact.kind and command["stripe_event_id"] == event["id"]
    assert command["payment_intent_id"] == PI and command["occurred_at_ms"] == event["created"] * 1000
    assert command["refunds"] == [{"refund_id": r.refund_id, "amount": r.amount, "currency": r.currency,
                                   "status": r.status, "reason": r.reason, "command_id": r.command_id}
                                  for r in fact.refunds]
    (send,) = decision.send
    assert send.value["causation_id"] == event["id"]
    assert decision.row == {"applied": [event["id"]], "payment_intent_id": PI, "order_id": ORDER,
                            "user_id": USER}


def test_a_failure_carries_the_decline_and_the_payment_method() -> None:
    command = forwarded(decide(None, webhook("payment_intent_payment_failed")))
    assert command["kind"] == "failed"
    assert (command["error_code"], command["error_message"]) == ("insufficient_funds",
                                                                 "Your card has insufficient funds.")
    assert command["payment_method"] == "pm_1QfR2jLkdIwHu7ixHc4Vx3Lp"
    assert (command["amount"], command["currency"]) == (4999, "EUR")


def test_the_order_is_learnt_from_metadata_and_reaches_later_events_without_it() -> None:
    learnt = decide(None, webhook("payment_intent_succeeded")).row
    assert learnt["order_id"] == ORDER and learnt["user_id"] == USER
    decision = decide(learnt, webhook("refund_updated"))
    command = forwarded(decision)
    assert command["order_id"] == ORDER and command["kind"] == "refunded"
    assert command["refunds"][0]["refund_id"] == "re_3QfR2kLkdIwHu7ix0gH5iJ6k"
    assert decision.row["user_id"] == USER  # not lost to an event without metadata


@pytest.mark.parametrize("name", WITHOUT_METADATA)
def test_an_event_without_metadata_after_the_link_reaches_the_order(name: str) -> None:
    linked = decide(None, link()).row
    command = forwarded(decide(linked, webhook(name)))
    assert command["order_id"] == ORDER


@pytest.mark.parametrize("name", WITHOUT_METADATA)
def test_an_event_for_an_intent_no_order_claims_is_counted_not_forwarded(name: str) -> None:
    event = webhook(name)
    decision = decide(None, event)
    assert decision.send == ()
    assert decision.row == {"applied": [event["id"]], "payment_intent_id": PI, "unlinked": 1}
    again = decide(decision.row, webhook(name, event_id="evt_another_one"))
    assert again.send == () and again.row["unlinked"] == 2
    assert decide(again.row, event) == DUPLICATE


def test_a_metadata_less_event_before_the_link_stays_unlinked_after_it() -> None:
    # Documented: the raw event stays in stripe.events; the index does not re-forward it.
    unlinked = decide(None, webhook("refund_updated")).row
    linked = decide(unlinked, link()).row
    assert linked["order_id"] == ORDER and linked["unlinked"] == 1
    assert decide(linked, webhook("refund_updated")) == DUPLICATE


def test_a_duplicate_stripe_event_id_is_a_duplicate() -> None:
    event = webhook("payment_intent_succeeded")
    row = decide(None, event).row
    assert decide(row, event) == DUPLICATE
    # even with another body: Stripe's event id is the identity
    assert decide(row, webhook("payment_intent_canceled", event_id=event["id"])) == DUPLICATE


def test_a_replayed_event_forwards_the_same_command() -> None:
    event = webhook("charge_refunded_with_refunds")
    first = forwarded(decide(None, event, NOW))
    replayed = forwarded(decide(None, event, NOW + 10_000))
    first.pop("issued_at"), replayed.pop("issued_at")
    assert first == replayed


def test_another_stripe_event_is_another_command() -> None:
    row = decide(None, webhook("payment_intent_created")).row
    a = forwarded(decide(None, webhook("payment_intent_succeeded")))
    b = forwarded(decide(row, webhook("payment_intent_succeeded", event_id="evt_resent")))
    assert a["command_id"] != b["command_id"]


def test_a_type_paystream_does_not_read_is_remembered_and_not_forwarded() -> None:
    event = webhook("customer_created")
    decision = decide(None, event)
    assert decision.send == () and decision.row == {"applied": [event["id"]]}
    assert decide(decision.row, event) == DUPLICATE


def test_the_index_remembers_a_bounded_number_of_stripe_event_ids() -> None:
    row = None
    for n in range(MAX_APPLIED + 3):
        row = decide(row, webhook("payment_intent_succeeded", event_id=f"evt_n{n}")).row
    assert row is not None and len(row["applied"]) == MAX_APPLIED
    assert row["applied"][-1] == f"evt_n{MAX_APPLIED + 2}" and "evt_n0" not in row["applied"]


# --------------------------------------------------------------------------
# Subscriptions and invoices

SUB = "sub_1QfZ2aLkdIwHu7ixq3mC8Ndv"
INVOICE = "in_1QhC2zLkdIwHu7ixRnw2Fail"


def object_forwarded(decision: Decision, topic: str, key_field: str) -> dict[str, Any]:
    """The one command a decision forwards to ``topic``, as that domain's agent reads it."""
    (send,) = decision.send
    assert send.topic == topic
    record = json.loads(json.dumps(send.value))
    assert send.key == record[key_field]
    return aggregate.command_message(record, key_field)


@pytest.mark.parametrize("event_type", sorted(SUBSCRIPTION_TYPES))
def test_a_subscription_event_goes_to_the_subscription_as_a_stripe_command(event_type: str) -> None:
    event = webhook("customer_subscription_updated")
    event["type"] = event_type
    decision = decide(None, event)
    command = object_forwarded(decision, SUBSCRIPTION_COMMANDS, "subscription_id")
    assert command["command"] == "stripe" and command["subscription_id"] == SUB
    assert command["command_id"] == aggregate.derived_id("stripe", event["id"])
    assert decision.send[0].value["causation_id"] == event["id"]
    assert command["stripe_event_id"] == event["id"] and command["stripe_type"] == event_type
    assert command["occurred_at_ms"] == event["created"] * 1000
    assert command["previous"] == ["items"]
    assert command["subscription"] == subscription_view(event["data"]["object"])
    assert "invoice" not in command
    assert decision.row == {"applied": [event["id"]]}


@pytest.mark.parametrize("event_type", sorted(INVOICE_TYPES))
def test_an_invoice_event_goes_to_the_invoice_as_a_stripe_command(event_type: str) -> None:
    event = webhook("invoice_payment_failed")
    event["type"] = event_type
    decision = decide(None, event)
    command = object_forwarded(decision, INVOICE_COMMANDS, "invoice_id")
    assert command["command"] == "stripe" and command["invoice_id"] == INVOICE
    assert command["command_id"] == aggregate.derived_id("stripe", event["id"])
    assert command["stripe_event_id"] == event["id"] and command["stripe_type"] == event_type
    assert command["occurred_at_ms"] == event["created"] * 1000
    assert command["previous"] == []  # the event has no previous_attributes
    assert command["invoice"] == invoice_view(event["data"]["object"])
    assert command["invoice"]["subscription_id"] == SUB


def test_the_2025_shapes_are_forwarded_with_their_views() -> None:
    sub_event = webhook("customer_subscription_updated_2025")
    command = object_forwarded(decide(None, sub_event), SUBSCRIPTION_COMMANDS, "subscription_id")
    assert command["previous"] == ["cancel_at", "cancel_at_period_end", "canceled_at", "cancellation_details"]
    assert command["subscription"]["cancel_at_period_end"] is True
    assert command["subscription"]["current_period_end"] == 1766822400_000
    invoice_event = webhook("invoice_paid_2025")
    command = object_forwarded(decide(None, invoice_event), INVOICE_COMMANDS, "invoice_id")
    assert command["invoice"]["subscription_id"] == "sub_1SkC9xLkdIwHu7ixZ5n2Qa7w"
    assert command["invoice"]["status"] == "paid"


@pytest.mark.parametrize("name", ["customer.subscription.created", "customer.subscription.deleted",
                                  "invoice.created", "invoice.payment_succeeded", "invoice.payment_failed"])
def test_localstripes_webhooks_are_forwarded(name: str) -> None:
    event = json.loads((FIXTURES / "localstripe" / f"{name}.json").read_bytes())
    decision = decide(None, event)
    (send,) = decision.send
    assert send.topic == (INVOICE_COMMANDS if name.startswith("invoice.") else SUBSCRIPTION_COMMANDS)
    assert send.key == event["data"]["object"]["id"]


def test_a_redelivered_subscription_event_is_a_duplicate_and_another_is_forwarded() -> None:
    event = webhook("customer_subscription_updated")
    row = decide(None, event).row
    assert decide(row, event) == DUPLICATE
    later = webhook("customer_subscription_updated", event_id="evt_later_one", status="past_due")
    decision = decide(row, later)
    command = object_forwarded(decision, SUBSCRIPTION_COMMANDS, "subscription_id")
    assert command["subscription"]["status"] == "past_due"
    assert decision.row == {"applied": [event["id"], "evt_later_one"]}


def test_a_replayed_invoice_event_forwards_the_same_command() -> None:
    event = webhook("invoice_payment_failed")
    first = object_forwarded(decide(None, event, NOW), INVOICE_COMMANDS, "invoice_id")
    again = object_forwarded(decide(None, event, NOW + 5_000), INVOICE_COMMANDS, "invoice_id")
    first.pop("issued_at"), again.pop("issued_at")
    assert first == again


@pytest.mark.parametrize("event", [
    webhook("customer_subscription_updated", id=None),
    webhook("customer_subscription_updated", object="invoice"),
    webhook("customer_subscription_updated", current_period_end="tomorrow"),
    webhook("invoice_payment_failed", id=None),
    webhook("invoice_payment_failed", amount_due=None),
    webhook("invoice_paid_2025", metadata="user_id"),
])
def test_a_subscription_or_invoice_that_cannot_be_read_is_invalid(event: dict[str, Any]) -> None:
    with pytest.raises(Invalid):
        decide(None, event)


# --------------------------------------------------------------------------
# Malformed events


def _without(event: dict[str, Any], *path: str) -> dict[str, Any]:
    target = event
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return event


@pytest.mark.parametrize("event", [
    {"id": "not-an-event", "object": "event", "type": "payment_intent.succeeded", "created": 1,
     "data": {"object": {}}},
    _without(webhook("payment_intent_succeeded"), "data"),
    _without(webhook("payment_intent_succeeded"), "created"),
    webhook("payment_intent_succeeded", id=None),  # a consumed type without its intent id
    webhook("refund_created", payment_intent=None),  # a refund without its intent
    webhook("payment_intent_succeeded", metadata=["order_id"]),
    webhook("charge_refunded_with_refunds", refunds={"object": "list", "data": [{"id": "re_1"}]}),
])
def test_a_malformed_event_is_invalid(event: dict[str, Any]) -> None:
    with pytest.raises(Invalid):
        decide(None, event)


# --------------------------------------------------------------------------
# Links


def test_a_link_remembers_the_order_of_the_intent() -> None:
    decision = decide(None, link())
    assert decision.row == {"payment_intent_id": PI, "order_id": ORDER, "user_id": USER}
    assert decision.send == ()


def test_the_same_link_again_is_a_duplicate() -> None:
    row = decide(None, link()).row
    assert decide(row, link()) == DUPLICATE


def test_a_link_keeps_the_event_ids_seen_before_it() -> None:
    row = decide(None, webhook("refund_failed")).row
    linked = decide(row, link()).row
    assert linked["applied"] == row["applied"] == ["evt_3QfR2kLkdIwHu7ix0g7h8i9j"]


@pytest.mark.parametrize("order_id", [None, "", 7])
def test_a_link_without_an_order_is_invalid(order_id: Any) -> None:
    with pytest.raises(Invalid, match="order_id"):
        link_payment_intent(None, {**link(), "order_id": order_id}, NOW)


def test_fact_command_is_the_stripe_verb_with_a_derived_id() -> None:
    event = webhook("payment_intent_succeeded")
    fact = payment_fact(event_from_dict(event))
    assert fact is not None
    record = fact_command(fact, ORDER, NOW)
    assert record["command"] == "stripe" and record["order_id"] == ORDER
    assert record["command_id"] == aggregate.derived_id("stripe", event["id"])
    assert record["issued_at"] == NOW and "origin" not in record
