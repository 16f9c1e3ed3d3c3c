"""localstripe (the Stripe stand-in of the tests and the local demo) as a child process.

:class:`LocalStripe` starts one localstripe on a port of its own, waits until
it answers, registers webhook endpoints with it and stops it; the tests
(``tests/integration/stripe_support.py``) and ``paystream stripe`` use it.

Two ways to run it:

- ``idempotency=True`` (the default): ``python -m streams.devtools.localstripe
  serve`` runs localstripe's own aiohttp application with one middleware
  added, Stripe's documented idempotency: a POST carrying an
  ``Idempotency-Key`` already seen (for the same API key) gets the first
  answer again (with ``Idempotent-Replayed: true``) instead of being run
  twice, and the same key with other parameters gets 400
  ``idempotency_error``.  localstripe 1.15.10 ignores the header, so without
  this a replayed call creates a second PaymentIntent or refund where Stripe
  would not, and the tests of "a replay never charges twice" would test
  nothing.  Answers of 5xx are not kept (a retry runs again).  The store
  stays in memory: localstripe's dump of every write to the shared
  ``/tmp/localstripe.pickle`` (re-read only without ``--from-scratch``) is
  turned off, so side-by-side instances do not write over each other.
- ``idempotency=False``: the ``localstripe --port N --from-scratch`` script of
  the venv, untouched.

Only the process this object started is ever signalled.  localstripe is a
test extra: it is imported only by the child process, never here.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from streams.devtools import host
from streams.devtools.host import free_port

#: Any ``sk_`` key works with localstripe; this one only authenticates the probe.
PROBE_KEY = "sk_test_localstripe_probe"
SERVE_MODULE = "streams.devtools.localstripe"


class LocalStripeError(RuntimeError):
    """localstripe did not start, or refused a configuration request."""


class LocalStripe:
    """One localstripe process on 127.0.0.1:``port`` (0: a free port).

    ``log_path``: where its output goes (default: discarded).  Usable as a
    context manager: ``with LocalStripe() as ls: ... ls.url ...``.
    """

    def __init__(self, port: int = 0, *, idempotency: bool = True, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.idempotency = idempotency
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The API base for ``STRIPE_API_BASE``."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.idempotency:
            return [sys.executable, "-m", SERVE_MODULE, "serve", "--port", str(self.port)]
        script = Path(sys.executable).parent / "localstripe"
        if not script.exists():
            raise LocalStripeError(f"{script} is missing: pip install -e '.[test]' installs localstripe")
        return [str(script), "--port", str(self.port), "--from-scratch"]

    def start(self, *, timeout: float = 30.0, detach: bool = False) -> LocalStripe:
        """Start the process and wait until it answers an authenticated request.

        ``detach``: run it in a session of its own, so it outlives the caller
        (``paystream stripe start``); the caller keeps :attr:`process`.pid.
        """
        if self.process is not None:
            raise LocalStripeError(f"localstripe on port {self.port} was started already")
        if self.answering():
            raise LocalStripeError(f"port {self.port} is taken by a server already")
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=detach, cwd=Path(__file__).resolve().parents[2])
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answering():
                return self
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise LocalStripeError(f"localstripe exited with code {code} at start"
                                       + (f" (log: {self.log_path})" if self.log_path else ""))
            time.sleep(0.05)
        self.stop()
        raise LocalStripeError(f"localstripe on port {self.port} did not answer within {timeout:g} s")

    def answering(self) -> bool:
        """Whether an authenticated ``GET /v1/payment_intents?limit=1`` is answered 200.

        A list changes nothing (``GET /v1/balance`` would: its first call
        makes localstripe send a ``balance.available`` webhook).
        """
        request = urllib.request.Request(
            self.url + "/v1/payment_intents?limit=1", headers={"Authorization": f"Bearer {PROBE_KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=1.0) as answer:
                return int(answer.status) == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def register_webhook(self, endpoint_id: str, url: str, secret: str,
                         events: Sequence[str] | None = None) -> None:
        """Have localstripe sign and POST its events to ``url`` (``POST /_config/webhooks/<id>``).

        ``events``: only these types (default: every event).  The same id
        again replaces the endpoint.  localstripe sends each event once,
        about 1 s after it happens, and never retries.
        """
        body: dict[str, Any] = {"url": url, "secret": secret}
        if events is not None:
            body["events"] = list(events)
        self._config("POST", f"/_config/webhooks/{endpoint_id}", body)

    def ensure_plan(self, plan_id: str, amount: int, currency: str = "eur", interval: str = "month") -> str:
        """Have localstripe hold Plan ``plan_id`` (its Product too); return the id.

        What an operator does once in Stripe's dashboard before anyone can
        subscribe (a Product, and a recurring Price, which Stripe's API also
        answers as a Plan).  localstripe has no Prices, so tests subscribe to
        Plans (the gateway sends ``items[].plan``, which Stripe takes for
        either).  A plan already there with the same amount, currency and
        interval is kept; one with others raises :class:`LocalStripeError`
        (localstripe cannot change a plan's price, nor can Stripe).
        """
        existing = self._api("GET", f"/v1/plans/{plan_id}", missing_ok=True)
        if existing is None:
            product = self._api("POST", "/v1/products", {"name": f"paystream {plan_id}"})
            assert product is not None
            existing = self._api("POST", "/v1/plans", {
                "id": plan_id, "amount": str(int(amount)), "currency": currency.lower(),
                "interval": interval, "product": product["id"]})
            assert existing is not None
        found = (existing.get("amount"), existing.get("currency"), existing.get("interval"))
        if found != (int(amount), currency.lower(), interval):
            raise LocalStripeError(f"plan {plan_id} exists with amount/currency/interval {found}")
        return plan_id

    def _api(self, method: str, path: str, form: dict[str, str] | None = None, *,
             missing_ok: bool = False) -> dict[str, Any] | None:
        """One request to localstripe's Stripe API (form-encoded, as Stripe's clients send)."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {PROBE_KEY}",
                     "Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(request, timeout=5.0) as answer:
                result: dict[str, Any] = json.loads(answer.read())
                return result
        except urllib.error.HTTPError as exc:
            if missing_ok and exc.code == 404:
                return None
            raise LocalStripeError(f"localstripe {method} {path}: HTTP {exc.code}") from exc

    def flush(self) -> None:
        """Forget every object (``DELETE /_config/data``); webhooks stay registered."""
        self._config("DELETE", "/_config/data", None)

    def _config(self, method: str, path: str, body: dict[str, Any] | None) -> None:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5.0) as answer:
                answer.read()
        except urllib.error.HTTPError as exc:
            raise LocalStripeError(f"localstripe {method} {path}: HTTP {exc.code}") from exc

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the process this object started (SIGTERM, then SIGKILL)."""
        process, self.process = self.process, None
        host.stop_process(process, timeout, kill_timeout=timeout)

    def __enter__(self) -> LocalStripe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# ``paystream stripe start|stop|status``: one detached localstripe whose pid
# lives in the state directory, on the port of STRIPE_API_BASE.


def _pid_file(state_dir: Path) -> Path:
    return state_dir / "localstripe.pid"


def running_pid(state_dir: Path) -> int | None:
    """The pid of the localstripe ``paystream stripe start`` started, if it still runs."""
    try:
        pid = int(_pid_file(state_dir).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"localstripe" in cmdline else None  # else the pid was reused


def main_start(state_dir: Path, api_base: str) -> int:
    """Start a detached localstripe on ``api_base``'s port unless ours is running."""
    base = urlsplit(api_base)
    if base.hostname not in ("localhost", "127.0.0.1") or not base.port:
        print(f"stripe: STRIPE_API_BASE={api_base} is not a local http://127.0.0.1:<port> address",
              file=sys.stderr)
        return 2
    runner = LocalStripe(base.port, log_path=state_dir / "localstripe.log")
    pid = running_pid(state_dir)
    if pid is not None:
        print(f"stripe: localstripe already running, pid {pid}, {runner.url}")
        return 0
    try:
        runner.start(detach=True)
    except LocalStripeError as exc:
        print(f"stripe: {exc}", file=sys.stderr)
        return 1
    assert runner.process is not None
    _pid_file(state_dir).write_text(f"{runner.process.pid}\n")
    print(f"stripe: localstripe running, pid {runner.process.pid}, {runner.url} (log: {runner.log_path})")
    return 0


