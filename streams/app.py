"""The Faust application: settings, topics from the catalog, codecs, agents.

``faust -A streams.app worker`` and ``paystream worker`` both run the module
level :data:`app`; tests build their own with :func:`create_app` and a
topic prefix so they never share topics, groups or state directories.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import faust

from streams import catalog
from streams.admin import ensure_topics
from streams.codec import ConfluentAvroCodec, SchemaCache
from streams.settings import Settings

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

    async def on_first_start(self) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        await super().on_first_start()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.prepare_topics)

    def prepare_topics(self) -> None:
        """Create the event topics and resolve their schema ids (blocking, at start)."""
        prefix = self.settings.topic_prefix
        ensure_topics(
            self.settings.kafka_bootstrap_servers,
            catalog.topic_settings(name_prefix=prefix) + catalog.internal_topic_settings(prefix),
        )
        self.schema_cache.resolve({t.get_topic_name(): name for name, t in self.event_topics.items()})

    def event_topic(self, name: str) -> faust.TopicT:
        """The Faust topic that carries catalog topic ``name``."""
        try:
            return self.event_topics[name]
        except KeyError:
            raise LookupError(f"{name!r} is not a topic of the catalog") from None


def create_app(
    settings: Settings | None = None,
    *,
    registrars: list[Registrar] | None = None,
    **faust_options: Any,
) -> PaystreamApp:
    """Build the app; ``registrars`` default to every domain in ``agents``."""
    settings = settings or Settings.from_env()
    options: dict[str, Any] = {
        "broker": settings.kafka_url,
        "store": "rocksdb://",
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
        "table_standby_replicas": 0,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    options.update(faust_options)
    app = PaystreamApp(settings.app_id, **options)
    app.settings = settings
    app.schema_cache = SchemaCache(settings.schema_registry_url)
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
    if registrars is None:
        from agents import REGISTRARS

        registrars = list(REGISTRARS)
    for register in registrars:
        register(app)
    return app


def run_worker(settings: Settings, *, loglevel: str = "info") -> int:
    """Run a worker in the foreground (``paystream worker``)."""
    worker_app = create_app(settings)
    worker = faust.Worker(worker_app, loglevel=loglevel)
    worker.execute_from_commandline()
    return 0


def __getattr__(name: str) -> Any:
    """``streams.app.app`` for ``faust -A streams.app``, built on first use.

    Lazy, so importing this module (tests, ``paystream worker``) does not
    build a second app from the environment.
    """
    if name == "app":
        globals()["app"] = built = create_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
