"""Stripe events -> payment facts (tables.stripe_events), without a broker.

The fixtures in ``tests/fixtures/stripe/docs_*.json`` are whole webhook
bodies in the shape of Stripe's API reference (API version 2024-06-20 unless
the file says otherwise), including the fields paystream ignores, so a
mapping that trips over a real payload fails here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tables.stripe_events import (
    CONSUMED_TYPES,
    INVOICE_TYPES,
    PAYMENT_TYPES,
    SUBSCRIPTION_TYPES,
    NotAStripeEvent,
    PaymentFact,
    RefundFact,
    StripeEvent,
    event_key,
    parse_event,
    payment_fact,
    refund_reasons,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe"
PI = "pi_3QfR2kLkdIwHu7ix0Zb8aQ1T"
CH = "ch_3QfR2kLkdIwHu7ix0nKq6yZr"
ORDER = "ord_7f3c2a9e1b5d4c08"
USER = "usr_42b1e0c9"
CREATED = 1764230400


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"docs_{name}.json").read_bytes())


def raw(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def fact_of(event: dict[str, Any]) -> PaymentFact | None:
    return payment_fact(parse_event(raw(event)))


# ---------------------------------------------------------------- parse_event


def test_parse_event_reads_the_envelope_and_object() -> None:
    body = (FIXTURES / "docs_payment_intent_succeeded.json").read_bytes()
    event = parse_event(body)
    assert event == StripeEvent(
        id="evt_3QfR2kLkdIwHu7ix0e4f5g6h", type="payment_intent.succeeded", created=CREATED + 4,
        api_version="2024-06-20", account=None, livemode=False, object=json.loads(body)["data"]["object"],
    )
    assert event.object["id"] == PI


def test_parse_event_reads_the_connect_account() -> None:
    event = parse_event(raw(fixture("payment_intent_canceled")))
    assert event.account == "acct_1PgT0aLkdIwHu7ix"
    assert event.api_version == "2025-03-31.basil"


def test_parsed_object_is_read_only() -> None:
    event = parse_event(raw(fixture("payment_intent_created")))
    with pytest.raises(TypeError):
        event.object["id"] = "pi_other"  # type: ignore[index]


@pytest.mark.parametrize("body, says", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"", "not JSON"),
    (b"{\"id\": \"evt_1\",", "not JSON"),
    (b"NaN", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[{\"id\": \"evt_1\"}]", "JSON array"),
    (b"\"evt_1\"", "JSON string"),
    (b"42", "JSON number"),
    (b"null", "JSON null"),
    (b"true", "JSON boolean"),
])
def test_parse_event_refuses_what_is_not_a_json_object(body: bytes, says: str) -> None:
    with pytest.raises(NotAStripeEvent, match=says):
        parse_event(body)


def _without(path: tuple[str, ...]) -> dict[str, Any]:
    event = fixture("payment_intent_succeeded")
    target = event
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return event


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    event = fixture("payment_intent_succeeded")
    target = event
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return event


@pytest.mark.parametrize("event, says", [
    (_without(("id",)), "no Stripe event id"),
    (_with(("id",), 17), "no Stripe event id"),
    (_with(("id",), "pi_3QfR2kLkdIwHu7ix0Zb8aQ1T"), "no Stripe event id"),
    (_with(("id",), "evt_"), "no Stripe event id"),
    (_with(("id",), "evt_abc def"), "no Stripe event id"),
    (_without(("type",)), "no event type"),
    (_with(("type",), ""), "no event type"),
    (_with(("type",), ["payment_intent.succeeded"]), "no event type"),
    (_without(("created",)), "'created'"),
    (_with(("created",), "1764230404"), "'created'"),
    (_with(("created",), True), "'created'"),
    (_with(("created",), 1764230404.5), "'created'"),
    (_without(("data",)), "data.object"),
    (_with(("data",), [1]), "data.object"),
    (_without(("data", "object")), "data.object"),
    (_with(("data", "object"), "pi_3QfR2kLkdIwHu7ix0Zb8aQ1T"), "data.object"),
    (_with(("data", "object"), None), "data.object"),
    (_with(("object",), "v2.core.event"), "not 'event'"),
    (_with(("object",), "payment_intent"), "not 'event'"),
    (_with(("api_version",), 2024), "api_version"),
    (_with(("account",), {"id": "acct_1"}), "account"),
    (_with(("livemode",), "false"), "livemode"),
])
def test_parse_event_refuses_objects_that_are_not_events(event: dict[str, Any], says: str) -> None:
    with pytest.raises(NotAStripeEvent, match=says):
        parse_event(raw(event))


def test_a_bare_payment_intent_is_not_an_event() -> None:
    with pytest.raises(NotAStripeEvent):
        parse_event(raw(fixture("payment_intent_succeeded")["data"]["object"]))


def test_parse_event_tolerates_what_stripe_may_leave_out() -> None:
    event = fixture("refund_updated")
    for name in ("object", "livemode", "api_version", "pending_webhooks", "request"):
        del event[name]
    parsed = parse_event(raw(event))
    assert (parsed.api_version, parsed.account, parsed.livemode) == (None, None, False)


def test_not_a_stripe_event_is_a_value_error_that_does_not_echo_the_body() -> None:
    secret = "4242424242424242"
    with pytest.raises(ValueError) as caught:
        parse_event(json.dumps({"id": "nope", "card": secret}).encode())
    assert isinstance(caught.value, NotAStripeEvent)
    assert secret not in str(caught.value)


# ------------------------------------------------------------------ event_key


@pytest.mark.parametrize("name, key", [
    ("payment_intent_created", PI),
    ("payment_intent_succeeded", PI),
    ("payment_intent_payment_failed", PI),
    ("payment_intent_canceled", PI),
    ("charge_refunded", PI),
    ("charge_refunded_with_refunds", PI),
    ("refund_created", PI),
    ("refund_updated", PI),
    ("refund_failed", PI),
    ("charge_refund_updated", PI),
    ("customer_created", "cus_RYz8kq1mQpA2sT"),
])
def test_every_event_of_one_payment_has_the_payment_intents_key(name: str, key: str) -> None:
    assert event_key(parse_event(raw(fixture(name)))) == key


@pytest.mark.parametrize("name, key", [
    ("customer_subscription_updated", "sub_1QfZ2aLkdIwHu7ixq3mC8Ndv"),
    ("customer_subscription_updated_2025", "sub_1SkC9xLkdIwHu7ixZ5n2Qa7w"),
    ("invoice_payment_failed", "in_1QhC2zLkdIwHu7ixRnw2Fail"),
    ("invoice_paid_2025", "in_1SkC9yLkdIwHu7ixFirst001"),
])
def test_subscription_and_invoice_events_are_keyed_by_their_object(name: str, key: str) -> None:
    event = fixture(name)
    assert event_key(parse_event(raw(event))) == key
    # an invoice names its payment intent and charge: still keyed by the invoice
    event["data"]["object"].update(payment_intent=PI, charge=CH)
    assert event_key(parse_event(raw(event))) == key


@pytest.mark.parametrize("event_type", sorted(SUBSCRIPTION_TYPES))
def test_every_subscription_type_is_keyed_by_the_subscription(event_type: str) -> None:
    event = fixture("customer_subscription_updated")
    event["type"] = event_type
    assert event_key(parse_event(raw(event))) == "sub_1QfZ2aLkdIwHu7ixq3mC8Ndv"


@pytest.mark.parametrize("event_type", sorted(INVOICE_TYPES))
def test_every_invoice_type_is_keyed_by_the_invoice(event_type: str) -> None:
    event = fixture("invoice_payment_failed")
    event["type"] = event_type
    assert event_key(parse_event(raw(event))) == "in_1QhC2zLkdIwHu7ixRnw2Fail"


def test_a_charge_without_payment_intent_is_keyed_by_its_id() -> None:
    event = fixture("charge_refunded")
    event["data"]["object"]["payment_intent"] = None
    assert event_key(parse_event(raw(event))) == CH


@pytest.mark.parametrize("name", ["refund_created", "charge_refund_updated"])
def test_a_refund_without_payment_intent_is_keyed_by_its_charge_then_its_id(name: str) -> None:
    event = fixture(name)
    event["data"]["object"]["payment_intent"] = None
    assert event_key(parse_event(raw(event))) == CH
    event["data"]["object"]["charge"] = None
    assert event_key(parse_event(raw(event))) == event["data"]["object"]["id"]


def test_an_expanded_reference_is_keyed_by_its_id() -> None:
    event = fixture("refund_created")
    event["data"]["object"]["payment_intent"] = {"id": PI, "object": "payment_intent"}
    assert event_key(parse_event(raw(event))) == PI


def test_an_object_without_id_falls_back_to_the_event_id() -> None:
    event = fixture("customer_created")
    event["type"] = "balance.available"
    event["data"]["object"] = {"object": "balance", "available": [{"amount": 1, "currency": "eur"}]}
    assert event_key(parse_event(raw(event))) == event["id"]


# ------------------------------------------------------------- payment_fact


def test_consumed_types_are_those_the_payment_subscription_and_invoice_flows_read() -> None:
    assert PAYMENT_TYPES == {
        "payment_intent.created", "payment_intent.succeeded", "payment_intent.payment_failed",
        "payment_intent.canceled", "charge.refunded", "refund.created", "refund.updated",
        "refund.failed", "charge.refund.updated",
    }
    assert SUBSCRIPTION_TYPES == {
        "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
        "customer.subscription.paused", "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
    }
    assert INVOICE_TYPES == {
        "invoice.created", "invoice.finalized", "invoice.paid", "invoice.payment_succeeded",
        "invoice.payment_failed", "invoice.voided", "invoice.marked_uncollectible", "invoice.overdue",
        "invoice.updated",
    }
    assert CONSUMED_TYPES == PAYMENT_TYPES | SUBSCRIPTION_TYPES | INVOICE_TYPES


@pytest.mark.parametrize("event_type", sorted(SUBSCRIPTION_TYPES | INVOICE_TYPES))
def test_a_subscription_or_invoice_event_is_no_payment_fact(event_type: str) -> None:
    name = "invoice_payment_failed" if event_type.startswith("invoice.") else "customer_subscription_updated"
    event = fixture(name)
    event["type"] = event_type
    assert payment_fact(parse_event(raw(event))) is None


def test_payment_intent_created() -> None:
    assert fact_of(fixture("payment_intent_created")) == PaymentFact(
        kind="intent_created", stripe_event_id="evt_3QfR2kLkdIwHu7ix0a1b2c3d",
        occurred_at_ms=CREATED * 1000, payment_intent_id=PI, order_id=ORDER, user_id=USER,
        amount=4999, currency="EUR", status="requires_payment_method", error_code=None,
        error_message=None, payment_method=None,
    )


def test_payment_intent_succeeded() -> None:
    assert fact_of(fixture("payment_intent_succeeded")) == PaymentFact(
        kind="succeeded", stripe_event_id="evt_3QfR2kLkdIwHu7ix0e4f5g6h",
        occurred_at_ms=(CREATED + 4) * 1000, payment_intent_id=PI, order_id=ORDER, user_id=USER,
        amount=4999, currency="EUR", status="succeeded", error_code=None, error_message=None,
        payment_method="pm_1QfR2jLkdIwHu7ixHc4Vx3Lp",
    )


def test_payment_intent_payment_failed_takes_the_decline_code_and_the_failed_method() -> None:
    fact = fact_of(fixture("payment_intent_payment_failed"))
    assert fact == PaymentFact(
        kind="failed", stripe_event_id="evt_3QfR2kLkdIwHu7ix0i7j8k9l",
        occurred_at_ms=(CREATED + 4) * 1000, payment_intent_id=PI, order_id=ORDER, user_id=USER,
        amount=4999, currency="EUR", status="requires_payment_method",
        error_code="insufficient_funds", error_message="Your card has insufficient funds.",
        payment_method="pm_1QfR2jLkdIwHu7ixHc4Vx3Lp",
    )


def test_payment_failed_without_decline_code_takes_the_error_code() -> None:
    # localstripe's shape, and Stripe's for errors that are not issuer declines
    event = fixture("payment_intent_payment_failed")
    event["data"]["object"]["last_payment_error"] = {
        "charge": CH, "code": "payment_intent_authentication_failure",
        "message": "The provided PaymentMethod has failed authentication."}
    fact = fact_of(event)
    assert fact is not None
    assert (fact.error_code, fact.payment_method) == ("payment_intent_authentication_failure", None)


def test_payment_intent_canceled() -> None:
    fact = fact_of(fixture("payment_intent_canceled"))
    assert fact is not None
    assert (fact.kind, fact.status, fact.occurred_at_ms) == ("canceled", "canceled", (CREATED + 1800) * 1000)
    assert (fact.error_code, fact.error_message, fact.refunds) == (None, None, ())


def test_charge_refunded_in_current_api_versions_carries_no_refunds() -> None:
    assert fact_of(fixture("charge_refunded")) == PaymentFact(
        kind="refunded", stripe_event_id="evt_3QfR2kLkdIwHu7ix0q4r5s6t",
        occurred_at_ms=(CREATED + 600) * 1000, payment_intent_id=PI, order_id=ORDER, user_id=USER,
        amount=4999, currency="EUR", status="succeeded", error_code=None, error_message=None,
        payment_method="pm_1QfR2jLkdIwHu7ixHc4Vx3Lp", refunds=(),
    )


def test_charge_refunded_with_its_refund_list_carries_every_refund() -> None:
    fact = fact_of(fixture("charge_refunded_with_refunds"))
    assert fact is not None and fact.kind == "refunded" and fact.amount == 4999
    assert fact.refunds == (
        RefundFact("re_3QfR2kLkdIwHu7ix0zA3bC4d", 3499, "EUR", "succeeded", "DUPLICATE"),
        RefundFact("re_3QfR2kLkdIwHu7ix0uV1wX2y", 1500, "EUR", "succeeded", "ORDER_CANCELED"),
    )


def test_refund_created_is_one_refund_with_our_reason_and_order() -> None:
    assert fact_of(fixture("refund_created")) == PaymentFact(
        kind="refunded", stripe_event_id="evt_3QfR2kLkdIwHu7ix0y1z2a3b",
        occurred_at_ms=(CREATED + 600) * 1000, payment_intent_id=PI, order_id=ORDER, user_id=USER,
        amount=None, currency="EUR", status="succeeded", error_code=None, error_message=None,
        payment_method=None,
        refunds=(RefundFact("re_3QfR2kLkdIwHu7ix0uV1wX2y", 1500, "EUR", "succeeded", "ORDER_CANCELED"),),
    )


@pytest.mark.parametrize("name", ["refund_updated", "charge_refund_updated"])
def test_refund_updated_takes_stripes_reason_upper_cased(name: str) -> None:
    fact = fact_of(fixture(name))
    assert fact is not None
    assert (fact.kind, fact.order_id, fact.user_id) == ("refunded", None, None)
    assert fact.refunds == (RefundFact("re_3QfR2kLkdIwHu7ix0gH5iJ6k", 700, "EUR", "succeeded", "FRAUDULENT"),)


def test_refund_failed_keeps_the_failed_status() -> None:
    fact = fact_of(fixture("refund_failed"))
    assert fact is not None
    assert fact.status == "failed"
    assert fact.refunds == (RefundFact("re_3QfR2kLkdIwHu7ix0lM7nO8p", 1000, "EUR", "failed", "OTHER"),)


@pytest.mark.parametrize("metadata, stripe_reason, reason", [
    ({"paystream_reason": "USER_DELETED"}, "requested_by_customer", "USER_DELETED"),
    ({"paystream_reason": "user_deleted"}, "duplicate", "DUPLICATE"),
    ({"paystream_reason": "NOT_A_REASON"}, None, "OTHER"),
    ({}, "expired_uncaptured_charge", "EXPIRED_UNCAPTURED_CHARGE"),
    ({}, "requested_by_customer", "REQUESTED_BY_CUSTOMER"),
    ({}, "something_new", "OTHER"),
    ({}, None, "OTHER"),
    (None, "fraudulent", "FRAUDULENT"),
])
def test_refund_reason(metadata: dict[str, str] | None, stripe_reason: str | None, reason: str) -> None:
    event = fixture("refund_updated")
    event["data"]["object"].update(metadata=metadata, reason=stripe_reason)
    fact = fact_of(event)
    assert fact is not None and fact.refunds[0].reason == reason
    assert reason in refund_reasons()


def test_refund_reasons_are_the_contracts_symbols() -> None:
    assert refund_reasons() == {
        "REQUESTED_BY_CUSTOMER", "DUPLICATE", "FRAUDULENT", "EXPIRED_UNCAPTURED_CHARGE",
        "ORDER_CANCELED", "USER_DELETED", "SUBSCRIPTION_PRORATION", "OTHER"}


def test_a_null_refund_status_is_empty() -> None:
    event = fixture("refund_created")
    event["data"]["object"]["status"] = None
    fact = fact_of(event)
    assert fact is not None and fact.refunds[0].status == "" and fact.status is None


def test_types_we_do_not_consume_have_no_fact() -> None:
    assert fact_of(fixture("customer_created")) is None
    event = fixture("payment_intent_succeeded")
    event["type"] = "payment_intent.processing"
    assert fact_of(event) is None


def test_empty_metadata_values_are_none() -> None:
    event = fixture("payment_intent_succeeded")
    event["data"]["object"]["metadata"] = {"order_id": "", "other": "x"}
    fact = fact_of(event)
    assert fact is not None and (fact.order_id, fact.user_id) == (None, None)


def _broken(name: str, **changes: Any) -> dict[str, Any]:
    event = copy.deepcopy(fixture(name))
    event["data"]["object"].update(changes)
    return event


@pytest.mark.parametrize("event, says", [
    (_broken("payment_intent_succeeded", id=None), "without a PaymentIntent id"),
    (_broken("payment_intent_succeeded", id=7), "without a PaymentIntent id"),
    (_broken("payment_intent_succeeded", object="charge"), "not a payment_intent"),
    (_broken("payment_intent_succeeded", amount="49.99"), "amount is not an integer"),
    (_broken("payment_intent_succeeded", metadata=["order_id"]), "metadata is not an object"),
    (_broken("charge_refunded", payment_intent=None), "charge without a PaymentIntent"),
    (_broken("charge_refunded", object="refund"), "not a charge"),
    (_broken("charge_refunded_with_refunds", refunds={"object": "list", "data": ["re_1"]}),
     "refund is not an object"),
    (_broken("refund_created", payment_intent=None), "refund without a PaymentIntent"),
    (_broken("refund_created", object="charge"), "not a refund"),
    (_broken("refund_created", id=None), "refund without an id"),
    (_broken("refund_created", amount=None), "no integer amount"),
    (_broken("refund_created", amount=-5), "no integer amount"),
    (_broken("refund_created", currency=None), "no currency"),
])
def test_a_consumed_event_without_what_its_fact_needs_is_refused(event: dict[str, Any], says: str) -> None:
    parsed = parse_event(raw(event))  # a well-formed event ...
    with pytest.raises(NotAStripeEvent, match=says):
        payment_fact(parsed)  # ... whose object cannot make a fact


def test_an_amount_localstripe_echoes_as_digits_is_read_as_the_integer() -> None:
    """localstripe answers an amount changed by an update as text; Stripe never does."""
    fact = fact_of(_broken("payment_intent_succeeded", amount="4999"))
    assert fact is not None and fact.amount == 4999
