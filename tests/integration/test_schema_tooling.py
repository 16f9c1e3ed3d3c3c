"""paystream schemas register|check against a real registry, and the CI gate on history."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from schemas import contracts, tooling
from streams import catalog
from streams.cli import main

pytestmark = pytest.mark.integration


def _without_field(topic: str, field: str) -> str:
    schema = contracts.schema_dict(topic)
    schema["fields"] = [f for f in schema["fields"] if f["name"] != field]
    return json.dumps(schema)


def test_register_then_check_is_all_compatible(
    registry_url: str, unique_name: Callable[[str], str]
) -> None:
    prefix = unique_name("reg") + "."
    ids = tooling.register_contracts(registry_url, prefix=prefix)
    assert len(ids) == len(contracts.contract_names())
    again = tooling.register_contracts(registry_url, prefix=prefix)
    assert again == ids, "registering the same contracts twice must keep their ids"
    results = tooling.check_contracts(registry_url, prefix=prefix)
    assert all(r.compatible for r in results), [r for r in results if not r.compatible]


def test_a_breaking_change_is_reported(registry_url: str, unique_name: Callable[[str], str]) -> None:
    prefix = unique_name("brk") + "."
    tooling.register_contracts(registry_url, ["order.created"], prefix=prefix)
    breaking = contracts.schema_dict("order.created")
    breaking["fields"].append({"name": "tax_code", "type": "string", "doc": "required, no default"})
    [result] = tooling.check_contracts(
        registry_url, ["order.created"], prefix=prefix, texts={"order.created": json.dumps(breaking)}
    )
    assert not result.compatible
    assert result.subject == f"{prefix}order.created-value"


def test_check_command_exits_non_zero_on_a_breaking_contract(
    registry_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An older version of order.created without `items`: the current contract
    # cannot read data written with it (items has no default), so BACKWARD fails.
    client = SchemaRegistryClient({"url": registry_url})
    subject = catalog.value_subject("order.created")
    client.register_schema(subject, Schema(_without_field("order.created", "items"), "AVRO"))
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", registry_url)
    try:
        assert main(["schemas", "check"]) == 1
        out = capsys.readouterr().out
        assert f"FAIL {subject}" in out
        assert "1 breaking" in out
    finally:
        client.delete_subject(subject)
        client.delete_subject(subject, permanent=True)


def test_every_committed_version_of_every_contract_stays_compatible(
    registry_url: str, unique_name: Callable[[str], str]
) -> None:
    """The CI gate: replay contract history into a fresh subject set, then check HEAD's files."""
    prefix = unique_name("hist") + "."
    registered = tooling.baseline_from_git(registry_url, prefix=prefix)
    assert registered >= len(contracts.contract_names()) or registered == 0
    results = tooling.check_contracts(registry_url, prefix=prefix)
    broken = [f"{r.subject}: {r.detail}" for r in results if not r.compatible]
    assert not broken, "a contract change breaks BACKWARD compatibility:\n" + "\n".join(broken)
