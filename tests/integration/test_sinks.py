"""The notification and billing sinks against a real broker and real stand-in services.

One stack for the module: an order worker (``paystream worker``, domain
orders, as a subprocess: its own process and consumer group), the sink app
(domains notifications and billing, in-process, in a group of its own, as
``paystream sinks`` builds it) and stand-ins of its own for the notification
and billing services (``streams.devtools.standins``, real aiohttp servers),
so failures injected here reach no other test.  What the services did is
read from their ``/_standin/state`` (once per key), what they were asked
from ``/_standin/received``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio

from connectors import sinks
from streams.settings import Settings
from tests.integration.payment_support import drop_topics
from tests.integration.pipeline_support import (
    DeadLetterReader,
    EventReader,
    RecordingWriter,
    assert_app_healthy,
    free_port,
    group_lag,
)
from tests.integration.standin_support import StandinThread
from tests.integration.worker_process import WorkerProcess, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DUE = 1_767_225_600_000


@dataclass
class Stack:
    orders: Settings
    sink_app: Any
    worker: WorkerProcess
    services: StandinThread
    writer: RecordingWriter
    reader: EventReader
    dead_letters: DeadLetterReader
    http: httpx.AsyncClient

    @property
    def notification(self) -> str:
        return self.services.urls["notification"]

    @property
    def billing(self) -> str:
        return self.services.urls["billing"]

    async def state(self) -> dict[str, Any]:
        answer = await self.http.get(f"{self.notification}/_standin/state")
        answer.raise_for_status()
        return answer.json()

    async def notified(self, event_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
        """source_event_id -> the notifications made for it (of ``event_ids``)."""
        found: dict[str, list[dict[str, Any]]] = {}
        for note in (await self.state())["notifications"]:
            if note.get("source_event_id") in event_ids:
                found.setdefault(note["source_event_id"], []).append(note)
        return found

    async def billed(self, event_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for record in (await self.state())["billing_records"]:
            if record.get("source_event_id") in event_ids:
                found.setdefault(record["source_event_id"], []).append(record)
        return found

    async def received(self, url: str, method: str | None = None) -> list[dict[str, Any]]:
        query = {"method": method} if method else None
        answer = await self.http.get(f"{url}/_standin/received", params=query)
        return answer.json()["requests"]

    async def fail(self, url: str, **order: Any) -> None:
        answer = await self.http.post(f"{url}/_standin/fail", json=order)
        assert answer.status_code == 200, answer.text

    async def heal(self, url: str) -> None:
        (await self.http.delete(f"{url}/_standin/fail")).raise_for_status()

    def send(self, topic: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self.writer.send(topic, payload)


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` (sync or async) until it answers something true; that answer."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.25)


def order_group_caught_up(settings: Settings, topics: list[str]) -> bool:
    return group_lag(settings.kafka_bootstrap_servers, settings.app_id, topics) == []


async def in_thread(function: Any, *args: Any) -> Any:
    """A blocking helper (producer flush, admin calls) off the loop the sink app and tests share."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(kafka_bootstrap: str, registry_url: str, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[Stack]:
    from streams.app import create_app

    state = tmp_path_factory.mktemp("sinks")
    prefix = f"t-sinks-{uuid.uuid4().hex[:8]}."
    orders = Settings.from_env(
        kafka_bootstrap_servers=kafka_bootstrap, schema_registry_url=registry_url, topic_prefix=prefix,
        app_id=f"{prefix}paystream", domains="orders", state_dir=state / "orders",
        worker_web_port=free_port())
    services = StandinThread().start()
    sink_settings = dataclasses.replace(
        sinks.sink_settings(orders), state_dir=state / "sinks", worker_web_port=free_port(),
        notification_service_url=services.urls["notification"], billing_service_url=services.urls["billing"])
    assert sink_settings.app_id != orders.app_id
    # The order worker first: it creates the topics; then the sinks, patient for ever
    # unless a test says otherwise (sinks.PatientService.patience_seconds).
    worker = WorkerProcess(settings_env(orders), orders.worker_web_port, state / "orders",
                           name="order-worker")
    await in_thread(worker.start, 90.0)
    sink_app = create_app(sink_settings, registrars=[
        functools.partial(sinks.register_notifications, patience_seconds=None),
        functools.partial(sinks.register_billing, patience_seconds=None)])
    sink_app._health_since = time.time()
    await sink_app.start()
    await eventually(lambda: sink_app.consumer.assignment(), 60, "sink assignment")
    stack = Stack(orders, sink_app, worker, services, RecordingWriter(orders),
                  EventReader(orders, ["order.completed", "order.payment_pending"]),
                  DeadLetterReader(orders), httpx.AsyncClient(timeout=10.0))
    try:
        yield stack
    finally:
        try:
            await in_thread(stack.reader.close)
            await in_thread(stack.dead_letters.close)
            await stack.http.aclose()
            # bounded: a Faust app stopped mid-batch can take long to finish its agent
            await asyncio.wait({asyncio.ensure_future(sink_app.stop())}, timeout=60)
        finally:
            worker.kill()
            services.stop()
            drop_topics(orders)  # the sink group's changelogs share the prefix


