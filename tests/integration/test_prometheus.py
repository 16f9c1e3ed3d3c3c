"""A real Prometheus scrapes a running worker and ingress while orders flow.

The stack is the payment tests' (:func:`tests.integration.payment_support.running_stack`):
``paystream worker`` and ``paystream ingress`` subprocesses on real Kafka, localstripe
as Stripe (its signed webhooks reach the ingress), the stand-ins as the external
services.  Prometheus is Debian's package (installed when missing, as ``./dev
test`` does: :mod:`streams.devtools.localprometheus`), run on the deploy
configuration (``deploy/prometheus/prometheus.yml``: its jobs, targets pointed at
this test's processes, a 1 s interval) with the deploy alert rules.  Everything is
read back through Prometheus' HTTP API, never from ``/metrics`` directly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from streams import catalog
from streams.devtools import localprometheus
from streams.devtools.localstripe import LocalStripe
from tests.integration.payment_support import PaymentStack, running_stack
from tests.integration.pipeline_support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
#: Scrape and rule evaluation interval of the test's Prometheus.
INTERVAL = "1s"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PaymentStack]:
    async with running_stack(kafka_bootstrap, registry_url, localstripe,
                             tmp_path_factory.mktemp("prometheus-stack"), "prom") as running:
        yield running


def scrape_config(stack: PaymentStack) -> dict:
    """deploy/prometheus/prometheus.yml with this stack's addresses, a fast interval, the deploy rules."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    addresses = {"paystream-worker": f"127.0.0.1:{stack.settings.worker_web_port}",
                 "paystream-ingress": f"127.0.0.1:{stack.settings.ingress_port}"}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(addresses)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [addresses[job["job_name"]]]}]
    config["global"] = {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL}
    config["rule_files"] = [str(DEPLOY / name) for name in config["rule_files"]]
    return config


@pytest.fixture(scope="module")
def prometheus(stack: PaymentStack, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[localprometheus.PrometheusServer]:
    localprometheus.ensure_installed()
    root = tmp_path_factory.mktemp("prometheus")
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(stack)))
    server = localprometheus.PrometheusServer(config, root / "data", free_port()).start()
    yield server
    server.stop()


def value(prometheus: localprometheus.PrometheusServer, expr: str) -> float | None:
    """The single value of an instant query (None: no sample)."""
    result = prometheus.query(expr)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


async def eventually(check: Callable[[], object], what: str, timeout: float = 45.0) -> object:
    """``check()`` once it answers truthy (Prometheus scrapes every second), else fail with ``what``."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await loop.run_in_executor(None, check)
        if last:
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what}: not seen within {timeout:g} s (last {last!r})")


def user() -> str:
    return f"u-prom-{uuid.uuid4().hex[:8]}"


async def test_prometheus_sees_the_series_move_as_orders_flow(
        stack: PaymentStack, prometheus: localprometheus.PrometheusServer) -> None:
    topic = stack.settings.topic

    def both_up() -> bool:
        targets = prometheus.targets()
        return len(targets) == 2 and all(t["health"] == "up" for t in targets)

    await eventually(both_up, "worker and ingress scraped")
    rules = {rule["name"] for group in prometheus.api("rules")["groups"] for rule in group["rules"]}
    assert {"PaystreamConsumerLagGrowing", "PaystreamDeadLetters", "PaystreamDeadlineLagHigh",
            "PaystreamCircuitBreakerOpen"} <= rules

    def total(expr: str) -> float:
        return value(prometheus, f"sum({expr})") or 0.0

    inputs = 'paystream_agent_input_records_total{job="paystream-worker",agent="order_events"}'
    order_created = topic("order.created")
    created = f'paystream_agent_emitted_records_total{{agent="order_events",topic="{order_created}"}}'
    accepted = 'paystream_ingress_webhooks_total{job="paystream-ingress",outcome="accepted"}'
    decided = 'paystream_agent_decide_seconds_count{agent="order_events"}'
    stripe_ok = 'paystream_stripe_requests_total{operation="create_payment_intent",outcome="ok"}'
    before = {expr: total(expr) for expr in (inputs, created, accepted, decided, stripe_ok)}

    # Three orders paid through localstripe (its webhooks through the ingress), one left open.
    for amount in (1200, 2300, 3400):
        await stack.paid_order(user(), amount)
    open_order, _intent = await stack.open_payment(user(), 4500)
    await stack.settle()

    async def grown(expr: str, by: float) -> None:
        await eventually(lambda: total(expr) >= before[expr] + by,
                         f"{expr} up by {by:g} from {before[expr]:g}")

    await grown(inputs, 4 * 2)  # a create command and payment events per order
    await grown(created, 4)
    await grown(decided, 1)
    await grown(stripe_ok, 4)  # one PaymentIntent per order
    await grown(accepted, 3)  # localstripe's payment_intent.succeeded of each paid order
    await eventually(lambda: total('paystream_client_requests_total{outcome="ok"}') > 0,
                     "service client calls (the order API's user check)")

    # Scrape-time series: rows per partition, the open order's deadline, lag back to 0.
    await eventually(lambda: total('paystream_table_keys{table="orders"}') >= 4, "order rows")
    await eventually(lambda: total('paystream_deadlines_pending{table="order-deadlines"}') >= 1,
                     "the open order's expiry deadline")
    commands = topic(catalog.ORDER_COMMANDS)
    lag_series = prometheus.query(f'paystream_consumer_lag_records{{topic="{commands}"}}')
    assert {int(s["metric"]["partition"]) for s in lag_series} <= set(range(catalog.EVENT_PARTITIONS))
    assert lag_series, "no lag series for the order commands"
    await eventually(lambda: value(prometheus, "max(paystream_consumer_lag_records)") == 0.0,
                     "consumer lag back to 0 once settled")
    assert value(prometheus, "max(paystream_recovery_active)") == 0.0
    assert value(prometheus, 'max(paystream_client_breaker_state{state="open"})') == 0.0
    assert total('paystream_agent_batch_records_count{agent="order_events"}') >= 1
    assert open_order["order_id"]


async def test_a_dead_letter_shows_up_by_reason_and_source_and_fires_the_alert(
        stack: PaymentStack, prometheus: localprometheus.PrometheusServer) -> None:
    commands = stack.settings.topic(catalog.ORDER_COMMANDS)
    series = f'paystream_dead_letters_total{{reason="undecodable",source_topic="{commands}"}}'
    before = value(prometheus, f"sum({series})") or 0.0
    stack.writer.send_raw(commands, b"o-prom-garbage", b"\x00not a command")
    await eventually(lambda: (value(prometheus, f"sum({series})") or 0.0) >= before + 1,
                     "the dead letter counted by reason and source topic")

    def firing() -> list[dict]:
        return [a for a in prometheus.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "PaystreamDeadLetters" and a["state"] == "firing"
                and a["labels"].get("source_topic") == commands]

    [alert] = await eventually(firing, "PaystreamDeadLetters firing")  # type: ignore[misc]
    assert alert["labels"]["reason"] == "undecodable"
    assert alert["labels"]["job"] == "paystream-worker"
