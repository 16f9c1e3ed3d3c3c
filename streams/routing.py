"""Send a web request to the worker that owns a table key, and wait for agents.

Faust's ``table_route`` forwards method and headers but drops the request
body, so commands with a JSON body (POST/PATCH) could not be routed with it.
:class:`Router` forwards the body too, over one pooled HTTP session per
process (opened when the app starts, closed when it stops), and answers
``None`` when this worker is the owner.  While partitions move (start-up, a
rebalance, an owner that just died) it raises :class:`NotOwnerYet`, which the
API answers with 503 and ``Retry-After``: never a 500.  :class:`ReplyBook`
lets a web handler on the owning worker wait for the agent that applies its
command (same process: the worker owning a table partition owns the command
topic's partition of the same number).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web
from mode import Service
from yarl import URL

ROUTED_HEADER = "X-Paystream-Routed"
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}
#: Headers of the owner's answer passed back to the client.
_ANSWER_HEADERS = ("Retry-After",)


class NotOwnerYet(Exception):
    """No worker serves the key's partition right now (start-up, rebalance, owner down)."""


class Router(Service):
    """Finds a key's owner and forwards requests to it on one pooled session."""

    # mode's "Starting..."/"Stopping..." lines under a faust logger, which the
    # worker's quiet logging config keeps at WARNING.
    logger = logging.getLogger("faust.paystream.router")

    def __init__(self, app: Any, *, timeout: float = 30.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def on_start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def on_stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def owner_response(
        self,
        table: Any,
        key: str,
        request: web.Request,
        *,
        extra_headers: dict[str, str] | None = None,
    ) -> web.Response | None:
        """The owner's answer to ``request``, or ``None`` if this worker owns ``key``.

        ``extra_headers`` travel with the forwarded request (e.g. an id the first
        worker chose, so the owner uses the same one).
        """
        try:
            owner = self.app.router.key_store(table.name, key)
        except (KeyError, TypeError) as exc:
            # KeyError: no assignment of the changelog partition yet.  TypeError:
            # aiokafka's producer metadata does not list the changelog topic yet
            # (a worker starting before its tables exist: partitions_for_topic()
            # is None).
            raise NotOwnerYet(f"no worker owns {table.name}[{key!r}] yet") from exc
        here = URL(str(self.app.conf.canonical_url))
        if (owner.host, owner.port) == (here.host, here.port):
            return None
        routed = [t for t in request.headers.get(ROUTED_HEADER, "").split(",") if t]
        if table.name in routed:
            # Routed here for this table already but we are not the owner: the
            # assignment moved between the two hops.  Refuse rather than bounce
            # between workers.  (A request may be routed once per table: a payment
            # looked up by its intent hops to the intent's owner, then the order's.)
            raise NotOwnerYet(f"{table.name}[{key!r}] moved while the request was routed")
        if self._session is None:
            raise NotOwnerYet("this worker is not serving yet")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers.update(extra_headers or {})
        headers[ROUTED_HEADER] = ",".join([*routed, table.name])
        target = request.url.with_scheme(owner.scheme or "http").with_host(owner.host).with_port(owner.port)
        body = await request.read()
        try:
            async with self._session.request(request.method, target, data=body, headers=headers) as answer:
                passed = {h: answer.headers[h] for h in _ANSWER_HEADERS if h in answer.headers}
                return web.Response(body=await answer.read(), status=answer.status,
                                    content_type=answer.content_type, headers=passed)
        except (TimeoutError, aiohttp.ClientError) as exc:
            # The owner is down or restarting: the group has not moved its
            # partitions yet.  The client retries (with its Idempotency-Key).
            raise NotOwnerYet(f"the owner of {table.name}[{key!r}] at {owner} did not answer: "
                              f"{type(exc).__name__}") from exc


class ReplyBook:
    """Futures for commands whose senders wait for the agent's verdict.

    Several requests may wait for one command id (a client retrying under its
    Idempotency-Key while the first attempt is still pending): all get it.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[Any]]] = {}

    def expect(self, command_id: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(command_id, []).append(future)
        return future

    def resolve(self, command_id: str, result: Any) -> None:
        for future in self._waiting.pop(command_id, ()):
            if not future.done():
                future.set_result(result)

    def fail(self, command_id: str, error: BaseException) -> None:
        for future in self._waiting.pop(command_id, ()):
            if not future.done():
                future.set_exception(error)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._waiting

    async def wait(self, command_id: str, future: asyncio.Future[Any], timeout: float) -> Any:
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            waiting = self._waiting.get(command_id)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiting[command_id]
