"""The ``paystream registry`` process: app factory and blocking runner.

``create_app(settings)`` builds the aiohttp application; its startup hook
starts the Kafka store (which loads the state in the background and keeps
retrying while Kafka is unreachable) and its cleanup hook stops it.
``run(settings)`` serves it on ``settings.registry_host:registry_port``.
"""

from __future__ import annotations

import logging

from aiohttp import web

from schemas import asyncapi
from schemas.registry.core import Registry
from schemas.registry.http import REGISTRY, error_middleware
from schemas.registry.routes import add_routes
from schemas.registry.routes import asyncapi as asyncapi_route
from schemas.registry.state import RegistryState
from schemas.registry.store import KafkaStore
from streams import access, logs
from streams.metrics import RegistryMetrics, metrics_response
from streams.settings import Settings

log = logging.getLogger(__name__)

#: Request bodies are schemas; Confluent's default limit is in the same range.
MAX_BODY_BYTES = 8 * 1024 * 1024


def create_app(
    settings: Settings,
    *,
    delivery_timeout_ms: int = 5_000,
    apply_timeout: float = 5.0,
    retry_interval: float = 2.0,
) -> web.Application:
    """The registry as an aiohttp application.

    ``delivery_timeout_ms`` bounds how long a write waits for Kafka's ack
    (a write while the broker is down answers 50001 after it);
    ``apply_timeout`` bounds the wait for the acknowledged record to come back
    through the reader (50002); ``retry_interval`` paces the retries of the
    initial load while Kafka is unreachable.
    """
    state = RegistryState()
    store = KafkaStore(
        settings.kafka_bootstrap_servers,
        settings.registry_topic,
        state.apply,
        delivery_timeout_ms=delivery_timeout_ms,
        apply_timeout=apply_timeout,
        retry_interval=retry_interval,
    )
    # Reads open, writes behind the service tokens (streams.access), checked first.
    tokens = access.token_middleware(settings.service_token_list, public=access.registry_is_public,
                                     refuse=access.registry_refusal)
    # Every request counted by route pattern and status (streams.metrics), refusals included.
    measured = RegistryMetrics()
    app = web.Application(middlewares=[measured.middleware(), tokens, error_middleware],
                          client_max_size=MAX_BODY_BYTES)
    app[REGISTRY] = Registry(state, store)

    async def metrics_page(request: web.Request) -> web.Response:
        return metrics_response(measured.render())

    app.router.add_get("/metrics", metrics_page)
    add_routes(app)
    asyncapi_route.install(app, asyncapi.document_for(settings))

    async def start_store(app: web.Application) -> None:
        await store.start()

    async def stop_store(app: web.Application) -> None:
        await store.close()

    app.on_startup.append(start_store)
    app.on_cleanup.append(stop_store)
    return app


def run(settings: Settings) -> None:
    """Serve the registry until interrupted (SIGINT/SIGTERM)."""
    logs.configure(settings)
    log.info(
        "schema registry on http://%s:%d, state in Kafka topic %r at %s",
        settings.registry_host, settings.registry_port, settings.registry_topic,
        settings.kafka_bootstrap_servers,
    )
    web.run_app(
        create_app(settings),
        host=settings.registry_host,
        port=settings.registry_port,
        print=None,
        access_log=None,
    )
