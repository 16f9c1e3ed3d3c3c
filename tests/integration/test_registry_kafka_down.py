"""The registry survives its Kafka broker going away and coming back.

This test owns a throwaway single-node KRaft broker on free ports (never the
team's broker on :9092): registry up -> register ok -> broker stopped ->
register answers a Confluent 5xx body in bounded time while reads keep being
served from memory -> broker restarted on the same log dir -> writes work
again.  A registry started while its broker is down answers 5xx until the
broker appears, then loads and serves.

The broker is ``streams.devtools.localkafka.LocalKafka`` (what ``paystream kafka``
runs) on free ports, stopped and restarted by its pid.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from streams.devtools.localkafka import LocalKafka
from streams.settings import Settings
from tests.integration.registry_support import RegistryThread, record_schema, registry_settings

pytestmark = pytest.mark.integration

V1 = record_schema("Wallet", ("wallet_id", "string"))
V2 = record_schema("Wallet", ("wallet_id", "string"), ("label", ["null", "string"], None))
V3 = record_schema("Wallet", ("wallet_id", "string"), ("label", ["null", "string"], None),
                   ("tier", "string", "basic"))
#: A write while Kafka is down must be answered within this many seconds.
WRITE_BOUND_SECONDS = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def throwaway_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A broker of this test's own (``paystream kafka``'s runner), not started yet."""
    broker = LocalKafka(tmp_path / "kafka", port=_free_port(), controller_port=_free_port(), heap="512m")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def start_registry(throwaway_broker, unique_name, free_port) -> Iterator[Callable[..., RegistryThread]]:
    started: list[RegistryThread] = []

    def start(*, wait_ready: bool = True) -> RegistryThread:
        base = Settings.from_env(kafka_bootstrap_servers=throwaway_broker.bootstrap)
        settings = registry_settings(base, unique_name("schemas"), free_port())
        instance = RegistryThread(
            settings, delivery_timeout_ms=5_000, apply_timeout=5.0, retry_interval=1.0
        ).start(wait_ready=wait_ready)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()


def register(url: str, subject: str, schema: str) -> httpx.Response:
    return httpx.post(f"{url}/subjects/{subject}/versions", json={"schema": schema}, timeout=60)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def test_writes_fail_cleanly_while_kafka_is_down_and_recover(throwaway_broker, start_registry,
                                                             unique_name):
    throwaway_broker.start()
    registry = start_registry()
    subject = unique_name("wallets") + "-value"
    first = register(registry.url, subject, V1)
    assert first.status_code == 200, first.text

    throwaway_broker.stop()
    began = time.monotonic()
    down = register(registry.url, subject, V2)
    took = time.monotonic() - began
    assert 500 <= down.status_code < 600, down.text
    assert down.json()["error_code"] in (50001, 50002)
    assert "Kafka" in down.json()["message"] or "store" in down.json()["message"]
    assert took < WRITE_BOUND_SECONDS, f"write while Kafka is down took {took:.1f}s"

    # Reads are served from memory while the broker is away.
    latest = httpx.get(f"{registry.url}/subjects/{subject}/versions/latest")
    assert latest.status_code == 200 and latest.json()["id"] == first.json()["id"]
    assert httpx.get(f"{registry.url}/schemas/ids/{first.json()['id']}").status_code == 200

    throwaway_broker.start()
    answers: list[httpx.Response] = []

    def write_succeeds() -> bool:
        answers.append(register(registry.url, subject, V3))
        return answers[-1].status_code == 200

    wait_until(write_succeeds, 90, f"writes did not recover: {answers[-1:]}")
    versions = httpx.get(f"{registry.url}/subjects/{subject}/versions").json()
    assert versions[0] == 1 and versions[-1] == len(versions)
    latest = httpx.get(f"{registry.url}/subjects/{subject}/versions/latest").json()
    assert "tier" in latest["schema"]


def test_registry_started_without_kafka_answers_5xx_then_loads(throwaway_broker, start_registry,
                                                               unique_name):
    registry = start_registry(wait_ready=False)
    subject = unique_name("wallets") + "-value"
    for answer in (httpx.get(f"{registry.url}/subjects"), register(registry.url, subject, V1),
                   httpx.get(f"{registry.url}/")):
        assert answer.status_code >= 500, answer.text
        assert answer.json()["error_code"] == 50002

    throwaway_broker.start()
    registry.wait_ready(90)
    assert register(registry.url, subject, V1).status_code == 200
    assert httpx.get(f"{registry.url}/subjects").json() == [subject]
