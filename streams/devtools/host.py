"""The machine's side of the dev tools: Debian programs, child processes, free ports.

One copy of what the local runners (:mod:`streams.devtools.localprometheus`,
:mod:`streams.devtools.localchromium`, :mod:`streams.devtools.localstripe`)
and the benches need from the host (dev tooling, not runtime).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence


def free_port() -> int:
    """A TCP port of 127.0.0.1 free a moment ago (the OS picked it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_programs(programs: Sequence[str]) -> dict[str, str] | None:
    """The paths of ``programs`` on ``PATH``, or None when any is missing."""
    found = {program: shutil.which(program) for program in programs}
    if any(path is None for path in found.values()):
        return None
    return {program: str(path) for program, path in found.items()}


def ensure_debian_programs(packages: Sequence[str], programs: Sequence[str],
                           missing: type[Exception], *, quiet: bool = True) -> dict[str, str]:
    """The paths of ``programs``, installing Debian's ``packages`` first when any is missing.

    Installs only as root with ``apt-get`` present; a first failure (package
    lists never fetched or stale) is retried once after ``apt-get update``.
    Raises ``missing`` saying what to install otherwise.  ``quiet``: apt-get's
    output is captured (its tail goes into the error) instead of shown.
    """
    tools = find_programs(programs)
    if tools is not None:
        return tools
    plural = "s" if len(packages) > 1 else ""
    hint = (f"install Debian's {' and '.join(packages)} package{plural} "
            f"(`apt-get install -y {' '.join(packages)}`)")
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise missing(f"{'/'.join(programs)} not found: {hint}")
    result = _apt_install(packages, quiet)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=quiet, text=True, check=False)
        result = _apt_install(packages, quiet)
    tools = find_programs(programs)
    if result.returncode != 0 or tools is None:
        detail = ((result.stdout or "")[-1500:] + (result.stderr or "")[-1500:]) if quiet else ""
        raise missing(f"apt-get could not install {' and '.join(packages)}: {hint}\n{detail}")
    return tools


def install_main(argv: Sequence[str], module: str, ensure: Callable[..., dict[str, str]],
                 missing: type[Exception]) -> int:
    """``python -m <module> install`` (what ``./dev test`` runs): ``ensure(quiet=False)``, paths printed.

    Exit code 2 for other arguments, 1 with the error when ``ensure`` raises ``missing``.
    """
    if list(argv[1:]) != ["install"]:
        print(f"usage: python -m {module} install", file=sys.stderr)
        return 2
    try:
        tools = ensure(quiet=False)
    except missing as exc:
        print(f"dev: {exc}", file=sys.stderr)
        return 1
    print(", ".join(f"{name}: {path}" for name, path in tools.items()))
    return 0


def _apt_install(packages: Sequence[str], quiet: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
                          capture_output=quiet, text=True, check=False, env=env)


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float,
                 kill_timeout: float = 10.0) -> None:
    """Stop a child this process started: SIGTERM, then SIGKILL after ``timeout`` seconds.

    Nothing happens when ``process`` is None or has exited already.
    """
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(kill_timeout)
