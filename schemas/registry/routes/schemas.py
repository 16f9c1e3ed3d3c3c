"""``/schemas``: schemas by global id, and the supported schema types."""

from __future__ import annotations

from aiohttp import web

from schemas.registry.http import flag, page, registry, reply, reply_raw, schema_id

routes = web.RouteTableDef()


@routes.get("/schemas/types")
async def schema_types(request: web.Request) -> web.Response:
    return reply(registry(request).schema_types())


@routes.get("/schemas/ids/{id}")
async def get_schema(request: web.Request) -> web.Response:
    # ``subject``, ``format`` and ``reference_format`` are accepted and have
    # nothing to select here (one context, AVRO only, no references).
    return reply(registry(request).get_schema(schema_id(request)))


@routes.get("/schemas/ids/{id}/schema")
async def get_schema_text(request: web.Request) -> web.Response:
    return reply_raw(registry(request).get_schema(schema_id(request))["schema"])


@routes.get("/schemas/ids/{id}/versions")
async def get_schema_versions(request: web.Request) -> web.Response:
    found = registry(request).get_schema_versions(schema_id(request), deleted=flag(request, "deleted"))
    subject = request.query.get("subject")
    if subject:
        found = [f for f in found if f["subject"] == subject]
    return reply(page(found, request))


@routes.get("/schemas/ids/{id}/subjects")
async def get_schema_subjects(request: web.Request) -> web.Response:
    found = registry(request).get_schema_subjects(schema_id(request), deleted=flag(request, "deleted"))
    subject = request.query.get("subject")
    if subject:
        found = [s for s in found if s == subject]
    return reply(page(found, request))
