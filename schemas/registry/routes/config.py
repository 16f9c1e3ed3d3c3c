"""``/config``: the global and per-subject compatibility level."""

from __future__ import annotations

from aiohttp import web

from schemas.registry.http import body, flag, registry, reply

routes = web.RouteTableDef()


@routes.get("/config")
async def get_global(request: web.Request) -> web.Response:
    return reply(registry(request).get_config(None))


@routes.put("/config")
async def set_global(request: web.Request) -> web.Response:
    return reply(await registry(request).set_config(None, await body(request)))


@routes.delete("/config")
async def delete_global(request: web.Request) -> web.Response:
    return reply(await registry(request).delete_config(None))


@routes.get("/config/{subject}")
async def get_subject(request: web.Request) -> web.Response:
    return reply(registry(request).get_config(
        request.match_info["subject"], default_to_global=flag(request, "defaultToGlobal")
    ))


@routes.put("/config/{subject}")
async def set_subject(request: web.Request) -> web.Response:
    return reply(await registry(request).set_config(request.match_info["subject"], await body(request)))


@routes.delete("/config/{subject}")
async def delete_subject(request: web.Request) -> web.Response:
    return reply(await registry(request).delete_config(request.match_info["subject"]))
