"""The order API on the worker's web server (command and query side).

Every request is answered by the worker that owns the order's partition
(:func:`streams.routing.owner_response` forwards it, body included): reads
come from that worker's table, and commands go to the order agent there,
whose verdict the handler awaits, so a client gets 201/200, 400, 404 or 409
rather than "accepted, look later".
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from faust import web as faust_web

from streams.routing import NotOwnerYet, owner_response
from tables import order_state
from tables.deadlines import now_ms

if TYPE_CHECKING:
    from agents.orders import OrderService

#: How long a request waits for the order agent before answering 504.
COMMAND_TIMEOUT = 15.0
CREATE_FIELDS = frozenset({"user_id", "order_type", "items", "currency", "total_amount",
                           "payment_window_seconds"})
REQUIRED_CREATE_FIELDS = ("user_id", "order_type", "items", "currency")
#: The order id the first worker chose, forwarded to the owning worker.
ORDER_ID_HEADER = "X-Paystream-Order-Id"


class BadRequest(Exception):
    """The request is not what the endpoint takes (400)."""


def _error(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "message": message, **extra}, status=status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _rejection(error: Exception) -> web.Response:
    if isinstance(error, order_state.OrderNotFound):
        return _error(404, "not_found", str(error))
    if isinstance(error, order_state.IllegalTransition):
        return _error(409, "illegal_transition", str(error))
    return _error(400, "invalid", str(error))


class OrderApi:
    """The handlers; the Faust views below only bind them to paths."""

    def __init__(self, app: Any, service: OrderService) -> None:
        self.app = app
        self.service = service

    async def owned(
        self,
        table: Any,
        key: str,
        request: web.Request,
        handler: Callable[[], Awaitable[web.Response]],
        extra_headers: dict[str, str] | None = None,
    ) -> web.Response:
        """Answer on the owner of ``table[key]``; map errors to JSON answers."""
        try:
            routed = await owner_response(self.app, table, key, request, extra_headers=extra_headers)
            return routed if routed is not None else await handler()
        except BadRequest as exc:
            return _error(400, "bad_request", str(exc))
        except NotOwnerYet as exc:
            return _error(503, "unavailable", str(exc))

    async def command(self, command: dict[str, Any], *, success: int = 200) -> web.Response:
        """Send a command to the order agent here and answer with its verdict."""
        from agents.orders import CommandRejected

        replies = self.service.replies
        future = replies.expect(command["command_id"])
        await self.service.commands.send(key=command["order_id"], value=command)
        try:
            order = await replies.wait(command["command_id"], future, COMMAND_TIMEOUT)
        except CommandRejected as rejected:
            return _rejection(rejected.error)
        except TimeoutError:
            return _error(504, "timeout", "the order agent did not answer in time; the command "
                          "may still be applied", command_id=command["command_id"])
        if order is None:
            return _error(404, "not_found", f"order {command['order_id']} does not exist")
        return web.json_response(order_state.order_view(order), status=success)

    # POST /orders -----------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        order_id = request.headers.get(ORDER_ID_HEADER) or self._new_order_id(request)
        return await self.owned(
            self.service.orders, order_id, request,
            lambda: self._create_here(request, order_id), {ORDER_ID_HEADER: order_id},
        )

    @staticmethod
    def _new_order_id(request: web.Request) -> str:
        # An Idempotency-Key makes a retried POST find the order it created.
        key = request.headers.get("Idempotency-Key")
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"paystream/order/{key}")) if key else str(uuid.uuid4())

    async def _create_here(self, request: web.Request, order_id: str) -> web.Response:
        from agents.orders import derived_id, make_command

        body = await _json_body(request)
        unknown = sorted(set(body) - CREATE_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
        missing = [name for name in REQUIRED_CREATE_FIELDS if name not in body]
        if missing:
            raise BadRequest(f"missing field(s): {', '.join(missing)}")
        args = {name: body[name] for name in REQUIRED_CREATE_FIELDS}
        args["total_amount"] = body["total_amount"] if "total_amount" in body else _items_total(body)
        window = body.get("payment_window_seconds")
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, (int, float)) or window <= 0:
                raise BadRequest("payment_window_seconds must be a positive number")
            args["expires_at"] = now_ms() + int(window * 1000)
        command = make_command("create", order_id, cause=None,
                               command_id=derived_id("api-create", order_id), **args)
        return await self.command(command, success=201)

    # /orders/{order_id} -------------------------------------------------
    async def get(self, request: web.Request, order_id: str) -> web.Response:
        async def here() -> web.Response:
            row = self.service.orders.get(order_id)
            if row is None:
                return _error(404, "not_found", f"order {order_id} does not exist")
            return web.json_response(order_state.order_view(order_state.Order.from_dict(row)))

        return await self.owned(self.service.orders, order_id, request, here)

    async def patch(self, request: web.Request, order_id: str) -> web.Response:
        from agents.orders import make_command

        async def here() -> web.Response:
            body = await _json_body(request)
            if not body:
                raise BadRequest("nothing to change")
            return await self.command(make_command("update", order_id, cause=None, changes=body))

        return await self.owned(self.service.orders, order_id, request, here)

    async def cancel(self, request: web.Request, order_id: str) -> web.Response:
        from agents.orders import make_command

        async def here() -> web.Response:
            body = await _json_body(request)
            args = {k: body[k] for k in ("reason", "detail") if body.get(k) is not None}
            return await self.command(make_command("cancel", order_id, cause=None, **args))

        return await self.owned(self.service.orders, order_id, request, here)

    async def fulfill(self, request: web.Request, order_id: str) -> web.Response:
        from agents.orders import make_command

        async def here() -> web.Response:
            body = await _json_body(request)
            details = body.get("fulfillment_details", {})
            return await self.command(
                make_command("fulfill", order_id, cause=None, fulfillment_details=details)
            )

        return await self.owned(self.service.orders, order_id, request, here)

    # /users/{user_id}/orders ----------------------------------------------
    async def user_orders(self, request: web.Request, user_id: str) -> web.Response:
        async def here() -> web.Response:
            row = self.service.user_orders.get(user_id) or {}
            orders = sorted(
                ({k: v for k, v in s.items() if k != "version"}
                 for s in row.get("orders", {}).values()),
                key=lambda s: (s.get("created_at_ms") or 0, s["order_id"]),
            )
            return web.json_response({"user_id": user_id, "orders": orders})

        return await self.owned(self.service.user_orders, user_id, request, here)


def _items_total(body: dict[str, Any]) -> Any:
    try:
        return sum(int(i["unit_amount"]) * int(i["quantity"]) for i in body["items"])
    except (TypeError, KeyError, ValueError) as exc:
        raise BadRequest("items must be a list of {product_id, quantity, unit_amount}") from exc


def register_routes(app: Any, service: OrderService) -> OrderApi:
    """Bind the order endpoints to the Faust app's web server."""
    api = OrderApi(app, service)

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
            return await api.user_orders(request, user_id)

    return api
