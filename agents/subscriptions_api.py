"""The subscription API on the worker's web server: ``create_subscription``, cancel, queries.

- ``POST /subscriptions`` ``{"user_id", "plan_id", "quantity"?, "payment_method"?,
  "trial_period_days"?, "email"?}`` (seed: ``create_subscription``): 201 with
  the subscription as Stripe created it.  First the synchronous checks (the
  seed's decision matrix), exactly as ``POST /orders`` makes them
  (:mod:`agents.client_checks`): the account service must know the user as
  active, and the product service must allow the user this plan
  (``validate_subscription``: plan_not_found, plan_inactive,
  already_subscribed); a refusal is 400 with the service's reason and
  nothing is sent to Stripe; a service that cannot answer is 503.  Then the
  user index's three commands, each awaited (:mod:`tables.subscription_index`):
  ``ensure_customer``, ``attach_payment_method`` (if given), ``create_subscription``.
- ``POST /subscriptions/{subscription_id}/cancel`` ``{"at_period_end": bool}``:
  200 with the subscription; now (default) or at the end of the paid period.
- ``GET /subscriptions/{subscription_id}``: the subscription as paystream
  knows it (404 if it does not).
- ``GET /users/{user_id}/subscriptions``: the summaries of the user index.

Idempotency-Key: for ``POST /subscriptions`` the caller is the body's
``user_id`` (the key is scoped to the user, as Stripe scopes it to the
account): the same key and parameters answer the subscription the first
request created, other parameters 422.  A request retried after a crash
between the three commands finds the customer (and card) its first attempt
made and creates the subscription once (the Stripe key derives from the
request).  Without a key every request is a new subscription.  For cancel the
subscription is the scope.  Answers otherwise are the kernel API's
(:mod:`streams.aggregate_api`).
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from agents.client_checks import checked, user_refused
from agents.subscriptions import SubscriptionService
from streams.aggregate_api import (
    AggregateApi,
    BadRequest,
    error,
    idempotency_key,
    json_body,
    router_of,
    serve,
)
from streams.routing import Router
from tables import aggregate, subscription_index
from tables.deadlines import now_ms

CREATE_FIELDS = frozenset({"user_id", "plan_id", "quantity", "payment_method",
                           "trial_period_days", "email"})
CANCEL_FIELDS = frozenset({"at_period_end"})


class SubscriptionApi(AggregateApi):
    """The handlers; the Faust views below only bind them to paths."""

    def __init__(self, app: Any, service: SubscriptionService, router: Router) -> None:
        super().__init__(app, router)
        self.service = service

    # POST /subscriptions -------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request)
            user_id = body.get("user_id")
            if not isinstance(user_id, str) or not user_id:
                raise BadRequest("user_id must be a non-empty string")
            idempotency_key(request)  # a malformed key is refused before the hop
        except BadRequest as exc:
            return error(400, "bad_request", str(exc))
        index = self.service.user_subscriptions
        return await self.owned(index, user_id, request,
                                lambda: self._create_here(body, request, user_id))

    async def _create_here(self, body: dict[str, Any], request: web.Request,
                           user_id: str) -> web.Response:
        unknown = sorted(set(body) - CREATE_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
        plan_id = body.get("plan_id")
        if not isinstance(plan_id, str) or not plan_id:
            raise BadRequest("plan_id must be a non-empty string")
        for name in ("payment_method", "email"):
            if name in body and (not isinstance(body[name], str) or not body[name]):
                raise BadRequest(f"{name} must be a non-empty string")
        for name in ("quantity", "trial_period_days"):
            value = body.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise BadRequest(f"{name} must be a positive integer")
        refused = await checked(lambda: self._checks(user_id, plan_id))
        if refused is not None:
            return refused
        return await self._subscribe(body, request, user_id)

    async def _checks(self, user_id: str, plan_id: str) -> web.Response | None:
        """The account and product services' verdicts (None: the user may subscribe)."""
        clients = self.app.clients
        refused = await user_refused(clients, user_id, "subscribe")
        if refused is not None:
            return refused
        verdict = await clients.product.validate_subscription(user_id, plan_id)
        if not verdict.valid:
            return error(400, verdict.reason or "invalid_plan",
                         f"user {user_id} may not subscribe to {plan_id}: {verdict.reason}")
        return None

    async def _subscribe(self, body: dict[str, Any], request: web.Request,
                         user_id: str) -> web.Response:
        """The index's commands in order; the first that is not a success is the answer."""
        index = self.service.user_subscriptions
        key = idempotency_key(request)
        common: dict[str, Any] = {}
        request_id = str(uuid.uuid4())
        if key is not None:
            fingerprint = aggregate.fingerprint("create_subscription", body)
            common = {"idempotency_key": key, "fingerprint": fingerprint}
            request_id = aggregate.derived_id("api-subscription", user_id, key, fingerprint)
        steps: list[tuple[str, dict[str, Any]]] = [
            ("ensure_customer", {k: body[k] for k in ("email",) if k in body})]
        if "payment_method" in body:
            steps.append(("attach_payment_method", {"payment_method": body["payment_method"]}))
        steps.append(("create_subscription", {k: body[k] for k in
                                              ("plan_id", "quantity", "trial_period_days")
                                              if body.get(k) is not None}))
        response: web.Response | None = None
        for verb, args in steps:
            record = aggregate.command(verb, "user_id", user_id, cause=None, now_ms=now_ms(),
                                       origin="api", command_id=f"{request_id}/{verb}",
                                       **args, **common)
            final = verb == "create_subscription"
            response = await self.command_on(index, record, success=201 if final else 200)
            if response.status >= 300:
                return response
        assert response is not None
        return response

    # /subscriptions/{subscription_id} --------------------------------------
    async def get(self, request: web.Request, subscription_id: str) -> web.Response:
        return await self.row_view(self.service.subscriptions, subscription_id, request,
                                   what=f"subscription {subscription_id}",
                                   missing=f"paystream knows no subscription {subscription_id}")

    async def cancel(self, request: web.Request, subscription_id: str) -> web.Response:
        subscriptions = self.service.subscriptions

        async def here() -> web.Response:
            body = await json_body(request)
            unknown = sorted(set(body) - CANCEL_FIELDS)
            if unknown:
                raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
            at_period_end = body.get("at_period_end", False)
            if not isinstance(at_period_end, bool):
                raise BadRequest("at_period_end must be true or false")
            record = self.keyed_command(subscriptions, "cancel", subscription_id, request,
                                        {"at_period_end": at_period_end})
            return await self.command_on(subscriptions, record)

        return await self.owned(subscriptions, subscription_id, request, here)

    # /users/{user_id}/subscriptions --------------------------------------------
    async def of_user(self, request: web.Request, user_id: str) -> web.Response:
        index = self.service.user_subscriptions

        async def here() -> web.Response:
            row = index.row(user_id)
            busy = self.not_readable(f"subscriptions of {user_id}") if row is None else None
            if busy is not None:
                return busy
            shown = [{k: v for k, v in s.items() if k != "version"}
                     for s in subscription_index.subscriptions_of(row)]
            return web.json_response({"user_id": user_id, "subscriptions": shown})

        return await self.owned(index, user_id, request, here)


def register(app: Any) -> SubscriptionApi:
    """Bind the subscription endpoints to the Faust app's web server (after ``agents.subscriptions``)."""
    api = SubscriptionApi(app, app.subscriptions, router_of(app))

    serve(app, {
        "/subscriptions": {"post": api.create},
        "/subscriptions/{subscription_id}": {"get": api.get},
        "/subscriptions/{subscription_id}/cancel": {"post": api.cancel},
        "/users/{user_id}/subscriptions": {"get": api.of_user},
    })
    return api
