"""The order API on the worker's web server (command and query side).

Every request is answered by the worker that owns the order's partition
(:class:`streams.routing.Router` forwards it, body included): reads come from
that worker's table, and commands go to the order aggregate there, whose
verdict the handler awaits.  What a client gets:

- 201/200 with the order, when the command was applied (or had been: a
  retry under the same Idempotency-Key gets what the first attempt did);
- 400 ``invalid`` / ``bad_request``, 404 ``not_found``, 409
  ``illegal_transition``, 422 ``idempotency_key_reused``: the domain's
  refusals, and only those;
- 500 ``failed`` with the ``command_id`` when the command failed for good
  (a bug, a record Kafka refuses): it is in the dead-letter topic;
- 503 ``unavailable`` with ``Retry-After`` while no worker serves the key
  (start-up, a rebalance, an owner that died) or Kafka does not take the
  command; 504 ``timeout`` with the ``command_id`` when the aggregate did not
  answer in time (the command may still be applied: retry with the same
  Idempotency-Key to learn its outcome).

Idempotency-Key (every POST and PATCH): scoped to the caller, as Stripe
scopes it.  For ``POST /orders`` the caller is the body's ``user_id``: the
key and the user derive the order id, so another user's key never finds this
order; the same key with the same parameters returns the order it created,
with other parameters 422 and nothing changes.  For commands on an order the
order is the scope.  How long a key is remembered: a create key for the
order's life (the order row keeps it), a command key for the order's last
:data:`tables.order_state.MAX_IDEMPOTENCY_KEYS` keyed commands.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from faust import web as faust_web

from agents.orders import OrderService
from streams.kernel import Aggregate, transient
from streams.routing import NotOwnerYet, Router
from tables import aggregate, order_index
from tables.aggregate import Refusal
from tables.deadlines import now_ms

#: How long a request waits for the order aggregate before answering 504.
COMMAND_TIMEOUT = 15.0
#: Seconds a 503 asks the client to wait before retrying.
RETRY_AFTER = "2"
CREATE_FIELDS = frozenset({"user_id", "order_type", "items", "currency", "total_amount",
                           "payment_window_seconds"})
REQUIRED_CREATE_FIELDS = ("user_id", "order_type", "items", "currency")
#: The order id the first worker chose for a create without Idempotency-Key,
#: forwarded to the owning worker.
ORDER_ID_HEADER = "X-Paystream-Order-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_LENGTH = 255


class BadRequest(Exception):
    """The request is not what the endpoint takes (400)."""


def _error(status: int, error: str, message: str, headers: Mapping[str, str] | None = None,
           **extra: Any) -> web.Response:
    return web.json_response({"error": error, "message": message, **extra}, status=status,
                             headers=headers)


def _unavailable(message: str, **extra: Any) -> web.Response:
    return _error(503, "unavailable", message, {"Retry-After": RETRY_AFTER}, **extra)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise BadRequest(f"{IDEMPOTENCY_HEADER} must be 1..{MAX_IDEMPOTENCY_KEY_LENGTH} characters")
    return key


class OrderApi:
    """The handlers; the Faust views below only bind them to paths."""

    def __init__(self, app: Any, service: OrderService, router: Router) -> None:
        self.app = app
        self.orders: Aggregate = service.orders
        self.user_orders: Aggregate = service.user_orders
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
            return _error(400, "bad_request", str(exc))
        except NotOwnerYet as exc:
            return _unavailable(str(exc))
        except Exception as exc:
            if self.app.rebalancing or transient(exc):
                return _unavailable(f"partitions are moving: {type(exc).__name__}")
            raise

    async def command(self, record: dict[str, Any], *, success: int = 200) -> web.Response:
        """Send a command to the order aggregate here and answer with its verdict."""
        replies = self.orders.replies
        command_id = record["command_id"]
        future = replies.expect(command_id)
        try:
            await self.orders.send_command(record)
        except Exception as exc:
            replies.fail(command_id, exc)
            if transient(exc):
                return _unavailable(f"Kafka did not take the command: {type(exc).__name__}",
                                    command_id=command_id)
            raise
        try:
            view = await replies.wait(command_id, future, COMMAND_TIMEOUT)
        except Refusal as refusal:
            return _error(refusal.status, refusal.code, str(refusal))
        except TimeoutError:
            return _error(504, "timeout", "the order aggregate did not answer in time; the command "
                          "may still be applied: retry with the same Idempotency-Key",
                          command_id=command_id)
        except Exception as exc:  # the command failed for good: it is in the dead letters
            return _error(500, "failed", f"the command failed ({type(exc).__name__}) and was "
                          "dead-lettered for an operator", command_id=command_id)
        if view is None:
            return _error(404, "not_found", f"order {record['order_id']} does not exist")
        return web.json_response(view, status=success)

    def _command(
        self, verb: str, order_id: str, request: web.Request, args: dict[str, Any]
    ) -> dict[str, Any]:
        """A command record for ``order_id``; keyed requests get a derived id and a fingerprint."""
        key = _idempotency_key(request)
        if key is not None:
            # The fingerprint is part of the id: a concurrent reuse of the key with
            # other parameters is another command, decided (and refused) on its own.
            fingerprint = aggregate.fingerprint(verb, args)
            args = {**args, "idempotency_key": key, "fingerprint": fingerprint}
            command_id = aggregate.derived_id("api", order_id, verb, key, fingerprint)
        else:
            command_id = str(uuid.uuid4())
        return aggregate.command(verb, "order_id", order_id, cause=None, now_ms=now_ms(),
                                 command_id=command_id, origin="api", **args)

    # POST /orders -----------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
            user_id = body.get("user_id")
            if not isinstance(user_id, str) or not user_id:
                raise BadRequest("user_id must be a non-empty string")
            key = _idempotency_key(request)
        except BadRequest as exc:
            return _error(400, "bad_request", str(exc))
        if key is not None:  # the caller's key, in the caller's namespace
            order_id = aggregate.derived_id("api-order", user_id, key)
        else:
            order_id = request.headers.get(ORDER_ID_HEADER) or str(uuid.uuid4())
            try:
                order_id = str(uuid.UUID(order_id))
            except ValueError:
                return _error(400, "bad_request", f"{ORDER_ID_HEADER} must be a UUID")
        return await self.owned(
            self.orders, order_id, request,
            lambda: self._create_here(body, request, order_id), {ORDER_ID_HEADER: order_id},
        )

    async def _create_here(self, body: dict[str, Any], request: web.Request, order_id: str) -> web.Response:
        unknown = sorted(set(body) - CREATE_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
        missing = [name for name in REQUIRED_CREATE_FIELDS if name not in body]
        if missing:
            raise BadRequest(f"missing field(s): {', '.join(missing)}")
        args = {name: body[name] for name in REQUIRED_CREATE_FIELDS}
        args["total_amount"] = body["total_amount"] if "total_amount" in body else _items_total(body)
        window = body.get("payment_window_seconds")
        key = _idempotency_key(request)
        extra: dict[str, Any] = {}
        if key is not None:
            # Same key and parameters, same command id: the retry is the request.
            fingerprint = aggregate.fingerprint("create", body)
            extra = {"idempotency_key": key, "fingerprint": fingerprint}
            command_id = aggregate.derived_id("api-create", order_id, fingerprint)
        else:
            # A fresh id: a create naming an existing order (a client that set the
            # order id header) is then refused as a taken id, never "found".
            command_id = str(uuid.uuid4())
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, (int, float)) or window <= 0:
                raise BadRequest("payment_window_seconds must be a positive number")
            args["expires_at"] = now_ms() + int(window * 1000)
        record = aggregate.command(
            "create", "order_id", order_id, cause=None, now_ms=now_ms(), origin="api",
            command_id=command_id, **args, **extra,
        )
        return await self.command(record, success=201)

    # /orders/{order_id} -------------------------------------------------
    async def get(self, request: web.Request, order_id: str) -> web.Response:
        async def here() -> web.Response:
            order = self.orders.row(order_id)
            if order is None:
                if self.app.rebalancing:  # its row may still be on its way from the changelog
                    return _unavailable(f"partitions are moving: order {order_id} not readable yet")
                return _error(404, "not_found", f"order {order_id} does not exist")
            return web.json_response(self.orders.flow.view(order))

        return await self.owned(self.orders, order_id, request, here)

    async def patch(self, request: web.Request, order_id: str) -> web.Response:
        async def here() -> web.Response:
            body = await _json_body(request)
            if not body:
                raise BadRequest("nothing to change")
            return await self.command(self._command("update", order_id, request, {"changes": body}))

        return await self.owned(self.orders, order_id, request, here)

    async def cancel(self, request: web.Request, order_id: str) -> web.Response:
        async def here() -> web.Response:
            body = await _json_body(request)
            args = {k: body[k] for k in ("reason", "detail") if body.get(k) is not None}
            return await self.command(self._command("cancel", order_id, request, args))

        return await self.owned(self.orders, order_id, request, here)

    async def fulfill(self, request: web.Request, order_id: str) -> web.Response:
        async def here() -> web.Response:
            body = await _json_body(request)
            args = {"fulfillment_details": body.get("fulfillment_details", {})}
            return await self.command(self._command("fulfill", order_id, request, args))

        return await self.owned(self.orders, order_id, request, here)

    # /users/{user_id}/orders ----------------------------------------------
    async def user_orders_of(self, request: web.Request, user_id: str) -> web.Response:
        async def here() -> web.Response:
            row = self.user_orders.row(user_id)
            if row is None and self.app.rebalancing:
                return _unavailable(f"partitions are moving: orders of {user_id} not readable yet")
            orders = [{k: v for k, v in s.items() if k != "version"}
                      for s in order_index.orders_of(row)]
            return web.json_response({"user_id": user_id, "orders": orders})

        return await self.owned(self.user_orders, user_id, request, here)


def _items_total(body: dict[str, Any]) -> Any:
    try:
        return sum(int(i["unit_amount"]) * int(i["quantity"]) for i in body["items"])
    except (TypeError, KeyError, ValueError) as exc:
        raise BadRequest("items must be a list of {product_id, quantity, unit_amount}") from exc


def register(app: Any) -> OrderApi:
    """Bind the order endpoints to the Faust app's web server (after ``agents.orders``)."""
    router = Router(app)
    app.add_dependency(router)
    api = OrderApi(app, app.orders, router)

    @app.page("/orders")
    class Orders(faust_web.View):
        async def post(self, request: web.Request) -> web.Response:
            return await api.create(request)

    @app.page("/orders/{order_id}")
    class OrderResource(faust_web.View):
        async def get(self, request: web.Request, order_id: str) -> web.Response:
            return await api.get(request, order_id)

        async def patch(self, request: web.Request, order_id: str) -> web.Response:
            return await api.patch(request, order_id)

    @app.page("/orders/{order_id}/cancel")
    class CancelOrder(faust_web.View):
        async def post(self, request: web.Request, order_id: str) -> web.Response:
            return await api.cancel(request, order_id)

    @app.page("/orders/{order_id}/fulfill")
    class FulfillOrder(faust_web.View):
        async def post(self, request: web.Request, order_id: str) -> web.Response:
            return await api.fulfill(request, order_id)

    @app.page("/users/{user_id}/orders")
    class UserOrders(faust_web.View):
        async def get(self, request: web.Request, user_id: str) -> web.Response:
            return await api.user_orders_of(request, user_id)

    return api
