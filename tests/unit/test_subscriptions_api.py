"""The subscription API without a broker: its checks, its command sequence and its error mapping.

The handlers are driven with aiohttp's mocked requests, a stand-in for each
aggregate (its real :class:`streams.routing.ReplyBook` and a ``send_command``
that answers the way the kernel's driver does), and stand-ins of the account
and product clients answering with the clients' own verdict models and
errors.  What Kafka, Stripe and the services really do is covered by
``tests/integration/test_subscription_flow.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from agents.subscriptions_api import SubscriptionApi
from connectors.clients import NotFound as ClientNotFound
from connectors.clients import ServiceUnavailable
from connectors.clients.spec import SubscriptionValidation, UserValidation
from streams import aggregate_api
from streams.routing import ReplyBook
from tables import aggregate
from tables.aggregate import Conflict, IdempotencyKeyReused

USER = "u-1"
SUB = "sub_1"
VIEW = {"subscription_id": SUB, "status": "active", "plan_id": "plan-basic"}

Answer = Callable[[dict[str, Any]], Any]


class Aggregate:
    """An aggregate as the API sees it; ``answers`` by verb: a view, or an exception to fail with."""

    def __init__(self, name: str, key_field: str, answers: dict[str, Any] | None = None,
                 row: Any = None) -> None:
        self.table = SimpleNamespace(name=name)
        self.flow = SimpleNamespace(name=name, key_field=key_field, view=lambda row: {"row": row})
        self.replies = ReplyBook()
        self.answers = answers or {}
        self.sent: list[dict[str, Any]] = []
        self._row = row

    async def send_command(self, record: dict[str, Any]) -> None:
        self.sent.append(record)
        given = self.answers.get(record["command"])
        if isinstance(given, BaseException):
            self.replies.fail(record["command_id"], given)
        elif given is not None:
            self.replies.resolve(record["command_id"], given)

    def row(self, key: str) -> Any:
        return self._row

    @property
    def verbs(self) -> list[str]:
        return [r["command"] for r in self.sent]


class Router:
    async def owner_response(self, table: Any, key: str, request: web.Request,
                             **kwargs: Any) -> web.Response | None:
        return None


class Clients:
    """The account and product clients: verdicts, or a client error to raise."""

    def __init__(self, user: UserValidation | BaseException | None = None,
                 plan: SubscriptionValidation | BaseException | None = None) -> None:
        self.calls: list[str] = []
        user_verdict = user or UserValidation(user_id=USER, valid=True, status="active")
        plan_verdict = plan or SubscriptionValidation(user_id=USER, plan_id="plan-basic", valid=True)

        async def validate_user(user_id: str) -> UserValidation:
            self.calls.append("validate_user")
            if isinstance(user_verdict, BaseException):
                raise user_verdict
            return user_verdict

        async def validate_subscription(user_id: str, plan_id: str) -> SubscriptionValidation:
            self.calls.append("validate_subscription")
            if isinstance(plan_verdict, BaseException):
                raise plan_verdict
            return plan_verdict

        self.account = SimpleNamespace(validate_user=validate_user)
        self.product = SimpleNamespace(validate_subscription=validate_subscription)


CREATED = {"ensure_customer": {"user_id": USER, "customer_id": "cus_1"},
           "attach_payment_method": {"customer_id": "cus_1", "payment_method": "pm_card_visa"},
           "create_subscription": VIEW}


def api(index: Aggregate | None = None, subscriptions: Aggregate | None = None,
        clients: Clients | None = None, *, rebalancing: bool = False) -> SubscriptionApi:
    service = SimpleNamespace(
        user_subscriptions=index or Aggregate("user-subscriptions", "user_id", dict(CREATED)),
        subscriptions=subscriptions or Aggregate("subscriptions", "subscription_id"))
    app = SimpleNamespace(rebalancing=rebalancing, clients=clients or Clients())
    return SubscriptionApi(app, service, Router())  # type: ignore[arg-type]


def request(body: Any, path: str = "/subscriptions", key: str | None = None,
            method: str = "POST") -> web.Request:
    req = make_mocked_request(method, path, headers={"Idempotency-Key": key} if key else {})
    req._read_bytes = json.dumps(body).encode()  # what request.read() returns
    return req


def answer(response: web.Response) -> tuple[int, dict[str, Any]]:
    assert response.body is not None
    return response.status, json.loads(bytes(response.body))  # type: ignore[arg-type]


BODY = {"user_id": USER, "plan_id": "plan-basic", "payment_method": "pm_card_visa"}


# ---------------------------------------------------------------------------
# POST /subscriptions


async def test_a_subscription_is_three_commands_in_order_then_201() -> None:
    handler = api()
    status, body = answer(await handler.create(request(BODY)))
    assert (status, body) == (201, VIEW)
    index = handler.service.user_subscriptions
    assert index.verbs == ["ensure_customer", "attach_payment_method", "create_subscription"]
    assert all(r["origin"] == "api" and r["user_id"] == USER for r in index.sent)
    assert index.sent[1]["args"]["payment_method"] == "pm_card_visa"
    assert index.sent[2]["args"] == {"plan_id": "plan-basic"}
    assert handler.app.clients.calls == ["validate_user", "validate_subscription"]


async def test_without_a_payment_method_nothing_is_attached() -> None:
    handler = api()
    body = {"user_id": USER, "plan_id": "plan-basic", "quantity": 3}
    assert (await handler.create(request(body))).status == 201
    index = handler.service.user_subscriptions
    assert index.verbs == ["ensure_customer", "create_subscription"]
    assert index.sent[1]["args"] == {"plan_id": "plan-basic", "quantity": 3}


async def test_a_keyed_request_retried_sends_the_same_commands() -> None:
    first, second = api(), api()
    await first.create(request(BODY, key="k1"))
    await second.create(request(BODY, key="k1"))
    ids = [r["command_id"] for r in first.service.user_subscriptions.sent]
    assert ids == [r["command_id"] for r in second.service.user_subscriptions.sent]
    fingerprint = aggregate.fingerprint("create_subscription", BODY)
    assert ids[0] == aggregate.derived_id("api-subscription", USER, "k1", fingerprint) + "/ensure_customer"
    assert all(r["args"]["idempotency_key"] == "k1" and r["args"]["fingerprint"] == fingerprint
               for r in first.service.user_subscriptions.sent)
    other = api()
    await other.create(request({**BODY, "plan_id": "plan-pro"}, key="k1"))
    assert other.service.user_subscriptions.sent[0]["command_id"] != ids[0]


@pytest.mark.parametrize(("body", "message"), [
    ({"plan_id": "plan-basic"}, "user_id"),
    ({"user_id": USER}, "plan_id"),
    ({**BODY, "coupon": "x"}, "unknown field"),
    ({**BODY, "quantity": 0}, "quantity"),
    ({**BODY, "quantity": True}, "quantity"),
    ({**BODY, "trial_period_days": "7"}, "trial_period_days"),
    ({**BODY, "payment_method": ""}, "payment_method"),
    ([1, 2], "JSON object"),
])
async def test_a_malformed_request_is_400_and_nothing_is_checked_or_sent(body: Any, message: str) -> None:
    handler = api()
    status, answered = answer(await handler.create(request(body)))
    assert (status, answered["error"]) == (400, "bad_request") and message in answered["message"]
    assert handler.service.user_subscriptions.sent == [] and handler.app.clients.calls == []


@pytest.mark.parametrize(("clients", "code"), [
    (Clients(user=UserValidation(user_id=USER, valid=False, reason="user_disabled")), "user_disabled"),
    (Clients(user=ClientNotFound("no user", service="account", method="validate_user",
                                 code="user_not_found")), "user_not_found"),
    (Clients(plan=SubscriptionValidation(user_id=USER, plan_id="plan-legacy", valid=False,
                                         reason="plan_inactive")), "plan_inactive"),
    (Clients(plan=SubscriptionValidation(user_id=USER, plan_id="plan-basic", valid=False,
                                         reason="already_subscribed")), "already_subscribed"),
])
async def test_a_refused_user_or_plan_is_400_with_the_reason_and_nothing_is_sent(
        clients: Clients, code: str) -> None:
    handler = api(clients=clients)
    status, body = answer(await handler.create(request(BODY)))
    assert (status, body["error"]) == (400, code)
    assert handler.service.user_subscriptions.sent == []


async def test_a_refused_user_is_not_asked_about_the_plan() -> None:
    clients = Clients(user=UserValidation(user_id=USER, valid=False, reason="user_deleted"))
    await api(clients=clients).create(request(BODY))
    assert clients.calls == ["validate_user"]


async def test_a_service_that_cannot_answer_is_503_and_nothing_is_sent() -> None:
    down = ServiceUnavailable("breaker open", service="product", method="validate_subscription",
                              code="circuit_open")
    handler = api(clients=Clients(plan=down))
    response = await handler.create(request(BODY))
    status, body = answer(response)
    assert (status, body["error"]) == (503, "unavailable")
    assert response.headers["Retry-After"] == aggregate_api.RETRY_AFTER
    assert handler.service.user_subscriptions.sent == []


async def test_a_refused_step_is_the_answer_and_later_steps_are_not_sent() -> None:
    index = Aggregate("user-subscriptions", "user_id", {
        **CREATED, "attach_payment_method": Conflict("Stripe refused payment method: card_declined")})
    status, body = answer(await api(index).create(request(BODY)))
    assert (status, body["error"]) == (409, "illegal_transition") and "card_declined" in body["message"]
    assert index.verbs == ["ensure_customer", "attach_payment_method"]


async def test_a_reused_key_is_422() -> None:
    index = Aggregate("user-subscriptions", "user_id", {
        "ensure_customer": IdempotencyKeyReused("Idempotency-Key 'k1' was used with other parameters")})
    status, body = answer(await api(index).create(request(BODY, key="k1")))
    assert (status, body["error"]) == (422, "idempotency_key_reused")
    assert index.verbs == ["ensure_customer"]


async def test_a_step_not_answered_in_time_is_504(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregate_api, "COMMAND_TIMEOUT", 0.01)
    index = Aggregate("user-subscriptions", "user_id", {"ensure_customer": CREATED["ensure_customer"]})
    status, body = answer(await api(index).create(request(BODY, key="k")))
    assert (status, body["error"]) == (504, "timeout")
    assert body["command_id"].endswith("/attach_payment_method")


# ---------------------------------------------------------------------------
# cancel and the queries


async def test_cancel_sends_a_keyed_cancel_command() -> None:
    subscriptions = Aggregate("subscriptions", "subscription_id", {"cancel": {**VIEW, "status": "canceled"}})
    handler = api(subscriptions=subscriptions)
    path = f"/subscriptions/{SUB}/cancel"
    status, body = answer(await handler.cancel(request({"at_period_end": True}, path, key="c1"), SUB))
    assert status == 200 and body["status"] == "canceled"
    (record,) = subscriptions.sent
    assert record["subscription_id"] == SUB and record["args"]["at_period_end"] is True
    assert record["command_id"] == aggregate.derived_id("api", SUB, "cancel", "c1",
                                                        record["args"]["fingerprint"])


@pytest.mark.parametrize("body", [{"at_period_end": "yes"}, {"now": True}])
async def test_a_malformed_cancel_is_400(body: dict[str, Any]) -> None:
    handler = api()
    status, answered = answer(await handler.cancel(request(body, f"/subscriptions/{SUB}/cancel"), SUB))
    assert (status, answered["error"]) == (400, "bad_request")
    assert handler.service.subscriptions.sent == []


async def test_cancel_of_a_subscription_over_is_409() -> None:
    subscriptions = Aggregate("subscriptions", "subscription_id",
                              {"cancel": Conflict("subscription sub_1 is canceled: nothing to cancel")})
    status, body = answer(await api(subscriptions=subscriptions).cancel(
        request({}, f"/subscriptions/{SUB}/cancel"), SUB))
    assert (status, body["error"]) == (409, "illegal_transition")


async def test_get_of_an_unknown_subscription_is_404_and_503_while_partitions_move() -> None:
    get = request(None, f"/subscriptions/{SUB}", method="GET")
    status, body = answer(await api().get(get, SUB))
    assert (status, body["error"]) == (404, "not_found")
    assert (await api(rebalancing=True).get(get, SUB)).status == 503
    known = api(subscriptions=Aggregate("subscriptions", "subscription_id", row="the-row"))
    assert answer(await known.get(get, SUB)) == (200, {"row": "the-row"})


async def test_a_users_subscriptions_are_the_index_summaries_without_versions() -> None:
    row = {"subscriptions": {SUB: {"subscription_id": SUB, "status": "active", "version": 3,
                                   "created_at_ms": 1}}, "applied": []}
    handler = api(index=Aggregate("user-subscriptions", "user_id", row=row))
    status, body = answer(await handler.of_user(request(None, f"/users/{USER}/subscriptions",
                                                        method="GET"), USER))
    assert status == 200
    assert body == {"user_id": USER, "subscriptions": [{"subscription_id": SUB, "status": "active",
                                                        "created_at_ms": 1}]}
    empty = api()
    status, body = answer(await empty.of_user(request(None, method="GET"), USER))
    assert (status, body["subscriptions"]) == (200, [])
