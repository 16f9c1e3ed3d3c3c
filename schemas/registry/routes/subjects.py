"""``/subjects``: registering, looking up, listing and deleting subject versions."""

from __future__ import annotations

from aiohttp import web

from schemas.registry.core import SchemaRequest
from schemas.registry.http import body, flag, page, registry, reply, reply_raw

routes = web.RouteTableDef()


@routes.get("/subjects")
async def list_subjects(request: web.Request) -> web.Response:
    found = registry(request).list_subjects(
        deleted=flag(request, "deleted"),
        deleted_only=flag(request, "deleted_only"),
        prefix=request.query.get("subjectPrefix") or None,
    )
    return reply(page(found, request))


@routes.post("/subjects/{subject}")
async def lookup(request: web.Request) -> web.Response:
    schema = SchemaRequest.from_body(await body(request))
    found = registry(request).lookup(
        request.match_info["subject"], schema, deleted=flag(request, "deleted")
    )
    return reply(found)


@routes.delete("/subjects/{subject}")
async def delete_subject(request: web.Request) -> web.Response:
    deleted = await registry(request).delete_subject(
        request.match_info["subject"], permanent=flag(request, "permanent")
    )
    return reply(deleted)


@routes.get("/subjects/{subject}/versions")
async def list_versions(request: web.Request) -> web.Response:
    found = registry(request).list_versions(
        request.match_info["subject"],
        deleted=flag(request, "deleted"),
        deleted_only=flag(request, "deleted_only"),
    )
    return reply(page(found, request))


@routes.post("/subjects/{subject}/versions")
async def register(request: web.Request) -> web.Response:
    schema = SchemaRequest.from_body(await body(request))
    registered = await registry(request).register(
        request.match_info["subject"], schema, normalize=flag(request, "normalize")
    )
    return reply(registered)


@routes.get("/subjects/{subject}/versions/{version}")
async def get_version(request: web.Request) -> web.Response:
    found = registry(request).get_version(
        request.match_info["subject"], request.match_info["version"], deleted=flag(request, "deleted")
    )
    return reply(found)


@routes.get("/subjects/{subject}/versions/{version}/schema")
async def get_version_schema(request: web.Request) -> web.Response:
    found = registry(request).get_version(
        request.match_info["subject"], request.match_info["version"], deleted=flag(request, "deleted")
    )
    return reply_raw(found["schema"])


@routes.get("/subjects/{subject}/versions/{version}/referencedby")
async def referenced_by(request: web.Request) -> web.Response:
    found = registry(request).referenced_by(
        request.match_info["subject"], request.match_info["version"]
    )
    return reply(page(found, request))


@routes.delete("/subjects/{subject}/versions/{version}")
async def delete_version(request: web.Request) -> web.Response:
    deleted = await registry(request).delete_version(
        request.match_info["subject"], request.match_info["version"],
        permanent=flag(request, "permanent"),
    )
    return reply(deleted)


@routes.get("/subjects/{subject}/metadata")
async def latest_with_metadata(request: web.Request) -> web.Response:
    keys = request.query.getall("key", [])
    values = request.query.getall("value", [])
    found = registry(request).get_latest_with_metadata(
        request.match_info["subject"], dict(zip(keys, values, strict=False)),
        deleted=flag(request, "deleted"),
    )
    return reply(found)
