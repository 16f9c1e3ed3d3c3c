"""The Stripe webhook ingress against real Kafka, with webhooks signed the way Stripe signs them.

Most tests run the ingress application in-process on a real port (aiohttp's
own server) against the shared broker on ``KAFKA_BOOTSTRAP_SERVERS``, each
with its own topic prefix, and read back what landed on ``stripe.events``.
One test runs ``paystream ingress`` as a subprocess, as it is deployed.

"Kafka down" never touches the shared broker (other tests use it): those
tests own a private single-node KRaft broker (``streams.devtools.localkafka``,
what ``paystream kafka`` runs) on free ports and its own state directory,
module-scoped because a start costs seconds (the time is printed), stopped
and restarted by its pid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from connectors.stripe_ingress import ACK_TIMEOUT_SECONDS, RETRY_AFTER_SECONDS
from streams.admin import delete_topics
from streams.devtools.localkafka import LocalKafka
from streams.devtools.worker_process import ROOT, settings_env
from streams.settings import Settings
from tests.integration.stripe_ingress_support import (
    InProcessIngress,
    Record,
    create_stripe_events_topic,
    free_port,
    headers_of,
    read_all_async,
    request,
    signature,
)

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe"
SECRET = "whsec_test_current_3f9c1d"
OLD_SECRET = "whsec_test_retired_7a2e4b"
PI = "pi_3QfR2kLkdIwHu7ix0Zb8aQ1T"
MAX_BODY = 16 * 1024


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / f"docs_{name}.json").read_bytes()


def event_bytes(name: str, **changes: object) -> bytes:
    """A fixture event with top-level fields changed, serialized the way Stripe does (indented)."""
    event = json.loads(fixture_bytes(name))
    event.update(changes)
    return json.dumps(event, indent=2).encode()


def unique_event(name: str = "payment_intent_succeeded") -> bytes:
    return event_bytes(name, id=f"evt_test{os.urandom(8).hex()}")


@pytest.fixture
def ingress_settings(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> Iterator[Settings]:
    settings = Settings.from_env(kafka_bootstrap_servers=kafka_bootstrap,
                                 topic_prefix=unique_name("ingress") + ".",
                                 stripe_webhook_secret=SECRET, ingress_max_body_bytes=MAX_BODY)
    create_stripe_events_topic(settings)
    yield settings
    delete_topics(kafka_bootstrap, [settings.topic("stripe.events")])


@pytest_asyncio.fixture
async def start_ingress(ingress_settings: Settings) -> AsyncIterator[Callable[..., object]]:
    """Start in-process ingresses on ``ingress_settings`` (overridable); all stopped at the end."""
    started: list[InProcessIngress] = []

    async def start(**overrides: object) -> InProcessIngress:
        settings = Settings.from_env({}, **{**_fields(ingress_settings), **overrides})
        ingress = await InProcessIngress(settings).start()
        started.append(ingress)
        return ingress

    yield start
    for ingress in started:
        await ingress.stop()


def _fields(settings: Settings) -> dict[str, object]:
    from dataclasses import fields

    return {f.name: getattr(settings, f.name) for f in fields(settings)}


@pytest_asyncio.fixture
async def ingress(start_ingress: Callable[..., object]) -> InProcessIngress:
    return await start_ingress()  # type: ignore[misc]


async def records(ingress: InProcessIngress) -> list[Record]:
    return await read_all_async(ingress.settings.kafka_bootstrap_servers,
                                ingress.settings.topic("stripe.events"))


# ---------------------------------------------------------------- accepted


async def test_a_signed_event_is_stored_verbatim_keyed_by_its_payment_intent(
        ingress: InProcessIngress) -> None:
    body = fixture_bytes("payment_intent_succeeded")
    answer = await ingress.post(body, signature(body, SECRET))
    assert (answer.status, answer.json()) == (200, {"received": True})

    [record] = await records(ingress)
    assert record.value == body  # the exact bytes Stripe signed
    assert record.key == PI.encode()
    assert record.headers == (
        ("stripe.event_id", b"evt_3QfR2kLkdIwHu7ix0e4f5g6h"),
        ("stripe.type", b"payment_intent.succeeded"),
        ("stripe.api_version", b"2024-06-20"),
    )
    assert (await ingress.metrics())['paystream_ingress_webhooks_total{outcome="accepted"}'] == 1


async def test_every_event_of_one_payment_lands_in_one_partition_with_its_account(
        ingress: InProcessIngress) -> None:
    names = ["payment_intent_created", "payment_intent_payment_failed", "payment_intent_canceled",
             "charge_refunded", "refund_created", "refund_failed", "charge_refund_updated"]
    for name in names:
        body = fixture_bytes(name)
        assert (await ingress.post(body, signature(body, SECRET))).status == 200, name
    stored = await records(ingress)
    assert sorted(r.value for r in stored) == sorted(fixture_bytes(n) for n in names)
    assert {r.key for r in stored} == {PI.encode()} and len({r.partition for r in stored}) == 1
    canceled = next(r for r in stored if headers_of(r)["stripe.type"] == b"payment_intent.canceled")
    assert headers_of(canceled)["stripe.account"] == b"acct_1PgT0aLkdIwHu7ix"
    assert headers_of(canceled)["stripe.api_version"] == b"2025-03-31.basil"
    assert all("stripe.account" not in headers_of(r) for r in stored if r is not canceled)


@pytest.mark.parametrize(("name", "event_type", "key"), [
    ("customer_subscription_updated", "customer.subscription.updated", "sub_1QfZ2aLkdIwHu7ixq3mC8Ndv"),
    ("invoice_payment_failed", "invoice.payment_failed", "in_1QhC2zLkdIwHu7ixRnw2Fail"),
])
async def test_a_signed_subscription_or_invoice_event_is_stored_keyed_by_its_object(
        ingress: InProcessIngress, name: str, event_type: str, key: str) -> None:
    body = fixture_bytes(name)
    answer = await ingress.post(body, signature(body, SECRET))
    assert (answer.status, answer.json()) == (200, {"received": True})
    [record] = await records(ingress)
    assert record.value == body and record.key == key.encode()
    event = json.loads(body)
    assert event["type"] == event_type
    assert record.headers == (
        ("stripe.event_id", event["id"].encode()),
        ("stripe.type", event_type.encode()),
        ("stripe.api_version", b"2024-06-20"),
    )
    assert (await ingress.metrics())['paystream_ingress_webhooks_total{outcome="accepted"}'] == 1


async def test_every_event_of_one_subscription_lands_in_one_partition(ingress: InProcessIngress) -> None:
    sub = "sub_1QfZ2aLkdIwHu7ixq3mC8Ndv"
    bodies = []
    for event_type in ("customer.subscription.created", "customer.subscription.updated",
                       "customer.subscription.paused", "customer.subscription.deleted"):
        bodies.append(event_bytes("customer_subscription_updated", type=event_type,
                                  id=f"evt_test{os.urandom(8).hex()}"))
        assert (await ingress.post(bodies[-1], signature(bodies[-1], SECRET))).status == 200, event_type
    stored = await records(ingress)
    assert [r.value for r in stored] == bodies  # in the order accepted
    assert {r.key for r in stored} == {sub.encode()} and len({r.partition for r in stored}) == 1


async def test_a_duplicate_event_id_is_stored_twice_for_the_stream_processor_to_dedupe(
        ingress: InProcessIngress) -> None:
    """Stripe delivers at least once; the ingress does not dedupe.

    Both deliveries are answered 200 and both are on the topic with the same
    ``stripe.event_id``: de-duplication is the payment agent's job.  The
    second is counted as a duplicate (the ingress remembers recent ids for
    its metrics only).
    """
    body = unique_event()
    first = await ingress.post(body, signature(body, SECRET))
    second = await ingress.post(body, signature(body, SECRET, timestamp=int(time.time()) + 1))
    assert (first.status, second.status) == (200, 200)
    stored = await records(ingress)
    assert [r.value for r in stored] == [body, body]
    assert len({headers_of(r)["stripe.event_id"] for r in stored}) == 1
    metrics = await ingress.metrics()
    assert metrics['paystream_ingress_webhooks_total{outcome="accepted"}'] == 1
    assert metrics['paystream_ingress_webhooks_total{outcome="duplicate"}'] == 1


async def test_an_unconsumed_type_is_answered_200_counted_and_not_stored(ingress: InProcessIngress) -> None:
    body = fixture_bytes("customer_created")
    for _ in range(2):
        answer = await ingress.post(body, signature(body, SECRET))
        assert (answer.status, answer.json()) == (200, {"received": True, "ignored": True})
    metrics = await ingress.metrics()
    assert metrics['paystream_ingress_webhooks_total{outcome="unknown_type"}'] == 2
    assert metrics['paystream_ingress_webhooks_total{outcome="accepted"}'] == 0
    assert await records(ingress) == []


# ---------------------------------------------------------------- signatures


async def test_bad_signatures_are_refused_and_nothing_is_stored(ingress: InProcessIngress) -> None:
    body = unique_event()
    tampered = body.replace(b'"amount": 4999', b'"amount": 1')
    assert tampered != body
    now = int(time.time())
    cases = {
        "missing header": (body, None),
        "empty header": (body, ""),
        "garbage header": (body, "this is not a signature"),
        "no timestamp": (body, signature(body, SECRET).partition(",")[2]),
        "no v1": (body, f"t={now},v0={'0' * 64}"),
        "other secret": (body, signature(body, "whsec_someone_else")),
        "tampered body": (tampered, signature(body, SECRET)),
        "non-ASCII signature": (body, f"t={now},v1=\u00e9\u00e9"),
    }
    for case, (payload, sig) in cases.items():
        answer = await ingress.post(payload, sig)
        assert (answer.status, answer.json()) == (400, {"error": "bad_signature"}), case
    assert (await ingress.metrics())['paystream_ingress_webhooks_total{outcome="bad_signature"}'] \
        == len(cases)
    assert await records(ingress) == []


async def test_a_stale_timestamp_is_refused_one_within_tolerance_accepted(ingress: InProcessIngress) -> None:
    stale, fresh = unique_event(), unique_event()
    now = int(time.time())
    answer = await ingress.post(stale, signature(stale, SECRET, timestamp=now - 301))
    assert (answer.status, answer.json()) == (400, {"error": "bad_signature"})
    assert (await ingress.post(fresh, signature(fresh, SECRET, timestamp=now - 240))).status == 200
    assert [r.value for r in await records(ingress)] == [fresh]
    metrics = await ingress.metrics()  # the same answer as a bad signature, counted apart
    assert metrics['paystream_ingress_webhooks_total{outcome="stale"}'] == 1
    assert metrics['paystream_ingress_webhooks_total{outcome="bad_signature"}'] == 0


async def test_several_v1_signatures_one_of_them_valid(ingress: InProcessIngress) -> None:
    body = unique_event()
    now = int(time.time())
    header = signature(body, "whsec_rolled_elsewhere", SECRET, timestamp=now)
    assert header.count("v1=") == 2
    assert (await ingress.post(body, header)).status == 200
    assert (await ingress.post(body, f"{header},v0=deadbeef")).status == 200
    assert [r.value for r in await records(ingress)] == [body, body]


async def test_a_rotated_out_secret_is_refused_both_accepted_while_rotating(
        start_ingress: Callable[..., object]) -> None:
    rotating = await start_ingress(stripe_webhook_secret=f"{SECRET}, {OLD_SECRET}")  # type: ignore[misc]
    old_body, new_body = unique_event(), unique_event()
    assert (await rotating.post(old_body, signature(old_body, OLD_SECRET))).status == 200
    assert (await rotating.post(new_body, signature(new_body, SECRET))).status == 200

    rotated = await start_ingress(stripe_webhook_secret=SECRET)  # type: ignore[misc]
    late = unique_event()
    answer = await rotated.post(late, signature(late, OLD_SECRET))
    assert (answer.status, answer.json()) == (400, {"error": "bad_signature"})
    assert (await rotated.post(late, signature(late, SECRET))).status == 200
    assert sorted(r.value for r in await records(rotated)) == sorted([old_body, new_body, late])


# ---------------------------------------------------------------- not events


async def test_signed_bodies_that_are_not_stripe_events_are_400_never_500(ingress: InProcessIngress) -> None:
    event = json.loads(fixture_bytes("payment_intent_succeeded"))
    cases = {
        "malformed JSON": b'{"id": "evt_1", "type": ',
        "empty body": b"",
        "JSON array": json.dumps([event]).encode(),
        "JSON string": json.dumps("evt_3QfR2kLkdIwHu7ix0e4f5g6h").encode(),
        "JSON number": b"42",
        "JSON null": b"null",
        "object without id": json.dumps({k: v for k, v in event.items() if k != "id"}).encode(),
        "data.object not an object": json.dumps({**event, "data": {"object": "pi_1"}}).encode(),
        "a bare PaymentIntent": json.dumps(event["data"]["object"]).encode(),
        "deeply nested": b"[" * 5000 + b"]" * 5000,
    }
    for case, body in cases.items():
        answer = await ingress.post(body, signature(body, SECRET))
        assert (answer.status, answer.json()) == (400, {"error": "not_a_stripe_event"}), case
    not_utf8 = b'{"id": "evt_\xff"}'
    answer = await ingress.post(not_utf8, f"t={int(time.time())},v1={'0' * 64}")
    assert (answer.status, answer.json()) == (400, {"error": "not_a_stripe_event"})
    metrics = await ingress.metrics()
    assert metrics['paystream_ingress_webhooks_total{outcome="not_a_stripe_event"}'] == len(cases) + 1
    assert await records(ingress) == []


async def test_a_consumed_type_with_an_unreadable_object_is_still_stored(ingress: InProcessIngress) -> None:
    """The ingress checks the envelope only; what an object lacks is the payment agent's to judge.

    A ``payment_intent.succeeded`` whose object has no id is stored (keyed by
    the event id) rather than lost: it is in the audit log, and the payment
    agent counts it when it cannot make a fact of it.
    """
    event = json.loads(fixture_bytes("payment_intent_succeeded"))
    del event["data"]["object"]["id"]
    body = json.dumps(event).encode()
    assert (await ingress.post(body, signature(body, SECRET))).status == 200
    [record] = await records(ingress)
    assert (record.value, record.key) == (body, event["id"].encode())


# ---------------------------------------------------------------- size


async def test_an_oversized_body_is_413_with_or_without_content_length(ingress: InProcessIngress) -> None:
    event = json.loads(fixture_bytes("payment_intent_succeeded"))
    event["data"]["object"]["description"] = "x" * MAX_BODY
    big = json.dumps(event).encode()
    assert len(big) > MAX_BODY

    answer = await ingress.post(big, signature(big, SECRET))  # Content-Length
    assert (answer.status, answer.json()) == (413, {"error": "too_large"})

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1024):
            yield big[start:start + 1024]

    answer = await ingress.post(chunks(), signature(big, SECRET))  # chunked: no Content-Length
    assert (answer.status, answer.json()) == (413, {"error": "too_large"})

    event["data"]["object"]["description"] = "x"
    fits = json.dumps(event).encode()
    fits = fits.replace(b'"x"', b'"' + b"x" * (MAX_BODY - len(fits) + 1) + b'"')
    assert len(fits) == MAX_BODY

    async def fits_chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(fits), 1000):
            yield fits[start:start + 1000]

    assert (await ingress.post(fits_chunks(), signature(fits, SECRET))).status == 200
    assert (await ingress.metrics())['paystream_ingress_webhooks_total{outcome="too_large"}'] == 2
    assert [r.value for r in await records(ingress)] == [fits]


# ---------------------------------------------------------------- the rest of HTTP


async def test_health_readiness_and_errors_as_json(ingress: InProcessIngress,
                                                   start_ingress: Callable[..., object]) -> None:
    assert ((await ingress.get("/healthz")).status, (await ingress.get("/readyz")).status) == (200, 200)
    not_found = await ingress.get("/webhooks/paypal")
    assert (not_found.status, not_found.json()) == (404, {"error": "not_found"})
    wrong_method = await ingress.get("/webhooks/stripe")
    assert (wrong_method.status, wrong_method.json()) == (405, {"error": "method_not_allowed"})
    assert wrong_method.headers["Allow"] == "POST"

    no_topic = await start_ingress(topic_prefix=ingress.settings.topic_prefix + "missing.")  # type: ignore[misc]
    assert (await no_topic.get("/healthz")).status == 200
    unready = await no_topic.get("/readyz")
    assert unready.status == 503 and "missing" in unready.json()["reason"]  # type: ignore[index]


async def test_the_log_has_one_line_per_request_and_no_secret_signature_or_body(
        ingress: InProcessIngress, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="paystream.ingress")
    body = unique_event()
    sig = signature(body, SECRET)
    assert (await ingress.post(body, sig)).status == 200
    assert (await ingress.post(body, sig.replace("v1=", "v1=0"))).status == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "paystream.ingress"]
    assert len(lines) == 2
    assert "200" in lines[0] and json.loads(body)["id"] in lines[0] and "accepted" in lines[0]
    assert "400" in lines[1] and "bad_signature" in lines[1]
    text = "\n".join(lines)
    for secret_or_data in (SECRET, sig.partition("v1=")[2], "pm_1QfR2jLkdIwHu7ixHc4Vx3Lp", "secret_",
                           '"amount"'):
        assert secret_or_data not in text


def test_paystream_ingress_runs_as_a_process_and_stops_on_sigterm(
        ingress_settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **settings_env(ingress_settings), "INGRESS_PORT": str(port),
           "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "ingress.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "streams.cli", "ingress"], cwd=ROOT, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        async def exercise() -> tuple[int, int]:
            import aiohttp

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if (await request(session, "GET", f"http://127.0.0.1:{port}/readyz")).status == 200:
                            break
                    except aiohttp.ClientConnectionError:
                        pass
                    assert process.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, log_path.read_text()
                    await asyncio.sleep(0.2)
                body = unique_event()
                good = await request(session, "POST", f"http://127.0.0.1:{port}/webhooks/stripe",
                                     data=body, headers={"Stripe-Signature": signature(body, SECRET)})
                bad = await request(session, "POST", f"http://127.0.0.1:{port}/webhooks/stripe",
                                    data=body, headers={"Stripe-Signature": signature(body, OLD_SECRET)})
                return good.status, bad.status

        assert asyncio.run(exercise()) == (200, 400)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert "POST /webhooks/stripe 200" in log and "POST /webhooks/stripe 400" in log
    assert SECRET not in log and "v1=" not in log


# ---------------------------------------------------------------- Kafka down


@pytest.fixture(scope="module")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A broker of this module's own on free ports (never the shared one); started by the tests."""
    broker = LocalKafka(tmp_path_factory.mktemp("kafka-down") / "kafka", port=free_port(),
                        controller_port=free_port(), heap="512m")
    try:
        yield broker
    finally:
        broker.stop()


