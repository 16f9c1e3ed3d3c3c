"""The order API's pure parts, without a broker: keyed command records and the error mapping.

The handlers are driven with aiohttp's mocked requests and a stand-in for the
order aggregate (its real :class:`streams.routing.ReplyBook`, and a
``send_command`` that answers the way the kernel's driver does, or fails the
way the producer can).  What Kafka itself does is covered by
``tests/integration/test_order_api.py``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from agents import orders_api
from agents.orders_api import BadRequest, OrderApi
from streams import aggregate_api
from streams.routing import NotOwnerYet, ReplyBook
from tables import order_state
from tables.aggregate import Conflict, IdempotencyKeyReused, Invalid, NotFound

ORDER_ID = "ord-1"


class Orders:
    """The order aggregate as the API sees it: a reply book and ``send_command``."""

    def __init__(self, answer: Callable[[ReplyBook, dict[str, Any]], None] | None = None,
                 error: BaseException | None = None) -> None:
        self.table = SimpleNamespace(name="orders")
        self.flow = SimpleNamespace(name="orders", key_field="order_id")
        self.replies = ReplyBook()
        self.answer = answer
        self.error = error
        self.sent: list[dict[str, Any]] = []

    async def send_command(self, record: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append(record)
        if self.answer is not None:
            self.answer(self.replies, record)


class Router:
    """This worker owns every key, or no worker owns any (``error``)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    async def owner_response(self, table: Any, key: str, request: web.Request,
                             **kwargs: Any) -> web.Response | None:
        if self.error is not None:
            raise self.error
        return None


def api(orders: Orders | None = None, router: Router | None = None, *, rebalancing: bool = False) -> OrderApi:
    aggregate_ = orders or Orders()
    service = SimpleNamespace(orders=aggregate_, user_orders=aggregate_)
    return OrderApi(SimpleNamespace(rebalancing=rebalancing), service, router or Router())  # type: ignore[arg-type]


def request(method: str = "POST", path: str = f"/orders/{ORDER_ID}/cancel",
            key: str | None = None) -> web.Request:
    return make_mocked_request(method, path, headers={"Idempotency-Key": key} if key is not None else {})


def answer(response: web.Response) -> tuple[int, dict[str, Any]]:
    assert response.body is not None
    return response.status, json.loads(bytes(response.body))  # type: ignore[arg-type]


def resolve_with(view: Any) -> Callable[[ReplyBook, dict[str, Any]], None]:
    return lambda book, record: book.resolve(record["command_id"], view)


def fail_with(error: BaseException) -> Callable[[ReplyBook, dict[str, Any]], None]:
    return lambda book, record: book.fail(record["command_id"], error)


# ---------------------------------------------------------------------------
# Keyed command records


def test_a_keyed_command_has_an_id_derived_from_order_verb_and_key() -> None:
    handler = api()
    first = handler._command("cancel", ORDER_ID, request(key="k1"), {"reason": "OTHER"})
    retry = handler._command("cancel", ORDER_ID, request(key="k1"), {"reason": "OTHER"})
    assert first["command_id"] == retry["command_id"]
    assert first["args"]["idempotency_key"] == "k1"
    assert first["args"]["fingerprint"] == retry["args"]["fingerprint"]
    assert first["origin"] == "api"
    # Keys are scoped by the order and name one request (verb).
    assert handler._command("cancel", "ord-2", request(key="k1"), {"reason": "OTHER"})["command_id"] \
        != first["command_id"]
    assert handler._command("fulfill", ORDER_ID, request(key="k1"), {})["command_id"] \
        != first["command_id"]
    assert handler._command("cancel", ORDER_ID, request(key="k2"), {"reason": "OTHER"})["command_id"] \
        != first["command_id"]


def test_the_fingerprint_tells_parameters_apart_not_their_order() -> None:
    handler = api()

    def fingerprint(verb: str, args: dict[str, Any]) -> str:
        return str(handler._command(verb, ORDER_ID, request(key="k"), args)["args"]["fingerprint"])

    changes = {"items": [{"product_id": "a", "quantity": 1, "unit_amount": 5}], "metadata": {"x": "1"}}
    base = fingerprint("update", {"changes": changes})
    assert fingerprint("update", {"changes": dict(reversed(changes.items()))}) == base
    assert fingerprint("update", {"changes": {**changes, "metadata": {"x": "2"}}}) != base
    assert fingerprint("update", {"changes": {"metadata": {"x": "1"}}}) != base
    assert fingerprint("cancel", {"changes": changes}) != base


def test_an_unkeyed_command_is_a_new_request_every_time() -> None:
    handler = api()
    first = handler._command("cancel", ORDER_ID, request(), {})
    second = handler._command("cancel", ORDER_ID, request(), {})
    assert first["command_id"] != second["command_id"]
    uuid.UUID(first["command_id"])
    assert "idempotency_key" not in first["args"] and "fingerprint" not in first["args"]


@pytest.mark.parametrize("key", ["", "k" * (orders_api.MAX_IDEMPOTENCY_KEY_LENGTH + 1)])
def test_a_key_of_the_wrong_length_is_a_bad_request(key: str) -> None:
    with pytest.raises(BadRequest, match="Idempotency-Key"):
        api()._command("cancel", ORDER_ID, request(key=key), {})


def test_the_longest_key_is_taken() -> None:
    key = "k" * orders_api.MAX_IDEMPOTENCY_KEY_LENGTH
    assert api()._command("cancel", ORDER_ID, request(key=key), {})["args"]["idempotency_key"] == key


