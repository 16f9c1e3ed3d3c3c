"""The operator console in a real browser, against a running worker (issue 10, point 7).

A ``paystream worker`` subprocess (orders and payments, localstripe as
Stripe, ``PAYSTREAM_SERVICE_TOKENS`` set) serves ``/console``; Debian's
headless Chromium, driven through chromium-driver (Selenium), loads it:

- without the token the console is refused (401); the browser then sends
  the token on every request, as the reverse proxy in front of a console
  would (``Network.setExtraHTTPHeaders``);
- pipeline health lists the kernel agents with their partitions' lag;
- a dead letter made by the test (bytes that are neither Avro nor JSON on
  the order command topic, a key and a header that hold markup) is found in the list, shown with its markup as
  inert text, replayed through the confirmation page, and the result page
  says where it went; the worker, still unable to read it, dead-letters it
  again with ``dlq.replay.count`` 1, which proves the record really went
  back to its source topic;
- a paid order and its payment are looked up by id, and a second worker of
  the same group answers the lookup of every order, the ones it does not
  own forwarded to their owner.

Screenshots of each page are kept in ``$PAYSTREAM_STATE_DIR/artifacts/console/``
(``.paystream/artifacts/console/`` under ``./dev test``), named after the
test and the page.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiokafka.partitioner import DefaultPartitioner
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from streams import catalog
from streams.devtools import localchromium
from streams.devtools.localstripe import LocalStripe
from streams.devtools.worker_process import ROOT as REPO_ROOT
from streams.dispatch import REPLAY_COUNT_HEADER
from tests.integration.payment_support import PaymentStack, running_stack
from tests.integration.pipeline_support import Sent, free_port
from tests.integration.worker_process import WorkerProcess, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

TOKEN = "tok-console-browser-8e41c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MARKUP_KEY_SUFFIX = "<b>bold</b>"
#: How Faust's router places a key (aiokafka's murmur2 over every partition).
PARTITIONER = DefaultPartitioner()
PARTITIONS = list(range(catalog.EVENT_PARTITIONS))
MARKUP_HEADER = '"><img src=x onerror=alert(1)><script>alert(2)</script>'


def artifacts_dir() -> Path:
    """Where the screenshots go: ``$PAYSTREAM_STATE_DIR/artifacts/console`` (``.paystream/...``)."""
    state = Path(os.environ.get("PAYSTREAM_STATE_DIR", REPO_ROOT / ".paystream"))
    if not state.is_absolute():
        state = REPO_ROOT / state
    path = state / "artifacts" / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PaymentStack]:
    async with running_stack(kafka_bootstrap, registry_url, localstripe,
                             tmp_path_factory.mktemp("console"), "console",
                             service_tokens=TOKEN) as running:
        yield running


class Browser:
    """One headless Chromium; every page it loads is checked and can be photographed."""

    def __init__(self, base: str, shots: str, *, headers: dict[str, str] | None = None) -> None:
        self.base = base
        self.shots = shots
        self.driver = localchromium.headless_browser(extra_headers=headers)
        self.saved: list[Path] = []

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def follow(self, element: Any) -> None:
        """Click ``element`` (a link or a submit button) and wait for the next page to load."""
        old = self.driver.find_element(By.TAG_NAME, "html")
        element.click()
        wait = WebDriverWait(self.driver, 30)
        wait.until(expected_conditions.staleness_of(old))
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def title(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "h1").text)

    def assert_inert(self) -> None:
        """No alert fired, no element a record injected: markup in records stays text."""
        try:
            alert = self.driver.switch_to.alert
        except NoAlertPresentException:
            alert = None
        assert alert is None, f"a script ran: alert {alert.text!r}"
        assert self.driver.find_elements(By.TAG_NAME, "img") == []
        assert self.driver.find_elements(By.TAG_NAME, "b") == []
        assert self.driver.find_elements(By.TAG_NAME, "script") == []

    def shot(self, name: str) -> Path:
        """A PNG of the whole page (not just the window), through the DevTools protocol."""
        path = artifacts_dir() / f"{self.shots}-{name}.png"
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000),
                     "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.stat().st_size > 1000, path
        self.saved.append(path)
        return path

    def quit(self) -> None:
        self.driver.quit()


async def in_browser(base: str, shots: str, steps: Callable[[Browser], Any],
                     headers: dict[str, str] | None = AUTH) -> Any:
    """Run ``steps`` with a fresh browser in a thread (WebDriver calls block)."""
    def run() -> Any:
        browser = Browser(base, shots, headers=headers)
        try:
            return steps(browser)
        finally:
            browser.quit()

    return await asyncio.to_thread(run)


async def test_without_the_token_the_console_is_refused(stack: PaymentStack) -> None:
    def steps(browser: Browser) -> str:
        browser.open("/console")
        return browser.text()

    body = await in_browser(stack.worker.url, "no-token", steps, headers=None)
    assert "unauthorized" in body and "Pipeline health" not in body
    # The replay POST too, whatever the form holds: the token comes before any console check.
    async with httpx.AsyncClient(timeout=30.0) as http:
        for headers in ({}, {"Authorization": "Bearer tok-wrong"}):
            answer = await http.post(f"{stack.worker.url}/console/dead-letters/replay",
                                     data={"position": "0:0", "confirm": "replay"}, headers=headers)
            assert answer.status_code == 401, answer.text
        answer = await http.post(f"{stack.worker.url}/console/dead-letters/replay",
                                 data={"position": "0:0", "confirm": "replay"}, headers=AUTH)
        assert answer.status_code == 403 and "CSRF" in answer.text  # no console session: refused


async def test_a_dead_letter_is_found_shown_and_replayed_in_the_browser(stack: PaymentStack) -> None:
    settings = stack.settings
    # The order commands: a topic the worker reads and the stack's event reader does not.
    source = settings.topic(catalog.ORDER_COMMANDS)
    key = f"order-{uuid.uuid4().hex[:10]}{MARKUP_KEY_SUFFIX}"
    value = b"\xde\xad\xbe\xef not avro at all"
    stack.writer.send_raw(source, key, value, [("x-trace", MARKUP_HEADER.encode())])
    garbage = stack.writer.last()
    first = await stack.dead_letters.wait_for(garbage)
    assert first.header("dlq.reason") == "undecodable"

    def steps(browser: Browser) -> dict[str, Any]:
        # Pipeline health: the kernel agents, with this worker's partitions.
        browser.open("/console")
        assert browser.title() == "Pipeline health"
        body = browser.text()
        for agent in ("order_events", "payment_events", "stripe_events", "user_order_events"):
            assert agent in body, agent
        assert re.search(r"payment_events: lag per partition", body)
        assert "no input partition" not in body.split("payment_events: lag per partition")[1][:200]
        browser.shot("health")

        # The list, filtered as dlq list filters: the test's dead letter is there.
        browser.open("/console/dead-letters")
        browser.driver.find_element(By.NAME, "source_topic").send_keys(catalog.ORDER_COMMANDS)
        browser.driver.find_element(By.NAME, "reason").send_keys("undecodable")
        browser.follow(browser.driver.find_element(By.CSS_SELECTOR, "form.filters button"))
        assert f"source_topic={catalog.ORDER_COMMANDS}" in browser.driver.current_url
        rows = [row for row in browser.driver.find_elements(By.CSS_SELECTOR, "table.letters tbody tr")
                if key in row.text]
        assert len(rows) == 1, browser.text()
        assert f"{source}[{garbage.partition}]@{garbage.offset}" in rows[0].text
        browser.assert_inert()
        browser.shot("dead-letters")
        position_link = rows[0].find_element(By.CSS_SELECTOR, "td:nth-child(2) a")
        position = position_link.text
        browser.follow(position_link)

        # One dead letter: the bytes as hex, the markup as text.
        assert browser.title() == f"Dead letter {position}"
        body = browser.text()
        assert value.hex()[:32] in body.replace("\n", "")
        assert key in body and MARKUP_HEADER in body and "undecodable" in body
        browser.assert_inert()
        browser.shot("dead-letter")

        # Replay: a confirmation page first, then the result.
        browser.follow(browser.driver.find_element(By.LINK_TEXT, "Replay…"))
        assert browser.title() == "Replay dead letters: confirm"
        planned = browser.driver.find_element(By.CSS_SELECTOR, "table.planned tbody tr").text
        assert position in planned and f"{source}[{garbage.partition}]" in planned
        browser.driver.find_element(By.NAME, "confirm").click()
        browser.shot("replay-confirm")
        browser.follow(browser.driver.find_element(By.CSS_SELECTOR,
                                                   "form.confirm button[type=submit]"))
        assert browser.title() == "Replay result", browser.text()
        assert "Replayed 1 record(s)" in browser.text()
        cells = [c.text for c in browser.driver.find_elements(By.CSS_SELECTOR, "table.replayed td")]
        browser.shot("replayed")
        return {"position": position, "cells": cells}

    seen = await in_browser(stack.worker.url, "replay", steps)
    position, sent_to, offset, count = seen["cells"]
    assert position == seen["position"] and count == "1"
    assert sent_to == f"{source}[{garbage.partition}]"

    # The replayed record reached its source partition: the worker dead-letters it again, counted.
    replayed = Sent(source, key, value, [], garbage.partition, int(offset))
    again = await stack.dead_letters.wait_for(replayed)
    assert again.header(REPLAY_COUNT_HEADER) == "1"
    assert again.header("x-trace") == MARKUP_HEADER
    assert again.key == key.encode() and again.value == value


async def test_an_order_and_its_payment_are_looked_up(stack: PaymentStack) -> None:
    order, intent_id = await stack.paid_order(f"user-console-{uuid.uuid4().hex[:8]}", 4200)
    order_id = order["order_id"]

    def steps(browser: Browser) -> dict[str, str]:
        browser.open("/console/lookup")
        kinds = [o.get_attribute("value") for o in
                 Select(browser.driver.find_element(By.NAME, "kind")).options]
        assert kinds == ["order", "payment", "payment_intent"]
        found = {}
        for kind, ident in (("order", order_id), ("payment", order_id), ("payment_intent", intent_id)):
            browser.open("/console/lookup")
            Select(browser.driver.find_element(By.NAME, "kind")).select_by_value(kind)
            browser.driver.find_element(By.NAME, "id").send_keys(ident)
            browser.follow(browser.driver.find_element(By.CSS_SELECTOR, "form.lookup button"))
            found[kind] = browser.text()
            browser.shot(f"lookup-{kind}")
        browser.open(f"/console/lookup?kind=order&id={uuid.uuid4()}")
        found["unknown"] = browser.text()
        return found

    found = await in_browser(stack.worker.url, "lookup", steps)
    assert "COMPLETED" in found["order"] and order_id in found["order"]
    assert intent_id in found["payment"] and "client_secret" not in found["payment"]
    assert order_id in found["payment_intent"]
    assert "404 not_found" in found["unknown"]


async def test_a_second_worker_forwards_lookups_to_the_owner(stack: PaymentStack) -> None:
    """Orders owned by one worker are found through the other worker's console, forwarded."""
    settings = stack.settings
    second = WorkerProcess(settings_env(settings), free_port(), stack.state_dir / "second-state",
                           name="second")
    loop = asyncio.get_running_loop()
    table = f"{settings.app_id}-orders-changelog"
    try:
        await loop.run_in_executor(None, second.start, 120.0)
        workers = {stack.worker.url: stack.worker, second.url: second}

        deadline = time.monotonic() + 90
        while True:
            routes = await loop.run_in_executor(None, second.routes)
            owned = {url: set(topics.get(table, [])) for url, topics in routes.items()}
            if set(owned) == set(workers) and all(owned.values()):
                break
            assert time.monotonic() < deadline, f"the two workers never split the partitions: {owned}"
            await asyncio.sleep(1.0)
        for worker in workers.values():
            await loop.run_in_executor(None, worker.wait_serving, 60.0)

        def owner(order_id: str) -> str:
            partition = PARTITIONER(order_id.encode(), PARTITIONS, PARTITIONS)
            [url] = [url for url, partitions in owned.items() if partition in partitions]
            return url

        # Orders until each worker has one that the other owns (about two are enough).
        orders: list[dict[str, Any]] = []
        while len({owner(o["order_id"]) for o in orders}) < 2:
            assert len(orders) < 30
            orders.append(await stack.create_order(f"user-console-fw-{uuid.uuid4().hex[:8]}", 1500))
        forwarded = 0
        async with httpx.AsyncClient(timeout=30.0, headers=AUTH) as http:
            for order in orders:
                for url, worker in workers.items():
                    answer = await http.get(f"{url}/console/lookup",
                                            params={"kind": "order", "id": order["order_id"]})
                    assert answer.status_code == 200, (worker.name, answer.text)
                    assert order["order_id"] in answer.text and "status" in answer.text
                    forwarded += owner(order["order_id"]) != url
        assert forwarded >= 2

        [elsewhere] = [o for o in orders if owner(o["order_id"]) == stack.worker.url][:1]

        def steps(browser: Browser) -> str:
            browser.open(f"/console/lookup?kind=order&id={elsewhere['order_id']}")
            browser.shot("lookup-forwarded")
            return browser.text()

        assert elsewhere["order_id"] in await in_browser(second.url, "second-worker", steps)
    finally:
        await loop.run_in_executor(None, second.kill)
