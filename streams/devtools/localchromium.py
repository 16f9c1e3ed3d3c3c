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
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streams.devtools import host

#: Debian package -> the program it puts on PATH.
PACKAGES = {"chromium": "chromium", "chromium-driver": "chromedriver"}


class ChromiumMissing(RuntimeError):
    """Chromium or its driver is not installed and could not be installed here."""


def find_tools() -> dict[str, str] | None:
    """The paths of ``chromium`` and ``chromedriver``, or None when either is missing."""
    return host.find_programs(list(PACKAGES.values()))


def ensure_installed(*, quiet: bool = True) -> dict[str, str]:
    """The tools' paths, installing Debian's packages first when they are missing.

    Installs only as root with ``apt-get`` present (:func:`streams.devtools.host.ensure_debian_programs`);
    raises :class:`ChromiumMissing` saying what to do otherwise.
    """
    return host.ensure_debian_programs(list(PACKAGES), list(PACKAGES.values()), ChromiumMissing,
                                       quiet=quiet)


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
    return host.install_main(argv, "streams.devtools.localchromium", ensure_installed, ChromiumMissing)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
