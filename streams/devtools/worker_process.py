"""``paystream worker`` as a subprocess, the way it is deployed: for benches and tests.

One class for starting, stopping, killing and reading the log of a worker
process; the benches (``streams/devtools/bench``) and the integration tests
(``tests/integration/worker_process.py``) add what each needs on top.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from streams.settings import ENVIRONMENT, Settings

#: The repository root: the subprocess runs there, so ``streams`` imports.
ROOT = Path(__file__).resolve().parents[2]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce ``settings`` in another process."""
    return {variable: str(getattr(settings, attribute))
            for variable, (attribute, _default) in ENVIRONMENT.items()}


class WorkerSubprocess:
    """One ``paystream worker`` subprocess with environment ``env``, logging to ``log_path``.

    ``failure`` is the exception a dead worker raises in :meth:`assert_running`
    (the tests want an AssertionError, the benches their own).
    """

    failure: type[Exception] = RuntimeError

    def __init__(self, env: Mapping[str, str], log_path: Path, *, name: str = "worker",
                 loglevel: str = "info", wait_after_kill: float = 30.0) -> None:
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.name = name
        self.loglevel = loglevel
        self.wait_after_kill = wait_after_kill
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def launch(self) -> WorkerSubprocess:
        """Start the subprocess without waiting for it."""
        if self.running:
            raise RuntimeError(f"{self.name} is running already")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in _reap
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker", "--loglevel", self.loglevel],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def assert_running(self) -> None:
        if self.process is None:
            raise self.failure(f"{self.name} was never started")
        code = self.process.poll()
        if code is not None:
            raise self.failure(f"{self.name} exited with {code}\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(self.wait_after_kill)
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL at once (a crash: nothing is flushed or committed, the group is not left)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(self.wait_after_kill)
        return self._reap()

    def _reap(self) -> int | None:
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode if self.process is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().splitlines()[-lines:]
        return f"--- {self.name} log ({self.log_path}) ---\n" + "\n".join(text)
