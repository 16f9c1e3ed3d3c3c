"""The thin HTTP layer shared by the routers: bodies, query parameters, errors.

Every answer, error or not, is JSON with Confluent's content type; every
failure is a Confluent error body, and no request can turn into a bare 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from schemas.registry import errors
from schemas.registry.core import Registry
from schemas.registry.errors import RegistryError

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
REGISTRY = web.AppKey("registry", Registry)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def registry(request: web.Request) -> Registry:
    return request.app[REGISTRY]


def reply(document: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(document, ensure_ascii=False), content_type=CONTENT_TYPE
    )


def reply_raw(text: str) -> web.Response:
    """A JSON text answered as is (the ``.../schema`` endpoints return the schema itself)."""
    return web.Response(text=text, content_type=CONTENT_TYPE)


async def body(request: web.Request) -> Any:
    """The request body as JSON; anything unparseable is a 400 Confluent error."""
    raw = await request.read()
    if not raw.strip():
        raise errors.bad_request("Request body is empty; a JSON object was expected")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.bad_request(f"Request body is not valid JSON: {exc}") from exc


def flag(request: web.Request, name: str, default: bool = False) -> bool:
    """A boolean query parameter (the clients send ``true``/``True``/``false``/``False``)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise errors.bad_request(f"Query parameter {name}={raw!r} is not a boolean")


def integer(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise errors.bad_request(f"Query parameter {name}={raw!r} is not an integer") from None


def schema_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    try:
        return int(raw)
    except ValueError:
        raise errors.schema_not_found() from None


def page(items: list[Any], request: web.Request) -> list[Any]:
    """Apply the ``offset``/``limit`` query parameters (a negative limit means all)."""
    offset = max(integer(request, "offset", 0), 0)
    limit = integer(request, "limit", -1)
    selected = items[offset:]
    return selected if limit < 0 else selected[:limit]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        registry(request).ensure_ready()
        return await handler(request)
    except RegistryError as exc:
        if exc.http_status == 500:
            log.warning("%s %s -> %d %s", request.method, request.path, exc.http_status, exc.message)
        return reply(exc.body(), exc.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.status
        message = f"HTTP {exc.status} {exc.reason}"
        if code == 413:
            message = "Request body is too large"
        return reply(errors.error_body(code, message), code)
    except Exception as exc:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return reply(errors.error_body(errors.STORE_ERROR, f"Internal schema registry error: {exc}"), 500)
