"""Service tokens on every HTTP surface, against the real processes (streams.access).

One deployment with ``PAYSTREAM_SERVICE_TOKENS=<current>,<previous>``: our
registry (reads open, writes guarded) holding the worker's contracts, the
``paystream worker`` subprocess (orders, payments, subscriptions, invoices)
that registered them with its token, and the ``paystream ingress``
subprocess.  Each surface is tried with no token, a wrong one, one rotated
out (it was configured before, it is not now) and the current and previous
ones.  A second worker of the same group shows the request forwarded to a
key's owner carries the caller's token; a registry restarted with a new
list shows a rotation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from streams.devtools.localstripe import LocalStripe
from streams.devtools.registry_runner import RegistryThread, registry_settings
from streams.settings import Settings
from tests.integration.payment_support import (
    CURRENCY,
    WEBHOOK_SECRET,
    PaymentStack,
    encode,
    intent_event,
    running_stack,
)
from tests.integration.pipeline_support import free_port
from tests.integration.registry_support import drop_topic, record_schema
from tests.integration.stripe_ingress_support import signature
from tests.integration.worker_process import WorkerProcess, settings_env

CURRENT, PREVIOUS, ROTATED_OUT = ("tok-current-6d1f0b9e", "tok-previous-a41c7730",
                                  "tok-rotated-out-0b3e55d1")
WRONG = "tok-wrong-ffffffff"
TOKENS = f"{CURRENT},{PREVIOUS}"
REFUSED = {"none": None, "wrong": WRONG, "rotated out": ROTATED_OUT}
ACCEPTED = {"current": CURRENT, "previous": PREVIOUS}

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclasses.dataclass
class Guarded:
    stack: PaymentStack
    registry: RegistryThread
    http: httpx.AsyncClient


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guarded(kafka_bootstrap: str, localstripe: LocalStripe,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Guarded]:
    topic = f"t-schemas-access-{uuid.uuid4().hex[:8]}"
    base = Settings.from_env(kafka_bootstrap_servers=kafka_bootstrap)
    registry = RegistryThread(dataclasses.replace(registry_settings(base, topic, free_port()),
                                                  service_tokens=TOKENS)).start()
    try:
        # The worker registers its contracts at start: with no token it would stop on a 401.
        async with running_stack(kafka_bootstrap, registry.url, localstripe,
                                 tmp_path_factory.mktemp("access"), "access", service_tokens=TOKENS,
                                 domains="orders,payments,subscriptions") as stack:
            async with httpx.AsyncClient(timeout=30.0) as http:
                yield Guarded(stack, registry, http)
    finally:
        registry.stop()
        drop_topic(kafka_bootstrap, topic)


def _order_body() -> dict[str, Any]:
    return {"user_id": f"user-access-{uuid.uuid4().hex[:8]}", "order_type": "ONE_TIME",
            "currency": CURRENCY, "items": [{"product_id": "sku-access", "quantity": 1, "unit_amount": 1500}]}


#: (method, path, JSON body) of every worker route; unknown ids: the handlers answer 404/400.
def _worker_routes() -> list[tuple[str, str, dict[str, Any] | None]]:
    unknown = uuid.uuid4().hex
    return [
        ("GET", f"/orders/{unknown}", None),
        ("PATCH", f"/orders/{unknown}", {"items": []}),
        ("POST", f"/orders/{unknown}/cancel", {}),
        ("POST", f"/orders/{unknown}/fulfill", {}),
        ("GET", f"/users/u-{unknown}/orders", None),
        ("GET", f"/payments/pi_{unknown}", None),
        ("POST", f"/payments/pi_{unknown}/refunds", {"amount": 100}),
        ("GET", f"/orders/{unknown}/payment", None),
        ("POST", "/subscriptions", {}),
        ("GET", f"/subscriptions/sub_{unknown}", None),
        ("POST", f"/subscriptions/sub_{unknown}/cancel", {}),
        ("GET", f"/users/u-{unknown}/subscriptions", None),
        ("GET", f"/invoices/in_{unknown}", None),
        ("GET", "/router/", None),  # Faust's own: who owns which partition
        ("GET", "/console", None),  # not mounted yet here, or the console: behind the token either way
        ("POST", "/dlq/replay", {}),
    ]


async def test_every_worker_route_needs_a_configured_token(guarded: Guarded) -> None:
    http, url = guarded.http, guarded.stack.worker.url
    for method, path, body in _worker_routes():
        for name, token in REFUSED.items():
            answer = await http.request(method, url + path, json=body, headers=_auth(token))
            assert answer.status_code == 401, (method, path, name, answer.text)
            assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="paystream"')
            assert answer.json()["error"] == "unauthorized"
        for name, token in ACCEPTED.items():
            answer = await http.request(method, url + path, json=body, headers=_auth(token))
            assert answer.status_code != 401, (method, path, name, answer.text)
            assert answer.status_code < 500, (method, path, name, answer.text)


async def test_an_order_is_created_with_one_token_and_read_with_the_other(guarded: Guarded) -> None:
    http, url = guarded.http, guarded.stack.worker.url
    body = _order_body()
    for name, token in REFUSED.items():
        answer = await http.post(url + "/orders", json=body, headers=_auth(token))
        assert answer.status_code == 401, (name, answer.text)
    created = await http.post(url + "/orders", json=body,
                              headers={**_auth(CURRENT), "Idempotency-Key": uuid.uuid4().hex})
    assert created.status_code == 201, created.text
    order_id = created.json()["order_id"]
    read = await http.get(f"{url}/orders/{order_id}", headers=_auth(PREVIOUS))
    assert read.status_code == 200 and read.json()["order_id"] == order_id
    # Nothing about the refused attempts reached the order topics.
    await guarded.stack.settle()
    assert [e["order_id"] for e in guarded.stack.events("order.created", user_id=body["user_id"])] \
        == [order_id]


async def test_a_paid_order_s_payment_is_read_with_either_token_only(guarded: Guarded) -> None:
    """The payment through localstripe (the stack's API client sends the current token)."""
    stack, http = guarded.stack, guarded.http
    order, intent_id = await stack.paid_order(f"user-access-{uuid.uuid4().hex[:8]}", 1900)
    for path in (f"/payments/{intent_id}", f"/orders/{order['order_id']}/payment",
                 f"/users/{order['user_id']}/orders", f"/users/{order['user_id']}/subscriptions"):
        for name, token in REFUSED.items():
            answer = await http.get(stack.worker.url + path, headers=_auth(token))
            assert answer.status_code == 401, (path, name)
        for name, token in ACCEPTED.items():
            answer = await http.get(stack.worker.url + path, headers=_auth(token))
            assert answer.status_code == 200, (path, name, answer.text)
    assert (await http.get(f"{stack.worker.url}/payments/{intent_id}",
                           headers=_auth(PREVIOUS))).json()["status"] == "SUCCEEDED"


async def test_the_ingress_webhook_needs_its_signature_and_no_token(guarded: Guarded) -> None:
    stack, http = guarded.stack, guarded.http
    # A signed webhook with no token, or with a wrong one, is accepted: the signature decides.
    for token in (None, WRONG):
        raw = encode(intent_event("succeeded", f"pi_{uuid.uuid4().hex[:16]}", amount=700,
                                  order_id=None, user_id=None))
        answer = await http.post(stack.ingress.webhook_url, content=raw, headers={
            **_auth(token), "Stripe-Signature": signature(raw, WEBHOOK_SECRET),
            "Content-Type": "application/json"})
        assert answer.status_code == 200 and answer.json() == {"received": True}, answer.text
    for token in (None, WRONG):
        answer = await http.post(stack.ingress.webhook_url, content=b"{}",
                                 headers={**_auth(token), "Stripe-Signature": "t=1,v1=00"})
        assert answer.status_code == 400 and answer.json() == {"error": "bad_signature"}
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await http.get(stack.ingress.url + path)).status_code == 200, path
    # Anything else on the ingress is behind the token (and then does not exist).
    for name, token in REFUSED.items():
        answer = await http.get(stack.ingress.url + "/orders", headers=_auth(token))
        assert answer.status_code == 401, name
    for token in ACCEPTED.values():
        assert (await http.get(stack.ingress.url + "/orders", headers=_auth(token))).status_code == 404
    log = stack.ingress.log_path.read_text()
    assert all(t not in log for t in (CURRENT, PREVIOUS, WRONG, ROTATED_OUT))


