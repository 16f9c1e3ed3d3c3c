"""The one settings object of paystream.

Every process (worker, registry, ingress, CLI, tests) reads its configuration
from here, so an environment variable means the same thing everywhere and the
docker-compose file can be checked against this single list.
"""

from __future__ import annotations

import os
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
    "PAYSTREAM_STATE_DIR": ("state_dir", ".paystream"),
    "WORKER_WEB_HOST": ("worker_web_host", "127.0.0.1"),
    "WORKER_WEB_PORT": ("worker_web_port", "6066"),
    "INGRESS_HOST": ("ingress_host", "127.0.0.1"),
    "INGRESS_PORT": ("ingress_port", "8000"),
    "STRIPE_API_KEY": ("stripe_api_key", "sk_test_local"),
    "STRIPE_API_BASE": ("stripe_api_base", "http://localhost:8420"),
    "STRIPE_WEBHOOK_SECRET": ("stripe_webhook_secret", "whsec_local"),
    "ORDER_PAYMENT_WINDOW_SECONDS": ("order_payment_window_seconds", "1800"),
    "ACCOUNT_SERVICE_URL": ("account_service_url", "http://localhost:8101"),
    "WALLET_SERVICE_URL": ("wallet_service_url", "http://localhost:8102"),
    "BILLING_SERVICE_URL": ("billing_service_url", "http://localhost:8103"),
    "PRODUCT_SERVICE_URL": ("product_service_url", "http://localhost:8104"),
    "NOTIFICATION_SERVICE_URL": ("notification_service_url", "http://localhost:8105"),
    "PAYMENT_SERVICE_URL": ("payment_service_url", "http://localhost:8106"),
    "STORAGE_SERVICE_URL": ("storage_service_url", "http://localhost:8107"),
}


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
    state_dir: Path
    worker_web_host: str
    worker_web_port: int
    ingress_host: str
    ingress_port: int
    stripe_api_key: str = field(repr=False)
    stripe_api_base: str
    stripe_webhook_secret: str = field(repr=False)
    order_payment_window_seconds: float
    account_service_url: str
    wallet_service_url: str
    billing_service_url: str
    product_service_url: str
    notification_service_url: str
    payment_service_url: str
    storage_service_url: str

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
