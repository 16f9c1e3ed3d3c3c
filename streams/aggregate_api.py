"""The HTTP side of the aggregate kernel: routing a request to a key's owner, sending
it a command, and answering with the aggregate's verdict, the same way for every domain.

What every domain API answers (orders, payments, ...):

- 2xx with the aggregate's view when the command was applied (or had been: a
  retry under the same Idempotency-Key gets what the first attempt did);
- the domain's refusals, and only those: 400 ``invalid``/``bad_request``,
  404 ``not_found``, 409 ``illegal_transition``, 422
  ``idempotency_key_reused`` (:class:`tables.aggregate.Refusal` says which);
- 500 ``failed`` with the ``command_id`` when the command failed for good
  (a bug, a record Kafka refuses): it is in the dead-letter topic;
- 503 ``unavailable`` with ``Retry-After`` while no worker serves the key
  (start-up, a rebalance, an owner that died) or Kafka does not take the
  command; 504 ``timeout`` with the ``command_id`` when the aggregate did not
  answer in time (the command may still be applied: retry with the same
  Idempotency-Key to learn its outcome).  Never a bare 500.

An Idempotency-Key is scoped to the aggregate the command is for (the
command id derives from the key, the aggregate and the request's
fingerprint), so another caller's key never finds this aggregate's answer,
and the same key with other parameters is a different command, which the
aggregate refuses with 422.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from faust import web as faust_web

from streams.kernel import Aggregate, transient
from streams.routing import NotOwnerYet, Router
from tables import aggregate
from tables.aggregate import Refusal
from tables.deadlines import now_ms

#: How long a request waits for the aggregate before answering 504.
COMMAND_TIMEOUT = 15.0
#: Seconds a 503 asks the client to wait before retrying.
RETRY_AFTER = "2"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_LENGTH = 255


class BadRequest(Exception):
    """The request is not what the endpoint takes (400)."""


def error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None,
          **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status,
                             headers=headers)


def unavailable(message: str, **extra: Any) -> web.Response:
    return error(503, "unavailable", message, {"Retry-After": RETRY_AFTER}, **extra)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body ({} when empty); BadRequest otherwise."""
    raw = await request.read()
    try:
        body = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise BadRequest(f"{IDEMPOTENCY_HEADER} must be 1..{MAX_IDEMPOTENCY_KEY_LENGTH} characters")
    return key


#: A request handler: ``handler(request, **path parameters)`` (see :func:`serve`).
Handler = Callable[..., Awaitable[web.StreamResponse]]


def serve(app: Any, routes: Mapping[str, Mapping[str, Handler]], *,
          path_parameters: bool = True) -> None:
    """Bind each ``path: {method: handler}`` of ``routes`` to the Faust app's web server.

    One Faust view per path (``app.page``, so the app's middlewares, the token check
    among them, cover it) with just the methods given (lower-case: ``get``, ``post``,
    ...); aiohttp answers any other method with 405.  A handler is called as
    ``handler(request, **path parameters)``, or ``handler(request)`` with the path
    parameters left in ``request.match_info`` when ``path_parameters`` is false.
    """
    for path, handlers in routes.items():
        app.page(path, name=path)(_view(handlers, path_parameters))


def _view(handlers: Mapping[str, Handler], path_parameters: bool) -> type[faust_web.View]:
    def method(handler: Handler) -> Handler:
        async def answer(self: faust_web.View, request: web.Request, **params: Any) -> web.StreamResponse:
            return await (handler(request, **params) if path_parameters else handler(request))

        return answer

    return type("Route", (faust_web.View,), {name: method(h) for name, h in handlers.items()})


def router_of(app: Any) -> Router:
    """The app's one :class:`Router` (one pooled session for all domain APIs)."""
    router = getattr(app, "paystream_router", None)
    if router is None:
        router = app.paystream_router = Router(app)
        app.add_dependency(router)
    return router


