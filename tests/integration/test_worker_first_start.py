"""A worker's very first start serves every agent, table and deadline at once, without a restart.

On a first start the worker creates its topics.  A topic the broker's
metadata did not list yet when the group's first assignment was computed was
left out of it (Faust's assignor: "Ignoring missing topic"): seen with
``invoice-deadlines-changelog``, whose table then fired no invoice.overdue
until a later rebalance.  The worker now creates every topic Faust would
create itself with the event topics, before its consumer joins, and waits
until the metadata lists them (``PaystreamApp.faust_topic_settings``,
``streams.admin.wait_until_listed``).

Here: a ``paystream worker`` subprocess on a fresh prefix (no topic of it
exists before), domains orders, payments, subscriptions, localstripe as
Stripe.  Once it serves: no topic was ignored; Faust's router places every
table's changelog partitions on it; every kernel agent answers a record on
each partition of one of its inputs (an undecodable one: its dead letter);
an order flows to the payment agent (a PaymentIntent at localstripe) and
expires, and an invoice opened by command goes overdue: two deadline tables
fire.  The worker is the same process throughout.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from agents.console import kernel_agents
from streams import catalog
from streams.admin import TopicSettings, delete_topics, ensure_topics, wait_until_listed
from streams.app import create_app
from streams.devtools.bench.invoices import open_command
from streams.devtools.localstripe import LocalStripe
from streams.producer import producer_config
from tables.invoice_state import DAY_MS
from tests.integration.payment_support import drop_topics, stack_settings
from tests.integration.pipeline_support import DeadLetterReader, EventReader, Sent
from tests.integration.worker_process import WorkerProcess, settings_env

pytestmark = pytest.mark.integration

SERVE_TIMEOUT = 180.0
#: Seconds from order creation to its expiry deadline, and from an invoice's open to its overdue.
DEADLINE_S = 3


def _undecodable_per_partition(settings: Any, topic: str, partitions: int) -> list[Sent]:
    """One undecodable record on each partition of ``topic``, where Kafka put it."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "acks": "all"})
    sent: list[Sent] = []
    for partition in range(partitions):
        record = Sent(topic, f"first-start-{partition}".encode(), b"\x00\x01 not json", [])

        def delivered(err: Any, message: Any, record: Sent = record) -> None:
            if err is None:
                record.partition, record.offset = message.partition(), message.offset()

        producer.produce(topic, key=record.key, value=record.value, partition=partition,
                         on_delivery=delivered)
        sent.append(record)
    assert producer.flush(30) == 0
    assert all(r.offset >= 0 for r in sent), f"no delivery report for {topic}"
    return sent


