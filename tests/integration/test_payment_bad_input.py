"""Bad input at the system level: what Stripe (or another writer) may send, each outcome asserted.

Stripe delivers at least once and in any order; an event may be about an
intent paystream never opened; a record on ``stripe.events`` may not come
from the ingress at all.  Each case goes through the deployed stack
(:mod:`tests.integration.payment_support`) and is judged from the topics,
the dead letters, the intent index's changelog and the API.  The ingress'
own refusals (signatures, bodies, sizes) and its Kafka-down answers are
``test_stripe_ingress.py``'s; the last test here follows a webhook refused
while Kafka was down to the order it pays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from schemas import contracts
from streams import catalog
from streams.devtools.localkafka import LocalKafka
from streams.devtools.localstripe import LocalStripe
from streams.devtools.registry_runner import RegistryThread, registry_settings
from streams.kernel import CallRefused
from streams.settings import Settings
from tables import payment_state
from tests.integration.payment_support import WEBHOOK_SECRET, PaymentStack, encode, intent_event
from tests.integration.pipeline_support import free_port, wait_until
from tests.integration.stripe_support import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


def user() -> str:
    return f"u-bad-{uuid.uuid4().hex[:8]}"


async def test_a_webhook_delivered_twice_completes_the_payment_once(payment_stack: PaymentStack) -> None:
    stack = payment_stack
    # Two copies of one event before the worker saw either (one Stripe event id).
    order, intent_id = await stack.open_payment(user(), 2100)
    order_id = order["order_id"]
    event = intent_event("succeeded", intent_id, amount=2100, order_id=order_id, user_id=order["user_id"],
                         payment_method="pm_card_visa", status="succeeded")
    body = encode(event)
    await stack.deliver(body)
    await stack.deliver(body)
    await stack.events_of("order.completed", order_id=order_id)

    # And localstripe's own delivery of a paid intent, posted again twice later.
    other, other_intent = await stack.paid_order(user(), 3300)
    stored = [r for r in await stack.stripe_records() if r.key == other_intent.encode()]
    [original] = stored
    await stack.deliver(original.value)
    await stack.deliver(original.value)

    await stack.settle()
    records = await stack.stripe_records()
    ids = [dict(r.headers)["stripe.event_id"] for r in records]
    assert ids.count(event["id"].encode()) == 2  # the ingress stores both; the worker dedupes
    assert ids.count(dict(original.headers)["stripe.event_id"]) == 3
    for order_id_, intent in ((order_id, intent_id), (other["order_id"], other_intent)):
        [completed] = stack.events("payment.completed", order_id=order_id_)
        assert completed["payment_intent_id"] == intent
        assert len(stack.events("order.completed", order_id=order_id_)) == 1
        assert (await stack.payment(intent))["status"] == "SUCCEEDED"
        assert not stack.dead_letters_of(intent.encode())


async def test_a_failure_reported_after_the_success_changes_nothing(payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order, intent_id = await stack.paid_order(user(), 2600)
    order_id = order["order_id"]
    [succeeded] = [r for r in await stack.stripe_records() if r.key == intent_id.encode()]
    created = json.loads(succeeded.value)["created"]

    # An older attempt's payment_failed, delivered late (Stripe does not order deliveries).
    late = intent_event("payment_failed", intent_id, amount=2600, order_id=order_id,
                        user_id=order["user_id"], created=created - 30)
    await stack.deliver(late)
    # And one that claims to be newer: a paid intent cannot fail any more either.
    newer = intent_event("payment_failed", intent_id, amount=2600, order_id=order_id,
                         user_id=order["user_id"], created=created + 30)
    await stack.deliver(newer)
    await stack.settle()

    assert not stack.events("payment.failed", order_id=order_id)
    assert not stack.events("order.canceled", order_id=order_id)
    assert len(stack.events("payment.completed", order_id=order_id)) == 1
    payment = await stack.payment(intent_id)
    assert (payment["status"], payment["failure_code"]) == ("SUCCEEDED", None)
    assert (await stack.order(order_id))["status"] == "COMPLETED"
    assert not stack.dead_letters_of(intent_id.encode())


async def test_an_event_for_an_intent_no_order_claims_is_kept_and_counted(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    intent_id = f"pi_unknown{uuid.uuid4().hex[:14]}"
    first = intent_event("succeeded", intent_id, amount=990, order_id=None, user_id=None,
                         status="succeeded")
    second = intent_event("payment_failed", intent_id, amount=990, order_id=None, user_id=None)
    await stack.deliver(first)
    await stack.deliver(second)
    await stack.settle()

    row = await stack.intent_row(intent_id)
    assert row is not None and row.get("unlinked") == 2, row
    assert row.get("order_id") is None
    assert sorted(row["applied"]) == sorted([first["id"], second["id"]])
    assert not [e for e in stack.reader.seen if e.get("payment_intent_id") == intent_id]
    assert not stack.dead_letters_of(intent_id.encode())
    answer = await stack.api.get(f"/payments/{intent_id}")
    assert answer.status_code == 404 and answer.json()["error"] == "not_found", answer.text
    # Kept: the raw events stay on stripe.events, byte for byte.
    kept = [r.value for r in await stack.stripe_records() if r.key == intent_id.encode()]
    assert kept == [encode(first), encode(second)]


async def test_a_record_that_is_no_stripe_event_written_past_the_ingress_is_dead_lettered(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    topic = stack.settings.topic(catalog.STRIPE_EVENTS)
    key = f"pi_bad{uuid.uuid4().hex[:14]}"
    not_an_event = json.dumps({"id": "not-an-event", "type": "payment_intent.succeeded",
                               "created": int(time.time()), "data": {"object": {"id": key}}}).encode()
    no_object = json.dumps({"id": f"evt_bad{uuid.uuid4().hex}", "object": "event",
                            "type": "payment_intent.succeeded", "created": int(time.time()),
                            "data": {"object": []}}).encode()
    not_json = b"\x00\x01 not json"
    an_array = json.dumps([{"id": f"evt_bad{uuid.uuid4().hex}"}]).encode()
    expected = {}
    for value, reason in ((not_an_event, "rejected"), (no_object, "rejected"), (not_json, "undecodable"),
                          (an_array, "undecodable")):
        stack.writer.send_raw(topic, key, value, [("stripe.type", b"payment_intent.succeeded")])
        expected[stack.writer.last().offset] = (value, reason)

    assert stack.dead_letters is not None
    for sent in stack.writer.sent[-4:]:
        letter = await stack.dead_letters.wait_for(sent)
        value, reason = expected[sent.offset]
        assert letter.value == value  # the original bytes
        assert letter.key == key.encode()
        assert letter.header("dlq.reason") == reason
        assert letter.header("dlq.source.topic") == topic
        assert letter.headers["stripe.type"] == b"payment_intent.succeeded"
    await stack.settle()
    assert not [e for e in stack.reader.seen if e.get("payment_intent_id") == key]
    assert await stack.intent_row(key) is None


async def test_a_consumed_type_with_an_unreadable_object_is_stored_by_the_ingress_and_dead_lettered(
        payment_stack: PaymentStack) -> None:
    stack = payment_stack
    order, intent_id = await stack.open_payment(user(), 1800)
    event = intent_event("succeeded", intent_id, amount=1800, order_id=order["order_id"],
                         user_id=order["user_id"], status="succeeded")
    event["data"]["object"]["metadata"] = "not an object"
    body = encode(event)
    await stack.deliver(body)  # signed, an event: stored verbatim; reading it is the worker's job
    await stack.settle()

    letters = stack.dead_letters_of(intent_id.encode())
    assert [(d.value, d.header("dlq.reason")) for d in letters] == [(body, "rejected")]
    assert "metadata is not an object" in letters[0].header("dlq.error")
    assert not stack.events("payment.completed", order_id=order["order_id"])
    assert (await stack.payment(intent_id))["status"] == "REQUIRES_PAYMENT"


async def test_stripes_news_of_an_intent_before_the_order_created_that_opened_it(
        payment_stack: PaymentStack) -> None:
    """The replay order after a crash: order.created and Stripe's webhook are read in either order.

    The worker opened the intent (the call here is its exact call: same
    arguments, same idempotency key) and published payment.intent.created,
    then died before it wrote the payment row; the payer paid.  Restarted,
    it may read the webhook first: the payment row is made from the fact,
    and the replayed order.created (written to its topic as the order
    service would, the order service being elsewhere) finds the row and opens
    no second intent.
    """
    stack = payment_stack
    user_id, order_id = user(), str(uuid.uuid4())
    created = stack.writer.event("order.created", contracts.payload(
        "order.created", order_id=order_id, user_id=user_id, order_type="ONE_TIME", total_amount=4100,
        currency="EUR", items=[{"product_id": "sku-replay", "quantity": 1, "unit_amount": 4100}]),
        producer="order_service")
    [call] = payment_state.plan_order_created(None, created)
    intent = await stack.payer.call(call)  # what the worker did before it died
    confirmed = await stack.confirm(intent["id"], "pm_card_visa")
    assert not isinstance(confirmed, CallRefused) and confirmed["status"] == "succeeded"
    [completed] = await stack.events_of("payment.completed", order_id=order_id)
    assert completed["event_id"] == payment_state.fact_event_id("payment.completed", intent["id"])

    stack.writer.send_event(created)  # the replayed order.created, read after the webhook
    await stack.settle()
    await asyncio.sleep(1.0)
    await stack.settle()
    assert [i["id"] for i in (await stack.stripe_intents_by_order([order_id]))[order_id]] == [intent["id"]]
    assert not [e for e in stack.events("payment.intent.created", order_id=order_id)
                if e["payment_intent_id"] != intent["id"]]
    assert len(stack.events("payment.completed", order_id=order_id)) == 1
    payment = await stack.order_payment(order_id)
    assert (payment["status"], payment["payment_intent_id"], payment["amount"]) == (
        "SUCCEEDED", intent["id"], 4100)
    assert not stack.dead_letters_of(intent["id"].encode())


@dataclass
class PrivateDeployment:
    """A broker of its own with a registry and a payment stack on it (the Kafka-down test's)."""

    broker: LocalKafka
    registry: RegistryThread | None = None
    stack: PaymentStack | None = None


@pytest_asyncio.fixture(scope="module", loop_scope="session", autouse=True)
async def private_deployment(localstripe: LocalStripe, tmp_path_factory: pytest.TempPathFactory
                             ) -> AsyncIterator[asyncio.Task[PrivateDeployment]]:
    """The Kafka-down test's broker, registry and stack, started in the background.

    Started when the module's first test starts and awaited by the Kafka-down
    test (the module's last), so the 20-30 s a broker and a worker take to
    start overlap the module's other tests instead of adding to them.
    """
    home = tmp_path_factory.mktemp("kafka-down")
    deployment = PrivateDeployment(LocalKafka(home / "kafka", port=free_port(), controller_port=free_port(),
                                              heap="512m"))

    async def start() -> PrivateDeployment:
        loop = asyncio.get_running_loop()
        took = await loop.run_in_executor(None, deployment.broker.start)
        print(f"\nprivate broker answering after {took:.1f}s", flush=True)
        base = Settings.from_env(kafka_bootstrap_servers=deployment.broker.bootstrap)
        deployment.registry = await loop.run_in_executor(
            None, RegistryThread(registry_settings(base, "_schemas", free_port())).start)
        deployment.stack = await PaymentStack.start(deployment.broker.bootstrap, deployment.registry.url,
                                                    localstripe, home, "kafka-down")
        return deployment

    task = asyncio.create_task(start())
    try:
        yield task
    finally:
        with contextlib.suppress(BaseException):
            await task
        if deployment.stack is not None:
            await deployment.stack.stop()
        if deployment.registry is not None:
            deployment.registry.stop()
        await asyncio.get_running_loop().run_in_executor(None, deployment.broker.stop)


async def test_with_kafka_down_stripes_retry_is_accepted_once_it_is_back_and_pays_once(
        localstripe: LocalStripe, private_deployment: asyncio.Task[PrivateDeployment]) -> None:
    """The ingress' own Kafka-down tests stop at "stored once"; this follows the event to the order.

    Everything runs on a private broker (the shared one is never stopped):
    the payer pays while it is down, localstripe's one delivery is answered
    503 (localstripe never retries; Stripe does, re-signing each attempt), so
    the test retries it as Stripe would, with the body localstripe signed
    (seen by an observing endpoint), until the ingress takes it.
    """
    loop = asyncio.get_running_loop()
    deployment = await asyncio.wait_for(asyncio.shield(private_deployment), 180)
    broker, stack = deployment.broker, deployment.stack
    assert stack is not None
    observer = await WebhookReceiver(WEBHOOK_SECRET).start()
    observer_id = f"paystream-payment-tests-observer-{uuid.uuid4().hex[:8]}"
    localstripe.register_webhook(observer_id, observer.url, WEBHOOK_SECRET,
                                 events=["payment_intent.succeeded"])
    try:
        order, intent_id = await stack.open_payment(user(), 2700)
        order_id = order["order_id"]

        await loop.run_in_executor(None, broker.stop)
        confirmed = await stack.confirm(intent_id, "pm_card_visa")  # Stripe does not need our Kafka
        assert not isinstance(confirmed, CallRefused) and confirmed["status"] == "succeeded"
        delivery = await observer.wait_for("payment_intent.succeeded", intent_id, timeout=30)

        async def refused_by_ingress() -> bool:
            metrics = (await stack.webhooks.get(f"{stack.ingress.url}/metrics")).text
            return 'paystream_ingress_webhooks_total{outcome="unavailable"} 0.0\n' not in metrics

        await wait_until(refused_by_ingress, timeout=20, what="localstripe's delivery answered 503")
        down = await stack.post_webhook(delivery.body)
        assert down.status_code == 503, down.text

        await loop.run_in_executor(None, broker.start)
        statuses = []
        deadline = time.monotonic() + 60
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline, f"no 200 within 60 s: {statuses}"
            await asyncio.sleep(0 if not statuses else 1.0)
            statuses.append((await stack.post_webhook(delivery.body)).status_code)
            assert statuses[-1] in (200, 503), statuses

        [completed] = await stack.events_of("payment.completed", order_id=order_id, timeout=90)
        assert completed["payment_intent_id"] == intent_id
        await stack.events_of("order.completed", order_id=order_id, timeout=60)
        await stack.settle(timeout=60)
        await asyncio.sleep(1.0)
        await stack.settle(timeout=60)
        assert len(stack.events("payment.completed", order_id=order_id)) == 1
        assert len(stack.events("order.completed", order_id=order_id)) == 1
        assert (await stack.payment(intent_id))["status"] == "SUCCEEDED"
        assert (await stack.order(order_id))["status"] == "COMPLETED"
        assert not stack.dead_letters_of(intent_id.encode())
        print(f"ingress answers after the broker came back: {statuses}")
    finally:
        localstripe.register_webhook(observer_id, observer.url, WEBHOOK_SECRET, events=["paystream.none"])
        await observer.stop()
