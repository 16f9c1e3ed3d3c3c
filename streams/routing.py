"""Send a web request to the worker that owns a table key, and wait for agents.

Faust's ``table_route`` forwards method and headers but drops the request
body, so commands with a JSON body (POST/PATCH) could not be routed with it.
:func:`owner_response` forwards the body too, and answers ``None`` when this
worker is the owner.  :class:`ReplyBook` lets a web handler on the owning
worker wait for the agent that applies its command (same process, since the
same worker owns the command topic's partition and the table's).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

ROUTED_HEADER = "X-Paystream-Routed"
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


class NotOwnerYet(Exception):
    """No worker owns the key's partition right now (start-up or rebalance)."""


async def owner_response(
    app: Any,
    table: Any,
    key: str,
    request: web.Request,
    *,
    extra_headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> web.Response | None:
    """The owner's answer to ``request``, or ``None`` if this worker owns ``key``.

    ``extra_headers`` travel with the forwarded request (e.g. an id the first
    worker chose, so the owner uses the same one).
    """
    try:
        owner = app.router.key_store(table.name, key)
    except (KeyError, TypeError) as exc:
        # KeyError: no assignment of the changelog partition yet.  TypeError:
        # aiokafka's producer metadata does not list the changelog topic yet
        # (a worker starting before its tables exist: partitions_for_topic()
        # is None), which would otherwise be a 500 with a traceback.
        raise NotOwnerYet(f"no worker owns {table.name}[{key!r}] yet") from exc
    here = URL(str(app.conf.canonical_url))
    if (owner.host, owner.port) == (here.host, here.port):
        return None
    if request.headers.get(ROUTED_HEADER):
        # Routed here already but we are not the owner: the assignment moved
        # between the two hops.  Refuse rather than bounce between workers.
        raise NotOwnerYet(f"{table.name}[{key!r}] moved while the request was routed")
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
    headers.update(extra_headers or {})
    headers[ROUTED_HEADER] = "1"
    target = request.url.with_scheme(owner.scheme or "http").with_host(owner.host).with_port(owner.port)
    body = await request.read()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.request(request.method, target, data=body, headers=headers) as answer:
            return web.Response(
                body=await answer.read(),
                status=answer.status,
                content_type=answer.content_type,
            )


class ReplyBook:
    """Futures for commands whose sender waits for the agent's verdict."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Any]] = {}

    def expect(self, command_id: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        return future

    def resolve(self, command_id: str, result: Any) -> None:
        future = self._waiting.pop(command_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def fail(self, command_id: str, error: BaseException) -> None:
        future = self._waiting.pop(command_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def forget(self, command_id: str) -> None:
        self._waiting.pop(command_id, None)

    async def wait(self, command_id: str, future: asyncio.Future[Any], timeout: float) -> Any:
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.forget(command_id)