# ---------------------------------------------------------------------------
# The aggregate's verdict -> the HTTP answer


@pytest.mark.parametrize(("refusal", "status", "code"), [
    (order_state.InvalidCommand("reason must be one of ...", order_id=ORDER_ID), 400, "invalid"),
    (Invalid("unknown command"), 400, "invalid"),
    (order_state.OrderNotFound(ORDER_ID, "cancel"), 404, "not_found"),
    (NotFound("no such order"), 404, "not_found"),
    (order_state.IllegalTransition(ORDER_ID, order_state.OrderStatus.CANCELED, "cancel"), 409,
     "illegal_transition"),
    (Conflict("state forbids it"), 409, "illegal_transition"),
    (IdempotencyKeyReused("key used with other parameters"), 422, "idempotency_key_reused"),
])
async def test_a_refusal_is_answered_with_its_status_and_code(
    refusal: Exception, status: int, code: str
) -> None:
    orders = Orders(answer=fail_with(refusal))
    handler = api(orders)
    record = handler._command("cancel", ORDER_ID, request(key="k"), {})
    got = answer(await handler.command(record))
    assert got == (status, {"error": code, "message": str(refusal)})
    assert record["command_id"] not in orders.replies


async def test_an_applied_command_answers_the_view_with_the_success_status() -> None:
    view = {"order_id": ORDER_ID, "status": "CANCELED"}
    handler = api(Orders(answer=resolve_with(view)))
    record = handler._command("cancel", ORDER_ID, request(), {})
    assert answer(await handler.command(record)) == (200, view)
    assert answer(await handler.command({**record, "command_id": "c2"}, success=201)) == (201, view)


async def test_a_command_answered_without_an_order_is_not_found() -> None:
    handler = api(Orders(answer=resolve_with(None)))
    status, body = answer(await handler.command(handler._command("cancel", ORDER_ID, request(), {})))
    assert (status, body["error"]) == (404, "not_found")


async def test_no_answer_in_time_is_504_with_the_command_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregate_api, "COMMAND_TIMEOUT", 0.01)
    orders = Orders()  # sent, never answered
    handler = api(orders)
    record = handler._command("cancel", ORDER_ID, request(key="k"), {})
    status, body = answer(await handler.command(record))
    assert (status, body["error"], body["command_id"]) == (504, "timeout", record["command_id"])
    assert orders.sent == [record]
    assert record["command_id"] not in orders.replies


@pytest.mark.parametrize("error", [KafkaTimeoutError(), KafkaConnectionError("broker down"),
                                   TimeoutError(), ConnectionResetError()])
async def test_a_command_kafka_did_not_take_is_503_with_the_command_id(error: BaseException) -> None:
    orders = Orders(error=error)
    handler = api(orders)
    record = handler._command("cancel", ORDER_ID, request(key="k"), {})
    response = await handler.command(record)
    status, body = answer(response)
    assert (status, body["error"], body["command_id"]) == (503, "unavailable", record["command_id"])
    assert response.headers["Retry-After"] == orders_api.RETRY_AFTER
    assert record["command_id"] not in orders.replies


async def test_a_bug_in_sending_is_not_answered_as_a_refusal() -> None:
    handler = api(Orders(error=RuntimeError("bug")))
    record = handler._command("cancel", ORDER_ID, request(), {})
    with pytest.raises(RuntimeError, match="bug"):
        await handler.command(record)
    assert record["command_id"] not in handler.orders.replies


# ---------------------------------------------------------------------------
# Routing and everything around the handler


async def owned(handler: OrderApi, here: Callable[[], Awaitable[web.Response]]) -> web.Response:
    return await handler.owned(handler.orders, ORDER_ID, request(method="GET", path=f"/orders/{ORDER_ID}"),
                               here)


async def ok() -> web.Response:
    return web.json_response({"here": True})


async def test_a_key_nobody_serves_is_503_with_retry_after() -> None:
    response = await owned(api(router=Router(NotOwnerYet("no worker owns orders['ord-1'] yet"))), ok)
    status, body = answer(response)
    assert (status, body["error"]) == (503, "unavailable")
    assert response.headers["Retry-After"] == orders_api.RETRY_AFTER


async def test_the_owner_answers_here() -> None:
    assert answer(await owned(api(), ok)) == (200, {"here": True})


async def test_a_bad_request_is_400() -> None:
    async def bad() -> web.Response:
        raise BadRequest("body is not JSON")

    assert answer(await owned(api(), bad)) == (400, {"error": "bad_request", "message": "body is not JSON"})


@pytest.mark.parametrize("error", [KafkaTimeoutError(), KafkaConnectionError("x"), ConnectionRefusedError()])
async def test_a_transient_failure_is_503(error: BaseException) -> None:
    async def failing() -> web.Response:
        raise error

    response = await owned(api(), failing)
    assert response.status == 503 and response.headers["Retry-After"] == orders_api.RETRY_AFTER


async def test_any_failure_while_partitions_move_is_503_and_a_bug_otherwise_is_raised() -> None:
    async def failing() -> web.Response:
        raise KeyError("partition not assigned here")

    response = await owned(api(rebalancing=True), failing)
    assert response.status == 503 and response.headers["Retry-After"] == orders_api.RETRY_AFTER
    with pytest.raises(KeyError):
        await owned(api(rebalancing=False), failing)
