"""``GET /asyncapi.json``: the AsyncAPI 3.0 document of the event topics (:mod:`schemas.asyncapi`).

Not part of Confluent's API: a stable URL where consumers of paystream's
topics find every channel, key, payload contract and producer/consumer in
one document.  The document is generated once when the registry app is
built (:func:`schemas.registry.server.create_app`), from the catalog and
the ``.avsc`` files this registry was shipped with, addressed with its
deployment's topic prefix, broker and registry URL.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from schemas.asyncapi import render

routes = web.RouteTableDef()

#: The rendered document, set by the app factory.
ASYNCAPI_DOCUMENT = web.AppKey("asyncapi_document", str)


def install(app: web.Application, document: dict[str, Any]) -> None:
    """Serve ``document`` at ``/asyncapi.json`` on ``app``."""
    app[ASYNCAPI_DOCUMENT] = render(document)


@routes.get("/asyncapi.json")
async def asyncapi_document(request: web.Request) -> web.Response:
    text = request.app.get(ASYNCAPI_DOCUMENT)
    if text is None:
        raise web.HTTPNotFound()
    return web.Response(text=text, content_type="application/json")
