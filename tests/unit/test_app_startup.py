"""streams.app start-up: waiting for an unreachable broker or registry, one line, no traceback.

The waits themselves are exercised against a real worker process in
``tests/integration/test_worker_availability.py``; here, which errors count
as "not reachable yet" and what gets logged.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streams.app import _broker_unreachable, _registry_unreachable, retry_until_reachable


def _refused_registry_error() -> Exception:
    """The real error the registry client raises for a port nobody listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = SchemaRegistryClient({"url": f"http://127.0.0.1:{port}", "max.retries": 0})
    try:
        client.get_subjects()
    except Exception as exc:  # whatever it raises is what the worker sees
        return exc
    raise AssertionError("a registry answered on a free port")


def test_registry_errors_that_mean_wait() -> None:
    assert _registry_unreachable(_refused_registry_error()) == "connection refused"
    assert _registry_unreachable(SchemaRegistryError(503, 50003, "store not ready")) == (
        "it answers 503 (store not ready)")
    assert _registry_unreachable(SchemaRegistryError(409, 409, "incompatible")) is None
    assert _registry_unreachable(SchemaRegistryError(422, 42201, "invalid schema")) is None
    assert _registry_unreachable(ValueError("bug")) is None


def test_broker_errors_that_mean_wait() -> None:
    down = KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))
    assert _broker_unreachable(down) == "Failed to get metadata"
    refused = KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "no"))
    assert _broker_unreachable(refused) is None
    assert _broker_unreachable(RuntimeError("x")) is None


def test_waits_with_one_line_then_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Connection refused"))
        return "topics"

    caplog.set_level(logging.INFO, logger="streams.app")
    result = asyncio.run(retry_until_reachable(
        "the Kafka broker at b:9092", attempt, reachability_error=_broker_unreachable,
        first_delay=0.01, max_delay=0.02))
    assert result == "topics" and len(calls) == 4
    lines = [r.getMessage() for r in caplog.records if r.name == "streams.app"]
    assert lines[0] == "waiting for the Kafka broker at b:9092: Connection refused; retrying"
    assert lines[1].startswith("the Kafka broker at b:9092 is reachable after ")
    assert len(lines) == 2
    assert not any(r.exc_info for r in caplog.records)


def test_a_new_reason_is_said_once_more(caplog: pytest.LogCaptureFixture) -> None:
    errors = [SchemaRegistryError(503, 50003, "starting"), SchemaRegistryError(503, 50003, "starting"),
              ConnectionRefusedError(111, "Connection refused")]

    async def attempt() -> int:
        if errors:
            raise errors.pop(0)
        return 1

    caplog.set_level(logging.INFO, logger="streams.app")
    asyncio.run(retry_until_reachable("the registry", attempt,
                                      reachability_error=_registry_unreachable,
                                      first_delay=0.01, max_delay=0.01))
    waits = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waits == ["waiting for the registry: it answers 503 (starting); retrying",
                     waits[1]]
    assert waits[1].startswith("waiting for the registry: connection refused; retrying (waiting for")


def test_other_errors_are_raised_at_once() -> None:
    async def attempt() -> None:
        raise SchemaRegistryError(409, 409, "Schema being registered is incompatible")

    with pytest.raises(SchemaRegistryError):
        asyncio.run(retry_until_reachable("the registry", attempt,
                                          reachability_error=_registry_unreachable))


def test_domains_choose_the_registrars() -> None:
    from agents import DOMAINS, REGISTRARS, registrars_for

    assert registrars_for(["orders"]) == DOMAINS["orders"]
    assert registrars_for(["orders", "payments"]) == DOMAINS["orders"] + DOMAINS["payments"]
    assert set(REGISTRARS) >= set(registrars_for(DOMAINS))
    with pytest.raises(ValueError, match="unknown domain 'accounting'"):
        registrars_for(["accounting"])
