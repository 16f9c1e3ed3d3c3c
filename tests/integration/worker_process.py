"""Run ``paystream worker`` as a real subprocess, the way it is deployed.

:class:`WorkerProcess` starts the CLI with an environment of its own (topics,
app id, state directory, web port), logs to a file, and knows when the worker
is serving: its web port answers the order API with a JSON 404 for an unknown
order, which needs the partition assignment (before it, the API answers 503).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from streams import access
from streams.devtools.worker_process import WorkerSubprocess, settings_env
from streams.settings import Settings

__all__ = ["WorkerProcess", "settings_env"]


class WorkerProcess(WorkerSubprocess):
    """One ``paystream worker`` subprocess, serving the order API on ``port``.

    ``settings_env`` are the paystream variables (see :func:`settings_env`);
    ``port`` and ``state_dir`` override WORKER_WEB_PORT and PAYSTREAM_STATE_DIR
    so several workers of one app can share a machine.
    """

    failure = AssertionError

    def __init__(self, settings_env: Mapping[str, str], port: int, state_dir: Path | str,
                 *, log_path: Path | str | None = None, name: str = "worker",
                 loglevel: str = "info") -> None:
        self.port = port
        self.state_dir = Path(state_dir)
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            **settings_env,
            "WORKER_WEB_HOST": "127.0.0.1",
            "WORKER_WEB_PORT": str(port),
            "PAYSTREAM_STATE_DIR": str(self.state_dir),
        }
        super().__init__(env, Path(log_path) if log_path else self.state_dir.parent / f"{name}-{port}.log",
                         name=name, loglevel=loglevel, wait_after_kill=10.0)
        # The worker's first service token, if it has any (streams.access): for the probes below.
        tokens = Settings.from_env(env=env).service_token_list
        self.headers = access.authorization(tokens[0] if tokens else None)

    # ------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        """Start the worker and wait until it serves the order API."""
        self.launch()
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Block until GET /orders/<unknown id> answers a JSON 404.

        Connection refused (web server not up) and 503 (no assignment yet,
        or a rebalance) mean: not yet.  An exited process fails at once.
        """
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.assert_running()
            last = self.probe()
            if last == 404:
                return
            time.sleep(0.25)
        raise AssertionError(f"{self.name} not serving after {timeout}s (last answer {last!r})"
                             f"\n{self.log_tail()}")

    def probe(self) -> int | str:
        """Status of GET /orders/<random id>: 404 (JSON) when serving, else why not."""
        try:
            answer = httpx.get(f"{self.url}/orders/{uuid.uuid4()}", timeout=5.0, headers=self.headers)
        except httpx.TransportError as exc:
            return type(exc).__name__
        if answer.status_code == 404 and answer.headers.get("content-type", "").startswith(
            "application/json"
        ) and answer.json().get("error") == "not_found":
            return 404
        return answer.status_code

    def routes(self) -> dict[str, dict[str, list[int]]]:
        """Faust's ``/router/``: worker URL -> changelog topic -> partitions."""
        answer = httpx.get(f"{self.url}/router/", timeout=5.0, headers=self.headers)
        answer.raise_for_status()
        return answer.json()

    # ------------------------------------------------------------------

    def wipe_state(self) -> None:
        """Delete the state directory, as a lost disk would (only while the worker is down).

        The next start rebuilds its tables from the changelog topics.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is running: stop or kill it before wiping its state")
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def error_lines(self) -> list[str]:
        """ERROR/CRITICAL log lines and tracebacks: a crashed agent only logs."""
        return [line for line in self.log_text().splitlines()
                if "[ERROR]" in line or "[CRITICAL]" in line or line.startswith("Traceback")]
