"""The service clients against real local HTTP servers: the stand-ins, and one server that answers garbage.

No Kafka needed.  Every test starts its own stand-ins on free ports
(``Standins``), so tests never share a server, a breaker or a key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from connectors.clients import (
    BadResponse,
    ClientOptions,
    ClientsService,
    NotFound,
    Rejected,
    ServiceClients,
    ServiceUnavailable,
)
from streams.devtools.standins import Failure, Standins
from streams.devtools.worker_process import ROOT
from streams.kernel import CallRefused, transient
from streams.settings import Settings
from tables.aggregate import Call

FAST = ClientOptions(timeout_seconds=1.0, max_attempts=3, backoff_base_seconds=0.01,
                     backoff_max_seconds=0.05, breaker_failures=50, breaker_cooldown_seconds=0.3)


@pytest_asyncio.fixture
async def standins() -> AsyncIterator[Standins]:
    async with Standins() as running:
        yield running


def clients_for(standins: Standins, options: ClientOptions = FAST) -> ServiceClients:
    return ServiceClients(Settings.from_env({}), options, urls=standins.urls())


@pytest_asyncio.fixture
async def clients(standins: Standins) -> AsyncIterator[ServiceClients]:
    async with clients_for(standins) as running:
        yield running


def received(standins: Standins, service: str, method: str | None = None) -> list[dict[str, Any]]:
    return [e for e in standins.standins[service].received if method is None or e["method"] == method]


def fail(standins: Standins, service: str, **failure: Any) -> None:
    standins.standins[service].failure = Failure(**failure)


# ----------------------------------------------------------------------
# Success: every method of every client


async def test_every_method_answers_the_specs_shape(clients: ServiceClients, standins: Standins) -> None:
    user = await clients.account.get_user("u-demo")
    assert (user.user_id, user.status, user.tier) == ("u-demo", "active", "basic")
    assert (await clients.account.validate_user("u-demo")).valid
    disabled = await clients.account.validate_user("u-disabled")
    assert (disabled.valid, disabled.reason) == (False, "user_disabled")
    unknown = await clients.account.validate_user("u-nobody")
    assert (unknown.valid, unknown.reason) == (False, "user_not_found")
    methods = await clients.account.get_payment_methods("u-demo")
    assert [m.payment_method_id for m in methods.payment_methods] == ["pm_card_visa"]
    assert (await clients.account.get_user_tier("u-pro")).tier == "pro"

    wallet = await clients.wallet.get_wallet("u-demo")
    assert (wallet.balance_amount, wallet.currency) == (10_000, "EUR")
    credit = await clients.wallet.add_credits("u-demo", 500, "EUR", reason="topup", idempotency_key="c-1")
    assert (credit.kind, credit.balance_amount) == ("credit", 10_500)
    debit = await clients.wallet.deduct_credits("u-demo", 1_500, "EUR", reason="order",
                                                idempotency_key="d-1", reference_id="o-1")
    assert (debit.kind, debit.balance_amount, debit.reference_id) == ("debit", 9_000, "o-1")
    assert (await clients.wallet.get_balance("u-demo")).balance_amount == 9_000

    record = await clients.billing.create_billing_record("u-demo", 2_500, "EUR", "payment",
                                                         idempotency_key="b-1", payment_intent_id="pi_1")
    order_record = await clients.billing.create_order_billing_record(
        "o-1", "u-demo", 2_500, "EUR", "COMPLETED", idempotency_key="b-2")
    assert (order_record.order_id, order_record.kind) == ("o-1", "order")
    history = await clients.billing.get_billing_history("u-demo", limit=1)
    assert [r.record_id for r in history.records] == [order_record.record_id]
    assert len((await clients.billing.get_billing_history("u-demo")).records) == 2
    assert record.payment_intent_id == "pi_1"

    assert (await clients.product.get_plan("plan-pro")).amount == 2999
    assert (await clients.product.validate_subscription("u-demo", "plan-pro")).valid
    assert (await clients.product.validate_subscription("u-pro", "plan-pro")).reason == "already_subscribed"
    assert (await clients.product.validate_subscription("u-demo", "plan-legacy")).reason == "plan_inactive"

    sent = [
        await clients.notification.send_payment_receipt("u-demo", "pi_1", 2_500, "EUR",
                                                        idempotency_key="n-1"),
        await clients.notification.send_invoice("u-demo", "in_1", 999, "EUR", "created",
                                                idempotency_key="n-2"),
        await clients.notification.send_order_confirmation("u-demo", "o-1", 2_500, "EUR",
                                                           idempotency_key="n-3"),
        await clients.notification.send_order_status("u-demo", "o-1", "CANCELED", reason="user",
                                                     idempotency_key="n-4"),
    ]
    assert len({n.notification_id for n in sent}) == 4 and all(n.status == "queued" for n in sent)
    assert [n["kind"] for n in standins.world.notifications] == [
        "payment_receipt", "invoice", "order_confirmation", "order_status"]

    intent = await clients.payment.create_payment_intent("o-9", "u-demo", 700, "EUR", idempotency_key="p-1")
    assert intent.client_secret and intent.status == "requires_payment_method"
    assert (await clients.payment.get_payment_status(intent.payment_intent_id)).amount == 700
    canceled = await clients.payment.cancel_payment(intent.payment_intent_id, idempotency_key="p-2")
    assert canceled.status == "canceled"

    usage = await clients.storage.get_storage_usage("u-pro")
    assert usage.used_bytes == 95 * 1024**3
    assert (await clients.storage.validate_quota("u-demo", 1024**3)).allowed
    over = await clients.storage.validate_quota("u-pro", 10 * 1024**3)
    assert (over.allowed, over.reason) == (False, "quota_exceeded")

    # The keyed POSTs carried their keys; nothing was retried.
    assert [e["idempotency_key"] for e in received(standins, "wallet") if e["http_method"] == "POST"] == [
        "c-1", "d-1"]
    assert all(e["status"] in (200, 201, 202) for s in standins.standins for e in received(standins, s))


# ----------------------------------------------------------------------
# 4xx: typed, never retried


async def test_not_found_and_rejections_are_typed_and_not_retried(
        clients: ServiceClients, standins: Standins) -> None:
    with pytest.raises(NotFound) as missing:
        await clients.account.get_user("u-nobody")
    assert (missing.value.status, missing.value.code, missing.value.attempts) == (404, "user_not_found", 1)
    assert len(received(standins, "account", "get_user")) == 1

    with pytest.raises(Rejected) as refused:
        await clients.wallet.deduct_credits("u-empty", 100, "EUR", reason="order", idempotency_key="k-1")
    assert (refused.value.status, refused.value.code) == (409, "insufficient_funds")
    assert not refused.value.retriable and not transient(refused.value)
    with pytest.raises(Rejected) as mismatch:
        await clients.wallet.add_credits("u-demo", 100, "USD", reason="topup", idempotency_key="k-2")
    assert mismatch.value.code == "currency_mismatch"
    # The same key for another request is refused, not applied.
    with pytest.raises(Rejected) as reused:
        await clients.wallet.deduct_credits("u-empty", 200, "EUR", reason="order", idempotency_key="k-1")
    assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
    assert len(received(standins, "wallet")) == 3
    # An injected 400 is a rejection too: one attempt.
    fail(standins, "product", mode="error", status=400)
    with pytest.raises(Rejected) as bad:
        await clients.product.get_plan("plan-pro")
    assert bad.value.code == "standin_failure" and len(received(standins, "product")) == 1


async def test_a_keyed_post_cannot_go_out_without_its_key(
        clients: ServiceClients, standins: Standins) -> None:
    with pytest.raises(ValueError, match="idempotency key"):
        await clients.wallet.deduct_credits("u-demo", 100, "EUR", reason="order", idempotency_key="")
    assert received(standins, "wallet") == []


# ----------------------------------------------------------------------
# 5xx and timeouts: retried, then ServiceUnavailable


async def test_5xx_is_retried_then_gives_up(clients: ServiceClients, standins: Standins) -> None:
    fail(standins, "account", mode="error", status=503)
    with pytest.raises(ServiceUnavailable) as gave_up:
        await clients.account.validate_user("u-demo")
    error = gave_up.value
    assert (error.status, error.attempts, error.code, error.retry_after) == (503, 3, "standin_failure", None)
    assert error.retriable and transient(error)
    assert [e["status"] for e in received(standins, "account")] == [503, 503, 503]


async def test_5xx_then_success_answers(clients: ServiceClients, standins: Standins) -> None:
    fail(standins, "storage", mode="error", status=502, times=2)
    usage = await clients.storage.get_storage_usage("u-demo")
    assert usage.quota_bytes == 10 * 1024**3
    assert [e["status"] for e in received(standins, "storage")] == [502, 502, 200]


async def test_a_timeout_is_retried_then_gives_up(standins: Standins) -> None:
    options = ClientOptions(timeout_seconds=0.2, max_attempts=2, backoff_base_seconds=0.01,
                            backoff_max_seconds=0.01, breaker_failures=50)
    fail(standins, "product", mode="slow", delay_seconds=2.0)
    async with clients_for(standins, options) as clients:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as gave_up:
            await clients.product.get_plan("plan-basic")
        elapsed = time.monotonic() - started
    assert (gave_up.value.code, gave_up.value.attempts) == ("timeout", 2)
    assert 0.4 <= elapsed < 1.5  # two attempts of 0.2 s, not the server's 2 s
    assert len(received(standins, "product")) == 2


async def test_a_dropped_connection_is_retried(clients: ServiceClients, standins: Standins) -> None:
    fail(standins, "billing", mode="drop", times=1)
    history = await clients.billing.get_billing_history("u-demo")
    assert history.records == []
    assert [e["status"] for e in received(standins, "billing")] == ["dropped", 200]


async def test_retry_after_is_honoured_and_handed_on(standins: Standins) -> None:
    options = ClientOptions(backoff_base_seconds=0.001, backoff_max_seconds=0.5, breaker_failures=50)
    fail(standins, "account", mode="error", status=429, times=1, retry_after=0.3)
    async with clients_for(standins, options) as clients:
        started = time.monotonic()
        assert (await clients.account.get_user_tier("u-demo")).tier == "basic"
        assert time.monotonic() - started >= 0.3
        fail(standins, "account", mode="error", status=503, retry_after=7)
        with pytest.raises(ServiceUnavailable) as gave_up:
            await clients.account.get_user_tier("u-demo")
        assert gave_up.value.retry_after == 7.0


# ----------------------------------------------------------------------
# A money-moving POST retried: the same key every time, the money moved once


async def test_a_retried_debit_carries_the_same_key_and_debits_once(
        clients: ServiceClients, standins: Standins) -> None:
    fail(standins, "wallet", mode="error", status=503, times=2, methods=["deduct_credits"])
    debit = await clients.wallet.deduct_credits("u-demo", 2_500, "EUR", reason="order",
                                                idempotency_key="order:o-7:pay", reference_id="o-7")
    assert debit.balance_amount == 7_500
    attempts = received(standins, "wallet", "deduct_credits")
    assert [e["status"] for e in attempts] == [503, 503, 201]
    assert {e["idempotency_key"] for e in attempts} == {"order:o-7:pay"}
    assert standins.world.wallets["u-demo"].balance_amount == 7_500
    # A replay of the same cause (e.g. after a crash) gets the first answer, no second debit.
    again = await clients.wallet.deduct_credits("u-demo", 2_500, "EUR", reason="order",
                                                idempotency_key="order:o-7:pay", reference_id="o-7")
    assert again == debit and standins.world.wallets["u-demo"].balance_amount == 7_500
    assert len(standins.world.transactions) == 1


async def test_a_debit_that_timed_out_but_happened_is_not_repeated(standins: Standins) -> None:
    """The first attempts time out while the service still does the work; a retry is answered from the key."""
    options = ClientOptions(timeout_seconds=0.2, max_attempts=3, backoff_base_seconds=0.01,
                            backoff_max_seconds=0.01, breaker_failures=50)
    fail(standins, "wallet", mode="slow", delay_seconds=0.5, times=2, methods=["add_credits"])
    async with clients_for(standins, options) as clients:
        credit = await clients.wallet.add_credits("u-empty", 1_000, "EUR", reason="topup",
                                                  idempotency_key="topup:o-8")
        await asyncio.sleep(0.6)  # let the slow attempts finish on the server
    assert credit.balance_amount == 1_000
    attempts = received(standins, "wallet", "add_credits")
    assert len(attempts) == 3 and {e["idempotency_key"] for e in attempts} == {"topup:o-8"}
    assert standins.world.wallets["u-empty"].balance_amount == 1_000
    assert len(standins.world.transactions) == 1


# ----------------------------------------------------------------------
# Connection refused -> breaker open -> half-open probe -> closed


async def test_breaker_opens_on_refused_connections_probes_and_closes(standins: Standins) -> None:
    options = ClientOptions(timeout_seconds=0.5, max_attempts=1, breaker_failures=3,
                            breaker_cooldown_seconds=0.4)
    async with clients_for(standins, options) as clients:
        await standins.stop_service("account")
        for _ in range(3):
            with pytest.raises(ServiceUnavailable) as refused:
                await clients.account.validate_user("u-demo")
            assert refused.value.code == "connection_error"
        assert clients.breakers()["account"] == "open"
        assert clients.breakers()["wallet"] == "closed"  # one breaker per service

        await standins.start_service("account")
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as fast:
            await clients.account.validate_user("u-demo")
        assert fast.value.code == "breaker_open" and time.monotonic() - started < 0.05
        assert 0 < fast.value.retry_after <= 0.4  # what is left of the cool-down
        assert received(standins, "account") == []  # failed fast: nothing was sent

        await asyncio.sleep(0.45)
        assert clients.breakers()["account"] == "half_open"
        assert (await clients.account.validate_user("u-demo")).valid  # the probe
        assert clients.breakers()["account"] == "closed"
        assert (await clients.account.get_user_tier("u-demo")).tier == "basic"
        assert len(received(standins, "account")) == 2


async def test_a_failed_probe_opens_the_breaker_again(standins: Standins) -> None:
    options = ClientOptions(timeout_seconds=0.5, max_attempts=1, breaker_failures=2,
                            breaker_cooldown_seconds=0.3)
    async with clients_for(standins, options) as clients:
        fail(standins, "storage", mode="error", status=500)
        for _ in range(2):
            with pytest.raises(ServiceUnavailable):
                await clients.storage.get_storage_usage("u-demo")
        await asyncio.sleep(0.35)
        with pytest.raises(ServiceUnavailable) as probe:
            await clients.storage.get_storage_usage("u-demo")
        assert probe.value.status == 500  # the probe went out and failed
        assert clients.breakers()["storage"] == "open"
        with pytest.raises(ServiceUnavailable) as fast:
            await clients.storage.get_storage_usage("u-demo")
        assert fast.value.code == "breaker_open"
        assert len(received(standins, "storage")) == 3


async def test_retries_stop_when_the_breaker_opens(standins: Standins) -> None:
    options = ClientOptions(max_attempts=5, backoff_base_seconds=0.001, backoff_max_seconds=0.001,
                            breaker_failures=2, breaker_cooldown_seconds=10)
    fail(standins, "account", mode="error", status=503)
    async with clients_for(standins, options) as clients:
        with pytest.raises(ServiceUnavailable) as stopped:
            await clients.account.get_user("u-demo")
    assert stopped.value.code == "breaker_open"
    assert len(received(standins, "account")) == 2


# ----------------------------------------------------------------------
# The kernel adapter


async def test_the_kernel_adapter_maps_refusals_and_keeps_unavailability_transient(
        clients: ServiceClients, standins: Standins) -> None:
    services = clients.services()
    assert set(services) == {"account", "wallet", "billing", "product", "notification", "payment", "storage"}
    answer = await services["wallet"](Call("wallet", "deduct_credits", {
        "user_id": "u-demo", "amount": 100, "currency": "EUR", "reason": "order", "reference_id": "o-1"},
        "order:o-1:wallet"))
    assert answer["balance_amount"] == 9_900 and answer["kind"] == "debit"
    assert received(standins, "wallet")[0]["idempotency_key"] == "order:o-1:wallet"
    verdict = await services["account"](Call("account", "validate_user", {"user_id": "u-disabled"}, "k"))
    assert verdict == {"user_id": "u-disabled", "valid": False, "reason": "user_disabled",
                       "status": "disabled"}

    async def refused(call: Call) -> CallRefused:
        with pytest.raises(CallRefused) as info:
            await services[call.service](call)
        return info.value

    assert (await refused(Call("wallet", "deduct_credits", {
        "user_id": "u-empty", "amount": 100, "currency": "EUR", "reason": "order"}, "k-2"))).code == \
        "insufficient_funds"
    assert (await refused(Call("account", "get_user", {"user_id": "u-nobody"}, "k-3"))).code == \
        "user_not_found"
    assert (await refused(Call("account", "delete_user", {"user_id": "u-demo"}, "k-4"))).code == \
        "unknown_operation"
    assert (await refused(Call("wallet", "add_credits", {"user_id": "u-demo", "amount": "lots",
                                                         "currency": "EUR", "reason": "x"}, "k-5"))).code == \
        "invalid_arguments"
    assert (await refused(Call("wallet", "add_credits", {"user_id": "u-demo", "amount": 1,
                                                         "currency": "EUR", "reason": "x"}, ""))).code == \
        "missing_idempotency_key"

    fail(standins, "product", mode="error", status=503)
    with pytest.raises(ServiceUnavailable) as down:
        await services["product"](Call("product", "get_plan", {"plan_id": "plan-pro"}, "k-6"))
    assert transient(down.value)


# ----------------------------------------------------------------------
# A server that does not keep to the spec


@pytest_asyncio.fixture
async def rogue() -> AsyncIterator[str]:
    async def not_the_shape(request: web.Request) -> web.Response:
        return web.json_response({"user_id": "u", "tier": 7})

    async def not_json(request: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>", status=200)

    async def plain_error(request: web.Request) -> web.Response:
        return web.Response(text="nope", status=403)

    app = web.Application()
    app.router.add_get("/users/{user_id}/tier", not_the_shape)
    app.router.add_get("/users/{user_id}", not_json)
    app.router.add_get("/users/{user_id}/payment-methods", plain_error)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_answers_that_break_the_spec_are_bad_responses(rogue: str) -> None:
    async with ServiceClients(Settings.from_env({}), FAST, urls={"account": rogue}) as clients:
        with pytest.raises(BadResponse, match="tier: expected a string") as shape:
            await clients.account.get_user_tier("u")
        assert shape.value.attempts == 1 and transient(shape.value)
        with pytest.raises(BadResponse):
            await clients.account.get_user("u")
        with pytest.raises(Rejected) as plain:
            await clients.account.get_payment_methods("u")
        assert (plain.value.status, plain.value.code) == (403, "http_403")


# ----------------------------------------------------------------------
# One session, logs without personal data


async def test_one_session_is_reused_and_closed(standins: Standins) -> None:
    clients = clients_for(standins)
    await clients.start()
    session = clients.pool.session
    for _ in range(5):
        await clients.account.get_user("u-demo")
        await clients.wallet.get_balance("u-demo")
    assert clients.pool.session is session
    connector = session.connector
    assert connector is not None and len(connector._conns) == 2  # one kept-alive connection per host
    await clients.close()
    assert session.closed
    with pytest.raises(RuntimeError, match="not started"):
        await clients.account.get_user("u-demo")


async def test_the_mode_service_opens_and_closes_the_session(standins: Standins) -> None:
    """What ``app.add_dependency(ClientsService(clients))`` does with the worker's start and stop."""
    clients = clients_for(standins)
    service = ClientsService(clients)
    assert not clients.pool.started
    await service.start()
    try:
        assert clients.pool.started
        assert (await clients.product.get_plan("plan-basic")).active
    finally:
        await service.stop()
    assert not clients.pool.started


