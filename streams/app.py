"""The Faust application: settings, topics from the catalog, codecs, agents.

``faust -A streams.app worker`` and ``paystream worker`` both run the module
level :data:`app`; tests build their own with :func:`create_app` and a
topic prefix so they never share topics, groups or state directories.

What a worker needs from its surroundings is decided here too: every table
on the process-wide RocksDB memory budget (``tables.storage``), Kafka static
membership so a restarted worker takes its partitions back at once, a start
that waits (one log line, then retries) for a broker or registry that is not
reachable yet, and a quiet log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import faust
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from mode import Service
from mode.utils.times import want_seconds

from streams import access, catalog, faust_patches, logs, metrics
from streams.admin import TopicSettings, ensure_topics, wait_until_listed
from streams.codec import REGISTRY_TRANSPORT_ERRORS, ConfluentAvroCodec, SchemaCache
from streams.event_loop import install_event_loop
from streams.settings import Settings
from tables import storage

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Changelog records Faust applies to RocksDB in one write batch while it
#: replays a table's tail (Faust's default is 1,000); long changelogs are
#: bulk-loaded before that (``tables.storage.BulkLoadingRecovery``).
RECOVERY_BUFFER_SIZE = 10_000
#: Seconds one schema registry request may take (the client's default is no
#: limit: a registry that never answers would hang the start without a word).
REGISTRY_TIMEOUT_SECONDS = 10

#: The cyclic garbage collector's thresholds in a worker process (CPython's
#: default is 700, 10, 10: a young-generation pass every 700 net container
#: allocations, a full one every hundred of those once enough objects have
#: survived).  A worker allocates many short-lived containers per record
#: (decoded records, rows, events, futures) on top of a large long-lived heap
#: (Faust, aiokafka, the contracts), and every full pass walks that heap: on
#: the order lifecycle bench the collector took about a fifth of the worker's
#: CPU with the default, almost none with these.  Collections are rarer, not
#: disabled: cycles are still freed.
GC_THRESHOLDS = (20_000, 10, 10)

#: Start-up waits: first retry after this many seconds, doubling up to the cap.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0
#: While still waiting, the wait line is repeated this often.
WAIT_REMINDER_SECONDS = 60.0

#: Loggers whose INFO lines are start-up chatter (service "Starting..." lines,
#: topic tables, one line per registry request or HTTP access).  Their
#: warnings and errors still show; ``paystream worker --loglevel debug``
#: shows everything.
QUIET_LOGGERS = ("faust", "mode", "aiokafka", "aiohttp.access", "aiohttp.server", "httpx",
                 "httpx2", "httpcore", "httpcore2")

#: Faust's ``logging_config``: quiet the loggers above, keep our own at INFO.
QUIET_LOGGING: dict[str, Any] = {
    "merge": True,
    "loggers": {name: {"level": "WARNING"} for name in QUIET_LOGGERS},
}

#: Functions that declare a domain's agents, tables and routes on an app.
#: Each domain module in ``agents/`` adds itself here (see ``agents.register``).
Registrar = Callable[["PaystreamApp"], None]


class PaystreamApp(faust.App):
    """A Faust app that owns its event topics and their Avro codecs.

    Before any agent or producer runs, it creates missing event topics from
    the catalog (Faust only creates internal topics) and resolves every
    contract's schema id, so codecs never call the registry per message.
    """

    settings: Settings
    schema_cache: SchemaCache
    event_topics: dict[str, faust.TopicT]
    clients: Any  # connectors.clients.ServiceClients: the external services' clients
    #: Paths served without a service token (streams.access); a registrar may add one.
    public_paths: set[str]
    metrics: Any  # streams.metrics.WorkerMetrics, or None with PAYSTREAM_METRICS=off

    # Faust's service lines ("Starting...") under a faust logger, so the
    # quiet logging config silences them; our own lines use ``log``.
    logger = logging.getLogger("faust.app.paystream")

    _rebalance_started: float | None = None
    _recovery_progress: storage.RecoveryProgress | None = None

    async def on_first_start(self) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        await super().on_first_start()
        settings = self.settings
        log.info("worker %s of group %s starting: broker %s, schema registry %s, state in %s, "
                 "RocksDB memory %d MiB", settings.group_instance_id, self.conf.id,
                 settings.kafka_bootstrap_servers, settings.schema_registry_url,
                 settings.state_dir, settings.rocksdb_memory_mb)
        await self.prepare_topics_when_reachable()

    async def prepare_topics_when_reachable(self) -> None:
        """Create the event topics and resolve their schema ids, waiting for broker and registry.

        Neither being reachable yet is a reason to wait, not to die: each
        wait logs one line saying what it waits for and retries with backoff
        until it succeeds (or the worker is stopped).  An answer that is
        not about reachability (an incompatible schema, a refused topic) is
        raised as before.
        """
        servers = self.settings.kafka_bootstrap_servers
        await retry_until_reachable(
            f"the Kafka broker at {servers}", lambda: self._to_thread(self._create_topics),
            reachability_error=_broker_unreachable)
        registry = self.settings.schema_registry_url
        ids = await retry_until_reachable(
            f"the schema registry at {registry}", lambda: self._to_thread(self._resolve_schemas),
            reachability_error=_registry_unreachable)
        log.info("schema ids resolved for %d topics at %s", len(ids), registry)

    @staticmethod
    async def _to_thread(call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, call)

    def prepare_topics(self) -> None:
        """Create the event topics and resolve their schema ids (blocking, no waiting)."""
        self._create_topics()
        self._resolve_schemas()

    def _create_topics(self) -> None:
        settings = self.settings
        prefix = settings.topic_prefix
        # A quiet metadata probe first: AdminClient calls against a broker that
        # is down spam librdkafka errors to stderr every 50 ms until they fail.
        probe = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers,
                             "log_level": 0, "socket.connection.setup.timeout.ms": 5000})
        probe.list_topics(timeout=5.0)
        topics = (catalog.topic_settings(name_prefix=prefix) + catalog.internal_topic_settings(prefix)
                  + self.faust_topic_settings())
        ensure_topics(settings.kafka_bootstrap_servers, topics)
        # The consumer joins its group after this: its first assignment must
        # see every topic, or the assignor leaves a missing one out until the
        # next rebalance (see faust_topic_settings).
        wait_until_listed(settings.kafka_bootstrap_servers, [t.name for t in topics])

    def faust_topic_settings(self) -> list[TopicSettings]:
        """The topics Faust would create itself, declared as Faust declares them.

        Every table's changelog and, unless disabled, the leader assignor's
        topic: partitions, replication, ``cleanup.policy`` from the topic's
        compacting/deleting flags, ``retention.ms``, then the table's extra
        topic configs (a deadline table's segment and cleaning settings), as
        faust-streaming 0.15.3's ``Topic.declare`` and aiokafka transport build
        them.  Faust declares them itself only as its consumer subscribes, and
        a topic the broker's metadata does not list yet when the group's first
        assignment is computed is left out of it ("Ignoring missing topic"):
        its table's partitions are not served until a later rebalance.
        Created with the event topics before the consumer starts, they are
        all listed by then; Faust's own declaration then finds them.
        """
        topics = [table.changelog_topic for table in self.tables.values()]
        if not self.conf.topic_disable_leader:
            topics.append(self._leader_assignor._leader_topic)  # type: ignore[attr-defined]
        return [_declared_settings(self.conf, topic) for topic in topics]

    def _resolve_schemas(self) -> dict[str, int]:
        return self.schema_cache.resolve(
            {t.get_topic_name(): name for name, t in self.event_topics.items()})

    # -- operator log lines: rebalances and recovery --------------------

    def on_rebalance_start(self) -> None:
        super().on_rebalance_start()
        self._rebalance_started = time.monotonic()

    def on_rebalance_end(self) -> None:
        super().on_rebalance_end()
        started, self._rebalance_started = self._rebalance_started, None
        assignment = self.consumer.assignment()
        took = f" {time.monotonic() - started:.1f} s after the rebalance began" if started else ""
        log.info("worker ready: %d partitions of %d topics (generation %s)%s",
                 len(assignment), len({tp.topic for tp in assignment}),
                 self.consumer_generation_id, took)

    @Service.timer(1.0)
    async def _log_recovery_progress(self) -> None:
        """One line every 5 s while tables recover (rows/s, ETA), one when done."""
        if not self.tables:
            return
        recovery = self.tables.recovery
        progress = self._recovery_progress
        at = time.monotonic()
        if getattr(recovery, "bulk_loading", False):
            return  # the bulk loader says how it goes itself
        if recovery.in_recovery:
            remaining = recovery.active_remaining_total()
            if progress is None:
                if remaining > 0:
                    self._recovery_progress = progress = storage.RecoveryProgress()
                    progress.begin(storage.RecoverySample(at, remaining))
                    log.info("recovering tables: %s changelog records to apply", f"{remaining:,}")
            elif progress.last is not None and at - progress.last.at >= 5.0:
                log.info("%s", progress.update(storage.RecoverySample(at, remaining)))
        elif progress is not None:
            self._recovery_progress = None
            log.info("%s", progress.finish(at))

    def event_topic(self, name: str) -> faust.TopicT:
        """The Faust topic that carries catalog topic ``name``."""
        try:
            return self.event_topics[name]
        except KeyError:
            raise LookupError(f"{name!r} is not a topic of the catalog") from None


def _declared_settings(conf: Any, topic: faust.TopicT) -> TopicSettings:
    """What Faust's ``Topic.declare`` would create ``topic`` with (see faust_topic_settings)."""
    config: dict[str, str] = {}
    flags = {flag for flag, on in (("compact", topic.compacting), ("delete", topic.deleting)) if on}
    if flags:
        config["cleanup.policy"] = ",".join(sorted(flags))
    if topic.retention:
        config["retention.ms"] = str(int(want_seconds(topic.retention) * 1000.0))
    config.update({key: str(value) for key, value in (topic.config or {}).items()})
    return TopicSettings(topic.get_topic_name(), topic.partitions or conf.topic_partitions,
                         topic.replicas or conf.topic_replication_factor or 1, config)


def create_app(
    settings: Settings | None = None,
    *,
    registrars: list[Registrar] | None = None,
    **faust_options: Any,
) -> PaystreamApp:
    """Build the app; ``registrars`` default to the domains the settings name."""
    settings = settings or Settings.from_env()
    storage.configure_memory(settings.rocksdb_memory_mb)
    faust_patches.apply()
    #: Paths the worker serves without a service token; registrars may add to it.
    public_paths = set(access.PUBLIC_PATHS)
    options: dict[str, Any] = {
        "broker": settings.kafka_url,
        "store": storage.register(),
        "TableManager": storage.BulkLoadingTableManager,
        "datadir": str(settings.state_dir / "worker"),
        "web_host": settings.worker_web_host,
        "web_bind": settings.worker_web_host,
        "web_port": settings.worker_web_port,
        "web_tables_enabled": False,
        "topic_partitions": catalog.EVENT_PARTITIONS,
        "topic_replication_factor": 1,
        "consumer_auto_offset_reset": "earliest",
        "processing_guarantee": "at_least_once",
        "producer_acks": -1,
        # The kernel hands a whole batch to the producer, then awaits its acks
        # once; a few ms of linger packs those records into a few requests
        # instead of one per record (measured: ~30% less CPU per input).
        "producer_linger_ms": 5,
        "table_standby_replicas": 0,
        "key_serializer": "raw",
        "value_serializer": "raw",
        # Static membership: a restarted worker rejoins under the same id and
        # gets its partitions back without a rebalance; a dead one is noticed
        # after the session timeout.
        "consumer_group_instance_id": settings.group_instance_id,
        "broker_session_timeout": settings.session_timeout_seconds,
        "broker_heartbeat_interval": settings.heartbeat_interval_seconds,
        "logging_config": QUIET_LOGGING,
        # Service tokens on every route but app.public_paths (streams.access).
        "web_application_options": {"middlewares": [access.token_middleware(
            settings.service_token_list, public=access.public_paths(public_paths))]},
    }
    options.update(faust_options)
    app = PaystreamApp(settings.app_id, **options)
    app.settings = settings
    app.public_paths = public_paths
    metrics.install_worker(app)  # before the agents: the kernel takes its hooks from it
    app.schema_cache = SchemaCache(SchemaRegistryClient(
        {"url": settings.schema_registry_url, "timeout": REGISTRY_TIMEOUT_SECONDS,
         **access.registry_client_config(settings.service_token)}))
    app.event_topics = {
        name: app.topic(
            settings.topic(name),
            key_type=str,
            key_serializer="raw",
            value_serializer=ConfluentAvroCodec(settings.topic(name), name, app.schema_cache),
            partitions=spec.partitions,
            acks=True,
        )
        for name, spec in catalog.CATALOG.items()
    }
    # One pooled HTTP session for every service client of the process, opened
    # with the app and closed at stop (connectors.clients).
    from connectors.clients import ClientsService, ServiceClients

    app.clients = ServiceClients.from_settings(settings)
    app.add_dependency(ClientsService(app.clients))
    if registrars is None:
        from agents import registrars_for

        registrars = registrars_for(settings.domain_names)
    for register in registrars:
        register(app)
    # The operator console (/console): after the domains, whose APIs it reads through.
    from agents import console

    console.register(app)
    for table in app.tables.values():
        # Bigger write batches while recovering (a Table argument in Faust,
        # read when recovery starts; set here so every domain's tables get it).
        table.recovery_buffer_size = max(table.recovery_buffer_size, RECOVERY_BUFFER_SIZE)
        table.standby_buffer_size = max(table.standby_buffer_size, RECOVERY_BUFFER_SIZE)
    return app


def run_worker(settings: Settings, *, loglevel: str = "info") -> int:
    """Run a worker in the foreground (``paystream worker``).

    At ``--loglevel debug`` nothing is quieted.
    """
    storage.limit_malloc_arenas()  # before any thread starts: keeps RSS near the budget
    install_event_loop(settings)  # before Faust makes its loops (the worker's and its consumer thread's)
    worker_app = create_app(settings)
    verbose = logging.getLevelName(loglevel.upper()) == logging.DEBUG
    # LOG_FORMAT and the secret filter (streams.logs); a JSON worker prints no banner.
    logging_config = logs.faust_logging_config(settings, {"merge": True} if verbose else QUIET_LOGGING)
    worker = faust.Worker(worker_app, loglevel=loglevel, logging_config=logging_config,
                          quiet=settings.log_format == "json")
    tune_gc()
    worker.execute_from_commandline()
    return 0


def tune_gc() -> None:
    """Set this process's garbage collector thresholds to :data:`GC_THRESHOLDS`."""
    gc.set_threshold(*GC_THRESHOLDS)


async def retry_until_reachable(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    reachability_error: Callable[[BaseException], str | None],
    first_delay: float = RETRY_FIRST_SECONDS,
    max_delay: float = RETRY_MAX_SECONDS,
) -> T:
    """Run ``attempt`` until it succeeds, waiting while ``what`` is unreachable.

    ``reachability_error(exc)`` says why an error means "not reachable yet"
    (a short reason), or None for an error that must be raised.  The first
    wait logs one WARNING line (what, why, "retrying"); later attempts are
    silent unless the reason changes or :data:`WAIT_REMINDER_SECONDS` pass;
    success after a wait logs one INFO line.
    """
    began = time.monotonic()
    delay = first_delay
    said: str | None = None
    said_at = 0.0
    while True:
        try:
            result = await attempt()
        except Exception as exc:
            reason = reachability_error(exc)
            if reason is None:
                raise
            now = time.monotonic()
            if reason != said or now - said_at >= WAIT_REMINDER_SECONDS:
                waited = f" (waiting for {now - began:.0f} s)" if said else ""
                log.warning("waiting for %s: %s; retrying%s", what, reason, waited)
                said, said_at = reason, now
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        if said is not None:
            log.info("%s is reachable after %.1f s", what, time.monotonic() - began)
        return result


def _broker_unreachable(exc: BaseException) -> str | None:
    """Why ``exc`` means the broker is not reachable yet, or None."""
    if not isinstance(exc, KafkaException) or not exc.args:
        return None
    error = exc.args[0]
    if not isinstance(error, KafkaError):
        return None
    if error.code() in _BROKER_DOWN_CODES:
        return error.str()
    return None


_BROKER_DOWN_CODES = frozenset({
    KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE, KafkaError._MSG_TIMED_OUT, KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.NETWORK_EXCEPTION, KafkaError.REQUEST_TIMED_OUT,
})


def _registry_unreachable(exc: BaseException) -> str | None:
    """Why ``exc`` means the registry is not reachable (or not serving) yet, or None."""
    if isinstance(exc, SchemaRegistryError):
        status = exc.http_status_code
        if status in (408, 429) or (isinstance(status, int) and status >= 500):
            return f"it answers {status} ({exc.error_message})"
        return None
    if isinstance(exc, REGISTRY_TRANSPORT_ERRORS):
        cause = exc.__cause__ or exc.__context__
        detail = str(cause or exc) or type(exc).__name__
        if "Connection refused" in detail:
            return "connection refused"
        return detail
    return None


def __getattr__(name: str) -> Any:
    """``streams.app.app`` for ``faust -A streams.app``, built on first use.

    Lazy, so importing this module (tests, ``paystream worker``) does not
    build a second app from the environment.
    """
    if name == "app":
        storage.limit_malloc_arenas()
        globals()["app"] = built = create_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
