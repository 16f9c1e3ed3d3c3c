"""The topic catalog, streams.catalog, against the contracts and the architecture."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from schemas.contracts import contract_names, schema_dict
from streams import catalog
from streams.admin import TopicSettings
from streams.catalog import (
    CATALOG,
    EVENT_PARTITIONS,
    EVENT_RETENTION_MS,
    TopicSpec,
    UnknownTopic,
    print_topics,
    record_key,
    render_markdown_table,
    topic_settings,
    topic_spec,
    value_subject,
)

SEVEN_DAYS_MS = 604_800_000


def field_types(topic: str) -> dict[str, object]:
    return {f["name"]: f["type"] for f in schema_dict(topic)["fields"]}


def test_catalog_and_contracts_name_the_same_topics() -> None:
    assert set(CATALOG) == set(contract_names())
    assert len(CATALOG) == 27


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_key_fields_exist_in_the_schema_as_strings(name: str) -> None:
    spec = CATALOG[name]
    assert spec.name == name
    types = field_types(name)
    for field in spec.key_fields:
        assert field in types, f"{name}: key field {field} not in {spec.schema_file}"
        assert types[field] in ("string", ["null", "string"]), f"{name}: {field}"
    # the last resort must always be there, so a valid event always has a key
    assert types[spec.key_fields[-1]] == "string", f"{name}: last key field must be required"


def test_keys_follow_the_architecture() -> None:
    def keys(name: str) -> tuple[str, ...]:
        return CATALOG[name].key_fields

    for name in CATALOG:
        if name.startswith("order."):
            assert keys(name) == ("order_id",), name
        elif name.startswith("subscription."):
            assert keys(name) == ("subscription_id",), name
        elif name.startswith("invoice."):
            assert keys(name) == ("invoice_id",), name
        elif name.startswith(("wallet.", "user.", "storage.")):
            assert keys(name) == ("user_id",), name
    assert keys("payment.completed") == ("order_id", "payment_intent_id")
    assert keys("payment.failed") == ("order_id", "payment_intent_id")
    assert keys("payment.intent.created") == ("order_id", "payment_intent_id")
    assert keys("payment.refunded") == ("order_id", "payment_id")
    assert keys("subscription.usage_exceeded") == ("subscription_id",)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_event_topic_settings(name: str) -> None:
    spec = CATALOG[name]
    assert spec.partitions == EVENT_PARTITIONS == 4
    assert spec.cleanup_policy == "delete"
    assert spec.retention_ms == EVENT_RETENTION_MS == SEVEN_DAYS_MS
    assert spec.value_subject == f"{name}-value" == value_subject(name)
    assert spec.schema_file == f"schemas/avro/{name}.avsc"
    assert spec.description and spec.description.endswith(".")
    assert spec.description in " ".join(schema_dict(name)["doc"].split())


def test_producers_consumers_and_inbound() -> None:
    ours = {"payment_service", "order_service"}
    service = re.compile(r"^[a-z]+_service$")
    for spec in CATALOG.values():
        assert service.match(spec.producer), spec
        assert spec.consumers and all(service.match(c) for c in spec.consumers), spec
        assert len(set(spec.consumers)) == len(spec.consumers), spec
        assert spec.producer not in spec.consumers, spec
        assert spec.inbound == (spec.producer not in ours), spec
        if spec.inbound:
            assert set(spec.consumers) <= ours, spec
    inbound = {name for name, spec in CATALOG.items() if spec.inbound}
    assert inbound == {
        "wallet.balance_changed", "wallet.insufficient_funds", "wallet.credits_added",
        "subscription.usage_exceeded", "storage.quota_exceeded", "user.deleted",
        "user.upgraded",
    }
    for name in CATALOG:
        if name.startswith(("payment.", "invoice.")) or name in {
            "subscription.created", "subscription.canceled", "subscription.updated",
            "subscription.expired", "subscription.payment_failed",
        }:
            assert CATALOG[name].producer == "payment_service", name
        if name.startswith("order."):
            assert CATALOG[name].producer == "order_service", name


def test_seed_subscriptions_are_consumers() -> None:
    # "Subscribers" columns of the seed
    assert CATALOG["payment.completed"].consumers == (
        "order_service", "wallet_service", "billing_service")
    assert CATALOG["order.fulfilled"].consumers == ("storage_service", "notification_service")
    # "Should Subscribe To" tables of the two services
    payment_reads = {"wallet.balance_changed", "wallet.insufficient_funds", "order.created",
                     "subscription.usage_exceeded", "user.deleted", "user.upgraded"}
    order_reads = {"payment.completed", "payment.failed", "payment.refunded",
                   "wallet.credits_added", "subscription.created", "subscription.canceled",
                   "storage.quota_exceeded", "user.deleted"}
    for name in payment_reads:
        assert "payment_service" in CATALOG[name].consumers, name
    for name in order_reads:
        assert "order_service" in CATALOG[name].consumers, name
    assert CATALOG["user.deleted"].consumers == ("payment_service", "order_service")
    assert CATALOG["wallet.credits_added"].consumers == ("order_service",)


def test_catalog_is_read_only() -> None:
    with pytest.raises(TypeError):
        CATALOG["x"] = CATALOG["order.created"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        CATALOG["order.created"].partitions = 8  # type: ignore[misc]


def test_topic_spec_and_unknown_topic() -> None:
    assert topic_spec("order.created") is CATALOG["order.created"]
    with pytest.raises(UnknownTopic) as info:
        topic_spec("order.crated")
    assert isinstance(info.value, KeyError)
    assert "'order.crated'" in str(info.value) and "catalog" in str(info.value)
    with pytest.raises(UnknownTopic):
        topic_spec("t-abc-order.created")
    with pytest.raises(UnknownTopic):
        record_key("nope", {"order_id": "o1"})


def test_topic_spec_rejects_nonsense() -> None:
    good = CATALOG["order.created"]
    for change in ({"key_fields": ()}, {"partitions": 0}, {"cleanup_policy": "keep"},
                   {"retention_ms": 0}):
        with pytest.raises(ValueError):
            dataclasses.replace(good, **change)
    assert dataclasses.replace(good, retention_ms=-1, cleanup_policy="compact").retention_ms == -1


def test_record_key_uses_the_first_key_field_set() -> None:
    assert record_key("order.created", {"order_id": "o-1", "user_id": "u-1"}) == "o-1"
    completed = {"order_id": "o-1", "payment_intent_id": "pi_1"}
    assert record_key("payment.completed", completed) == "o-1"
    assert record_key("payment.completed", {**completed, "order_id": None}) == "pi_1"
    assert record_key("payment.completed", {"payment_intent_id": "pi_1"}) == "pi_1"
    assert record_key("payment.completed", {"order_id": "", "payment_intent_id": "pi_1"}) == "pi_1"
    assert record_key("payment.refunded", {"order_id": None, "payment_id": "pi_9"}) == "pi_9"
    assert record_key("user.deleted", {"user_id": 42}) == "42"
    assert record_key("subscription.usage_exceeded",
                      {"subscription_id": "sub_1", "user_id": "u"}) == "sub_1"


def test_record_key_without_any_key_field_names_topic_and_fields() -> None:
    with pytest.raises(ValueError) as info:
        record_key("payment.completed", {"order_id": None, "user_id": "u-1"})
    message = str(info.value)
    assert "payment.completed" in message
    assert "order_id" in message and "payment_intent_id" in message
    with pytest.raises(ValueError, match=r"order\.created.*order_id"):
        record_key("order.created", {})


def test_topic_settings_cover_the_catalog() -> None:
    settings = topic_settings()
    assert all(isinstance(s, TopicSettings) for s in settings)
    assert [s.name for s in settings] == list(CATALOG)
    for s in settings:
        assert s.partitions == EVENT_PARTITIONS
        assert s.replication_factor == 1
        assert s.config == {"cleanup.policy": "delete", "retention.ms": str(SEVEN_DAYS_MS)}


def test_value_subject_is_topic_name_strategy() -> None:
    assert value_subject("order.created") == "order.created-value"
    # prefixed test copies get their own subjects
    assert value_subject("t-abc-order.created") == "t-abc-order.created-value"
    with pytest.raises(ValueError):
        value_subject("")


def test_topic_settings_prefixed_copies() -> None:
    settings = topic_settings(partitions_override=1, name_prefix="t-abc-")
    assert [s.name for s in settings] == [f"t-abc-{name}" for name in CATALOG]
    assert {s.partitions for s in settings} == {1}
    assert topic_settings(replication_factor=3)[0].replication_factor == 3
    # the catalog itself is untouched
    assert CATALOG["order.created"].partitions == EVENT_PARTITIONS


def test_markdown_table() -> None:
    table = render_markdown_table()
    lines = table.strip().splitlines()
    assert lines[0] == "| topic | key | partitions | producer | consumers | schema file |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert len(lines) == 2 + len(CATALOG)
    for line, spec in zip(lines[2:], CATALOG.values(), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 6
        assert cells[0] == f"`{spec.name}`"
        assert all(field in cells[1] for field in spec.key_fields)
        assert cells[2] == str(spec.partitions)
        assert cells[3].startswith(spec.producer)
        assert ("external" in cells[3]) == spec.inbound
        assert cells[4] == ", ".join(spec.consumers)
        assert spec.schema_file in cells[5]
    assert "order_id, else payment_intent_id" in table


def test_print_topics(capsys: pytest.CaptureFixture[str]) -> None:
    print_topics(markdown=True)
    assert capsys.readouterr().out == render_markdown_table()
    print_topics(markdown=False)
    out = capsys.readouterr().out
    assert "|" not in out
    rows = out.strip().splitlines()
    assert rows[0].split()[0] == "TOPIC"
    for name, spec in CATALOG.items():
        row = next(r for r in rows if r.split()[0] == name)
        assert spec.producer in row and spec.consumers[0] in row


def test_catalog_module_spells_each_topic_once() -> None:
    source = Path(catalog.__file__).read_text(encoding="utf-8")
    for name in CATALOG:
        assert source.count(f'"{name}"') == 1, name
    assert isinstance(CATALOG["order.created"], TopicSpec)


def test_a_records_idempotency_id_field() -> None:
    assert catalog.id_field("stripe.events") == "id"  # a Stripe event's own id
    assert catalog.id_field("order.created") == "event_id"
    assert catalog.id_field(catalog.PAYMENT_COMMANDS) == "event_id"