def main_stop(state_dir: Path, timeout: float = 10.0) -> int:
    """Stop the localstripe ``paystream stripe start`` started (SIGTERM, then SIGKILL)."""
    pid = running_pid(state_dir)
    if pid is None:
        _pid_file(state_dir).unlink(missing_ok=True)
        print("stripe: localstripe was not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    _pid_file(state_dir).unlink(missing_ok=True)
    print("stripe: localstripe stopped")
    return 0


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie child of ours is reaped and counts as gone)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask /proc
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def main_status(state_dir: Path, api_base: str) -> int:
    pid = running_pid(state_dir)
    port = urlsplit(api_base).port or 0
    if pid is None:
        print("stripe: localstripe not running")
        return 3
    state = "answering" if LocalStripe(port).answering() else "not answering"
    print(f"stripe: localstripe running, pid {pid}, {api_base}, {state}")
    return 0


# --------------------------------------------------------------------------
# The child process: localstripe's application plus Stripe's idempotency.

Handler = Callable[[Any], Awaitable[Any]]


def idempotency_middleware() -> Any:
    """An aiohttp middleware giving localstripe Stripe's idempotent POSTs.

    Keys are scoped by the API key (the ``Authorization`` header, hashed) like
    Stripe's; the request is fingerprinted by method, path and body.  A second
    request with a key still in flight waits for the first one's answer.
    """
    from aiohttp import web
    from localstripe.errors import UserError

    saved: dict[tuple[str, str], tuple[str, int, bytes, str]] = {}
    locks: dict[tuple[str, str], asyncio.Lock] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "DELETE" and request.path == "/_config/data":
            saved.clear()  # the objects the saved answers name are gone
        key = request.headers.get("Idempotency-Key")
        if request.method != "POST" or not key:
            return await handler(request)
        scope = hashlib.sha256(request.headers.get("Authorization", "").encode()).hexdigest()
        slot = (scope, key)
        body = await request.read()
        fingerprint = hashlib.sha256(b"%s %s\n%s" % (request.method.encode(),
                                                      request.path.encode(), body)).hexdigest()
        async with locks.setdefault(slot, asyncio.Lock()):
            if slot in saved:
                first, status, payload, content_type = saved[slot]
                if first != fingerprint:
                    return web.json_response({"error": {
                        "type": "idempotency_error",
                        "message": "Keys for idempotent requests can only be used with the same "
                                   "parameters they were first used with.",
                    }}, status=400)
                return web.Response(status=status, body=payload, content_type=content_type,
                                    headers={"Idempotent-Replayed": "true", "Idempotency-Key": key})
            try:
                response = await handler(request)
            except UserError as refused:
                response = refused.to_response()
            if response.status < 500 and isinstance(response, web.Response) and response.body is not None:
                payload = bytes(response.body)  # type: ignore[arg-type]
                saved[slot] = (fingerprint, response.status, payload, response.content_type)
            response.headers["Idempotency-Key"] = key
            return response

    return middleware


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Run localstripe's application with :func:`idempotency_middleware` (blocks)."""
    import logging

    from aiohttp import web
    from localstripe import resources, server

    resources.store.dump_to_disk = lambda: None  # type: ignore[method-assign]
    server.app.middlewares.insert(0, idempotency_middleware())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    web.run_app(server.app, host=host, port=port, print=None, access_log=logging.getLogger("aiohttp.access"))


def confirm_intent(settings: Any, intent_id: str, payment_method: str) -> int:
    """What a user's browser does on a checkout page: set a test card on the intent and confirm it.

    Prints the intent's status after the confirm (or the decline's code).
    """
    from connectors.stripe_gateway import StripeGateway
    from streams.kernel import CallRefused
    from tables.aggregate import Call

    async def run() -> int:
        async with StripeGateway.from_settings(settings) as gateway:
            call = Call("stripe", "confirm_payment_intent",
                        {"payment_intent_id": intent_id, "payment_method": payment_method},
                        f"manual-confirm-{intent_id}-{payment_method}-{time.time_ns()}")
            try:
                view = await gateway.call(call)
            except CallRefused as refused:
                print(json.dumps({"id": intent_id, "refused": str(refused), "code": refused.code}))
                return 1
        print(json.dumps({k: view[k] for k in ("id", "status", "amount", "currency", "latest_charge")}))
        return 0

    return asyncio.run(run())


def cli(action: str, settings: Any, *, intent_id: str | None = None, card: str = "pm_card_visa",
        webhook_url: str | None = None) -> int:
    """``paystream stripe start|stop|status|webhook|confirm`` on :class:`~streams.settings.Settings`.

    - ``start``/``stop``/``status``: the detached localstripe on the port of
      ``STRIPE_API_BASE`` (pid and log in ``PAYSTREAM_STATE_DIR``);
    - ``webhook``: register the ingress (``webhook_url``, default
      ``http://INGRESS_HOST:INGRESS_PORT/webhooks/stripe``) with the first
      secret of ``STRIPE_WEBHOOK_SECRET``;
    - ``confirm``: confirm ``intent_id`` with ``card`` (:func:`confirm_intent`).
    """
    state_dir = Path(settings.state_dir)
    if action == "start":
        return main_start(state_dir, settings.stripe_api_base)
    if action == "stop":
        return main_stop(state_dir)
    if action == "status":
        return main_status(state_dir, settings.stripe_api_base)
    if action == "webhook":
        url = webhook_url or f"http://{settings.ingress_host}:{settings.ingress_port}/webhooks/stripe"
        runner = LocalStripe(urlsplit(settings.stripe_api_base).port or 8420)
        runner.register_webhook("paystream", url, settings.stripe_webhook_secrets[0])
        print(f"stripe: localstripe sends its webhooks to {url}")
        return 0
    if action == "confirm":
        if not intent_id:
            print("stripe: confirm needs a PaymentIntent id", file=sys.stderr)
            return 2
        return confirm_intent(settings, intent_id, card)
    raise ValueError(f"unknown action {action!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``paystream stripe`` (and of ``python -m streams.devtools.localstripe``)."""
    parser.add_argument("action", choices=["start", "stop", "status", "webhook", "confirm"])
    parser.add_argument("intent_id", nargs="?", help="confirm: the PaymentIntent (pi_...)")
    parser.add_argument("--card", default="pm_card_visa",
                        help="confirm: a test payment method (pm_card_visa succeeds, "
                             "pm_card_chargeCustomerFail is declined)")
    parser.add_argument("--url", dest="webhook_url", help="webhook: the endpoint (default: the ingress)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {SERVE_MODULE}", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="localstripe with Stripe's idempotency, in the foreground")
    run.add_argument("--port", type=int, default=8420)
    run.add_argument("--host", default="127.0.0.1")
    add_arguments(commands.add_parser("stripe", help="what `paystream stripe` does"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, args.host)
        return 0
    from streams.settings import Settings

    return cli(args.action, Settings.from_env(), intent_id=args.intent_id, card=args.card,
               webhook_url=args.webhook_url)


if __name__ == "__main__":
    sys.exit(main())
