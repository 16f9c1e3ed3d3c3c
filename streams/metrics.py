"""Every Prometheus metric of paystream, in one module (``prometheus-client``).

Each process serves ``GET /metrics`` in the Prometheus text format (0.0.4):
the worker and the sinks worker on their Faust web server, the webhook
ingress and the schema registry on their aiohttp servers.  Names follow
Prometheus' conventions: ``paystream_`` first, counters end in ``_total``,
durations are ``_seconds`` histograms, record counts end in ``_records``;
label values come from bounded sets (agent, Kafka topic, partition, reason,
service, operation, outcome: never an order, user, event or Stripe id).

Where the metrics live
----------------------
- Per process (``prometheus_client.REGISTRY``): the calls that leave the
  process, whoever makes them: Stripe (:data:`STRIPE_REQUESTS`,
  :data:`STRIPE_SECONDS`), the service clients (:data:`CLIENT_REQUESTS`,
  :data:`CLIENT_SECONDS`) and their circuit breakers (a collector reads each
  breaker's state at scrape time), plus the client library's own process
  metrics (CPU, memory, open files, GC).
- Per application object (:class:`WorkerMetrics`, :class:`IngressMetrics`,
  :class:`RegistryMetrics`), each on a registry of its own, so two apps in
  one test process keep their own counts.  ``/metrics`` renders the app's
  registry and the process registry together (:func:`exposition`).

The hot path
------------
The kernel reports once per batch (:class:`AgentMetrics`): the batch's size,
its inputs by topic and its outgoing records by topic are counted with one
pass each and added with one ``inc`` per (agent, topic), and the three
phase durations are observed once.  Values that need no event to change
(consumer lag, table keys, pending deadlines, recovery, breaker state) are
computed only when Prometheus scrapes, by collectors reading what Faust,
aiokafka and RocksDB already keep in memory: a scrape makes no broker or
network call.

``PAYSTREAM_METRICS=off`` (:attr:`streams.settings.Settings.metrics_enabled`)
gives the worker no :class:`WorkerMetrics`: the kernel's hooks are skipped
and its ``/metrics`` is not served.  The per-call counters of Stripe and
the service clients stay (one increment per network round trip).
"""

from __future__ import annotations

import time
import weakref
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

#: The ``Content-Type`` of every ``/metrics`` answer.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: Seconds: a batch phase, an HTTP call (half a millisecond to half a minute).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
#: Records in one batch (the kernel takes at most ``PAYSTREAM_BATCH_MAX``, default 1,000).
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
#: Seconds a deadline is late (a timer tick is 0.5 s; a backlog can take minutes).
DEADLINE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)

#: Keys a scrape counts exactly, over all tables and partitions (about 12 ms of
#: RocksDB iteration on the event loop); a partition that would exceed what is
#: left is reported with RocksDB's estimate instead.
EXACT_KEYS_PER_SCRAPE = 20_000

#: The states of a circuit breaker, as ``connectors.clients.base.CircuitBreaker`` names them.
BREAKER_STATES = ("closed", "half_open", "open")

#: Outcomes of a Stripe webhook at the ingress (``paystream_ingress_webhooks_total``).
WEBHOOK_OUTCOMES = ("accepted", "duplicate", "unknown_type", "bad_signature", "stale", "too_large",
                    "not_a_stripe_event", "unavailable")


# ----------------------------------------------------------------------
# Per process: calls that leave it


STRIPE_REQUESTS = Counter(
    "paystream_stripe_requests_total",
    "Stripe API requests by gateway operation and outcome (ok, refused: Stripe said no, "
    "unavailable: transient, error: configuration or credentials).",
    ["operation", "outcome"])
STRIPE_SECONDS = Histogram(
    "paystream_stripe_request_seconds",
    "Duration of one Stripe API request, the stripe library's own retries included.",
    ["operation"], buckets=LATENCY_BUCKETS)
CLIENT_REQUESTS = Counter(
    "paystream_client_requests_total",
    "Service client calls by service, method and outcome (ok, not_found, rejected, unavailable, "
    "breaker_open, bad_response, cancelled, error), each counted once whatever its retries.",
    ["service", "method", "outcome"])
