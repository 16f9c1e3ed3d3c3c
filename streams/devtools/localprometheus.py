"""A local Prometheus for tests and the dev stack (dev tooling, not runtime).

Prometheus and ``promtool`` come from Debian's ``prometheus`` package.  Like
Java and Maven for the local Kafka (:mod:`streams.devtools.localkafka`), they
are the machine's tools, found on ``PATH``; unlike them, a missing Prometheus
is installed here when that can be done without asking anyone: ``apt-get``
exists and this process is root (``./dev test`` and the integration test's
fixture call :func:`ensure_installed`).  Anywhere else the error says exactly
what to install.

:class:`PrometheusServer` runs one ``prometheus`` process on a scrape config,
a private TSDB directory and a free port, and talks to its HTTP API.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from streams.devtools import host

#: The Debian package that holds both ``prometheus`` and ``promtool``.
PACKAGE = "prometheus"
TOOLS = ("prometheus", "promtool")


class PrometheusMissing(RuntimeError):
    """Prometheus is not installed and could not be installed here."""


def find_tools() -> dict[str, str] | None:
    """The paths of ``prometheus`` and ``promtool``, or None when either is missing."""
    return host.find_programs(TOOLS)


def ensure_installed(*, quiet: bool = True) -> dict[str, str]:
    """The tools' paths, installing Debian's ``prometheus`` first when they are missing.

    Installs only as root with ``apt-get`` present (:func:`streams.devtools.host.ensure_debian_programs`);
    raises :class:`PrometheusMissing` saying what to do otherwise.
    """
    return host.ensure_debian_programs([PACKAGE], TOOLS, PrometheusMissing, quiet=quiet)


def check_rules(*paths: Path | str) -> subprocess.CompletedProcess[str]:
    """``promtool check rules PATHS``: its exit code and output."""
    promtool = ensure_installed()["promtool"]
    return subprocess.run([promtool, "check", "rules", *map(str, paths)],
                          capture_output=True, text=True, check=False)


def check_config(path: Path | str) -> subprocess.CompletedProcess[str]:
    """``promtool check config PATH`` (rule files it names are checked too)."""
    promtool = ensure_installed()["promtool"]
    return subprocess.run([promtool, "check", "config", str(path)],
                          capture_output=True, text=True, check=False)


class PrometheusServer:
    """One ``prometheus`` process on ``config`` with its TSDB in ``data_dir``, on ``port``."""

    def __init__(self, config: Path, data_dir: Path, port: int, *, log_path: Path | None = None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path or data_dir.parent / f"prometheus-{port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        binary = ensure_installed()["prometheus"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.data_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
             "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready within {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        process, self._process = self._process, None
        host.stop_process(process, timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>?params``: the ``data`` of a successful answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
            body = json.loads(answer.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the vector's samples (``metric`` labels and ``value``)."""
        data = self.api("query", query=expr)
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health and last error."""
        return list(self.api("targets")["activeTargets"])


def main(argv: list[str]) -> int:
    """``python -m streams.devtools.localprometheus install``: what ``./dev test`` runs."""
    return host.install_main(argv, "streams.devtools.localprometheus", ensure_installed, PrometheusMissing)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
