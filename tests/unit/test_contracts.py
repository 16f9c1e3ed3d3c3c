"""The Avro contracts in schemas/avro and their loader, schemas.contracts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import avro.schema
import fastavro
import pytest

from schemas import contracts
from schemas.contracts import (
    ENVELOPE_FIELDS,
    UnknownContract,
    contract_names,
    field_names,
    parsed_schema,
    payload_fields,
    schema_dict,
    schema_file,
    schema_text,
)

AVRO_DIR = Path(contracts.__file__).parent / "avro"

PAYMENT_SIDE = {
    "payment.completed", "payment.failed", "payment.refunded", "payment.intent.created",
    "subscription.created", "subscription.canceled", "subscription.updated",
    "subscription.expired", "subscription.payment_failed",
    "invoice.created", "invoice.paid", "invoice.overdue",
}
ORDER_SIDE = {
    "order.created", "order.updated", "order.canceled", "order.completed", "order.expired",
    "order.payment_pending", "order.refunded", "order.fulfilled",
}
INBOUND = {
    "wallet.balance_changed", "wallet.insufficient_funds", "wallet.credits_added",
    "subscription.usage_exceeded", "storage.quota_exceeded", "user.deleted", "user.upgraded",
}

TIMESTAMP = {"type": "long", "logicalType": "timestamp-millis"}
#: The envelope as ARCHITECTURE.md "Contracts" specifies it: name -> (type, default).
EXPECTED_ENVELOPE: list[tuple[str, Any, Any]] = [
    ("event_id", {"type": "string", "logicalType": "uuid"}, None),
    ("event_type", "string", None),
    ("occurred_at", TIMESTAMP, None),
    ("producer", "string", None),
    ("correlation_id", "string", None),
    ("causation_id", ["null", "string"], ("default", None)),
    ("schema_version", "int", ("default", 1)),
]

ALL = sorted(contract_names())
AVRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def walk_types(schema: Any):
    """Yield every named or complex type nested in a schema (records, enums, arrays, maps)."""
    if isinstance(schema, list):
        for branch in schema:
            yield from walk_types(branch)
    elif isinstance(schema, dict):
        yield schema
        kind = schema.get("type")
        if kind == "record":
            for field in schema["fields"]:
                yield from walk_types(field["type"])
        elif kind == "array":
            yield from walk_types(schema["items"])
        elif kind == "map":
            yield from walk_types(schema["values"])


def records(topic: str) -> list[dict[str, Any]]:
    return [t for t in walk_types(schema_dict(topic)) if t.get("type") == "record"]


def non_null(field_type: Any) -> Any:
    if isinstance(field_type, list):
        rest = [branch for branch in field_type if branch != "null"]
        return rest[0] if len(rest) == 1 else rest
    return field_type


def is_nullable(field_type: Any) -> bool:
    return isinstance(field_type, list) and "null" in field_type


def test_every_seed_event_has_exactly_one_contract() -> None:
    assert set(contract_names()) == PAYMENT_SIDE | ORDER_SIDE | INBOUND
    assert len(contract_names()) == 27
    assert contract_names() == sorted(contract_names())
    on_disk = sorted(p.name[: -len(".avsc")] for p in AVRO_DIR.glob("*.avsc"))
    assert contract_names() == on_disk


@pytest.mark.parametrize("topic", ALL)
def test_parses_with_fastavro_and_avro(topic: str) -> None:
    text = (AVRO_DIR / f"{topic}.avsc").read_text(encoding="utf-8")
    fastavro.schema.parse_schema(json.loads(text))
    parsed = avro.schema.parse(text)
    assert parsed.fullname == f"io.paystream.events.{schema_dict(topic)['name']}"


@pytest.mark.parametrize("topic", ALL)
def test_record_name_namespace_and_doc(topic: str) -> None:
    schema = schema_dict(topic)
    pascal = "".join(p[:1].upper() + p[1:] for p in re.split(r"[._]", topic))
    assert schema["type"] == "record"
    assert schema["name"] == f"{pascal}Event"
    assert schema["namespace"] == "io.paystream.events"
    assert len(schema["doc"].strip()) > 40, "the record doc says what the event means and when"


def test_pascal_case_examples() -> None:
    assert schema_dict("order.created")["name"] == "OrderCreatedEvent"
    assert schema_dict("payment.intent.created")["name"] == "PaymentIntentCreatedEvent"
    assert schema_dict("subscription.payment_failed")["name"] == "SubscriptionPaymentFailedEvent"


@pytest.mark.parametrize("topic", ALL)
def test_envelope_is_the_first_seven_fields(topic: str) -> None:
    fields = schema_dict(topic)["fields"]
    head = fields[: len(EXPECTED_ENVELOPE)]
    assert [f["name"] for f in head] == [name for name, _, _ in EXPECTED_ENVELOPE]
    for field, (name, field_type, default) in zip(head, EXPECTED_ENVELOPE, strict=True):
        assert field["type"] == field_type, name
        if default is None:
            assert "default" not in field, name
        else:
            assert field["default"] == default[1], name
    # identical, doc text included, in every file
    assert head == schema_dict("order.created")["fields"][: len(EXPECTED_ENVELOPE)]


def test_envelope_fields_are_derived_from_the_files() -> None:
    assert ENVELOPE_FIELDS == tuple(name for name, _, _ in EXPECTED_ENVELOPE)
    # the first payload field differs between files, so the common prefix stops there
    assert len({json.dumps(schema_dict(t)["fields"][7]) for t in ALL}) > 1


@pytest.mark.parametrize("topic", ALL)
def test_every_field_and_named_type_has_a_doc(topic: str) -> None:
    for record in records(topic):
        for field in record["fields"]:
            assert field.get("doc", "").strip(), f"{topic}: {record['name']}.{field['name']}"
    for named in walk_types(schema_dict(topic)):
        if named.get("type") in ("enum", "record"):
            assert named.get("doc", "").strip(), f"{topic}: {named['name']}"


@pytest.mark.parametrize("topic", ALL)
def test_names_are_valid_and_snake_case(topic: str) -> None:
    for record in records(topic):
        for field in record["fields"]:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", field["name"]), field["name"]


@pytest.mark.parametrize("topic", ALL)
def test_payload_carries_the_aggregate_owner(topic: str) -> None:
    assert "user_id" in payload_fields(topic)
    assert schema_dict(topic)["fields"][field_names(topic).index("user_id")]["type"] == "string"


@pytest.mark.parametrize("topic", ALL)
def test_money_is_minor_units_with_a_currency(topic: str) -> None:
    top = {f["name"]: f for f in schema_dict(topic)["fields"]}
    money = [
        field
        for record in records(topic)
        for field in record["fields"]
        if field["name"].endswith("amount")
    ]
    for field in money:
        assert non_null(field["type"]) == "long", f"{topic}: {field['name']} must be long"
        # items' amounts use their order's currency
        assert "currency" in top, f"{topic}: {field['name']} without a currency"
        currency = top["currency"]
        assert non_null(currency["type"]) == "string"
        assert "ISO-4217" in currency["doc"] and "upper-case" in currency["doc"]
    if "currency" in top:
        assert money, f"{topic}: a currency without an amount"
    # any required amount at the top level makes the currency required
    required_money = [
        f for f in top.values() if f["name"].endswith("amount") and not is_nullable(f["type"])
    ]
    if required_money:
        assert not is_nullable(top["currency"]["type"]), topic


@pytest.mark.parametrize("topic", ALL)
def test_nullable_fields_are_optional_with_null_default(topic: str) -> None:
    for record in records(topic):
        for field in record["fields"]:
            if is_nullable(field["type"]):
                assert field["type"][0] == "null", f"{topic}: {field['name']}: null first"
                assert "default" in field and field["default"] is None, (
                    f"{topic}: {field['name']} is nullable but does not default to null"
                )


@pytest.mark.parametrize("topic", ALL)
def test_timestamps_are_timestamp_millis(topic: str) -> None:
    for record in records(topic):
        for field in record["fields"]:
            name = field["name"]
            if name.endswith(("_at", "_date", "_end")):
                assert non_null(field["type"]) == TIMESTAMP, f"{topic}: {name}"


@pytest.mark.parametrize("topic", ALL)
def test_ids_are_strings(topic: str) -> None:
    for record in records(topic):
        for field in record["fields"]:
            if field["name"].endswith("_id"):
                assert non_null(field["type"]) in ("string", {"type": "string",
                                                             "logicalType": "uuid"})


@pytest.mark.parametrize("topic", ALL)
def test_enums_are_valid_and_forward_compatible(topic: str) -> None:
    for named in walk_types(schema_dict(topic)):
        if named.get("type") != "enum":
            continue
        symbols = named["symbols"]
        assert all(AVRO_NAME.match(s) and s == s.upper() for s in symbols), symbols
        assert len(set(symbols)) == len(symbols)
        assert named.get("default") in symbols, f"{topic}: {named['name']} needs a default"


def test_specific_shapes_the_consumers_rely_on() -> None:
    def field(topic: str, name: str) -> dict[str, Any]:
        return next(f for f in schema_dict(topic)["fields"] if f["name"] == name)

    order_type = field("order.created", "order_type")["type"]
    assert order_type["symbols"][:4] == ["ONE_TIME", "SUBSCRIPTION", "WALLET_TOPUP",
                                         "STORAGE_UPGRADE"]
    items = field("order.created", "items")["type"]
    assert items["type"] == "array"
    item_fields = {f["name"]: f["type"] for f in items["items"]["fields"]}
    assert item_fields == {
        "product_id": "string",
        "quantity": "int",
        "unit_amount": "long",
        "description": ["null", "string"],
    }
    status = field("subscription.created", "status")["type"]
    assert {"INCOMPLETE", "INCOMPLETE_EXPIRED", "TRIALING", "ACTIVE", "PAST_DUE", "CANCELED",
            "UNPAID", "PAUSED"} <= set(status["symbols"])
    assert field("order.updated", "changes")["type"] == {"type": "map", "values": "string"}
    assert field("order.updated", "updated_fields")["type"] == {"type": "array",
                                                               "items": "string"}
    for topic in ("payment.completed", "payment.failed", "payment.intent.created",
                  "payment.refunded"):
        assert field(topic, "order_id")["type"] == ["null", "string"], topic
    assert field("payment.failed", "error_code")["type"] == ["null", "string"]
    assert field("payment.failed", "error_message")["type"] == "string"
    assert {"reason", "refund_amount", "currency"} <= set(payload_fields("order.canceled"))
    assert {"amount", "currency"} <= set(payload_fields("order.payment_pending"))
    assert field("order.expired", "expired_at")["type"] == TIMESTAMP
    assert "fulfillment_details" in payload_fields("order.fulfilled")
    assert {"old_plan", "new_plan", "user_id"} <= set(payload_fields("subscription.updated"))
    assert field("invoice.overdue", "days_overdue")["type"] == "int"
    assert field("invoice.overdue", "due_date")["type"] == TIMESTAMP
    assert field("subscription.expired", "expiration_date")["type"] == TIMESTAMP
    assert field("subscription.payment_failed", "attempt_count")["type"] == "int"


def test_seed_data_fields_are_all_present() -> None:
    seed = {
        "payment.completed": "payment_intent_id user_id amount currency",
        "payment.failed": "payment_intent_id user_id amount",
        "subscription.created": "subscription_id user_id plan_id status",
        "subscription.canceled": "subscription_id user_id reason",
        "payment.refunded": "payment_id refund_id amount reason",
        "payment.intent.created": "payment_intent_id user_id amount",
        "subscription.updated": "subscription_id old_plan new_plan",
        "subscription.expired": "subscription_id user_id expiration_date",
        "subscription.payment_failed": "subscription_id user_id attempt_count",
        "invoice.created": "invoice_id user_id amount due_date",
        "invoice.paid": "invoice_id payment_id amount",
        "invoice.overdue": "invoice_id user_id days_overdue",
        "order.created": "order_id user_id order_type total_amount items",
        "order.canceled": "order_id user_id reason refund_amount",
        "order.completed": "order_id user_id total_amount payment_id",
        "order.updated": "order_id changes updated_fields",
        "order.expired": "order_id user_id expired_at",
        "order.payment_pending": "order_id payment_intent_id amount",
        "order.refunded": "order_id refund_id amount",
        "order.fulfilled": "order_id fulfillment_details",
    }
    for topic, names in seed.items():
        missing = set(names.split()) - set(payload_fields(topic))
        assert not missing, f"{topic} lacks {missing}"
    assert {"error_code", "error_message"} <= set(payload_fields("payment.failed"))


@pytest.mark.parametrize("topic", ALL)
def test_schema_text_is_compact_json_of_the_file(topic: str) -> None:
    text = schema_text(topic)
    on_disk = json.loads((AVRO_DIR / f"{topic}.avsc").read_text(encoding="utf-8"))
    assert json.loads(text) == on_disk == schema_dict(topic)
    assert text == json.dumps(on_disk, separators=(",", ":"), ensure_ascii=False)
    assert text == schema_text(topic)  # deterministic
    # docs and defaults survive (Parsing Canonical Form would drop them)
    assert '"doc":' in text and '"default":null' in text


def test_schema_dict_is_a_private_copy() -> None:
    mine = schema_dict("order.created")
    mine["fields"].clear()
    mine["name"] = "Tampered"
    assert schema_dict("order.created")["name"] == "OrderCreatedEvent"
    assert len(schema_dict("order.created")["fields"]) > 7
    assert "Tampered" not in schema_text("order.created")


def test_parsed_schema_is_cached_and_usable() -> None:
    parsed = parsed_schema("order.created")
    assert parsed is parsed_schema("order.created")
    assert parsed["name"] == "io.paystream.events.OrderCreatedEvent"


def test_schema_file_paths() -> None:
    assert schema_file("order.created") == "schemas/avro/order.created.avsc"
    repo_root = AVRO_DIR.parent.parent
    for topic in ALL:
        assert (repo_root / schema_file(topic)).is_file()


@pytest.mark.parametrize(
    "call", [schema_dict, schema_text, parsed_schema, field_names, payload_fields, schema_file]
)
def test_unknown_contract(call: Any) -> None:
    with pytest.raises(UnknownContract) as info:
        call("order.crated")
    assert isinstance(info.value, LookupError) and isinstance(info.value, KeyError)
    assert "'order.crated'" in str(info.value)
    assert "order.created" in str(info.value)  # the likely typo is suggested
    assert info.value.topic == "order.crated"


def test_a_path_is_not_a_topic() -> None:
    with pytest.raises(UnknownContract):
        schema_dict("../contracts")


def test_payload_fills_defaults_and_refuses_what_the_contract_lacks() -> None:
    from schemas.contracts import enum_symbols, payload

    built = payload("payment.failed", payment_intent_id="pi_1", user_id="u", amount=5,
                    currency="EUR", error_message="declined")
    assert built["order_id"] is None and built["error_code"] is None  # the contract's defaults
    assert list(built) == [n for n in field_names("payment.failed")[7:]]
    with pytest.raises(RuntimeError, match="no field"):
        payload("payment.failed", nope=1)
    with pytest.raises(RuntimeError, match="required field 'user_id'"):
        payload("payment.failed", payment_intent_id="pi_1")
    assert "REQUESTED_BY_CUSTOMER" in enum_symbols("payment.refunded", "reason")
    with pytest.raises(LookupError):
        enum_symbols("payment.refunded", "amount")
