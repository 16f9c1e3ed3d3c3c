"""The order API on the worker's web server (command and query side).

Every request is answered by the worker that owns the order's partition
(:class:`streams.routing.Router` forwards it, body included): reads come from
that worker's table, and commands go to the order aggregate there, whose
verdict the handler awaits.  The answers (2xx, the domain's refusals
400/404/409/422, 500 ``failed``, 503 with ``Retry-After``, 504 ``timeout``)
are the kernel API's, :mod:`streams.aggregate_api`.

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

import uuid
from typing import Any

from aiohttp import web

from agents.client_checks import checked, user_refused
from agents.orders import OrderService
from streams.aggregate_api import (
    IDEMPOTENCY_HEADER,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    RETRY_AFTER,
    AggregateApi,
    BadRequest,
    error,
    idempotency_key,
    json_body,
    router_of,
    serve,
    unavailable,
)
from streams.kernel import Aggregate
from streams.routing import Router
from tables import aggregate, order_index, order_state
from tables.deadlines import now_ms
from tables.order_state import WALLET

__all__ = ["IDEMPOTENCY_HEADER", "MAX_IDEMPOTENCY_KEY_LENGTH", "RETRY_AFTER", "BadRequest",
           "OrderApi", "register"]

CREATE_FIELDS = frozenset({"user_id", "order_type", "items", "currency", "total_amount",
                           "payment_window_seconds", "payment_method"})
REQUIRED_CREATE_FIELDS = ("user_id", "order_type", "items", "currency")
#: The order id the first worker chose for a create without Idempotency-Key,
#: forwarded to the owning worker.
ORDER_ID_HEADER = "X-Paystream-Order-Id"

_error, _json_body, _idempotency_key = error, json_body, idempotency_key
_unavailable = unavailable


class OrderApi(AggregateApi):
    """The handlers; the Faust views below only bind them to paths."""

    def __init__(self, app: Any, service: OrderService, router: Router) -> None:
        super().__init__(app, router)
        self.orders: Aggregate = service.orders
        self.user_orders: Aggregate = service.user_orders

    async def command(self, record: dict[str, Any], *, success: int = 200) -> web.Response:
        """Send a command to the order aggregate here and answer with its verdict."""
        return await self.command_on(self.orders, record, success=success)

    def _command(
        self, verb: str, order_id: str, request: web.Request, args: dict[str, Any]
    ) -> dict[str, Any]:
        return self.keyed_command(self.orders, verb, order_id, request, args)

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
        refused = await self._checked(record, body.get("payment_method"), key)
        if refused is not None:
            return refused
        return await self.command(record, success=201)

    async def _checked(self, record: dict[str, Any], payment_method: Any,
                       key: str | None) -> web.Response | None:
        """The synchronous checks of a new order (the seed's decision matrix): None when it may go on.

        Before anything is published: the account service must know the user
        as active; a storage upgrade needs a user the storage service knows; an
        order paid with wallet credits needs the balance, and the credits are
        deducted here, under a key derived from the order, so a retried request
        (same Idempotency-Key, same order id) deducts once.  A service that
        cannot answer is 503 with Retry-After: no order is created half-checked.
        The create command ``record`` gains the wallet transaction that paid
        the order; it is checked by the order's own rules first, so no credits
        are taken for an order the aggregate would refuse.  A SIGKILL between
        the deduction and the command's ack leaves credits taken and no order
        until the client retries under its Idempotency-Key (required here for
        that reason): the replayed deduction answers the same transaction and
        the order is created, paid once.
        """
        return await checked(lambda: self._checks(record, payment_method, key))

    async def _checks(self, record: dict[str, Any], payment_method: Any,
                      key: str | None) -> web.Response | None:
        clients = self.app.clients
        args, order_id = record["args"], record["order_id"]
        user_id = str(args["user_id"])
        refused = await user_refused(clients, user_id, "order")
        if refused is not None:
            return refused
        if args.get("order_type") == "STORAGE_UPGRADE":
            await clients.storage.validate_quota(user_id, 0)  # NotFound: no storage to upgrade
        if payment_method is not None:
            if payment_method != WALLET:
                raise BadRequest(f"payment_method must be {WALLET!r} or absent (a card)")
            if key is None:
                raise BadRequest(f"an order paid with wallet credits needs an {IDEMPOTENCY_HEADER}: "
                                 "a retry without one could deduct twice")
            window_ms = int(self.app.settings.order_payment_window_seconds * 1000)
            dry_run = {**aggregate.command_message(record, "order_id"),
                       "payment_method": WALLET, "wallet_transaction_id": "not-yet"}
            order_state.create(None, dry_run, now_ms(), window_ms)  # a Refusal: take nothing
            # No balance read first: a retry of a paid order (same key) would find
            # the balance already lowered by its own deduction; the deduction,
            # replayed under its key, answers what it did, and refuses when short.
            paid = await clients.wallet.deduct_credits(
                user_id, int(args["total_amount"]), str(args["currency"]), reason="order",
                idempotency_key=aggregate.derived_id("wallet-order", order_id), reference_id=order_id)
            args.update(payment_method=WALLET, wallet_transaction_id=paid.transaction_id)
        return None

    # /orders/{order_id} -------------------------------------------------
    async def get(self, request: web.Request, order_id: str) -> web.Response:
        return await self.row_view(self.orders, order_id, request, what=f"order {order_id}",
                                   missing=f"order {order_id} does not exist")

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
            busy = self.not_readable(f"orders of {user_id}") if row is None else None
            if busy is not None:
                return busy
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
    api = OrderApi(app, app.orders, router_of(app))

    serve(app, {
        "/orders": {"post": api.create},
        "/orders/{order_id}": {"get": api.get, "patch": api.patch},
        "/orders/{order_id}/cancel": {"post": api.cancel},
        "/orders/{order_id}/fulfill": {"post": api.fulfill},
        "/users/{user_id}/orders": {"get": api.user_orders_of},
    })
    return api
