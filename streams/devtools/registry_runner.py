"""Our schema registry served from a thread of the calling process.

The registry gets its own thread and event loop, so blocking clients
(``SchemaRegistryClient``, the serializers) can talk to it from the caller's
thread while async clients work from the caller's own loop.  The test suite
and ``paystream bench`` both use this one runner; each gives it a private
``_schemas`` topic and a free port so runs never share registry state.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

from aiohttp import web

from schemas.registry.server import create_app
from streams.settings import Settings


def registry_settings(settings: Settings, topic: str, port: int) -> Settings:
    """``settings`` with the registry on its own topic and port on 127.0.0.1."""
    return Settings.from_env(
        kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
        registry_topic=topic,
        registry_port=port,
        registry_host="127.0.0.1",
        schema_registry_url=f"http://127.0.0.1:{port}",
    )


class RegistryThread:
    """One registry instance (``create_app``) served on 127.0.0.1:``port``.

    ``app_options`` go to :func:`schemas.registry.server.create_app`
    (delivery and apply timeouts, retry interval).
    """

    def __init__(self, settings: Settings, **app_options: float) -> None:
        self.settings = settings
        self.app_options = app_options
        self.url = f"http://127.0.0.1:{settings.registry_port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="registry", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> RegistryThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    async def _serve(self) -> None:
        app = create_app(self.settings, **self.app_options)  # type: ignore[arg-type]
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.settings.registry_port).start()

    def status(self) -> int | None:
        """HTTP status of ``GET /`` (None when nothing answers)."""
        try:
            with urllib.request.urlopen(self.url + "/", timeout=2.0) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ``GET /`` answers 200 (the state is loaded from Kafka)."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.status()
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