async def test_registry_reads_are_open_and_writes_need_a_token(guarded: Guarded) -> None:
    http, url = guarded.http, guarded.registry.url
    subject = f"access-{uuid.uuid4().hex[:8]}-value"
    schema = {"schema": record_schema("Access", ("id", "string"))}
    content = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
    for name, token in REFUSED.items():
        answer = await http.post(f"{url}/subjects/{subject}/versions", json=schema,
                                 headers={**content, **_auth(token)})
        assert answer.status_code == 401, (name, answer.text)
        assert answer.json()["error_code"] == 40101
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    first = await http.post(f"{url}/subjects/{subject}/versions", json=schema,
                            headers={**content, **_auth(CURRENT)})
    assert first.status_code == 200, first.text
    again = await http.post(f"{url}/subjects/{subject}/versions", json=schema,
                            headers={**content, **_auth(PREVIOUS)})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    # Reads, including the lookup and the compatibility check (POSTs that change nothing): no token.
    assert (await http.get(f"{url}/subjects/{subject}/versions")).json() == [1]
    assert (await http.get(f"{url}/schemas/ids/{first.json()['id']}")).status_code == 200
    looked_up = await http.post(f"{url}/subjects/{subject}", json=schema, headers=content)
    assert looked_up.status_code == 200 and looked_up.json()["version"] == 1
    checked = await http.post(f"{url}/compatibility/subjects/{subject}/versions/latest", json=schema,
                              headers=content)
    assert checked.status_code == 200 and checked.json()["is_compatible"] is True
    # Config, mode and deletes are writes.
    for method, path, body in (("PUT", f"/config/{subject}", {"compatibility": "NONE"}),
                               ("PUT", "/mode", {"mode": "READONLY"}),
                               ("DELETE", f"/subjects/{subject}", None)):
        for name, token in REFUSED.items():
            answer = await http.request(method, url + path, json=body, headers={**content, **_auth(token)})
            assert answer.status_code == 401, (method, path, name)
    assert (await http.get(f"{url}/subjects/{subject}/versions")).json() == [1]
    # The worker's contracts are there: it registered them with its (first) token.
    subjects = (await http.get(f"{url}/subjects")).json()
    prefix = guarded.stack.settings.topic_prefix
    assert f"{prefix}order.created-value" in subjects


