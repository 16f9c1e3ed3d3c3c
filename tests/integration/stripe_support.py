"""Fixtures and helpers of the tests that talk to a real localstripe.

- ``localstripe`` (session): one localstripe child process for the whole test
  session (with Stripe's idempotency, see :mod:`streams.devtools.localstripe`).
  Tests share it and keep apart by their own objects and idempotency keys; a
  test that needs an empty store or its own webhooks starts a
  :class:`LocalStripe` of its own.
- ``stripe_gateway`` (function): a :class:`StripeGateway` on it, built by
  ``StripeGateway.from_settings`` like the worker's.
- :class:`WebhookReceiver`: a real aiohttp server that verifies every
  webhook's ``Stripe-Signature`` with the stripe library and keeps the body.

Import them into a conftest.py to use them::

    from tests.integration.stripe_support import localstripe, stripe_gateway  # noqa: F401
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import stripe
from aiohttp import web

from connectors.stripe_gateway import StripeGateway
from streams.devtools.localstripe import LocalStripe
from streams.settings import Settings

#: localstripe takes any ``sk_`` key longer than 5 characters.
TEST_API_KEY = "sk_test_paystream"


def gateway_settings(api_base: str, **overrides: Any) -> Settings:
    """Settings pointing the Stripe adapter at ``api_base``."""
    values: dict[str, Any] = {"stripe_api_key": TEST_API_KEY, "stripe_api_base": api_base}
    values.update(overrides)
    return Settings.from_env(**values)


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    """One localstripe for the test session (its log in the session's tmp dir)."""
    runner = LocalStripe(log_path=tmp_path_factory.mktemp("localstripe") / "localstripe.log")
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


@pytest_asyncio.fixture
async def stripe_gateway(localstripe: LocalStripe) -> AsyncIterator[StripeGateway]:
    """The worker's Stripe adapter, on the session's localstripe."""
    gateway = StripeGateway.from_settings(gateway_settings(localstripe.url))
    try:
        yield gateway
    finally:
        await gateway.close()


@dataclass(frozen=True)
class Delivery:
    """One webhook as it arrived: the exact bytes, the headers, the parsed event."""

    body: bytes
    headers: dict[str, str]
    event: dict[str, Any]
    received_at: float


class WebhookReceiver:
    """A webhook endpoint on 127.0.0.1 that verifies signatures and records deliveries.

    A delivery whose signature does not verify against ``secret`` is answered
    400 and kept in :attr:`rejected`, so a test sees it instead of waiting.
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self.rejected: list[bytes] = []
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/webhooks/stripe", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/webhooks/stripe"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            stripe.Webhook.construct_event(body, request.headers.get("Stripe-Signature", ""),
                                           self.secret, tolerance=300)
        except (stripe.SignatureVerificationError, ValueError):
            self.rejected.append(body)
            return web.Response(status=400)
        self.deliveries.append(Delivery(body, dict(request.headers), json.loads(body), time.monotonic()))
        self._arrived.set()
        return web.Response(text="ok")

    def of(self, event_type: str, object_id: str | None = None) -> list[Delivery]:
        return [d for d in self.deliveries if d.event["type"] == event_type
                and (object_id is None or d.event["data"]["object"].get("id") == object_id)]

    async def wait_for(self, event_type: str, object_id: str | None = None,
                       timeout: float = 10.0) -> Delivery:
        """The first delivery of ``event_type`` (about ``object_id``), waiting up to ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = self.of(event_type, object_id)
            if found:
                return found[0]
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                seen = [d.event["type"] for d in self.deliveries]
                raise TimeoutError(f"no {event_type} for {object_id} within {timeout:g} s; got {seen}")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass
