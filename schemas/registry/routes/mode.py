"""``/mode``: the global and per-subject mode (READWRITE, READONLY, IMPORT...)."""

from __future__ import annotations

from aiohttp import web

from schemas.registry.http import body, flag, registry, reply

routes = web.RouteTableDef()


@routes.get("/mode")
async def get_global(request: web.Request) -> web.Response:
    return reply(registry(request).get_mode(None))


@routes.put("/mode")
async def set_global(request: web.Request) -> web.Response:
    return reply(await registry(request).set_mode(
        None, await body(request), force=flag(request, "force")
    ))


@routes.get("/mode/{subject}")
async def get_subject(request: web.Request) -> web.Response:
    return reply(registry(request).get_mode(
        request.match_info["subject"], default_to_global=flag(request, "defaultToGlobal")
    ))


@routes.put("/mode/{subject}")
async def set_subject(request: web.Request) -> web.Response:
    return reply(await registry(request).set_mode(
        request.match_info["subject"], await body(request), force=flag(request, "force")
    ))


@routes.delete("/mode/{subject}")
async def delete_subject(request: web.Request) -> web.Response:
    return reply(await registry(request).delete_mode(request.match_info["subject"]))
