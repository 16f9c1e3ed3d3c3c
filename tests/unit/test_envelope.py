"""Building events with streams.envelope.new_event."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer

from schemas.contracts import (
    ENVELOPE_FIELDS,
    UnknownContract,
    contract_names,
    field_names,
    parsed_schema,
    payload_fields,
    schema_dict,
)
from streams.envelope import InvalidEvent, new_event

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def order_created_payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "order_id": "ord_1",
        "user_id": "usr_1",
        "order_type": "WALLET_TOPUP",
        "total_amount": 2500,
        "currency": "EUR",
        "items": [
            {"product_id": "credits-10", "quantity": 2, "unit_amount": 1000},
            {"product_id": "fee", "quantity": 1, "unit_amount": 500, "description": "fee"},
        ],
    }
    payload.update(overrides)
    return payload


def sample(schema: Any, name: str) -> Any:
    """A valid, non-default value for a field type (the first non-null union branch)."""
    if isinstance(schema, list):
        return sample(next(branch for branch in schema if branch != "null"), name)
    if isinstance(schema, dict):
        kind = schema["type"]
        if schema.get("logicalType") == "timestamp-millis":
            return NOW_MS - 1000
        if kind == "enum":
            return schema["symbols"][0]
        if kind == "array":
            return [sample(schema["items"], name)]
        if kind == "map":
            return {"key": sample(schema["values"], name)}
        if kind == "record":
            return {f["name"]: sample(f["type"], f["name"]) for f in schema["fields"]}
        return sample(kind, name)
    if name == "currency":
        return "EUR"
    return {"string": f"{name}-1", "int": 3, "long": 1234, "boolean": True,
            "double": 1.5, "float": 1.5}[schema]


def full_payload(topic: str) -> dict[str, Any]:
    fields = schema_dict(topic)["fields"][len(ENVELOPE_FIELDS):]
    return {f["name"]: sample(f["type"], f["name"]) for f in fields}


def round_trip(topic: str, event: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    schemaless_writer(buffer, parsed_schema(topic), event)
    buffer.seek(0)
    return schemaless_reader(buffer, parsed_schema(topic), None)


def as_decoded(event: dict[str, Any], topic: str) -> dict[str, Any]:
    """What fastavro's reader returns for ``event``: logical types become Python objects."""
    decoded = dict(event)
    decoded["event_id"] = uuid.UUID(event["event_id"])
    for field in schema_dict(topic)["fields"]:
        field_type = field["type"]
        if isinstance(field_type, list):
            field_type = next(b for b in field_type if b != "null")
        value = decoded[field["name"]]
        if (isinstance(field_type, dict) and field_type.get("logicalType") == "timestamp-millis"
                and value is not None):
            decoded[field["name"]] = datetime.fromtimestamp(value / 1000, tz=UTC)
    return decoded


def test_envelope_is_filled() -> None:
    event = new_event("order.created", order_created_payload(), producer="order_service",
                      now_ms=NOW_MS)
    assert list(event) == field_names("order.created")
    assert str(uuid.UUID(event["event_id"])) == event["event_id"]
    assert uuid.UUID(event["event_id"]).version == 4
    assert event["event_type"] == "order.created"
    assert event["occurred_at"] == NOW_MS
    assert event["producer"] == "order_service"
    assert uuid.UUID(event["correlation_id"]).version == 4
    assert event["correlation_id"] != event["event_id"]
    assert event["causation_id"] is None
    assert event["schema_version"] == 1
    given = order_created_payload()
    assert {k: event[k] for k in given} == given
    assert all(event[k] is None for k in payload_fields("order.created") if k not in given)


def test_each_event_gets_its_own_id_and_flow() -> None:
    a = new_event("order.created", order_created_payload(), producer="order_service")
    b = new_event("order.created", order_created_payload(), producer="order_service")
    assert a["event_id"] != b["event_id"]
    assert a["correlation_id"] != b["correlation_id"]


def test_occurred_at_defaults_to_now() -> None:
    before = int(datetime.now(UTC).timestamp() * 1000)
    event = new_event("order.created", order_created_payload(), producer="order_service")
    after = int(datetime.now(UTC).timestamp() * 1000)
    assert before <= event["occurred_at"] <= after


def test_cause_sets_causation_and_correlation() -> None:
    created = new_event("order.created", order_created_payload(), producer="order_service",
                        correlation_id="flow-1")
    assert created["correlation_id"] == "flow-1"
    pending = new_event(
        "order.payment_pending",
        {"order_id": "ord_1", "user_id": "usr_1", "payment_intent_id": "pi_1",
         "amount": 2500, "currency": "EUR"},
        producer="order_service",
        cause=created,
    )
    assert pending["causation_id"] == created["event_id"]
    assert pending["correlation_id"] == "flow-1"
    # the same correlation id given explicitly is fine, a different one is a bug
    again = new_event("order.expired", {"order_id": "ord_1", "user_id": "usr_1",
                                        "expired_at": NOW_MS},
                      producer="order_service", cause=pending, correlation_id="flow-1")
    assert again["correlation_id"] == "flow-1"
    with pytest.raises(InvalidEvent, match="correlation_id"):
        new_event("order.expired", {"order_id": "ord_1", "user_id": "usr_1",
                                    "expired_at": NOW_MS},
                  producer="order_service", cause=pending, correlation_id="flow-2")
    with pytest.raises(InvalidEvent, match="cause has no event_id"):
        new_event("order.expired", {"order_id": "ord_1", "user_id": "usr_1",
                                    "expired_at": NOW_MS},
                  producer="order_service", cause={"correlation_id": "flow-1"})