@pytest.mark.asyncio(loop_scope="module")
async def test_first_start_serves_every_agent_table_and_deadline(
        kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe, tmp_path: Path) -> None:
    settings = stack_settings(kafka_bootstrap, registry_url, localstripe.url, tmp_path, "first",
                              domains="orders,payments,subscriptions")
    plan = create_app(settings)  # not started: what the worker will run (tables, agents)
    changelogs = sorted(t.changelog_topic.get_topic_name() for t in plan.tables.values())
    agents = {name: sorted(aggregate.names) for name, aggregate in kernel_agents(plan)}
    assert len(agents) == 9 and len(changelogs) == 12
    worker = WorkerProcess(settings_env(settings), settings.worker_web_port, tmp_path / "worker-state")
    dead_letters: DeadLetterReader | None = None
    reader: EventReader | None = None
    try:
        from confluent_kafka.admin import AdminClient

        existing = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=30).topics
        assert not [t for t in existing if t.startswith(settings.topic_prefix)], "prefix not fresh"
        began = time.monotonic()
        worker.start(SERVE_TIMEOUT)
        pid = worker.pid
        print(f"\nfirst start serving after {time.monotonic() - began:.1f} s", flush=True)

        assert "Ignoring missing topic" not in worker.log_text(), worker.log_tail()
        routes = worker.routes()
        assert list(routes) == [worker.url], routes
        placed = routes[worker.url]
        for changelog in changelogs:
            assert placed.get(changelog) == list(range(catalog.EVENT_PARTITIONS)), (changelog, placed)

        dead_letters = DeadLetterReader(settings)
        reader = EventReader(settings, ("order.created", "order.expired", "payment.intent.created",
                                        "invoice.created", "invoice.overdue"))

        # Every kernel agent, every partition: a record of one of its inputs is answered.
        for name, topics in sorted(agents.items()):
            records = _undecodable_per_partition(settings, topics[0], catalog.EVENT_PARTITIONS)
            for record in records:
                letter = await dead_letters.wait_for(record, timeout=60.0)
                assert letter.header("dlq.reason") == "undecodable", (name, letter.headers)

        # An order: order.created, the payment agent opens its PaymentIntent, the deadline expires it.
        import httpx

        from streams import access

        async with httpx.AsyncClient(base_url=worker.url, timeout=30.0,
                                     headers=access.authorization(settings.service_token)) as api:
            answer = await api.post("/orders", json={
                "user_id": f"u-first-{uuid.uuid4().hex[:8]}", "order_type": "ONE_TIME",
                "currency": "EUR", "payment_window_seconds": DEADLINE_S,
                "items": [{"product_id": "sku-1", "quantity": 1, "unit_amount": 1250}]})
            assert answer.status_code == 201, answer.text
            order_id = answer.json()["order_id"]
        await reader.wait_for("order.created", order_id=order_id, timeout=60.0)
        await reader.wait_for("payment.intent.created", order_id=order_id, timeout=60.0)
        expired = await reader.wait_for("order.expired", order_id=order_id, timeout=60.0)

        # An invoice opened by command, due so that its first overdue day ends in a few seconds.
        invoice_id = f"in_first{uuid.uuid4().hex[:12]}"
        due_ms = int(time.time() * 1000) - settings.overdue_days[0] * DAY_MS + DEADLINE_S * 1000
        # Keyed as every paystream producer keys (murmur2), so it lands where the worker routes it.
        producer = Producer(producer_config(kafka_bootstrap, client_id="test-first-start"))
        producer.produce(settings.topic(catalog.INVOICE_COMMANDS), key=invoice_id.encode(),
                         value=open_command(invoice_id, "u-first-invoice", due_ms))
        assert producer.flush(30) == 0
        await reader.wait_for("invoice.created", invoice_id=invoice_id, timeout=60.0)
        overdue = await reader.wait_for("invoice.overdue", invoice_id=invoice_id, timeout=60.0)

        assert len({e["event_id"] for e in expired}) == 1
        assert len({e["event_id"] for e in overdue}) == 1
        worker.assert_running()
        assert worker.pid == pid  # no restart
        assert "Ignoring missing topic" not in worker.log_text()
        assert not worker.error_lines(), worker.error_lines()
    finally:
        for client in (dead_letters, reader):
            if client is not None:
                client.close()
        worker.stop()
        drop_topics(settings)


def test_wait_until_listed(kafka_bootstrap: str) -> None:
    """Returns once a created topic is listed with leaders; a topic never created times out, retriable."""
    name = f"t-first-listed-{uuid.uuid4().hex[:8]}"
    try:
        ensure_topics(kafka_bootstrap, [TopicSettings(name, 2)])
        wait_until_listed(kafka_bootstrap, [name], timeout=30.0)
        missing = f"{name}-never-created"
        began = time.monotonic()
        with pytest.raises(KafkaException) as raised:
            wait_until_listed(kafka_bootstrap, [name, missing], timeout=1.0)
        assert time.monotonic() - began < 15.0
        error = raised.value.args[0]
        assert error.code() == KafkaError._TIMED_OUT and error.retriable()
        assert missing in error.str() and f"{name}," not in error.str()
    finally:
        delete_topics(kafka_bootstrap, [name])
