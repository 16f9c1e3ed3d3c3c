"""The registry survives its Kafka broker going away and coming back.

This test owns a throwaway single-node KRaft broker on free ports (never the
team's broker on :9092): registry up -> register ok -> broker stopped ->
register answers a Confluent 5xx body in bounded time while reads keep being
served from memory -> broker restarted on the same log dir -> writes work
again.  A registry started while its broker is down answers 5xx until the
broker appears, then loads and serves.

The broker lives in one fixture, ``throwaway_broker``, so moving it onto
``streams.localkafka`` later touches only that fixture.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from streams.settings import Settings
from tests.integration.registry_support import RegistryThread, record_schema, registry_settings

pytestmark = pytest.mark.integration

KAFKA_CLASSPATH = os.environ.get("PAYSTREAM_KAFKA_CLASSPATH", "/tmp/kres/lib/*")
V1 = record_schema("Wallet", ("wallet_id", "string"))
V2 = record_schema("Wallet", ("wallet_id", "string"), ("label", ["null", "string"], None))
V3 = record_schema("Wallet", ("wallet_id", "string"), ("label", ["null", "string"], None),
                   ("tier", "string", "basic"))
#: A write while Kafka is down must be answered within this many seconds.
WRITE_BOUND_SECONDS = 20.0


class ThrowawayBroker:
    """A single-node KRaft broker+controller in ``home``, started and stopped by pid."""

    def __init__(self, home: Path, port: int, controller_port: int) -> None:
        self.home = home
        self.port = port
        self.controller_port = controller_port
        self.bootstrap = f"localhost:{port}"
        self.properties = home / "server.properties"
        self._process: subprocess.Popen[bytes] | None = None

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java", "-Xmx512m", "-Xms128m",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            "-cp", KAFKA_CLASSPATH, main, *args,
        ]

    def format(self) -> None:
        self.properties.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@localhost:{self.controller_port}",
            f"listeners=PLAINTEXT://localhost:{self.port},CONTROLLER://localhost:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://localhost:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={self.home / 'data'}",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "auto.create.topics.enable=false",
            "group.initial.rebalance.delay.ms=0",
            "",
        ]))
        # What `StorageTool random-uuid` prints: a random UUID in Kafka's base64url form.
        cluster_id = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster_id,
                       "-c", str(self.properties)),
            check=True, capture_output=True, timeout=120,
        )

    def start(self, timeout: float = 90.0) -> None:
        with open(self.home / "broker.out", "ab") as log:  # the child keeps its own copy
            self._process = subprocess.Popen(
                self._java("kafka.Kafka", str(self.properties)), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"broker exited with {self._process.returncode}; see "
                                   f"{self.home / 'broker.out'}")
            if self.answering():
                return
            time.sleep(0.5)
        raise TimeoutError(f"throwaway broker on {self.bootstrap} did not come up")

    def answering(self) -> bool:
        try:
            with socket.create_connection(("localhost", self.port), timeout=1.0):
                pass
        except OSError:
            return False
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        try:
            return bool(admin.list_topics(timeout=3).brokers)
        except Exception:  # any failure means "not yet"
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def throwaway_broker(tmp_path: Path) -> Iterator[ThrowawayBroker]:
    """A broker of this test's own; formatted, not started (the test decides when)."""
    broker = ThrowawayBroker(tmp_path, _free_port(), _free_port())
    broker.format()
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
