"""Fixtures shared by every test tree.

Integration tests talk to the real local broker at ``KAFKA_BOOTSTRAP_SERVERS``
(``./dev test`` starts it with ``paystream kafka start``).  Every test gets its
own topic/subject/group names from ``unique_name`` so tests never share state.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest

from streams.settings import Settings


def _broker_reachable(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "localhost", int(port)), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The bootstrap address of the running local broker.

    The broker is started outside pytest (``./dev test`` / ``.ci/run``); a run
    without one fails loudly here instead of passing on a mock.
    """
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
    if not _broker_reachable(bootstrap):
        pytest.fail(
            f"no Kafka broker at {bootstrap}: start one with `paystream kafka start` "
            "(./dev test does this for you)"
        )
    yield bootstrap


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Return a function that makes names unique to this test run and test."""
    token = uuid.uuid4().hex[:8]
    test = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:40]

    def make(prefix: str) -> str:
        return f"t-{prefix}-{test}-{token}"

    return make


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Return a function that finds a free localhost TCP port."""

    def find() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    return find


@pytest.fixture
def settings(kafka_bootstrap: str) -> Settings:
    """Settings pointed at the test broker, otherwise the local defaults."""
    return Settings.from_env(kafka_bootstrap_servers=kafka_bootstrap)
