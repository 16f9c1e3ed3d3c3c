"""A headless Chromium for the console's browser test (dev tooling, not runtime).

Chromium and its WebDriver come from Debian's ``chromium`` and
``chromium-driver`` packages, found on ``PATH`` like Java and Maven for the
local Kafka; like Prometheus (:mod:`streams.devtools.localprometheus`), they
are installed here when that can be done without asking anyone (``apt-get``
exists and this process is root: ``./dev test`` calls
``python -m streams.devtools.localchromium install``).  Anywhere else the
error says what to install.

:func:`headless_browser` starts one Chromium through Selenium (a test
extra) with the driver found here, never a downloaded one: Selenium Manager
is not asked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Debian package -> the program it puts on PATH.
PACKAGES = {"chromium": "chromium", "chromium-driver": "chromedriver"}


class ChromiumMissing(RuntimeError):
    """Chromium or its driver is not installed and could not be installed here."""


def find_tools() -> dict[str, str] | None:
    """The paths of ``chromium`` and ``chromedriver``, or None when either is missing."""
    found = {program: shutil.which(program) for program in PACKAGES.values()}
    if any(path is None for path in found.values()):
        return None
    return {program: str(path) for program, path in found.items()}


def _apt_install(quiet: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                          capture_output=quiet, text=True, check=False, env=env)


def ensure_installed(*, quiet: bool = True) -> dict[str, str]:
    """The tools' paths, installing Debian's packages first when they are missing.

    Installs only as root with ``apt-get`` present; a first failure (package
    lists never fetched or stale) is retried once after ``apt-get update``.
    Raises :class:`ChromiumMissing` saying what to do otherwise.
    """
    tools = find_tools()
    if tools is not None:
        return tools
    hint = f"install Debian's {' and '.join(PACKAGES)} packages (`apt-get install -y {' '.join(PACKAGES)}`)"
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise ChromiumMissing(f"chromium/chromedriver not found: {hint}")
    result = _apt_install(quiet)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=quiet, text=True, check=False)
        result = _apt_install(quiet)
    tools = find_tools()
    if result.returncode != 0 or tools is None:
        detail = ((result.stdout or "")[-1500:] + (result.stderr or "")[-1500:]) if quiet else ""
        raise ChromiumMissing(f"apt-get could not install chromium: {hint}\n{detail}")
    return tools


def headless_browser(*, width: int = 1400, height: int = 1000,
                     extra_headers: Mapping[str, str] | None = None) -> Any:
    """A Selenium WebDriver on a fresh headless Chromium profile; ``quit()`` it when done.

    ``extra_headers`` go with every request the page makes (the DevTools
    protocol's ``Network.setExtraHTTPHeaders``), as a reverse proxy in
    front of the console would add a service token.  The profile directory
    is deleted when the driver quits.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tools = ensure_installed()
    profile = Path(tempfile.mkdtemp(prefix="paystream-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = tools["chromium"]
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                     f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run its sandbox as root
    driver = webdriver.Chrome(service=Service(executable_path=tools["chromedriver"]), options=options)
    if extra_headers:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": dict(extra_headers)})
    quit_driver = driver.quit

    def quit_and_clean() -> None:
        try:
            quit_driver()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean
    return driver


def main(argv: list[str]) -> int:
    """``python -m streams.devtools.localchromium install``: what ``./dev test`` runs."""
    if argv[1:] != ["install"]:
        print("usage: python -m streams.devtools.localchromium install", file=sys.stderr)
        return 2
    try:
        tools = ensure_installed(quiet=False)
    except ChromiumMissing as exc:
        print(f"dev: {exc}", file=sys.stderr)
        return 1
    print(f"chromium: {tools['chromium']}, chromedriver: {tools['chromedriver']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