async def test_logs_are_structured_and_hold_no_personal_data(
        clients: ServiceClients, standins: Standins, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="paystream.clients")
    await clients.account.get_user("u-demo")
    fail(standins, "wallet", mode="error", status=503, times=1)
    await clients.wallet.deduct_credits("u-demo", 100, "EUR", reason="order", idempotency_key="order:o-3:pay")
    records = [r for r in caplog.records if r.name == "paystream.clients"]
    assert [(r.service, r.method, r.status, r.attempt) for r in records] == [  # type: ignore[attr-defined]
        ("account", "get_user", 200, 1), ("wallet", "deduct_credits", 503, 1),
        ("wallet", "deduct_credits", 201, 2)]
    assert all(isinstance(r.duration_ms, float) for r in records)  # type: ignore[attr-defined]
    assert records[2].idempotency_key == "order:o-3:pay"  # type: ignore[attr-defined]
    text = "\n".join(r.getMessage() for r in records)
    assert "u-demo" not in text and "example.test" not in text and "EUR" not in text


# ----------------------------------------------------------------------
# The stand-ins' own surface: control endpoints, and the process the CLI runs


async def test_standin_control_endpoints_over_http(standins: Standins) -> None:
    base = standins.url("wallet")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/_standin/health") as health:
            assert await health.json() == {"service": "wallet", "ok": True}
        async with http.post(f"{base}/_standin/fail", json={"mode": "error", "status": 500, "times": 1}) as r:
            assert r.status == 200
        async with http.get(f"{base}/wallets/u-demo") as failed:
            assert failed.status == 500
            assert (await failed.json())["error"]["code"] == "standin_failure"
        async with http.post(f"{base}/wallets/u-demo/debits", json={
                "amount": 1, "currency": "EUR", "reason": "x"}) as unkeyed:
            assert unkeyed.status == 400
            assert (await unkeyed.json())["error"]["code"] == "idempotency_key_required"
        async with http.post(f"{base}/wallets/u-demo/debits", json={"amount": "1"},
                             headers={"Idempotency-Key": "k"}) as invalid:
            assert invalid.status == 400
            assert (await invalid.json())["error"]["code"] == "invalid_request"
        async with http.post(f"{base}/_standin/seed", json={"wallets": [{
                "wallet_id": "w-new", "user_id": "u-new", "balance_amount": 42, "currency": "EUR",
                "status": "active"}]}) as seeded:
            assert seeded.status == 200
        async with http.get(f"{base}/wallets/u-new/balance") as balance:
            assert (await balance.json())["balance_amount"] == 42
        async with http.get(f"{base}/_standin/received", params={"method": "get_wallet"}) as got:
            assert [e["status"] for e in (await got.json())["requests"]] == [500]
        for _ in range(2):
            async with http.post(f"{base}/wallets/u-new/credits", headers={"Idempotency-Key": "c"},
                                 json={"amount": 8, "currency": "EUR", "reason": "x"}) as credit:
                assert credit.status == 201
        async with http.get(f"{base}/_standin/state") as state:
            world = await state.json()
        assert [(t["user_id"], t["amount"]) for t in world["transactions"]] == [("u-new", 8)]
        assert {w["user_id"]: w["balance_amount"] for w in world["wallets"]}["u-new"] == 50
        async with http.post(f"{base}/_standin/reset") as reset:
            assert reset.status == 200
        async with http.get(f"{base}/_standin/received") as got:
            assert (await got.json())["requests"] == []
        async with http.get(f"{base}/wallets/u-new") as gone:
            assert gone.status == 404


def test_standins_run_as_one_process_on_the_settings_ports(free_port: Any) -> None:
    ports = {name: free_port() for name in ("account", "wallet", "billing", "product", "notification",
                                            "payment", "storage")}
    env = {**os.environ, **{f"{name.upper()}_SERVICE_URL": f"http://localhost:{port}"
                            for name, port in ports.items()}}
    process = subprocess.Popen([sys.executable, "-m", "streams.devtools.standins"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline() for _ in ports]  # type: ignore[union-attr]
        assert all(line.startswith("standin ") for line in lines), lines

        async def ask() -> dict[str, Any]:
            async with ServiceClients(Settings.from_env(env)) as clients:
                return {"user": await clients.account.validate_user("u-demo"),
                        "quota": await clients.storage.validate_quota("u-demo", 1)}

        answers = asyncio.run(ask())
        assert answers["user"].valid and answers["quota"].allowed
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