def payloads(order_id: str, user_id: str, intent: str) -> dict[str, dict[str, Any]]:
    return {
        "order.completed": {"order_id": order_id, "user_id": user_id, "order_type": "ONE_TIME",
                            "total_amount": 2500, "currency": "EUR", "payment_id": intent},
        "order.canceled": {"order_id": order_id, "user_id": user_id, "reason": "USER_REQUESTED",
                           "refund_amount": 0, "currency": "EUR"},
        "order.expired": {"order_id": order_id, "user_id": user_id, "payment_intent_id": None,
                          "expired_at": DUE},
        "order.fulfilled": {"order_id": order_id, "user_id": user_id, "order_type": "ONE_TIME",
                            "fulfillment_details": {"note": "delivered"}},
        "payment.completed": {"payment_intent_id": intent, "order_id": order_id, "user_id": user_id,
                              "amount": 2500, "currency": "EUR"},
        "payment.refunded": {"payment_id": intent, "refund_id": f"re_{order_id}", "order_id": order_id,
                             "user_id": user_id, "amount": 500, "currency": "EUR",
                             "reason": "REQUESTED_BY_CUSTOMER"},
        "invoice.created": {"invoice_id": f"in_{order_id}", "user_id": user_id, "subscription_id": None,
                            "amount": 999, "currency": "EUR", "due_date": DUE},
        "invoice.paid": {"invoice_id": f"in_{order_id}", "user_id": user_id, "payment_id": intent,
                         "subscription_id": None, "amount": 999, "currency": "EUR"},
        "invoice.overdue": {"invoice_id": f"in_{order_id}", "user_id": user_id, "days_overdue": 2,
                            "due_date": DUE, "amount": 999, "currency": "EUR"},
    }


BILLED = {"payment.completed", "payment.refunded", "order.completed", "invoice.created", "invoice.paid"}


