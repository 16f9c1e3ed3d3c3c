"""order.expired from the payment deadline timer (tables.deadlines), end to end.

Each test runs the real app against the broker with short per-order payment
windows (``payment_window_seconds``): the deadline fires once, a payment or a
cancel before it disarms it, and a deadline passed while no worker ran fires
once when the app comes back, from its RocksDB state or from the changelog.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from typing import Any

import pytest

from streams.app import PaystreamApp, create_app
from streams.settings import Settings
from tests.integration.pipeline_support import Api, EventReader, EventWriter, wait_until

pytestmark = pytest.mark.integration

ORDER_TOPICS = ["order.created", "order.payment_pending", "order.completed", "order.canceled",
                "order.expired"]
#: The default order of ``Api.create_order``: 2 x 1250.
TOTAL = 2500
#: Timer interval of the deadline index (0.5 s) plus slack for the command round trip.
SETTLE = 3.0


async def start_app(settings: Settings) -> PaystreamApp:
    """A started app whose order API answers (partitions assigned, tables recovered)."""
    app = create_app(settings)
    await app.start()
    api = Api(settings.worker_web_port)
    try:
        async def serving() -> bool:
            assert_healthy(app)
            answer = await api.client.get(f"/orders/{uuid.uuid4()}")
            return answer.status_code == 404 and answer.json().get("error") == "not_found"

        await wait_until(serving, timeout=60, interval=0.25, what="order API serving")
    finally:
        await api.close()
    return app


def assert_healthy(app: PaystreamApp) -> None:
    """A crashed Faust service only stops; make it fail the test instead."""
    for service in (app, app.consumer, app.producer, *app.agents.values()):
        assert not service.crashed, f"{service} crashed: {service.crash_reason!r}"


def pending_deadlines(app: PaystreamApp, order_id: str) -> list[int]:
    pending = app.orders.orders.deadlines.pending()
    return [deadline for aggregate, deadline in pending if aggregate == order_id]


def epoch_ms(value: Any) -> int:
    """A timestamp-millis field as confluent's decoder returns it (datetime) in ms."""
    return int(value.timestamp() * 1000) if hasattr(value, "timestamp") else int(value)


async def sleep_past(deadline_ms: int, extra: float) -> None:
    """Sleep until ``extra`` seconds after the epoch-ms ``deadline_ms``."""
    await asyncio.sleep(max(0.0, deadline_ms / 1000 - time.time()) + extra)


async def create(api: Api, window: float) -> dict[str, Any]:
    answer = await api.create_order(payment_window_seconds=window)
    assert answer.status_code == 201, answer.text
    order = answer.json()
    assert order["status"] == "PENDING"
    assert order["payment_deadline_ms"] is not None
    return order


