"""streams.metrics: names and labels by Prometheus' conventions, the kernel's per-batch hooks,
the scrape-time breaker state, the ingress and registry families, and PAYSTREAM_METRICS=off.

The kernel runs on the stand-in app of :mod:`tests.unit.test_kernel` (no broker).
"""

from __future__ import annotations

import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.clients.base import CircuitBreaker
from streams import metrics
from streams.kernel import Aggregate
from streams.settings import Settings
from tests.unit.test_kernel import (
    CREDITS,
    DLQ,
    PREFIX,
    DeadlineRecorder,
    FakeApp,
    command,
    counter_flow,
    credits_added,
)

#: Labels that would carry an id (unbounded): never allowed.
ID_LABELS = re.compile(r"(^|_)(id|key|order|user|event|intent|invoice|subscription|customer)(_|$)")


def scrape(registry: object) -> dict[str, float]:
    """{'name{a="x",b="y"}': value} of one registry's exposition (labels sorted)."""
    values = {}
    for family in text_string_to_metric_families(metrics.exposition(registry).decode()):  # type: ignore[arg-type]
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def rig_with_metrics() -> tuple[FakeApp, Aggregate, metrics.WorkerMetrics]:
    app = FakeApp()
    worker = app.metrics = metrics.WorkerMetrics(app)  # type: ignore[attr-defined]
    kernel = Aggregate(app, counter_flow(), agent_name="counter_events", deadlines="counter-deadlines",
                       max_backoff=0.0)
    kernel.deadlines = DeadlineRecorder()  # type: ignore[assignment]
    return app, kernel, worker


def test_every_name_and_label_follows_the_conventions() -> None:
    families = []
    app = FakeApp()
    worker = metrics.WorkerMetrics(app)
    for registry in (worker.registry, metrics.IngressMetrics().registry, metrics.RegistryMetrics().registry):
        families.extend(registry.collect())
    families.extend(f for f in metrics.REGISTRY.collect() if f.name.startswith("paystream_"))
    assert len(families) >= 23
    for family in families:
        assert family.name.startswith("paystream_"), family.name
        assert family.documentation, family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_records")), family.name
        if family.type == "gauge":
            assert not family.name.endswith("_total"), family.name
    for collector_family in (metrics.STRIPE_REQUESTS, metrics.CLIENT_REQUESTS, worker.dead_letters,
                             worker.input_records, worker.emitted_records):
        for label in collector_family._labelnames:
            assert not ID_LABELS.search(label), label
    names = metrics.all_metric_names()
    assert {"paystream_consumer_lag_records", "paystream_table_keys", "paystream_deadlines_pending",
            "paystream_recovery_active", "paystream_client_breaker_state",
            "paystream_ingress_webhooks_total", "paystream_agent_decide_seconds_bucket"} <= names
    assert all(not n.endswith("_total_total") for n in names)


async def test_a_batch_is_counted_once_by_topic_with_its_dead_letters_and_phases() -> None:
    app, kernel, worker = rig_with_metrics()
    dollars = credits_added(app, "u1", 5, currency="USD", partition=3)  # refused: dead-lettered
    await kernel.process([credits_added(app, "u1", 1, partition=3), dollars,
                          credits_added(app, "u1", 2, partition=3)])
    values = scrape(worker.registry)
    source = PREFIX + CREDITS
    assert values[f'paystream_agent_input_records_total{{agent="counter_events",topic="{source}"}}'] == 3
    assert values[f'paystream_dead_letters_total{{reason="rejected",source_topic="{source}"}}'] == 1
    emitted = {k: v for k, v in values.items() if k.startswith("paystream_agent_emitted_records_total")}
    assert sum(emitted.values()) == len(app.producer.acked) - 1  # all but the dead letter
    assert not any(DLQ in k for k in emitted)
    assert values['paystream_agent_batch_records_count{agent="counter_events"}'] == 1
    assert values['paystream_agent_batch_records_sum{agent="counter_events"}'] == 3
    for phase in ("decide", "ack", "write"):
        assert values[f'paystream_agent_{phase}_seconds_count{{agent="counter_events"}}'] == 1


async def test_a_fired_deadline_is_measured_from_its_due_time_when_applied_and_handed_over() -> None:
    _app, kernel, worker = rig_with_metrics()
    due = int(time.time() * 1000) - 2_000  # two seconds late
    await kernel.process([command("add", "u1", partition=2, amount=1, deadline=due)])
    await kernel.process([command("tick", "u1", partition=2, deadline_ms=due)])
    await kernel.hand_over([("u2", int(time.time() * 1000) - 7_000)])
    values = scrape(worker.registry)
    applied = 'paystream_deadline_apply_lag_seconds_{}{{table="counter-deadlines"}}'
    assert values[applied.format("count")] == 1
    assert 2.0 <= values[applied.format("sum")] < 10.0
    assert values['paystream_deadline_apply_lag_seconds_bucket{le="1.0",table="counter-deadlines"}'] == 0
    handed = 'paystream_deadline_handover_lag_seconds_{}{{table="counter-deadlines"}}'
    assert values[handed.format("count")] == 1
    assert 7.0 <= values[handed.format("sum")] < 15.0


