"""``/compatibility``: test a schema against one version or all of a subject."""

from __future__ import annotations

from aiohttp import web

from schemas.registry.core import SchemaRequest
from schemas.registry.http import body, flag, registry, reply

routes = web.RouteTableDef()


@routes.post("/compatibility/subjects/{subject}/versions")
async def against_all(request: web.Request) -> web.Response:
    schema = SchemaRequest.from_body(await body(request))
    result = registry(request).test_compatibility(
        request.match_info["subject"], schema, None, verbose=flag(request, "verbose")
    )
    return reply(result)


@routes.post("/compatibility/subjects/{subject}/versions/{version}")
async def against_version(request: web.Request) -> web.Response:
    schema = SchemaRequest.from_body(await body(request))
    result = registry(request).test_compatibility(
        request.match_info["subject"], schema, request.match_info["version"],
        verbose=flag(request, "verbose"),
    )
    return reply(result)