def start_broker(broker: LocalKafka) -> float:
    seconds = broker.start()
    print(f"private broker answering after {seconds:.1f} s")
    return seconds


async def post_until(ingress: InProcessIngress, body: bytes, timeout: float) -> list[int]:
    """Post ``body`` (freshly signed each time, like Stripe's retries) until 200; the statuses seen."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = await ingress.post(body, signature(body, SECRET))
        statuses.append(answer.status)
        if answer.status == 200:
            return statuses
        assert answer.status == 503, answer.text
        await asyncio.sleep(1.0)
    raise AssertionError(f"no 200 within {timeout} s: {statuses}")


async def assert_unavailable(ingress: InProcessIngress, body: bytes) -> None:
    answer = await ingress.post(body, signature(body, SECRET))
    assert (answer.status, answer.json()) == (503, {"error": "unavailable"})
    assert answer.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert answer.elapsed < ACK_TIMEOUT_SECONDS + 2.0, "the 503 must come in bounded time"


async def test_an_ingress_started_while_kafka_is_down_answers_503_then_stores_once_kafka_is_up(
        private_broker: LocalKafka, tmp_path: Path) -> None:
    private_broker.stop()
    settings = Settings.from_env(kafka_bootstrap_servers=private_broker.bootstrap, topic_prefix="down.",
                                 stripe_webhook_secret=SECRET)
    ingress = await InProcessIngress(settings).start()
    try:
        body = unique_event()
        assert (await ingress.get("/healthz")).status == 200
        assert (await ingress.get("/readyz")).status == 503
        await assert_unavailable(ingress, body)
        assert (await ingress.metrics())['paystream_ingress_webhooks_total{outcome="unavailable"}'] == 1

        await asyncio.get_running_loop().run_in_executor(None, start_broker, private_broker)
        create_stripe_events_topic(settings)
        statuses = await post_until(ingress, body, timeout=60)
        assert statuses[-1] == 200
        assert (await ingress.get("/readyz")).status == 200
        assert [r.value for r in await records(ingress)] == [body]  # once, though 503'd before
    finally:
        await ingress.stop()


async def test_kafka_going_away_gives_503_and_the_same_producer_stores_the_retry_once_it_is_back(
        private_broker: LocalKafka) -> None:
    await asyncio.get_running_loop().run_in_executor(None, start_broker, private_broker)
    settings = Settings.from_env(kafka_bootstrap_servers=private_broker.bootstrap, topic_prefix="away.",
                                 stripe_webhook_secret=SECRET)
    create_stripe_events_topic(settings)
    ingress = await InProcessIngress(settings).start()
    try:
        before, during = unique_event(), unique_event()
        assert (await ingress.post(before, signature(before, SECRET))).status == 200

        await asyncio.get_running_loop().run_in_executor(None, private_broker.stop)
        await assert_unavailable(ingress, during)
        await assert_unavailable(ingress, during)
        assert (await ingress.get("/readyz")).status == 503

        await asyncio.get_running_loop().run_in_executor(None, start_broker, private_broker)
        await post_until(ingress, during, timeout=60)
        metrics = await ingress.metrics()
        assert metrics['paystream_ingress_webhooks_total{outcome="accepted"}'] == 2
        assert metrics['paystream_ingress_webhooks_total{outcome="unavailable"}'] >= 2
        assert sorted(r.value for r in await records(ingress)) == sorted([before, during])
    finally:
        await ingress.stop()