def test_the_breaker_state_is_read_when_scraped() -> None:
    clock = [0.0]
    breaker = CircuitBreaker("metrics-test-service", failures=2, cooldown_seconds=5.0, clock=lambda: clock[0])

    def state() -> dict[str, float]:
        return {k: v for k, v in scrape(metrics.REGISTRY).items()
                if k.startswith("paystream_client_breaker_state") and "metrics-test-service" in k}

    assert state()['paystream_client_breaker_state{service="metrics-test-service",state="closed"}'] == 1
    breaker.failure()
    breaker.failure()
    assert state()['paystream_client_breaker_state{service="metrics-test-service",state="open"}'] == 1
    assert state()['paystream_client_breaker_state{service="metrics-test-service",state="closed"}'] == 0
    clock[0] = 6.0  # past the cool-down: a caller would be let through as a probe
    assert state()['paystream_client_breaker_state{service="metrics-test-service",state="half_open"}'] == 1
    del breaker


def test_the_ingress_has_every_outcome_from_the_start() -> None:
    ingress = metrics.IngressMetrics()
    values = scrape(ingress.registry)
    for outcome in metrics.WEBHOOK_OUTCOMES:
        assert values[f'paystream_ingress_webhooks_total{{outcome="{outcome}"}}'] == 0
    ingress.webhook("stale")
    assert ingress.count("stale") == 1
    with pytest.raises(KeyError):
        ingress.webhook("order-123")  # no outcome outside the bounded set


def test_metrics_off_gives_the_worker_no_metrics_and_a_bad_value_is_refused() -> None:
    assert Settings.from_env(env={}).metrics_enabled
    off = Settings.from_env(env={"PAYSTREAM_METRICS": "off"})
    assert not off.metrics_enabled
    with pytest.raises(ValueError, match="PAYSTREAM_METRICS"):
        Settings.from_env(env={"PAYSTREAM_METRICS": "yes"})
    app = FakeApp()
    app.settings.metrics_enabled = False  # type: ignore[attr-defined]
    assert metrics.install_worker(app) is None and app.metrics is None  # type: ignore[attr-defined]
    kernel = Aggregate(app, counter_flow(), agent_name="counter_events")
    assert kernel.metrics is None


def test_the_worker_app_serves_metrics_unless_off(tmp_path: object) -> None:
    from streams.app import create_app

    on = create_app(Settings.from_env(env={}, state_dir=tmp_path), registrars=[])
    assert isinstance(on.metrics, metrics.WorkerMetrics)
    assert any(getattr(r, "path", None) == "/metrics" or "/metrics" in str(r) for r in on.web.views)
    off = create_app(Settings.from_env(env={"PAYSTREAM_METRICS": "off"}, state_dir=tmp_path), registrars=[])
    assert off.metrics is None
    assert not any("/metrics" in str(r) for r in off.web.views)


def test_table_keys_are_exact_within_the_scrape_budget_and_estimated_beyond(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import rocksdict

    from tables import deadlines

    db = rocksdict.Rdict(str(tmp_path), options=rocksdict.Options(raw_mode=True))  # as Faust opens them
    try:
        offset_key = b"__faust\0offset__"
        for index in range(10):
            db[b"row-%d" % index] = b"v1"
        for index in range(3):
            db[b"row-%d" % index] = b"v2"  # rewritten rows: RocksDB's estimate counts them again
        del db[b"row-8"], db[b"row-9"]
        db[offset_key] = b"42"

        class Store:
            pass

        class Table:
            data = Store()

        Table.data.offset_key = offset_key  # type: ignore[attr-defined]
        monkeypatch.setattr(deadlines, "rocksdict_partition_dbs", lambda table: {5: db})
        budget = [100]
        assert list(metrics._partition_keys(Table(), budget)) == [(5, 8.0)]
        assert budget == [92]
        estimated = list(metrics._partition_keys(Table(), [0]))  # no budget left: the estimate
        assert estimated[0][0] == 5 and estimated[0][1] >= 8.0
    finally:
        db.close()


def test_the_sinks_worker_serves_metrics_with_an_agent_per_sink(tmp_path: object) -> None:
    from connectors.sinks import sink_settings
    from streams.app import create_app

    app = create_app(sink_settings(Settings.from_env(env={}, state_dir=tmp_path)))
    assert isinstance(app.metrics, metrics.WorkerMetrics)
    assert any("/metrics" in str(r) for r in app.web.views)
    sinks = {sink.aggregate.metrics.agent for sink in app.sinks.values()}
    assert sinks == {"notification_sink", "billing_sink"}
