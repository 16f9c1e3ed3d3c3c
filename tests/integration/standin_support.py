"""The external services of the whole test session: the stand-ins, on a thread of their own.

The order API asks the account service (and, for some orders, the storage
and wallet services) before it creates an order, so every test that creates
orders needs them answering.  One set serves the session, from its own event
loop thread (in-process apps and worker subprocesses alike reach it over
HTTP), on free ports that the session's environment points the
``*_SERVICE_URL`` settings at.  Its world is open: users the tests invent
are active (``World.open_accounts``); the seeded ones (``u-disabled``,
``u-demo`` with its wallet, ...) keep what they are.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from streams.devtools.standins import Standins, seeded_world


class StandinThread:
    """Every stand-in, served from an event loop on a daemon thread."""

    def __init__(self) -> None:
        world = seeded_world()
        world.open_accounts = True
        self.standins = Standins(world=world)
        self.urls: dict[str, str] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="standins", daemon=True)

    def start(self) -> StandinThread:
        self._thread.start()
        self.urls = self.run(self.standins.start())
        return self

    def run(self, coroutine: Any, timeout: float = 30.0) -> Any:
        """Run ``coroutine`` on the stand-ins' loop (e.g. ``stop_service("account")``)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self) -> None:
        self.run(self.standins.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def environment(self) -> dict[str, str]:
        """``<SERVICE>_SERVICE_URL`` for each stand-in."""
        return {f"{name.upper()}_SERVICE_URL": url for name, url in self.urls.items()}
