"""The one settings object of paystream.

Every process (worker, registry, ingress, CLI, tests) reads its configuration
from here, so an environment variable means the same thing everywhere and the
docker-compose file can be checked against this single list.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

#: Environment variable -> (Settings attribute, local default).  The defaults
#: are the addresses ``./dev up`` starts things on, so nothing needs to be set
#: for local development.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "KAFKA_BOOTSTRAP_SERVERS": ("kafka_bootstrap_servers", "localhost:9092"),
    "SCHEMA_REGISTRY_URL": ("schema_registry_url", "http://localhost:8081"),
    "SCHEMA_REGISTRY_HOST": ("registry_host", "127.0.0.1"),
    "SCHEMA_REGISTRY_PORT": ("registry_port", "8081"),
    "SCHEMA_REGISTRY_TOPIC": ("registry_topic", "_schemas"),
    "PAYSTREAM_APP_ID": ("app_id", "paystream"),
    "PAYSTREAM_TOPIC_PREFIX": ("topic_prefix", ""),
    "PAYSTREAM_DOMAINS": ("domains", "orders,payments,subscriptions"),
    "PAYSTREAM_STATE_DIR": ("state_dir", ".paystream"),
    "WORKER_WEB_HOST": ("worker_web_host", "127.0.0.1"),
    "WORKER_WEB_PORT": ("worker_web_port", "6066"),
    "INGRESS_HOST": ("ingress_host", "127.0.0.1"),
    "INGRESS_PORT": ("ingress_port", "8000"),
    "STRIPE_API_KEY": ("stripe_api_key", "sk_test_local"),
    "STRIPE_API_BASE": ("stripe_api_base", "http://localhost:8420"),
    "STRIPE_WEBHOOK_SECRET": ("stripe_webhook_secret", "whsec_local"),
    "STRIPE_MAX_NETWORK_RETRIES": ("stripe_max_network_retries", "2"),
    "STRIPE_TIMEOUT_SECONDS": ("stripe_timeout_seconds", "20"),
    "INGRESS_MAX_BODY_BYTES": ("ingress_max_body_bytes", "524288"),
    "ORDER_PAYMENT_WINDOW_SECONDS": ("order_payment_window_seconds", "1800"),
    "INVOICE_OVERDUE_DAYS": ("invoice_overdue_days", "1,7,30"),
    "ACCOUNT_SERVICE_URL": ("account_service_url", "http://localhost:8101"),
    "WALLET_SERVICE_URL": ("wallet_service_url", "http://localhost:8102"),
    "BILLING_SERVICE_URL": ("billing_service_url", "http://localhost:8103"),
    "PRODUCT_SERVICE_URL": ("product_service_url", "http://localhost:8104"),
    "NOTIFICATION_SERVICE_URL": ("notification_service_url", "http://localhost:8105"),
    "PAYMENT_SERVICE_URL": ("payment_service_url", "http://localhost:8106"),
    "STORAGE_SERVICE_URL": ("storage_service_url", "http://localhost:8107"),
    # Worker resources and availability (README: "Running a worker").
    "PAYSTREAM_ROCKSDB_MEMORY_MB": ("rocksdb_memory_mb", "64"),
    "PAYSTREAM_INSTANCE_ID": ("instance_id", ""),
    "PAYSTREAM_SESSION_TIMEOUT_SECONDS": ("session_timeout_seconds", "10"),
    "PAYSTREAM_HEARTBEAT_INTERVAL_SECONDS": ("heartbeat_interval_seconds", "1"),
    "PAYSTREAM_BATCH_MAX": ("batch_max", "1000"),
    "PAYSTREAM_BATCH_WITHIN_MS": ("batch_within_ms", "0"),
    # Access and logs (README: "Access tokens and logs").
    "PAYSTREAM_SERVICE_TOKENS": ("service_tokens", ""),
    "LOG_FORMAT": ("log_format", "text"),
    "LOG_LEVEL": ("log_level", "info"),
    # Operator tools (README: "Dead letters").
    "PAYSTREAM_DLQ_REPLAY_LIMIT": ("dlq_replay_limit", "3"),
    # Prometheus metrics (streams.metrics): on, or off to run without them.
    "PAYSTREAM_METRICS": ("metrics", "on"),
    # The worker's event loop (streams.event_loop): uvloop, or asyncio's own.
    "PAYSTREAM_EVENT_LOOP": ("event_loop", "uvloop"),
}

#: The values of ``PAYSTREAM_EVENT_LOOP``.
EVENT_LOOPS = ("uvloop", "asyncio")

#: The values of ``LOG_FORMAT``.
LOG_FORMATS = ("text", "json")

#: The broker's default ``group.min.session.timeout.ms``: a shorter session is
#: refused at JoinGroup, so it is refused here, where the message is clearer.
MIN_SESSION_TIMEOUT_SECONDS = 6.0


@dataclass(frozen=True)
class Settings:
    """Configuration of one paystream process; build it with :meth:`from_env`."""

    kafka_bootstrap_servers: str
    schema_registry_url: str
    registry_host: str
    registry_port: int
    registry_topic: str
    app_id: str
    topic_prefix: str
    #: The domains (``agents.DOMAINS``) this worker runs, comma-separated: all
    #: of them by default; the seed's order and payment services can also run
    #: as separate worker groups (each with its own PAYSTREAM_APP_ID).
    domains: str
    state_dir: Path
    worker_web_host: str
    worker_web_port: int
    ingress_host: str
    ingress_port: int
    stripe_api_key: str = field(repr=False)
    stripe_api_base: str
    #: One secret, or several separated by commas while one is rotated out:
    #: a webhook signed with any of them is accepted (:attr:`stripe_webhook_secrets`).
    stripe_webhook_secret: str = field(repr=False)
    #: Retries the stripe library makes itself (with Stripe's idempotency
    #: keys, so a retried call is not a second charge) before the kernel's
    #: batch retry takes over.
    stripe_max_network_retries: int
    stripe_timeout_seconds: float
    #: Largest webhook body the ingress reads (413 above it).
    ingress_max_body_bytes: int
    order_payment_window_seconds: float
    #: Days after an open invoice's due date on which invoice.overdue is
    #: published, comma-separated whole days >= 0 (:attr:`overdue_days`).
    invoice_overdue_days: str
    account_service_url: str
    wallet_service_url: str
    billing_service_url: str
    product_service_url: str
    notification_service_url: str
    payment_service_url: str
    storage_service_url: str
    #: Memory for all RocksDB tables of the process together: one block cache,
    #: with the memtables charged to it (``tables.storage``).
    rocksdb_memory_mb: int
    #: Kafka static membership id of this worker (``group.instance.id``);
    #: empty means derive it (see :attr:`group_instance_id`).
    instance_id: str
    session_timeout_seconds: float
    heartbeat_interval_seconds: float
    #: Records one aggregate takes per batch, and how long it waits for more
    #: before deciding a batch that is not full (streams.kernel); 0: not at
    #: all, what arrives meanwhile makes the next batch.
    batch_max: int
    batch_within_ms: float
    #: Bearer tokens the HTTP surfaces accept, comma-separated (streams.access);
    #: empty: no token is asked for.  The first is the one this process sends.
    service_tokens: str = field(repr=False)
    #: ``text`` (one human line per record) or ``json`` (one JSON object per line).
    log_format: str
    #: Level of the ingress' and registry's logs (the worker takes ``--loglevel``).
    log_level: str
    #: ``paystream dlq replay`` refuses a dead letter already replayed this
    #: many times, so a record that keeps failing cannot loop.
    dlq_replay_limit: int
    #: ``on``: the kernel's metrics and the worker's ``/metrics``; ``off``: neither (streams.metrics).
    metrics: str = "on"
    #: ``uvloop`` (libuv's loop for asyncio) or ``asyncio`` (the standard library's),
    #: for the worker and the bench's raw loops alike.
    event_loop: str = "uvloop"

    def __post_init__(self) -> None:
        if self.batch_max < 1 or self.batch_within_ms < 0:
            raise ValueError(
                f"PAYSTREAM_BATCH_MAX={self.batch_max} must be >= 1 and "
                f"PAYSTREAM_BATCH_WITHIN_MS={self.batch_within_ms:g} >= 0")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"LOG_FORMAT={self.log_format!r} must be one of {', '.join(LOG_FORMATS)}")
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ValueError(f"LOG_LEVEL={self.log_level!r} is not a logging level (debug, info, ...)")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"PAYSTREAM_EVENT_LOOP={self.event_loop!r} must be one of "
                             f"{', '.join(EVENT_LOOPS)}")
        if self.metrics not in ("on", "off"):
            raise ValueError(f"PAYSTREAM_METRICS={self.metrics!r} must be on or off")
        if self.dlq_replay_limit < 1:
            raise ValueError(f"PAYSTREAM_DLQ_REPLAY_LIMIT={self.dlq_replay_limit} must be >= 1")
        self.overdue_days  # noqa: B018 - refuses a malformed INVOICE_OVERDUE_DAYS at start
        if self.rocksdb_memory_mb < 8:
            raise ValueError(
                f"PAYSTREAM_ROCKSDB_MEMORY_MB={self.rocksdb_memory_mb} is too small (minimum 8)")
        if self.session_timeout_seconds < MIN_SESSION_TIMEOUT_SECONDS:
            raise ValueError(
                f"PAYSTREAM_SESSION_TIMEOUT_SECONDS={self.session_timeout_seconds:g} is below the "
                f"broker's minimum group session timeout ({MIN_SESSION_TIMEOUT_SECONDS:g} s)")
        if not 0 < self.heartbeat_interval_seconds <= self.session_timeout_seconds / 3:
            raise ValueError(
                f"PAYSTREAM_HEARTBEAT_INTERVAL_SECONDS={self.heartbeat_interval_seconds:g} must be "
                f"positive and at most a third of the session timeout "
                f"({self.session_timeout_seconds:g} s)")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Read every variable of :data:`ENVIRONMENT`, falling back to its default.

        ``overrides`` win over the environment; tests use them to point one
        process at its own topics and ports without touching ``os.environ``.
        """
        source = os.environ if env is None else env
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for variable, (attribute, default) in ENVIRONMENT.items():
            raw = source.get(variable, default)
            values[attribute] = _coerce(types[attribute], raw, variable)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def topic(self, name: str) -> str:
        """The Kafka topic that carries catalog topic ``name`` in this deployment.

        A prefix lets tests (and side-by-side environments on one cluster) own
        private copies of every topic without renaming anything in code.
        """
        return f"{self.topic_prefix}{name}"

    @property
    def group_instance_id(self) -> str:
        """This worker's static membership id: ``PAYSTREAM_INSTANCE_ID`` or host + web port.

        Stable across restarts of the same worker (same host, same port), and
        different for two workers on one host (they cannot share a port).  A
        worker that restarts under the same id takes its partitions back at
        once, without waiting for its old session to expire.
        """
        return self.instance_id or f"{socket.gethostname()}-{self.worker_web_port}"

    @property
    def overdue_days(self) -> tuple[int, ...]:
        """The days of ``INVOICE_OVERDUE_DAYS``, sorted, each once (ValueError if malformed)."""
        try:
            days = sorted({int(d) for d in self.invoice_overdue_days.split(",") if d.strip()})
        except ValueError:
            days = []
        if not days or days[0] < 0:
            raise ValueError(f"INVOICE_OVERDUE_DAYS={self.invoice_overdue_days!r} must be whole days "
                             ">= 0 separated by commas, e.g. 1,7,30")
        return tuple(days)

    @property
    def domain_names(self) -> tuple[str, ...]:
        """The domains of ``PAYSTREAM_DOMAINS``, in the order given."""
        return tuple(d.strip() for d in self.domains.split(",") if d.strip())

    @property
    def stripe_webhook_secrets(self) -> tuple[str, ...]:
        """Every webhook signing secret in force (``STRIPE_WEBHOOK_SECRET``, comma-separated)."""
        return tuple(s.strip() for s in self.stripe_webhook_secret.split(",") if s.strip())

    @property
    def metrics_enabled(self) -> bool:
        """Whether the worker keeps Prometheus metrics (``PAYSTREAM_METRICS=on``)."""
        return self.metrics == "on"

    @property
    def service_token_list(self) -> tuple[str, ...]:
        """Every accepted service token (``PAYSTREAM_SERVICE_TOKENS``, comma-separated)."""
        return tuple(t.strip() for t in self.service_tokens.split(",") if t.strip())

    @property
    def service_token(self) -> str | None:
        """The token this process sends to other paystream services: the first one, or None."""
        tokens = self.service_token_list
        return tokens[0] if tokens else None

    @property
    def kafka_url(self) -> str:
        """The broker list in Faust's ``kafka://`` form."""
        return ";".join(f"kafka://{server}" for server in self.kafka_bootstrap_servers.split(","))


def _coerce(type_name: object, raw: str, variable: str) -> object:
    try:
        if type_name in ("int", int):
            return int(raw)
        if type_name in ("float", float):
            return float(raw)
        if type_name in ("Path", Path):
            return Path(raw)
    except ValueError as exc:
        raise ValueError(f"{variable}={raw!r} is not a valid {type_name}") from exc
    return raw
