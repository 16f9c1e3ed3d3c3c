"""``/associations``: not supported; every lookup answers 404.

Since confluent-kafka 2.14 the serializers' default subject-name strategy
first asks ``GET /associations/resources/{namespace}/{topic}`` and falls back
to ``<topic>-value`` only on a 404, so a 404 with a Confluent body is the
answer that keeps ordinary clients working.
"""

from __future__ import annotations

from aiohttp import web

from schemas.registry import errors

routes = web.RouteTableDef()


@routes.route("*", "/associations")
@routes.route("*", "/associations/{tail:.*}")
async def associations(request: web.Request) -> web.Response:
    resource = request.match_info.get("tail", "")
    raise errors.association_not_found(resource.rsplit("/", 1)[-1] or "associations")
