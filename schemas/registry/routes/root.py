"""``GET /``: Confluent answers an empty object (used as a liveness probe)."""

from __future__ import annotations

from aiohttp import web

from schemas.registry.http import reply

routes = web.RouteTableDef()


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    return reply({})
