"""Fixtures for tests against the real local broker: a registry and app settings."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from streams.settings import Settings
from tests.integration.payment_support import (  # noqa: F401  (fixtures)
    drop_topics,
    localstripe,
    payment_stack,
)
from tests.integration.pipeline_support import Pipeline, private_settings
from tests.integration.registry_support import RegistryThread, drop_topic, registry_settings
from tests.integration.standin_support import StandinThread


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def standins() -> Iterator[StandinThread]:
    """The external services (account, wallet, storage, ...) for the whole session.

    Its URLs go into the environment before any settings are read, so every
    app, worker subprocess and bench of the session asks these stand-ins.
    """
    runner = StandinThread().start()
    saved = {name: os.environ.get(name) for name in runner.environment()}
    os.environ.update(runner.environment())
    yield runner
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    runner.stop()


@pytest.fixture(scope="session")
def registry_url(kafka_bootstrap: str) -> Iterator[str]:
    """One real registry for the session, on its own ``_schemas`` copy.

    Tests keep apart by their topic prefixes, hence by their subjects.
    """
    topic = f"t-schemas-session-{uuid.uuid4().hex[:8]}"
    base = Settings.from_env(kafka_bootstrap_servers=kafka_bootstrap)
    registry = RegistryThread(registry_settings(base, topic, _free_port())).start()
    yield registry.url
    registry.stop()
    drop_topic(kafka_bootstrap, topic)


@pytest.fixture
def registry(
    settings: Settings, unique_name: Callable[[str], str], free_port: Callable[[], int]
) -> Iterator[RegistryThread]:
    """A registry of this test's own, on its own ``_schemas`` copy (dropped afterwards)."""
    topic = unique_name("schemas")
    instance = RegistryThread(registry_settings(settings, topic, free_port())).start()
    yield instance
    instance.stop()
    drop_topic(settings.kafka_bootstrap_servers, topic)

@pytest.fixture
def app_settings(
    kafka_bootstrap: str, registry_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> Iterator[Settings]:
    """Settings for one test's own app: private topics (dropped afterwards), group, state dir and port."""
    prefix = unique_name("app") + "."
    settings = Settings.from_env(
        kafka_bootstrap_servers=kafka_bootstrap,
        schema_registry_url=registry_url,
        topic_prefix=prefix,
        app_id=f"{prefix}paystream",
        domains="orders",  # the order pipeline alone; payment tests add "payments"
        state_dir=tmp_path / "state",
        worker_web_port=_free_port(),
    )
    yield settings
    drop_topics(settings)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipe(
    kafka_bootstrap: str, registry_url: str, tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Pipeline]:
    """One running app (and its clients) per test module; tests keep apart by their own ids.

    An app start costs seconds, so modules whose tests can share one do
    (they must use ``pytest.mark.asyncio(loop_scope="module")``).
    """
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    state = tmp_path_factory.mktemp(name)
    pipeline = await Pipeline.start(private_settings(kafka_bootstrap, registry_url, state, name))
    try:
        yield pipeline
    finally:
        await pipeline.stop()
        drop_topics(pipeline.settings)  # a broker holds files per partition: leave none behind