async def test_every_event_is_notified_and_billed_once_per_event_id_even_redelivered(stack: Stack) -> None:
    user, order_id = f"u-sink-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:8]}"
    sent = {topic: await in_thread(stack.send, topic, payload)
            for topic, payload in payloads(order_id, user, f"pi_{order_id}").items()}
    # a redelivery: the same records again (same bytes, same event ids)
    first_records = list(stack.writer.sent[-len(sent):])
    await in_thread(stack.writer.replay, first_records[:4])
    ids = {event["event_id"]: topic for topic, event in sent.items()}

    await eventually(lambda: at_least(stack.notified(set(ids)), len(ids)), 60, "a notification per event")
    await eventually(lambda: at_least(stack.billed({i for i, t in ids.items() if t in BILLED}), len(BILLED)),
                     60, "a billing record per event")
    await asyncio.sleep(2.0)  # time for a second delivery, if there were one
    notified = await stack.notified(set(ids))
    billed = await stack.billed(set(ids))
    assert {ids[i]: len(notes) for i, notes in notified.items()} == {t: 1 for t in sent}
    assert {ids[i]: len(records) for i, records in billed.items()} == {t: 1 for t in BILLED}
    by_topic = {ids[i]: notes[0] for i, notes in notified.items()}
    assert by_topic["order.completed"]["kind"] == "order_confirmation"
    assert by_topic["order.completed"]["total_amount"] == 2500
    assert by_topic["order.canceled"]["order_status"] == "CANCELED"
    assert by_topic["payment.completed"]["payment_intent_id"] == f"pi_{order_id}"
    assert by_topic["payment.refunded"]["reason"] == "REQUESTED_BY_CUSTOMER: 500 EUR"
    assert by_topic["invoice.overdue"]["invoice_status"] == "overdue"
    assert by_topic["invoice.created"]["due_date"] == "2026-01-01T00:00:00Z"
    records = {ids[i]: r[0] for i, r in billed.items()}
    assert records["order.completed"]["kind"] == "order"
    assert records["order.completed"]["order_status"] == "COMPLETED"
    assert (records["payment.refunded"]["kind"], records["payment.refunded"]["amount"]) == ("refund", 500)
    assert records["invoice.paid"]["invoice_id"] == f"in_{order_id}"
    assert_app_healthy(stack.sink_app)


async def at_least(found: Awaitable[dict[str, Any]], want: int) -> dict[str, Any] | None:
    result = await found
    return result if len(result) >= want else None


async def test_notification_service_down_then_up_delivers_once_and_never_holds_the_order_path(
        stack: Stack) -> None:
    user = f"u-down-{uuid.uuid4().hex[:6]}"
    await stack.fail(stack.notification, mode="error", status=503)
    try:
        # While notifications fail, the order worker takes orders and completes them.
        orders = []
        for _ in range(5):
            answer = await stack.http.post(f"http://127.0.0.1:{stack.orders.worker_web_port}/orders", json={
                "user_id": user, "order_type": "ONE_TIME", "currency": "EUR",
                "items": [{"product_id": "sku-1", "quantity": 1, "unit_amount": 1200}]})
            assert answer.status_code == 201, answer.text
            orders.append(answer.json())
        for order in orders:
            payment = {"payment_intent_id": f"pi_{order['order_id'][:12]}", "order_id": order["order_id"],
                       "user_id": user, "amount": order["total_amount"], "currency": "EUR"}
            await in_thread(stack.send, "payment.intent.created", payment)
        for order in orders:
            await stack.reader.wait_for("order.payment_pending", order_id=order["order_id"], timeout=60)
        payments = []
        for order in orders:
            payment = {"payment_intent_id": f"pi_{order['order_id'][:12]}", "order_id": order["order_id"],
                       "user_id": user, "amount": order["total_amount"], "currency": "EUR"}
            payments.append(await in_thread(stack.send, "payment.completed", payment))
        completed = [(await stack.reader.wait_for("order.completed", order_id=o["order_id"], timeout=60))[0]
                     for o in orders]
        # the order group is not behind on payments; the sink group is, and nothing was notified
        order_topics = [stack.orders.topic("payment.completed")]
        await eventually(lambda: in_thread(order_group_caught_up, stack.orders, order_topics), 30,
                         "the order group committed every payment")
        ids = {e["event_id"] for e in completed} | {e["event_id"] for e in payments}
        await asyncio.sleep(3.0)  # several retries of the sink meanwhile
        assert await stack.notified(ids) == {}
        # the sink retries its first batch (payments first: later events wait behind it)
        tried = [r for r in await stack.received(stack.notification) if r["idempotency_key"] in ids]
        assert len(tried) > 1 and all(r["status"] == 503 for r in tried)
        sink_group = stack.sink_app.settings.app_id
        assert await in_thread(group_lag, stack.orders.kafka_bootstrap_servers, sink_group, order_topics)
        worker_ok = await stack.http.get(f"http://127.0.0.1:{stack.orders.worker_web_port}"
                                         f"/orders/{orders[0]['order_id']}")
        assert worker_ok.json()["status"] == "COMPLETED"
    finally:
        await stack.heal(stack.notification)

    await eventually(lambda: at_least(stack.notified(ids), len(ids)), 60, "notifications after the outage")
    await asyncio.sleep(2.0)
    notified = await stack.notified(ids)
    assert sorted(len(n) for n in notified.values()) == [1] * len(ids)
    kinds = sorted(n[0]["kind"] for n in notified.values())
    assert kinds == ["order_confirmation"] * 5 + ["payment_receipt"] * 5
    # retried under one key: the same key was sent more than once, and done once
    asked = [r["idempotency_key"] for r in await stack.received(stack.notification, "send_payment_receipt")
             if r["idempotency_key"] in ids]
    assert len(asked) > len(set(asked)) == 5
    assert_app_healthy(stack.sink_app)
    stack.worker.assert_running()
    assert not stack.worker.error_lines(), stack.worker.log_tail(80)


