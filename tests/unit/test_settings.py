"""streams.settings: worker resources and availability settings, and how the app uses them."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from streams.app import QUIET_LOGGING, create_app
from streams.settings import ENVIRONMENT, Settings
from tables import storage


def test_defaults_bound_memory_and_make_a_dead_worker_noticed_in_seconds() -> None:
    settings = Settings.from_env(env={})
    assert settings.rocksdb_memory_mb == 64 <= 128
    assert settings.session_timeout_seconds == 10.0
    assert settings.heartbeat_interval_seconds == 1.0
    assert settings.instance_id == ""


def test_variables_are_read_and_typed() -> None:
    settings = Settings.from_env(env={
        "PAYSTREAM_ROCKSDB_MEMORY_MB": "96",
        "PAYSTREAM_INSTANCE_ID": "worker-7",
        "PAYSTREAM_SESSION_TIMEOUT_SECONDS": "12.5",
        "PAYSTREAM_HEARTBEAT_INTERVAL_SECONDS": "2",
    })
    assert (settings.rocksdb_memory_mb, settings.instance_id) == (96, "worker-7")
    assert (settings.session_timeout_seconds, settings.heartbeat_interval_seconds) == (12.5, 2.0)
    assert settings.group_instance_id == "worker-7"
    for variable in ("PAYSTREAM_ROCKSDB_MEMORY_MB", "PAYSTREAM_INSTANCE_ID",
                     "PAYSTREAM_SESSION_TIMEOUT_SECONDS", "PAYSTREAM_HEARTBEAT_INTERVAL_SECONDS"):
        assert variable in ENVIRONMENT


def test_the_default_instance_id_is_stable_per_host_and_port() -> None:
    one = Settings.from_env(env={"WORKER_WEB_PORT": "6066"})
    again = Settings.from_env(env={"WORKER_WEB_PORT": "6066"})
    other = Settings.from_env(env={"WORKER_WEB_PORT": "6067"})
    assert one.group_instance_id == again.group_instance_id == f"{socket.gethostname()}-6066"
    assert other.group_instance_id != one.group_instance_id


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("PAYSTREAM_ROCKSDB_MEMORY_MB", "4", "too small"),
    ("PAYSTREAM_ROCKSDB_MEMORY_MB", "lots", "not a valid"),
    ("PAYSTREAM_SESSION_TIMEOUT_SECONDS", "3", "minimum group session timeout"),
    ("PAYSTREAM_HEARTBEAT_INTERVAL_SECONDS", "5", "third of the session timeout"),
    ("PAYSTREAM_HEARTBEAT_INTERVAL_SECONDS", "0", "positive"),
    ("PAYSTREAM_EVENT_LOOP", "trio", "uvloop, asyncio"),
])
def test_unworkable_values_are_refused_with_the_variable_named(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=variable) as error:
        Settings.from_env(env={variable: value})
    assert message in str(error.value)


def test_the_app_uses_the_settings(tmp_path: Path) -> None:
    settings = Settings.from_env(env={
        "PAYSTREAM_ROCKSDB_MEMORY_MB": "40", "PAYSTREAM_INSTANCE_ID": "w-1",
        "PAYSTREAM_SESSION_TIMEOUT_SECONDS": "9", "PAYSTREAM_HEARTBEAT_INTERVAL_SECONDS": "2",
    }, state_dir=tmp_path)
    try:
        app = create_app(settings, registrars=[])
        conf = app.conf
        assert conf.consumer_group_instance_id == "w-1"
        assert (conf.broker_session_timeout, conf.broker_heartbeat_interval) == (9.0, 2.0)
        assert conf.store.scheme == storage.STORE_URL.partition(":")[0]
        assert storage.memory_budget().capacity == 40 * storage.MiB
        assert conf.logging_config == QUIET_LOGGING
        assert app.schema_cache._client._rest_client.timeout == 10
    finally:
        storage.configure_memory(storage.DEFAULT_MEMORY_MB)


def test_quiet_logging_keeps_warnings_and_our_own_lines() -> None:
    loggers = QUIET_LOGGING["loggers"]
    for name in ("faust", "mode", "aiokafka", "aiohttp.access", "httpx", "httpx2"):
        assert loggers[name] == {"level": "WARNING"}
    assert not any(name.startswith("streams") or name.startswith("tables") for name in loggers)