class AggregateApi:
    """Routing, commands and answers; a domain API subclasses it and adds its handlers."""

    def __init__(self, app: Any, router: Router) -> None:
        self.app = app
        self.router = router

    async def owned(
        self,
        aggregate_: Aggregate,
        key: str,
        request: web.Request,
        handler: Callable[[], Awaitable[web.Response]],
        extra_headers: dict[str, str] | None = None,
    ) -> web.Response:
        """Answer on the owner of ``key``; map errors to JSON answers, never a bare 500."""
        try:
            routed = await self.router.owner_response(aggregate_.table, key, request,
                                                      extra_headers=extra_headers)
            return routed if routed is not None else await handler()
        except BadRequest as exc:
            return error(400, "bad_request", str(exc))
        except Refusal as refusal:
            return error(refusal.status, refusal.code, str(refusal))
        except NotOwnerYet as exc:
            return unavailable(str(exc))
        except Exception as exc:
            if self.app.rebalancing or transient(exc):
                return unavailable(f"partitions are moving: {type(exc).__name__}")
            raise

    async def row_view(self, aggregate_: Aggregate, key: str, request: web.Request, *,
                       what: str, missing: str) -> web.Response:
        """A GET of ``key``'s row, answered on its owner: the aggregate's view of the row.

        No row: 503 while partitions move (``what`` not readable yet), else 404
        ``not_found`` with the message ``missing``.
        """

        async def here() -> web.Response:
            row = aggregate_.row(key)
            if row is None:
                return self.not_readable(what) or error(404, "not_found", missing)
            return web.json_response(aggregate_.flow.view(row))

        return await self.owned(aggregate_, key, request, here)

    def not_readable(self, what: str) -> web.Response | None:
        """503 while partitions move (a row may still be on its way from its changelog)."""
        if self.app.rebalancing:
            return unavailable(f"partitions are moving: {what} not readable yet")
        return None

    async def command_on(self, aggregate_: Aggregate, record: dict[str, Any], *,
                         success: int = 200) -> web.Response:
        """Send a command to ``aggregate_`` here and answer with its verdict."""
        replies = aggregate_.replies
        command_id = record["command_id"]
        future = replies.expect(command_id)
        try:
            await aggregate_.send_command(record)
        except Exception as exc:
            replies.fail(command_id, exc)
            if transient(exc):
                return unavailable(f"Kafka did not take the command: {type(exc).__name__}",
                                   command_id=command_id)
            raise
        try:
            view = await replies.wait(command_id, future, COMMAND_TIMEOUT)
        except Refusal as refusal:
            return error(refusal.status, refusal.code, str(refusal))
        except TimeoutError:
            return error(504, "timeout", f"the {aggregate_.flow.name} aggregate did not answer in "
                         "time; the command may still be applied: retry with the same "
                         "Idempotency-Key", command_id=command_id)
        except Exception as exc:  # the command failed for good: it is in the dead letters
            return error(500, "failed", f"the command failed ({type(exc).__name__}) and was "
                         "dead-lettered for an operator", command_id=command_id)
        if view is None:
            key = record[aggregate_.flow.key_field]
            return error(404, "not_found", f"{aggregate_.flow.name} {key} does not exist")
        return web.json_response(view, status=success)

    def keyed_command(self, aggregate_: Aggregate, verb: str, key: str, request: web.Request,
                      args: dict[str, Any]) -> dict[str, Any]:
        """A command record for ``key``; keyed requests get a derived id and a fingerprint."""
        idem = idempotency_key(request)
        if idem is not None:
            # The fingerprint is part of the id: a concurrent reuse of the key with
            # other parameters is another command, decided (and refused) on its own.
            fingerprint = aggregate.fingerprint(verb, args)
            args = {**args, "idempotency_key": idem, "fingerprint": fingerprint}
            command_id = aggregate.derived_id("api", key, verb, idem, fingerprint)
        else:
            command_id = str(uuid.uuid4())
        return aggregate.command(verb, aggregate_.flow.key_field, key, cause=None, now_ms=now_ms(),
                                 command_id=command_id, origin="api", **args)