async def test_a_refusal_is_dead_lettered_with_its_bytes_and_the_rest_goes_on(stack: Stack) -> None:
    user, order_id = f"u-refused-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:8]}"
    messages = payloads(order_id, user, f"pi_{order_id}")
    await stack.fail(stack.notification, mode="error", status=422, times=1, methods=["send_order_status"])
    canceled = await in_thread(stack.send, "order.canceled", messages["order.canceled"])
    refused = stack.writer.last()
    confirmed = await in_thread(stack.send, "order.completed", messages["order.completed"])
    letter = await stack.dead_letters.wait_for(refused, timeout=60)
    assert letter.value == refused.value
    assert letter.header("dlq.reason") == "rejected"
    assert "SinkRefused" in letter.header("dlq.error") and "standin_failure" in letter.header("dlq.error")
    later = await in_thread(stack.send, "order.expired", messages["order.expired"])
    ids = {confirmed["event_id"], later["event_id"], canceled["event_id"]}

    notified = await eventually(lambda: at_least(stack.notified(ids), 2), 60, "the events after the refusal")
    assert set(notified) == {confirmed["event_id"], later["event_id"]}
    assert_app_healthy(stack.sink_app)


async def test_an_event_the_service_keeps_failing_is_dead_lettered_after_the_patience(stack: Stack) -> None:
    user, order_id = f"u-poison-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:8]}"
    messages = payloads(order_id, user, f"pi_{order_id}")
    patient = stack.sink_app.sinks["notification_sink"].service
    patient.patience_seconds = 3.0
    await stack.fail(stack.notification, mode="error", status=500, methods=["send_invoice"])
    try:
        started = time.monotonic()
        poison = await in_thread(stack.send, "invoice.created", messages["invoice.created"])
        poisoned = stack.writer.last()
        fine = await in_thread(stack.send, "order.completed", messages["order.completed"])
        letter = await stack.dead_letters.wait_for(poisoned, timeout=60)
        waited = time.monotonic() - started
        assert letter.value == poisoned.value
        assert letter.header("dlq.reason") == "unavailable"  # worth replaying: the service never said no
        assert "GaveUp" in letter.header("dlq.error")
        assert waited >= 3.0
        found = await eventually(lambda: at_least(stack.notified({fine["event_id"]}), 1), 60,
                                 "the event beside the poison")
        assert len(found[fine["event_id"]]) == 1
        assert await stack.notified({poison["event_id"]}) == {}
        # it was billed all the same: the billing service was up
        assert await eventually(lambda: at_least(stack.billed({poison["event_id"]}), 1), 30,
                                "the invoice's billing record")
    finally:
        patient.patience_seconds = None
        await stack.heal(stack.notification)
    assert_app_healthy(stack.sink_app)