CLIENT_SECONDS = Histogram(
    "paystream_client_request_seconds",
    "Duration of one service client call, its retries and back-off included.",
    ["service", "method"], buckets=LATENCY_BUCKETS)


class _BreakerCollector:
    """``paystream_client_breaker_state``: each service's breaker state, read at scrape time."""

    def __init__(self) -> None:
        self.breakers: weakref.WeakSet[Any] = weakref.WeakSet()

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily("paystream_client_breaker_state", "", labels=["service", "state"])]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "paystream_client_breaker_state",
            "1 for the state a service's circuit breaker is in (closed, half_open, open), 0 for the "
            "others; open past its cool-down reads half_open.  With several breakers of one service "
            "in a process, the worst.",
            labels=["service", "state"])
        worst: dict[str, int] = {}
        for breaker in list(self.breakers):
            rank = BREAKER_STATES.index(breaker.state) if breaker.state in BREAKER_STATES else 0
            worst[breaker.service] = max(worst.get(breaker.service, 0), rank)
        for service, rank in sorted(worst.items()):
            for index, state in enumerate(BREAKER_STATES):
                family.add_metric([service, state], 1.0 if index == rank else 0.0)
        yield family


_BREAKERS = _BreakerCollector()
REGISTRY.register(_BREAKERS)


def track_breaker(breaker: Any) -> None:
    """Report ``breaker`` (``service`` and ``state`` attributes) while it lives."""
    _BREAKERS.breakers.add(breaker)


def observe_stripe(operation: str, outcome: str, seconds: float) -> None:
    """One Stripe request of the gateway's ``operation`` ended with ``outcome``."""
    STRIPE_REQUESTS.labels(operation, outcome).inc()
    STRIPE_SECONDS.labels(operation).observe(seconds)


def observe_client(service: str, method: str, outcome: str, seconds: float) -> None:
    """One service client call ended with ``outcome`` after ``seconds``."""
    CLIENT_REQUESTS.labels(service, method, outcome).inc()
    CLIENT_SECONDS.labels(service, method).observe(seconds)


def exposition(*registries: CollectorRegistry) -> bytes:
    """The text format of ``registries`` and the process registry, in one answer."""
    return b"".join(generate_latest(r) for r in (*registries, REGISTRY))


# ----------------------------------------------------------------------
# The worker (and the sinks worker): agents, tables, consumer


