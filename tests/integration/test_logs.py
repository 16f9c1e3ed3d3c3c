"""Every process' log of a full flow, with ``LOG_FORMAT=json`` at DEBUG: JSON lines, no secrets.

The deployment of the payment tests (``tests/integration/payment_support.py``)
with the schema registry and the sinks as subprocesses too, all four
(``paystream registry``, ``worker --loglevel debug``, ``ingress``, ``sinks
--loglevel debug``) with ``LOG_FORMAT=json``, ``LOG_LEVEL=debug`` and
service tokens configured.  The flow: a user with personal data (name, e-mail)
at the account service, an order created and paid through localstripe
(``pm_card_visa``), a partial refund, the sinks' notifications and billing
records, a request with a wrong token, a webhook with a bad signature, and a
record on a worker topic that cannot be decoded (it holds a card number and
an e-mail address) and is dead-lettered.  Then every process is stopped
with SIGTERM and each line of each log must be a JSON object (ts, level,
logger, msg), and no line may hold a token, the Stripe key, the webhook
secret, a card number, an e-mail address or the user's name.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.clients import spec
from streams import logs
from streams.devtools.localstripe import LocalStripe
from streams.devtools.registry_runner import registry_settings
from streams.devtools.worker_process import ROOT, settings_env
from streams.settings import Settings
from tests.integration.payment_support import WEBHOOK_SECRET, PaymentStack, source_topics
from tests.integration.pipeline_support import free_port, wait_until
from tests.integration.registry_support import drop_topic
from tests.integration.standin_support import StandinThread
from tests.integration.stripe_support import TEST_API_KEY
from tests.integration.worker_process import WorkerProcess

CURRENT, PREVIOUS, WRONG = "tok-logs-current-5c8e21", "tok-logs-previous-90ad4f", "tok-logs-wrong-e7e7e7"
CARD = "4242424242424242"
AMOUNT = 2500


class Process:
    """A ``python -m streams.cli ...`` subprocess logging (stdout and stderr) to a file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name, self.args, self.log_path = name, args, log_path
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen([sys.executable, "-m", "streams.cli", *self.args], cwd=ROOT,
                                            env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        return self

    def assert_running(self) -> None:
        assert self.process is not None and self.process.poll() is None, \
            f"{self.name} exited\n{self.log_path.read_text(errors='replace')[-4000:]}"

    def stop(self, timeout: float = 30.0) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        return process.returncode


class LoggedStack(PaymentStack):
    """The payment stack with its worker at DEBUG."""

    def __init__(self, settings: Settings, localstripe: LocalStripe, state_dir: Path) -> None:
        super().__init__(settings, localstripe, state_dir)
        self.worker = WorkerProcess(settings_env(settings), settings.worker_web_port,
                                    state_dir / "worker-state", name="worker", loglevel="debug",
                                    log_path=state_dir / "worker.log")


def _wait_http(url: str, process: Process, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        process.assert_running()
        try:
            if httpx.get(url, timeout=5.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{process.name} not serving {url}"
        time.sleep(0.3)


#: 13-19 digits, not the fraction or integer part of a decimal number (timer drifts are logged).
_CARDLIKE = re.compile(r"(?<![\d.])(?:\d[ -]?){12,18}\d(?![\d.])")


def _luhn_cards(text: str) -> list[str]:
    found = []
    for match in _CARDLIKE.finditer(text):
        digits = re.sub(r"\D", "", match.group(0))
        total = sum(int(d) if i % 2 == 0 else (2 * int(d) - 9 if int(d) > 4 else 2 * int(d))
                    for i, d in enumerate(reversed(digits)))
        if total % 10 == 0 and digits[0] in "3456":
            found.append(match.group(0))
    return found


@pytest.mark.asyncio
async def test_a_full_flow_logs_json_lines_without_secrets_or_personal_data(
    kafka_bootstrap: str, localstripe: LocalStripe, standins: StandinThread, tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    logged = {"log_format": "json", "log_level": "debug", "service_tokens": f"{CURRENT},{PREVIOUS}"}
    schemas_topic = f"t-schemas-logs-{uuid.uuid4().hex[:8]}"
    registry_env = settings_env(Settings.from_env(**{
        **vars(registry_settings(Settings.from_env(kafka_bootstrap_servers=kafka_bootstrap),
                                 schemas_topic, free_port())), **logged}))
    registry = Process("registry", ["registry"], registry_env, tmp_path / "registry.log").start()
    registry_url = registry_env["SCHEMA_REGISTRY_URL"]
    processes = [registry]
    stack: LoggedStack | None = None
    user_id = f"u-logs-{uuid.uuid4().hex[:8]}"
    name, email = "Zelda Quixote-Marchetti", f"zelda.marchetti.{uuid.uuid4().hex[:6]}@mail.example.org"
    standins.standins.world.users[user_id] = spec.User(user_id=user_id, status="active", tier="basic",
                                                       email=email, name=name)
    try:
        await loop.run_in_executor(None, _wait_http, f"{registry_url}/", registry)
        stack = await LoggedStack.start(kafka_bootstrap, registry_url, localstripe, tmp_path, "logs",
                                        **logged)
        # The sinks serve on WORKER_WEB_PORT + 1 (connectors.sinks.sink_settings): a free port.
        sinks_env = {**settings_env(stack.settings), "WORKER_WEB_PORT": str(free_port() - 1)}
        sinks = Process("sinks", ["sinks", "--loglevel", "debug"], sinks_env, tmp_path / "sinks.log").start()
        processes.append(sinks)

        # The flow: an order paid through localstripe, then partly refunded.
        order, intent_id = await stack.paid_order(user_id, AMOUNT)
        refund = await stack.refund(intent_id, uuid.uuid4().hex, amount=500)
        assert refund.status_code == 201, refund.text
        await stack.events_of("order.refunded", order_id=order["order_id"])
        # Requests that are refused: a wrong token, a forged webhook.
        async with httpx.AsyncClient(timeout=30.0) as http:
            refused = await http.get(f"{stack.worker.url}/orders/{order['order_id']}",
                                     headers={"Authorization": f"Bearer {WRONG}"})
            assert refused.status_code == 401
            forged = await http.post(stack.ingress.webhook_url, content=b'{"id": "evt_x"}',
                                     headers={"Stripe-Signature": "t=1,v1=00",
                                              "Authorization": f"Bearer {CURRENT}"})
            assert forged.status_code == 400
        # A record no contract decodes, holding a card number and an e-mail address: dead-lettered.
        # (on an inbound topic the worker reads and the test's reader does not)
        topic = stack.settings.topic("user.deleted")
        assert topic in source_topics(stack.settings)
        stack.writer.send_raw(topic, user_id.encode(),
                              json.dumps({"card": CARD, "email": email, "name": name}).encode())
        await stack.settle()
        assert stack.dead_letters_of(user_id.encode()), "the bad record was not dead-lettered"

        # The sinks told the user and billed the order (the stand-ins saw both).
        def notified() -> bool:
            sinks.assert_running()
            world = standins.standins.world
            return any(n.get("user_id") == user_id for n in world.notifications) and \
                any(r.user_id == user_id for r in world.billing)

        await wait_until(notified, timeout=90.0, what="the sinks' calls for the order")
    finally:
        for process in reversed(processes[1:]):
            await loop.run_in_executor(None, process.stop)
        if stack is not None:
            await loop.run_in_executor(None, stack.worker.stop)  # SIGTERM: its shutdown lines too
            await stack.stop()
        await loop.run_in_executor(None, registry.stop)
        drop_topic(kafka_bootstrap, schemas_topic)

    assert stack is not None
    logs_of = {"registry": registry.log_path, "worker": stack.worker.log_path,
               "ingress": stack.ingress.log_path, "sinks": sinks.log_path}
    forbidden = {"current token": CURRENT, "previous token": PREVIOUS, "wrong token": WRONG,
                 "stripe key": TEST_API_KEY, "webhook secret": WEBHOOK_SECRET, "card": CARD,
                 "e-mail": email, "name": name, "surname": "Marchetti"}
    counts: dict[str, dict[str, int]] = {}
    record_lines: list[dict[str, Any]] = []
    for process, path in logs_of.items():
        text = path.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines, f"{process} logged nothing"
        levels: dict[str, int] = {}
        for number, line in enumerate(lines, 1):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"{process} line {number} is not JSON: {line[:300]!r}")
            assert isinstance(parsed, dict), (process, number, line[:300])
            assert {"ts", "level", "logger", "msg"} <= set(parsed), (process, number, line[:300])
            levels[parsed["level"]] = levels.get(parsed["level"], 0) + 1
            if "offset" in parsed:
                record_lines.append(parsed)
        counts[process] = levels
        for what, value in forbidden.items():
            assert value not in text, f"{process} log holds the {what}"
        assert not _luhn_cards(text), f"{process} log holds card numbers: {_luhn_cards(text)[:3]}"
        assert not re.search(r"[\w.+-]+@[\w-]+\.[\w.-]+", text), f"{process} log holds an e-mail address"
        assert not re.search(r"\b(?:sk|rk)_(?:test|live)_|\bwhsec_", text), \
            f"{process} log holds a Stripe secret"
        assert not re.search(r"(?i)bearer\s+(?!\[redacted\])\S", text), f"{process} log holds a bearer token"
    print(f"\nlog lines by process and level: {counts}; "
          f"redactions: { {p: path.read_text().count(logs.REDACTED) for p, path in logs_of.items()} }")
    # Nothing needed the filter: the code itself logs none of it (the filter is the last defence).
    assert all(logs.REDACTED not in path.read_text() for path in logs_of.values())
    assert counts["worker"].get("DEBUG", 0) > 0 and counts["sinks"].get("DEBUG", 0) > 0
    assert counts["ingress"].get("INFO", 0) > 0 and counts["registry"].get("INFO", 0) > 0
    # The dead letter's line says which record it was.
    assert counts["worker"].get("WARNING", 0) >= 2  # the 401 and the dead letter, at least
    dead = [line for line in record_lines if line["msg"].startswith("dead-lettered")]
    assert dead and {"topic", "partition", "offset"} <= set(dead[0]), record_lines[:3]
    assert dead[0]["topic"] == topic
