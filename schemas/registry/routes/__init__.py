"""One router per REST resource of the Confluent Schema Registry API."""

from __future__ import annotations

from aiohttp import web

from schemas.registry.routes import (
    associations,
    asyncapi,
    compatibility,
    config,
    contexts,
    mode,
    root,
    schemas,
    subjects,
)

ROUTERS = (root, schemas, subjects, compatibility, config, mode, contexts, associations, asyncapi)


def add_routes(app: web.Application) -> None:
    for router in ROUTERS:
        app.router.add_routes(router.routes)