class WorkerMetrics:
    """A worker app's metrics: the kernel's per-batch families and the scrape-time collector."""

    def __init__(self, app: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.input_records = Counter(
            "paystream_agent_input_records_total",
            "Records an agent took from its input topics (commands and internal records included).",
            ["agent", "topic"], registry=r)
        self.emitted_records = Counter(
            "paystream_agent_emitted_records_total",
            "Records an agent published (events, index updates, commands), dead letters aside, "
            "counted once their batch was acknowledged.",
            ["agent", "topic"], registry=r)
        self.batch_size = Histogram(
            "paystream_agent_batch_records", "Records in one batch an agent took.",
            ["agent"], buckets=BATCH_BUCKETS, registry=r)
        self.decide_seconds = Histogram(
            "paystream_agent_decide_seconds",
            "Deciding one batch: decoding, decisions, external calls, encoding.",
            ["agent"], buckets=LATENCY_BUCKETS, registry=r)
        self.ack_seconds = Histogram(
            "paystream_agent_ack_seconds",
            "Handing one batch's outgoing records to the producer until Kafka acknowledged them all.",
            ["agent"], buckets=LATENCY_BUCKETS, registry=r)
        self.write_seconds = Histogram(
            "paystream_agent_write_seconds",
            "Writing one batch's rows and deadlines (RocksDB and changelog hand-over).",
            ["agent"], buckets=LATENCY_BUCKETS, registry=r)
        self.dead_letters = Counter(
            "paystream_dead_letters_total",
            "Records put on the dead-letter topic, by dlq.reason and the topic they came from.",
            ["reason", "source_topic"], registry=r)
        self.handover_lag = Histogram(
            "paystream_deadline_handover_lag_seconds",
            "From a deadline's due time to the timer handing it to its agent as a command.",
            ["table"], buckets=DEADLINE_BUCKETS, registry=r)
        self.apply_lag = Histogram(
            "paystream_deadline_apply_lag_seconds",
            "From a deadline's due time to its agent having applied it (events acknowledged, row "
            "written).",
            ["table"], buckets=DEADLINE_BUCKETS, registry=r)
        self.deadline_tables: dict[str, Any] = {}  # deadline table name -> Faust table
        self.registry.register(_WorkerCollector(app, self))

    def agent(self, name: str, *, dead_letter_topic: str, deadlines: Any = None) -> AgentMetrics:
        """The hooks of one kernel agent; ``deadlines`` is its ``tables.deadlines.Deadlines``, if any."""
        table = None
        if deadlines is not None:
            table = deadlines.name
            self.deadline_tables[table] = deadlines.table
        return AgentMetrics(self, name, dead_letter_topic, table)

    def render(self) -> bytes:
        return exposition(self.registry)


class AgentMetrics:
    """One agent's per-batch hooks (see "The hot path" above)."""

    __slots__ = (
        "_ack",
        "_apply",
        "_decide",
        "_emitted",
        "_handover",
        "_inputs",
        "_size",
        "_write",
        "agent",
        "dead_letter_topic",
        "table",
        "worker",
    )

    def __init__(self, worker: WorkerMetrics, agent: str, dead_letter_topic: str,
                 table: str | None) -> None:
        self.worker = worker
        self.agent = agent
        self.dead_letter_topic = dead_letter_topic
        self.table = table
        self._inputs: dict[str, Any] = {}
        self._emitted: dict[str, Any] = {}
        self._size = worker.batch_size.labels(agent)
        self._decide = worker.decide_seconds.labels(agent)
        self._ack = worker.ack_seconds.labels(agent)
        self._write = worker.write_seconds.labels(agent)
        self._handover = worker.handover_lag.labels(table) if table else None
        self._apply = worker.apply_lag.labels(table) if table else None

    def taken(self, events: Sequence[Any]) -> None:
        """A batch was taken: its size, and its records by input topic."""
        self._size.observe(len(events))
        inputs = self._inputs
        for topic, count in Tally([e.message.topic for e in events]).items():
            child = inputs.get(topic)
            if child is None:
                child = inputs[topic] = self.worker.input_records.labels(self.agent, topic)
            child.inc(count)

    def done(self, outgoing: Sequence[Any], slots: Iterable[Any], decide: float, ack: float,
             write: float) -> None:
        """A batch (or a part of it run alone) was acknowledged and written.

        ``outgoing`` are its published records (``topic``, ``headers``);
        ``slots`` its rows, whose ``fired`` deadlines it applied.
        """
        self._decide.observe(decide)
        self._ack.observe(ack)
        self._write.observe(write)
        emitted = self._emitted
        for topic, count in Tally([r.topic for r in outgoing]).items():
            if topic == self.dead_letter_topic:
                self._dead_letters(outgoing)
                continue
            child = emitted.get(topic)
            if child is None:
                child = emitted[topic] = self.worker.emitted_records.labels(self.agent, topic)
            child.inc(count)
        if self._apply is not None:
            now = time.time() * 1000
            for slot in slots:
                for due in slot.fired:
                    self._apply.observe(max(0.0, now - due) / 1000)

    def _dead_letters(self, outgoing: Sequence[Any]) -> None:
        for record in outgoing:
            if record.topic != self.dead_letter_topic:
                continue
            headers = dict(record.headers or ())
            reason = headers.get("dlq.reason", b"unknown").decode(errors="replace")
            source = headers.get("dlq.source.topic", b"unknown").decode(errors="replace")
            self.worker.dead_letters.labels(reason, source).inc()

    def handed_over(self, due: Iterable[tuple[str, int]], now_ms: int) -> None:
        """The timer handed these ``(aggregate id, deadline ms)`` to the agent at ``now_ms``."""
        if self._handover is not None:
            for _aggregate, deadline in due:
                self._handover.observe(max(0, now_ms - deadline) / 1000)


class _WorkerCollector:
    """Scrape-time values of a worker: consumer lag, table keys, pending deadlines, recovery.

    Reads Faust's and aiokafka's in-memory bookkeeping and the tables'
    RocksDB databases; never asks the broker.  Keys are counted exactly up to
    :data:`EXACT_KEYS_PER_SCRAPE` per scrape; past that, a partition reports
    RocksDB's ``estimate-num-keys`` (which counts an overwrite as a key until
    compaction, so it runs high for rows rewritten often).
    """

    def __init__(self, app: Any, metrics: WorkerMetrics) -> None:
        self.app = weakref.proxy(app)
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._lag()
            yield from self._tables()
            yield from self._recovery()
        except ReferenceError:  # the app is gone (a test's app after its end)
            return

    def _lag(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "paystream_consumer_lag_records",
            "Records in an input partition not yet committed by the worker's group: the log end "
            "offset the consumer last fetched minus the committed offset.  Assigned partitions "
            "with a committed offset only; table changelogs aside.",
            labels=["topic", "partition"])
        app = self.app
        consumer = getattr(app, "_consumer", None)  # not created before the worker starts
        if consumer is not None:
            changelogs = set(app.tables.changelog_topics) if app.tables else set()
            committed = getattr(consumer, "_committed_offset", {})
            try:
                assignment = sorted(consumer.assignment())
            except Exception:  # consumer not started or being replaced: nothing to say
                assignment = []
            for tp in assignment:
                if tp.topic in changelogs:
                    continue
                done = committed.get(tp)
                try:
                    end = consumer.highwater(tp)
                except Exception:
                    end = None
                if done is None or end is None:
                    continue
                lag.add_metric([tp.topic, str(tp.partition)], float(max(0, end - done)))
        yield lag

    def _tables(self) -> Iterator[Metric]:
        keys = GaugeMetricFamily(
            "paystream_table_keys",
            "Keys in a table's RocksDB database for one partition this worker serves (Faust's offset "
            "key not counted): exact for small tables, RocksDB's estimate-num-keys for large ones.",
            labels=["table", "partition"])
        pending = GaugeMetricFamily(
            "paystream_deadlines_pending",
            "Deadlines held for this worker's partitions, per deadline table (the sum of its "
            "paystream_table_keys).",
            labels=["table"])
        tables = self.app.tables
        by_table: dict[str, float] = {}
        budget = [EXACT_KEYS_PER_SCRAPE]
        for table in list(tables.values()) if tables else []:
            for partition, count in _partition_keys(table, budget):
                keys.add_metric([table.name, str(partition)], count)
                by_table[table.name] = by_table.get(table.name, 0.0) + count
        for name in sorted(self.metrics.deadline_tables):
            pending.add_metric([name], by_table.get(name, 0.0))
        yield keys
        yield pending

    def _recovery(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "paystream_recovery_active", "1 while the worker restores its tables from their changelogs.")
        remaining = GaugeMetricFamily(
            "paystream_recovery_remaining_records",
            "Changelog records the worker still has to apply to its active tables before it serves.")
        tables = self.app.tables
        recovery = getattr(tables, "recovery", None) if tables else None
        busy = bool(recovery is not None and recovery.in_recovery)
        left = 0
        if busy:
            try:
                left = int(recovery.active_remaining_total())
            except Exception:  # not known yet
                left = 0
        active.add_metric([], 1.0 if busy else 0.0)
        remaining.add_metric([], float(left))
        yield active
        yield remaining


def _partition_keys(table: Any, budget: list[int]) -> Iterator[tuple[int, float]]:
    """(partition, keys) of a RocksDB-backed table's active partitions; nothing for other stores.

    Counted exactly while ``budget[0]`` (keys left to count in this scrape)
    allows, else RocksDB's estimate.
    """
    from tables.deadlines import rocksdict_partition_dbs

    try:
        dbs = rocksdict_partition_dbs(table)
    except Exception:  # store not opened yet, no assignment
        return
    if not dbs:
        return
    offset_key = getattr(table.data, "offset_key", None)
    for partition, db in sorted(dbs.items()):
        try:
            count = db.property_int_value("rocksdb.estimate-num-keys") or 0
            if count <= budget[0]:
                count = sum(1 for key in db.keys() if key != offset_key)
                budget[0] -= count
            elif offset_key is not None and db.get(offset_key) is not None:
                count -= 1
        except Exception:  # a database being closed by a rebalance
            continue
        yield partition, float(max(0, count))


def for_agent(app: Any, agent: str, *, dead_letter_topic: str, deadlines: Any = None) -> AgentMetrics | None:
    """The agent's hooks on ``app``, or None when the app has no metrics (PAYSTREAM_METRICS=off)."""
    worker = getattr(app, "metrics", None)
    if not isinstance(worker, WorkerMetrics):
        return None
    return worker.agent(agent, dead_letter_topic=dead_letter_topic, deadlines=deadlines)


def install_worker(app: Any) -> WorkerMetrics | None:
    """Give a Faust app its metrics and ``GET /metrics``, unless its settings turn them off."""
    if not app.settings.metrics_enabled:
        app.metrics = None
        return None
    from aiohttp import web
    from faust import web as faust_web

    metrics = app.metrics = WorkerMetrics(app)

    @app.page("/metrics")
    class Metrics(faust_web.View):
        async def get(self, request: web.Request) -> web.Response:
            return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    return metrics


# ----------------------------------------------------------------------
# The webhook ingress and the schema registry


class IngressMetrics:
    """The Stripe webhook ingress: webhooks by outcome and Kafka acknowledgement time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.webhooks = Counter(
            "paystream_ingress_webhooks_total",
            "Stripe webhooks by outcome: accepted (stored, 200 after Kafka's ack), duplicate (an "
            "event id this process stored recently, 200, not stored again), unknown_type (a type "
            "paystream does not consume, 200, not stored), bad_signature, stale (signature "
            "timestamp older than the tolerance), too_large, not_a_stripe_event (4xx), unavailable "
            "(503: no Kafka ack in time).",
            ["outcome"], registry=self.registry)
        self._outcomes = {outcome: self.webhooks.labels(outcome) for outcome in WEBHOOK_OUTCOMES}
        self.ack_seconds = Histogram(
            "paystream_ingress_kafka_ack_seconds",
            "From handing a webhook's record to the producer to Kafka's acknowledgement (or failure).",
            buckets=LATENCY_BUCKETS, registry=self.registry)

    def webhook(self, outcome: str) -> None:
        self._outcomes[outcome].inc()

    def count(self, outcome: str) -> float:
        """The count of one outcome so far (for logs and tests)."""
        return float(self._outcomes[outcome]._value.get())

    def render(self) -> bytes:
        return exposition(self.registry)


class RegistryMetrics:
    """The schema registry: requests by route, method and status class, and their durations."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "paystream_registry_requests_total",
            "Schema registry HTTP requests by route pattern, method and status code.",
            ["route", "method", "status"], registry=self.registry)
        self.seconds = Histogram(
            "paystream_registry_request_seconds", "Schema registry HTTP request duration by route pattern.",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def middleware(self) -> Any:
        """An aiohttp middleware counting every request under its route's pattern (unmatched: "other")."""
        from aiohttp import web

        @web.middleware
        async def measure(request: web.Request, handler: Any) -> web.StreamResponse:
            began = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                info = request.match_info.route.resource
                route = info.canonical if info is not None else "other"
                self.requests.labels(route, request.method, str(status)).inc()
                self.seconds.labels(route).observe(time.perf_counter() - began)

        return measure

    def render(self) -> bytes:
        return exposition(self.registry)


def metrics_response(body: bytes) -> Any:
    """An aiohttp answer of ``/metrics``."""
    from aiohttp import web

    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE,
                                            "X-Content-Type-Options": "nosniff"})


def all_metric_names() -> set[str]:
    """Every metric family name paystream exposes (dashboards and alerts are checked against it).

    Sample names derived from them (``_bucket``, ``_count``, ``_sum``,
    ``_created``) are included.
    """

    class _App:
        tables = None
        _consumer = None

    families: list[Metric] = []
    app = _App()  # alive while its collector runs (the collector holds a weak reference)
    worker = WorkerMetrics(app)
    for registry in (worker.registry, IngressMetrics().registry, RegistryMetrics().registry):
        families.extend(registry.collect())
    families.extend(_BREAKERS.describe())
    families.extend(f for f in REGISTRY.collect() if f.name.startswith("paystream_"))
    names: set[str] = set()
    for family in families:
        if family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names
