"""Run a real schema registry in-process for tests.

The registry gets its own thread and event loop, so blocking clients
(``SchemaRegistryClient``, the serializers) can talk to it from the test
thread while async clients work from the test's own loop.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from aiohttp import web

from schemas.registry.server import create_app
from streams.admin import delete_topics
from streams.settings import Settings


class RegistryThread:
    """One registry instance (``create_app``) served on 127.0.0.1:``port``."""

    def __init__(self, settings: Settings, **app_options: float) -> None:
        self.settings = settings
        self.app_options = app_options
        self.url = f"http://127.0.0.1:{settings.registry_port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> RegistryThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    async def _serve(self) -> None:
        self._runner = web.AppRunner(create_app(self.settings, **self.app_options))  # type: ignore[arg-type]
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.settings.registry_port).start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ``GET /`` answers 200 (the state is loaded from Kafka)."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(self.url + "/", timeout=2.0).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"registry at {self.url} not ready after {timeout}s (last status {status})")

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._runner = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()


def registry_settings(settings: Settings, topic: str, port: int) -> Settings:
    """``settings`` with the registry on its own topic and port (tests never share state)."""
    return Settings.from_env(
        kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
        registry_topic=topic,
        registry_port=port,
        schema_registry_url=f"http://127.0.0.1:{port}",
    )


def record_schema(name: str, *fields: tuple[str, object] | tuple[str, object, object]) -> str:
    """An Avro record schema text; a 3-tuple field carries a default."""
    import json

    out = []
    for spec in fields:
        field: dict[str, object] = {"name": spec[0], "type": spec[1]}
        if len(spec) == 3:
            field["default"] = spec[2]
        out.append(field)
    return json.dumps({"type": "record", "name": name, "namespace": "paystream.test", "fields": out})


def drop_topic(bootstrap_servers: str, topic: str) -> None:
    """Delete a test's registry topic."""
    delete_topics(bootstrap_servers, [topic])
