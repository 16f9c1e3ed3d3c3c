"""The synchronous checks of POST /orders (issue 8's decision matrix), over HTTP on a real worker.

The account, storage and wallet services are the session's stand-ins (real
aiohttp servers, :mod:`tests.integration.standin_support`).  What each
outcome does, asserted from the answer and the topics:

- an unknown, disabled or deleted user: 400 with the reason, nothing published;
- the account service down: 503 with Retry-After, nothing published; back
  up, the same request creates the order;
- an order paid with wallet credits: deducted once under a key derived from
  the order (a retry with the same Idempotency-Key deducts nothing more),
  published created and completed; not enough credits: 402, nothing
  published and nothing deducted; without an Idempotency-Key: 400;
- a storage upgrade for a user the storage service does not know: 400.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from connectors.clients import spec
from tests.integration.pipeline_support import Pipeline, assert_app_healthy, uid
from tests.integration.standin_support import StandinThread

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ITEMS = [{"product_id": "sku-1", "quantity": 2, "unit_amount": 1250}]


def body(user_id: str, **fields: Any) -> dict[str, Any]:
    return {"user_id": user_id, "order_type": "ONE_TIME", "currency": "EUR", "items": ITEMS, **fields}


async def nothing_published_for(pipe: Pipeline, user_id: str) -> None:
    await asyncio.sleep(1.0)
    await pipe.settle()
    assert [e for e in pipe.reader.seen if e.get("user_id") == user_id] == []


def wallet_of(standins: StandinThread, user_id: str, balance: int) -> None:
    standins.standins.world.wallets[user_id] = spec.Wallet(
        wallet_id=f"w-{user_id}", user_id=user_id, balance_amount=balance, currency="EUR",
        status="active")


def debits_of(standins: StandinThread, order_id: str) -> list[spec.WalletTransaction]:
    return [t for t in standins.standins.world.transactions
            if t.reference_id == order_id and t.kind == "debit"]


@pytest.mark.parametrize("user, reason", [("u-disabled", "user_disabled"), ("u-deleted", "user_deleted")])
async def test_a_disabled_or_deleted_user_may_not_order(pipe: Pipeline, user: str, reason: str) -> None:
    response = await pipe.api.client.post("/orders", json=body(user))
    assert response.status_code == 400 and response.json()["error"] == reason, response.text
    await nothing_published_for(pipe, user)


async def test_an_unknown_user_may_not_order(pipe: Pipeline, standins: StandinThread) -> None:
    user = uid("u-nobody")
    standins.standins.world.open_accounts = False  # the session's world knows every user otherwise
    try:
        response = await pipe.api.client.post("/orders", json=body(user))
    finally:
        standins.standins.world.open_accounts = True
    assert response.status_code == 400 and response.json()["error"] == "user_not_found", response.text
    await nothing_published_for(pipe, user)


async def test_the_account_service_down_is_503_and_nothing_is_created(
    pipe: Pipeline, standins: StandinThread
) -> None:
    user, key = uid("u-acct-down"), uid("create")
    standins.run(standins.standins.stop_service("account"))
    try:
        response = await pipe.api.client.post("/orders", json=body(user), headers={"Idempotency-Key": key})
    finally:
        standins.run(standins.standins.start_service("account"))
    assert response.status_code == 503 and response.headers["Retry-After"], response.text
    await nothing_published_for(pipe, user)
    retried = await pipe.api.client.post("/orders", json=body(user), headers={"Idempotency-Key": key})
    assert retried.status_code == 201, retried.text
    assert_app_healthy(pipe.app)


async def test_an_order_paid_with_wallet_credits_is_deducted_once_and_completed(
    pipe: Pipeline, standins: StandinThread
) -> None:
    user, key = uid("u-wallet"), uid("create")
    wallet_of(standins, user, 10_000)
    request = body(user, payment_method="wallet")
    first = await pipe.api.client.post("/orders", json=request, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    order = first.json()
    assert order["status"] == "COMPLETED" and order["payment_method"] == "wallet"
    again = await pipe.api.client.post("/orders", json=request, headers={"Idempotency-Key": key})
    assert again.status_code in (200, 201) and again.json()["order_id"] == order["order_id"]
    (debit,) = debits_of(standins, order["order_id"])
    assert debit.amount == 2500 and order["payment_id"] == debit.transaction_id
    assert standins.standins.world.wallets[user].balance_amount == 7_500
    await pipe.reader.wait_for("order.completed", order_id=order["order_id"])
    await pipe.settle()
    assert sorted(pipe.order_events(order["order_id"])) == ["order.completed", "order.created"]


async def test_a_retry_after_the_deduction_left_too_little_gets_the_paid_order(
    pipe: Pipeline, standins: StandinThread
) -> None:
    user, key = uid("u-exact"), uid("create")
    wallet_of(standins, user, 2_500)  # exactly the order: nothing left after it
    request = body(user, payment_method="wallet")
    first = await pipe.api.client.post("/orders", json=request, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    again = await pipe.api.client.post("/orders", json=request, headers={"Idempotency-Key": key})
    assert again.status_code in (200, 201), again.text
    assert again.json()["order_id"] == first.json()["order_id"] and again.json()["status"] == "COMPLETED"
    assert standins.standins.world.wallets[user].balance_amount == 0  # deducted once


async def test_not_enough_credits_is_402_and_nothing_is_taken(
    pipe: Pipeline, standins: StandinThread
) -> None:
    user = uid("u-poor")
    wallet_of(standins, user, 100)
    response = await pipe.api.client.post("/orders", json=body(user, payment_method="wallet"),
                                          headers={"Idempotency-Key": uid("create")})
    assert response.status_code == 402 and response.json()["error"] == "insufficient_funds", response.text
    assert standins.standins.world.wallets[user].balance_amount == 100
    await nothing_published_for(pipe, user)


async def test_a_wallet_order_needs_an_idempotency_key_and_valid_lines(
    pipe: Pipeline, standins: StandinThread
) -> None:
    user = uid("u-nokey")
    wallet_of(standins, user, 10_000)
    unkeyed = await pipe.api.client.post("/orders", json=body(user, payment_method="wallet"))
    assert unkeyed.status_code == 400 and "Idempotency-Key" in unkeyed.json()["message"]
    bad = await pipe.api.client.post("/orders", json=body(user, payment_method="wallet", total_amount=1),
                                     headers={"Idempotency-Key": uid("create")})
    assert bad.status_code == 400, bad.text  # the order's own rules refuse it: no credits taken
    assert standins.standins.world.wallets[user].balance_amount == 10_000
    await nothing_published_for(pipe, user)


async def test_a_storage_upgrade_needs_a_user_the_storage_service_knows(
    pipe: Pipeline, standins: StandinThread
) -> None:
    user = uid("u-nostorage")
    standins.standins.world.users[user] = spec.User(
        user_id=user, status="active", tier="basic", email="x@example.test", name="x",
        created_at="2026-01-01T00:00:00Z")  # known to accounts, not to storage
    response = await pipe.api.client.post("/orders", json=body(user, order_type="STORAGE_UPGRADE"))
    assert response.status_code == 400 and response.json()["error"] == "user_not_found", response.text
    await nothing_published_for(pipe, user)
    known = await pipe.api.client.post("/orders", json=body(uid("u-storage"), order_type="STORAGE_UPGRADE"))
    assert known.status_code == 201, known.text