async def _read(http: httpx.AsyncClient, url: str, token: str, timeout: float = 60.0) -> httpx.Response:
    """GET as a careful client does: a 503 (a table of the new assignment still
    recovering: "partitions are moving") is retried after its Retry-After."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await http.get(url, headers=_auth(token))
        if answer.status_code != 503 or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(min(float(answer.headers.get("Retry-After") or 1), 2.0))


async def test_a_forwarded_request_carries_the_caller_s_token(guarded: Guarded) -> None:
    """A second worker of the group: each order's owner is one of two, so one GET of each is forwarded."""
    stack, http = guarded.stack, guarded.http
    created = []
    for _ in range(4):
        answer = await http.post(stack.worker.url + "/orders", json=_order_body(),
                                 headers={**_auth(CURRENT), "Idempotency-Key": uuid.uuid4().hex})
        assert answer.status_code == 201, answer.text
        created.append(answer.json()["order_id"])
    port = free_port()
    second = WorkerProcess(settings_env(stack.settings), port, stack.state_dir / "worker-2-state",
                           name="worker-2")
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, second.start, 90.0)
        await loop.run_in_executor(None, stack.worker.wait_serving, 90.0)

        def split() -> bool:
            owners = second.routes()
            return sum(1 for tables in owners.values() if any(tables.values())) == 2

        deadline = loop.time() + 60
        while not await loop.run_in_executor(None, split):
            assert loop.time() < deadline, second.routes()
            await asyncio.sleep(0.5)
        for order_id in created:
            for worker in (stack.worker, second):
                for token in (CURRENT, PREVIOUS):
                    answer = await _read(http, f"{worker.url}/orders/{order_id}", token)
                    assert answer.status_code == 200, (worker.name, answer.text)
                    assert answer.json()["order_id"] == order_id
                for name, token in REFUSED.items():
                    answer = await http.get(f"{worker.url}/orders/{order_id}", headers=_auth(token))
                    assert answer.status_code == 401, (worker.name, name)
    finally:
        await loop.run_in_executor(None, second.stop)


async def test_a_rotation_drops_the_old_token(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Registry restarts: [old] -> [new, old] -> [new]; the old token passes, then does not."""
    topic = f"t-schemas-rotation-{uuid.uuid4().hex[:8]}"
    base = registry_settings(Settings.from_env(kafka_bootstrap_servers=kafka_bootstrap), topic, free_port())
    subject = f"rotation-{uuid.uuid4().hex[:8]}-value"
    content = {"Content-Type": "application/vnd.schemaregistry.v1+json"}

    def register(url: str, token: str, n: int) -> int:
        schema = {"schema": record_schema("Rotation", ("id", "string"), (f"f{n}", ["null", "string"], None))}
        return httpx.post(f"{url}/subjects/{subject}/versions", json=schema,
                          headers={**content, **_auth(token)}, timeout=30.0).status_code

    expected = [("old", {"old": 200, "new": 401}), ("new,old", {"old": 200, "new": 200}),
                ("new", {"old": 401, "new": 200})]
    loop = asyncio.get_running_loop()
    try:
        for n, (tokens, statuses) in enumerate(expected):
            registry = await loop.run_in_executor(
                None, RegistryThread(dataclasses.replace(base, service_tokens=tokens)).start)
            try:
                seen = {name: await loop.run_in_executor(None, register, registry.url, name, n * 2 + i)
                        for i, name in enumerate(("old", "new"))}
            finally:
                registry.stop()
            assert seen == statuses, (tokens, seen)
    finally:
        drop_topic(kafka_bootstrap, topic)
