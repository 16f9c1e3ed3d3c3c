"""``/contexts``: only Confluent's default context exists here."""

from __future__ import annotations

from aiohttp import web

from schemas.registry.http import page, reply

routes = web.RouteTableDef()

DEFAULT_CONTEXT = "."


@routes.get("/contexts")
async def list_contexts(request: web.Request) -> web.Response:
    return reply(page([DEFAULT_CONTEXT], request))