async def status(api: Api, order_id: str) -> str:
    answer = await api.client.get(f"/orders/{order_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()["status"]


@pytest.fixture
async def running(app_settings: Settings):
    app = await start_app(app_settings)
    api = Api(app_settings.worker_web_port)
    reader = EventReader(app_settings, ORDER_TOPICS)
    try:
        yield app, api, reader
    finally:
        reader.close()
        await api.close()
        await app.stop()


async def test_unpaid_order_expires_once(running: tuple[PaystreamApp, Api, EventReader]) -> None:
    app, api, reader = running
    order = await create(api, 2)
    order_id, deadline = order["order_id"], order["payment_deadline_ms"]
    assert pending_deadlines(app, order_id) == [deadline]

    [expired] = await reader.wait_for("order.expired", timeout=30, order_id=order_id)
    assert epoch_ms(expired["expired_at"]) == deadline
    assert expired["user_id"] == order["user_id"]
    # The timer fires at the deadline, not before and not much later.
    fired_ms = epoch_ms(expired["occurred_at"])
    assert deadline <= fired_ms <= deadline + 5_000, (deadline, fired_ms)
    assert await status(api, order_id) == "EXPIRED"

    # Several timer intervals later: still one order.expired, and the entry
    # left the deadline index (else it would be handed over again forever).
    await asyncio.sleep(SETTLE)
    reader.poll(1.0)
    assert len(reader.events("order.expired", order_id=order_id)) == 1
    assert pending_deadlines(app, order_id) == []
    assert_healthy(app)


async def test_order_paid_before_its_deadline_never_expires(
    running: tuple[PaystreamApp, Api, EventReader], app_settings: Settings
) -> None:
    app, api, reader = running
    order = await create(api, 3)
    order_id, deadline = order["order_id"], order["payment_deadline_ms"]
    payment = {"payment_intent_id": f"pi_{uuid.uuid4().hex[:12]}", "user_id": order["user_id"],
               "amount": TOTAL, "currency": "EUR", "order_id": order_id}
    writer = EventWriter(app_settings)
    writer.send("payment.intent.created", payment)
    writer.send("payment.completed", payment)
    await reader.wait_for("order.completed", timeout=30, order_id=order_id)
    assert int(time.time() * 1000) < deadline, "paid too late for this test to mean anything"

    await sleep_past(deadline, SETTLE)
    reader.poll(1.0)
    assert reader.events("order.expired", order_id=order_id) == []
    assert await status(api, order_id) == "COMPLETED"
    assert pending_deadlines(app, order_id) == []
    assert_healthy(app)


async def test_order_canceled_before_its_deadline_never_expires(
    running: tuple[PaystreamApp, Api, EventReader],
) -> None:
    app, api, reader = running
    order = await create(api, 3)
    order_id, deadline = order["order_id"], order["payment_deadline_ms"]
    answer = await api.client.post(f"/orders/{order_id}/cancel", json={"detail": "changed my mind"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "CANCELED"
    assert int(time.time() * 1000) < deadline, "canceled too late for this test to mean anything"
    assert pending_deadlines(app, order_id) == []

    await sleep_past(deadline, SETTLE)
    # the reader is a consumer group of its own: its first poll may still be joining
    await reader.wait_for("order.canceled", order_id=order_id)
    reader.poll(1.0)
    assert len(reader.events("order.canceled", order_id=order_id)) == 1
    assert reader.events("order.expired", order_id=order_id) == []
    assert await status(api, order_id) == "CANCELED"
    assert_healthy(app)


@pytest.mark.parametrize("state", ["kept", "wiped"])
async def test_deadline_passed_while_stopped_fires_once_after_restart(
    app_settings: Settings, state: str
) -> None:
    """No worker runs when the deadline passes; the next one expires the order.

    ``kept``: the new app opens the same RocksDB state.  ``wiped``: the state
    directory is gone and the tables come back from their changelog topics.
    """
    reader = EventReader(app_settings, ORDER_TOPICS)
    api = Api(app_settings.worker_web_port)
    app = await start_app(app_settings)
    try:
        order = await create(api, 6)
        order_id, deadline = order["order_id"], order["payment_deadline_ms"]
        await reader.wait_for("order.created", timeout=30, order_id=order_id)
        assert_healthy(app)
    finally:
        await app.stop()
    assert int(time.time() * 1000) < deadline - 1_000, "stopped too late for this test to mean anything"
    if state == "wiped":
        shutil.rmtree(app_settings.state_dir)

    await sleep_past(deadline, 0.5)
    reader.poll(0.5)
    assert reader.events("order.expired", order_id=order_id) == []  # nobody was running

    app = await start_app(app_settings)
    try:
        [expired] = await reader.wait_for("order.expired", timeout=30, order_id=order_id)
        assert epoch_ms(expired["expired_at"]) == deadline
        assert await status(api, order_id) == "EXPIRED"
        await asyncio.sleep(SETTLE)
        reader.poll(1.0)
        assert len(reader.events("order.expired", order_id=order_id)) == 1
        assert len(reader.events("order.created", order_id=order_id)) == 1
        assert pending_deadlines(app, order_id) == []
        assert_healthy(app)
    finally:
        reader.close()
        await api.close()
        await app.stop()
