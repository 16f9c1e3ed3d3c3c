"""The sinks without a broker: each event's call (method, arguments that fit the spec, key = event id),
the refusal and give-up decisions, and the patience of :class:`connectors.sinks.PatientService`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agents import DOMAINS
from connectors.clients.base import ServiceUnavailable
from connectors.clients.spec import endpoint
from connectors.sinks import SINK_DOMAINS, PatientService, sink_settings
from streams.envelope import new_event
from streams.kernel import CallRefused
from streams.settings import Settings
from tables import billing_sink, notification_sink
from tables.aggregate import NOOP, Call, Outcome
from tables.sinks import UNAVAILABLE, GaveUp, SinkRefused, iso_date

ORDER, USER, INTENT = "o-1", "u-demo", "pi_1"
DUE = 1_767_225_600_000  # 2026-01-01T00:00:00Z

PAYLOADS: dict[str, dict[str, Any]] = {
    "order.completed": {"order_id": ORDER, "user_id": USER, "order_type": "ONE_TIME", "total_amount": 2500,
                        "currency": "EUR", "payment_id": INTENT},
    "order.canceled": {"order_id": ORDER, "user_id": USER, "reason": "USER_REQUESTED", "refund_amount": 0,
                       "currency": "EUR"},
    "order.expired": {"order_id": ORDER, "user_id": USER, "payment_intent_id": INTENT, "expired_at": DUE},
    "order.fulfilled": {"order_id": ORDER, "user_id": USER, "order_type": "ONE_TIME",
                        "fulfillment_details": {}},
    "payment.completed": {"payment_intent_id": INTENT, "order_id": ORDER, "user_id": USER, "amount": 2500,
                          "currency": "EUR"},
    "payment.refunded": {"payment_id": INTENT, "refund_id": "re_1", "order_id": ORDER, "user_id": USER,
                         "amount": 700, "currency": "EUR", "reason": "REQUESTED_BY_CUSTOMER"},
    "invoice.created": {"invoice_id": "in_1", "user_id": USER, "subscription_id": "sub_1", "amount": 999,
                        "currency": "EUR", "due_date": DUE},
    "invoice.paid": {"invoice_id": "in_1", "user_id": USER, "payment_id": INTENT, "subscription_id": "sub_1",
                     "amount": 999, "currency": "EUR"},
    "invoice.overdue": {"invoice_id": "in_1", "user_id": USER, "days_overdue": 3, "due_date": DUE,
                        "amount": 999, "currency": "EUR"},
}


def event(topic: str, **changes: Any) -> dict[str, Any]:
    return new_event(topic, {**PAYLOADS[topic], **changes}, producer="test_service")


def only_call(flow: Any, topic: str, message: dict[str, Any]) -> Call:
    (call,) = flow.step(topic, message).calls(None, message)
    return call


EXPECTED_NOTIFICATIONS = {
    "order.completed": ("send_order_confirmation", {"total_amount": 2500, "currency": "EUR",
                                                    "order_id": ORDER}),
    "order.canceled": ("send_order_status", {"order_status": "CANCELED", "reason": "USER_REQUESTED"}),
    "order.expired": ("send_order_status", {"order_status": "EXPIRED", "reason": None}),
    "order.fulfilled": ("send_order_status", {"order_status": "FULFILLED"}),
    "payment.completed": ("send_payment_receipt", {"payment_intent_id": INTENT, "amount": 2500,
                                                   "order_id": ORDER}),
    "payment.refunded": ("send_order_status", {"order_status": "REFUNDED",
                                               "reason": "REQUESTED_BY_CUSTOMER: 700 EUR"}),
    "invoice.created": ("send_invoice", {"invoice_status": "created", "due_date": "2026-01-01T00:00:00Z",
                                         "amount": 999}),
    "invoice.paid": ("send_invoice", {"invoice_status": "paid", "due_date": None}),
    "invoice.overdue": ("send_invoice", {"invoice_status": "overdue", "due_date": "2026-01-01T00:00:00Z"}),
}

EXPECTED_BILLING = {
    "payment.completed": ("create_billing_record", {"kind": "payment", "amount": 2500,
                                                    "payment_intent_id": INTENT}),
    "payment.refunded": ("create_billing_record", {"kind": "refund", "amount": 700,
                                                   "payment_intent_id": INTENT}),
    "order.completed": ("create_order_billing_record", {"order_id": ORDER, "amount": 2500,
                                                        "order_status": "COMPLETED",
                                                        "payment_intent_id": INTENT}),
    "invoice.created": ("create_billing_record", {"kind": "invoice", "invoice_id": "in_1", "amount": 999}),
    "invoice.paid": ("create_billing_record", {"kind": "payment", "invoice_id": "in_1",
                                               "payment_intent_id": INTENT}),
}


@pytest.mark.parametrize(("flow", "service", "expected"), [
    (notification_sink.NOTIFICATIONS, "notification", EXPECTED_NOTIFICATIONS),
    (billing_sink.BILLING, "billing", EXPECTED_BILLING),
], ids=["notifications", "billing"])
def test_each_event_is_one_call_keyed_by_its_event_id_with_arguments_the_spec_accepts(
        flow: Any, service: str, expected: dict[str, Any]) -> None:
    assert set(flow.topics) == set(expected)
    for topic, (operation, fields) in expected.items():
        message = event(topic)
        call = only_call(flow, topic, message)
        assert (call.service, call.operation) == (service, operation), topic
        assert call.idempotency_key == message["event_id"]
        assert call.args["source_event_id"] == message["event_id"]
        assert call.args["user_id"] == USER
        assert {k: call.args.get(k) for k in fields} == fields, topic
        spec = endpoint(service, operation)
        assert spec.needs_key
        request = spec.request.from_json(call.args, where=topic)  # SpecError if it does not fit
        assert request.to_json() == {**{k: None for k in spec.request_fields}, **call.args}


def test_the_same_event_twice_makes_the_same_call() -> None:
    message = event("payment.completed")
    flow = notification_sink.NOTIFICATIONS
    again = dict(message)
    assert only_call(flow, "payment.completed", again) == only_call(flow, "payment.completed", message)


def test_two_events_of_one_order_are_two_keys() -> None:
    flow = notification_sink.NOTIFICATIONS
    first, second = event("order.canceled"), event("order.canceled")
    assert only_call(flow, "order.canceled", first).idempotency_key != \
        only_call(flow, "order.canceled", second).idempotency_key


def test_a_refund_of_no_order_is_not_notified_but_is_billed() -> None:
    message = event("payment.refunded", order_id=None)
    step = notification_sink.NOTIFICATIONS.step("payment.refunded", message)
    assert step.calls(None, message) == []
    assert step.decide(None, message, 0, {}) == NOOP
    call = only_call(billing_sink.BILLING, "payment.refunded", message)
    assert call.args["kind"] == "refund" and "order" not in call.args["description"]


def test_an_accepted_call_changes_nothing_and_emits_nothing() -> None:
    message = event("order.completed")
    step = notification_sink.NOTIFICATIONS.step("order.completed", message)
    outcomes = {message["event_id"]: Outcome(value={"notification_id": "ntf_1"})}
    assert step.decide(None, message, 0, outcomes) == NOOP


def test_a_refused_call_is_a_refusal_with_the_services_code() -> None:
    message = event("order.completed")
    step = billing_sink.BILLING.step("order.completed", message)
    with pytest.raises(SinkRefused) as refused:
        refusal = Outcome(refused="HTTP 422", code="invalid_amount")
        step.decide(None, message, 0, {message["event_id"]: refusal})
    assert refused.value.code == "invalid_amount" and not isinstance(refused.value, GaveUp)
    assert message["event_id"] in str(refused.value)


def test_a_call_given_up_is_a_gave_up_refusal() -> None:
    message = event("invoice.overdue")
    step = notification_sink.NOTIFICATIONS.step("invoice.overdue", message)
    with pytest.raises(GaveUp) as gave_up:
        step.decide(None, message, 0, {message["event_id"]: Outcome(refused="down", code=UNAVAILABLE)})
    assert gave_up.value.code == UNAVAILABLE


def test_iso_date() -> None:
    assert iso_date(DUE) == "2026-01-01T00:00:00Z"
    assert iso_date(None) is None


# ----------------------------------------------------------------------
# PatientService


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """A kernel service that fails as told, then answers."""

    def __init__(self) -> None:
        self.failures: list[BaseException] = []
        self.calls: list[str] = []

    async def __call__(self, call: Call) -> Any:
        self.calls.append(call.idempotency_key)
        if self.failures:
            raise self.failures.pop(0)
        return {"ok": call.idempotency_key}


def down() -> ServiceUnavailable:
    return ServiceUnavailable("down", service="notification", method="send_invoice", code="connection_error")


def call(key: str) -> Call:
    return Call("notification", "send_invoice", {}, key)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_patient_service_lets_transient_failures_through_until_the_patience_is_spent() -> None:
    clock, flaky = Clock(), Flaky()
    patient = PatientService(flaky, 60.0, clock)
    flaky.failures = [down(), down(), down()]
    with pytest.raises(ServiceUnavailable):
        run(patient(call("k")))
    clock.now += 59.9
    with pytest.raises(ServiceUnavailable):
        run(patient(call("k")))
    clock.now += 0.1
    with pytest.raises(CallRefused) as refused:
        run(patient(call("k")))
    assert refused.value.code == UNAVAILABLE
    assert "k" not in patient.failing
    assert run(patient(call("k"))) == {"ok": "k"}  # a replay later is called again


def test_patient_service_counts_each_key_from_its_own_first_failure_and_forgets_it_on_success() -> None:
    clock, flaky = Clock(), Flaky()
    patient = PatientService(flaky, 60.0, clock)
    flaky.failures = [down()]
    with pytest.raises(ServiceUnavailable):
        run(patient(call("a")))
    clock.now += 50
    flaky.failures = [down()]
    with pytest.raises(ServiceUnavailable):
        run(patient(call("b")))
    assert run(patient(call("a"))) == {"ok": "a"}
    assert patient.failing == {"b": 1050.0}
    clock.now += 50  # a: 100 s after its first failure, but it succeeded in between
    flaky.failures = [down()]
    with pytest.raises(ServiceUnavailable):
        run(patient(call("a")))
    assert patient.failing == {"b": 1050.0, "a": 1100.0}


def test_patient_service_passes_refusals_and_other_errors_unchanged() -> None:
    clock, flaky = Clock(), Flaky()
    patient = PatientService(flaky, 0.0, clock)
    flaky.failures = [CallRefused("no", code="invalid_amount"), KeyError("bug")]
    with pytest.raises(CallRefused) as refused:
        run(patient(call("k")))
    assert refused.value.code == "invalid_amount"
    with pytest.raises(KeyError):
        run(patient(call("k")))
    assert patient.failing == {}


def test_patient_service_without_patience_retries_for_ever() -> None:
    clock, flaky = Clock(), Flaky()
    patient = PatientService(flaky, None, clock)
    for _ in range(3):
        flaky.failures = [down()]
        with pytest.raises(ServiceUnavailable):
            run(patient(call("k")))
        clock.now += 10**6
    assert run(patient(call("k"))) == {"ok": "k"}


def test_patient_service_refuses_a_negative_patience() -> None:
    with pytest.raises(ValueError):
        PatientService(Flaky(), -1.0)


def test_sink_settings_are_a_group_of_their_own() -> None:
    base = Settings.from_env(env={}, app_id="paystream", worker_web_port=6066)
    chosen = sink_settings(base)
    assert (chosen.app_id, chosen.domains, chosen.worker_web_port) == (
        "paystream-sinks", "notifications,billing", 6067)
    assert chosen.group_instance_id != base.group_instance_id
    assert sink_settings(base, "billing").domains == "billing"
    for wrong in ("orders", "", "billing,payments"):
        with pytest.raises(ValueError):
            sink_settings(base, wrong)
    assert "notifications" not in base.domain_names and "billing" not in base.domain_names
    assert set(SINK_DOMAINS) <= set(DOMAINS)