def test_given_event_id_is_kept_in_canonical_form() -> None:
    stable = uuid.uuid5(uuid.NAMESPACE_URL, "stripe:evt_123")
    event = new_event("order.created", order_created_payload(), producer="order_service",
                      event_id=str(stable).upper())
    assert event["event_id"] == str(stable)
    assert new_event("order.created", order_created_payload(), producer="order_service",
                     event_id=stable)["event_id"] == str(stable)
    assert new_event("order.created", order_created_payload(), producer="order_service",
                     event_id=str(stable))["event_id"] == str(stable)
    with pytest.raises(InvalidEvent, match="event_id") as info:
        new_event("order.created", order_created_payload(), producer="order_service",
                  event_id="evt_123")
    assert info.value.fields == ("event_id",)


def test_optional_fields_default_to_null() -> None:
    event = new_event(
        "payment.completed",
        {"payment_intent_id": "pi_1", "user_id": "usr_1", "amount": 990, "currency": "USD"},
        producer="payment_service",
    )
    assert event["order_id"] is None


@pytest.mark.parametrize("topic", contract_names())
def test_round_trip_through_avro_binary(topic: str) -> None:
    payload = full_payload(topic)
    event = new_event(topic, payload, producer="test_service", now_ms=NOW_MS)
    assert {k: event[k] for k in payload} == payload
    assert round_trip(topic, event) == as_decoded(event, topic)


@pytest.mark.parametrize("topic", contract_names())
def test_minimal_payload_round_trips(topic: str) -> None:
    required = [f for f in schema_dict(topic)["fields"][len(ENVELOPE_FIELDS):]
                if "default" not in f]
    payload = {f["name"]: sample(f["type"], f["name"]) for f in required}
    event = new_event(topic, payload, producer="test_service", now_ms=NOW_MS)
    optional = set(payload_fields(topic)) - set(payload)
    assert all(event[name] is None for name in optional)
    assert round_trip(topic, event) == as_decoded(event, topic)


def test_wrong_type_names_topic_and_field() -> None:
    with pytest.raises(InvalidEvent) as info:
        new_event("order.created", order_created_payload(total_amount="25.00"),
                  producer="order_service")
    message = str(info.value)
    assert "order.created" in message and "total_amount" in message and "long" in message
    assert info.value.fields == ("total_amount",)
    assert info.value.topic == "order.created"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("topic", "payload", "field"),
    [
        ("order.created", order_created_payload(order_type="GIFT"), "order_type"),
        ("order.created", order_created_payload(total_amount=True), "total_amount"),
        ("order.created", order_created_payload(user_id=None), "user_id"),
        ("order.created", order_created_payload(items=[{"product_id": "p", "quantity": "2",
                                                        "unit_amount": 1}]),
         "OrderItem.quantity"),
        ("payment.failed", {"payment_intent_id": "pi", "user_id": "u", "amount": 1,
                            "currency": "EUR", "error_message": "no", "error_code": 51},
         "error_code"),
        ("order.updated", {"order_id": "o", "user_id": "u", "changes": {"total_amount": 1},
                           "updated_fields": ["total_amount"]}, "changes"),
    ],
)
def test_invalid_values_are_named(topic: str, payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        new_event(topic, payload, producer="test_service")
    assert info.value.fields == (field,)
    assert topic in str(info.value) and field in str(info.value)


def test_missing_required_fields_are_named() -> None:
    payload = order_created_payload()
    del payload["user_id"], payload["currency"]
    with pytest.raises(InvalidEvent) as info:
        new_event("order.created", payload, producer="order_service")
    assert info.value.fields == ("user_id", "currency")
    assert "missing" in str(info.value) and "user_id" in str(info.value)


def test_unknown_fields_are_named() -> None:
    with pytest.raises(InvalidEvent) as info:
        new_event("order.created", order_created_payload(coupon="X", amount=1),
                  producer="order_service")
    assert info.value.fields == ("amount", "coupon")
    assert "unknown" in str(info.value) and "coupon" in str(info.value)


def test_envelope_fields_are_not_accepted_in_the_payload() -> None:
    with pytest.raises(InvalidEvent) as info:
        new_event("order.created", order_created_payload(event_id=str(uuid.uuid4())),
                  producer="order_service")
    assert info.value.fields == ("event_id",)


def test_producer_is_required() -> None:
    with pytest.raises(InvalidEvent, match="producer"):
        new_event("order.created", order_created_payload(), producer="")


def test_payload_must_be_a_mapping() -> None:
    with pytest.raises(InvalidEvent, match="mapping"):
        new_event("order.created", [("order_id", "o")], producer="order_service")  # type: ignore[arg-type]


def test_unknown_topic() -> None:
    with pytest.raises(UnknownContract):
        new_event("order.crated", order_created_payload(), producer="order_service")


def test_fulfillment_details_round_trip() -> None:
    fulfilled = {"order_id": "o", "user_id": "u", "order_type": "STORAGE_UPGRADE",
                 "fulfillment_details": {"quota_bytes": "1073741824"}}
    event = new_event("order.fulfilled", fulfilled, producer="order_service")
    assert round_trip("order.fulfilled", event)["fulfillment_details"] == {
        "quota_bytes": "1073741824"}
