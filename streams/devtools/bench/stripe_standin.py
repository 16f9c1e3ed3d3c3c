"""A local stand-in for Stripe's PaymentIntent create, for ``paystream bench payments`` only.

localstripe answers some 80 calls/s on this machine, far below what the
payment path processes, so a bench against it would measure localstripe.
This server answers ``POST /v1/payment_intents`` (form-encoded, as
stripe-python sends it) with a PaymentIntent in Stripe's shape and nothing
else: one new ``pi_...`` id per ``Idempotency-Key`` (the same key gets the
same answer again, as Stripe does for 24 hours), the request's amount,
currency and metadata echoed, status ``requires_payment_method``.  It checks
nothing (no key, no amount minimum) and keeps every answer in memory for
the length of the run.

It runs in a process of its own (``python -m
streams.devtools.bench.stripe_standin --port N``, :class:`StandinProcess`)
so its CPU is neither the worker's nor the raw loop's; ``GET /_standin/stats``
answers the calls served and keys seen.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from aiohttp import web

INTENT_PATH = "/v1/payment_intents"


def payment_intent(intent_id: str, form: Any, now: int) -> dict[str, Any]:
    """A PaymentIntent as Stripe's API returns a new one (API version 2024+ fields)."""
    metadata = {name[len("metadata["):-1]: value for name, value in form.items()
                if name.startswith("metadata[") and name.endswith("]")}
    amount = int(form.get("amount", 0))
    return {
        "id": intent_id, "object": "payment_intent", "amount": amount, "amount_capturable": 0,
        "amount_details": {"tip": {}}, "amount_received": 0, "application": None,
        "application_fee_amount": None, "automatic_payment_methods": None, "canceled_at": None,
        "cancellation_reason": None, "capture_method": "automatic",
        "client_secret": f"{intent_id}_secret_{secrets.token_hex(12)}",
        "confirmation_method": "automatic", "created": now, "currency": form.get("currency", "eur"),
        "customer": form.get("customer"), "description": None, "invoice": None,
        "last_payment_error": None, "latest_charge": None, "livemode": False, "metadata": metadata,
        "next_action": None, "on_behalf_of": None, "payment_method": form.get("payment_method"),
        "payment_method_configuration_details": None, "payment_method_options": {"card": {
            "installments": None, "mandate_options": None, "network": None,
            "request_three_d_secure": "automatic"}},
        "payment_method_types": ["card"], "processing": None, "receipt_email": None, "review": None,
        "setup_future_usage": None, "shipping": None, "source": None, "statement_descriptor": None,
        "statement_descriptor_suffix": None, "status": "requires_payment_method",
        "transfer_data": None, "transfer_group": None,
    }


def make_app() -> web.Application:
    answers: dict[str, bytes] = {}
    stats = {"calls": 0, "replayed": 0, "without_key": 0}

    async def create_intent(request: web.Request) -> web.Response:
        stats["calls"] += 1
        key = request.headers.get("Idempotency-Key")
        body = answers.get(key) if key else None
        if body is not None:
            stats["replayed"] += 1
        else:
            form = await request.post()
            intent = payment_intent(f"pi_{secrets.token_hex(12)}", form, int(time.time()))
            body = json.dumps(intent).encode()
            if key:
                answers[key] = body
            else:
                stats["without_key"] += 1
        return web.Response(body=body, content_type="application/json",
                            headers={"Request-Id": f"req_{secrets.token_hex(7)}"})

    async def stats_page(request: web.Request) -> web.Response:
        return web.json_response({**stats, "keys": len(answers)})

    app = web.Application()
    app.router.add_post(INTENT_PATH, create_intent)
    app.router.add_get("/_standin/stats", stats_page)
    return app


class StandinProcess:
    """The stand-in as a subprocess on ``port`` (started by the bench, stopped by pid)."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> StandinProcess:
        root = Path(__file__).resolve().parents[3]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams.devtools.bench.stripe_standin", "--port", str(self.port)],
            cwd=root, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.stats()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Stripe stand-in did not start (see {self.log_path})") from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/_standin/stats", timeout=5) as answer:
            return json.loads(answer.read())  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
