"""Stand-ins for the seed's external services, for the local run and the tests (dev tooling only).

Small in-memory aiohttp servers for account, wallet, billing, product,
notification, payment and storage.  They route, validate and answer from
the same spec the clients read (:mod:`connectors.clients.spec`): every
endpoint of a service is served at its path and method, requests that do not
fit the spec are answered 400 ``invalid_request``, answers are built from
the spec's response models, refusals are ``{"error": {"code", "message"}}``.

Keyed POSTs behave as the spec promises: a POST without ``Idempotency-Key``
is answered 400 ``idempotency_key_required``; the same key with the same
request gets the first answer again (no second debit), with another request
422 ``idempotency_key_reused``.  Injected failures are not remembered under
the key, so a retry after one is processed.

Seeded data (:func:`seeded_world`; amounts in cents, EUR):

- users ``u-demo`` (active, basic), ``u-pro`` (active, pro, subscribed to
  ``plan-pro``), ``u-empty`` (active, basic, empty wallet), ``u-disabled``
  (disabled), ``u-deleted`` (deleted);
- wallets: u-demo 10000, u-pro 250000, u-empty 0, u-disabled 5000;
- plans ``plan-basic`` (999/month, 10 GiB), ``plan-pro`` (2999/month,
  100 GiB), ``plan-legacy`` (499/month, inactive);
- storage: u-demo 2 of 10 GiB, u-pro 95 of 100 GiB, u-empty 0 of 10 GiB;
- payment intent ``pi_standin_paid`` (succeeded, order ``o-paid``).

Control endpoints, on every stand-in's port:

- ``GET /_standin/health`` -> ``{"service", "ok"}``;
- ``GET /_standin/received[?method=<name>]`` -> ``{"requests": [...]}``,
  each ``{method, http_method, path, query, idempotency_key, body, status}``
  (``status`` is ``"dropped"`` for a dropped connection);
  ``DELETE /_standin/received`` forgets them;
- ``GET /_standin/state`` -> the shared world as JSON (users, wallets,
  transactions, plans, subscriptions, billing_records, notifications,
  payment_intents, storage): what was done, once per key, as opposed to
  what was received;
- ``POST /_standin/fail`` ``{"mode": "error"|"slow"|"drop"|"ok", "status":
  503, "delay_seconds": 5, "times": null, "methods": null,
  "retry_after": null}``: answer ``status`` (with ``Retry-After`` when
  given) / wait ``delay_seconds`` then answer normally / close the
  connection without an answer, for the next ``times`` requests (null: until
  told ``"ok"``) of ``methods`` (null: all); ``DELETE /_standin/fail``
  clears;
- ``POST /_standin/reset``: the seeded data again, nothing received, no failure;
- ``POST /_standin/seed`` ``{"users": [User], "wallets": [Wallet], "plans":
  [Plan], "storage": [StorageUsage]}``: add or replace entries (tests seed
  their own users).

A refused connection is a stopped stand-in: :meth:`Standins.stop_service`
and :meth:`Standins.start_service` (same port).

Run them all, each on the port of its ``<SERVICE>_SERVICE_URL``::

    python -m streams.devtools.standins          # or run(settings) from the CLI
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from connectors.clients import spec
from connectors.clients.spec import (
    IDEMPOTENCY_HEADER,
    Endpoint,
    ErrorBody,
    ErrorDetail,
    Model,
    SpecError,
)
from streams.settings import Settings

GIB = 1024**3
STANDIN_SERVICES: tuple[str, ...] = tuple(spec.SERVICES)


class StandinError(Exception):
    """A refusal the stand-in answers: ``status`` and the spec's error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# ----------------------------------------------------------------------
# The data


@dataclass
class World:
    """Everything the stand-ins know, in memory."""

    users: dict[str, spec.User] = field(default_factory=dict)
    payment_methods: dict[str, list[spec.PaymentMethod]] = field(default_factory=dict)
    wallets: dict[str, spec.Wallet] = field(default_factory=dict)
    transactions: list[spec.WalletTransaction] = field(default_factory=list)
    plans: dict[str, spec.Plan] = field(default_factory=dict)
    subscriptions: set[tuple[str, str]] = field(default_factory=set)
    billing: list[spec.BillingRecord] = field(default_factory=list)
    notifications: list[dict[str, Any]] = field(default_factory=list)
    intents: dict[str, spec.PaymentIntent] = field(default_factory=dict)
    storage: dict[str, spec.StorageUsage] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    #: Every user id nobody seeded is an active basic user with an empty 10 GiB
    #: storage (no wallet): for pipelines whose tests invent their users.
    open_accounts: bool = False

    def user(self, user_id: str) -> spec.User | None:
        user = self.users.get(user_id)
        if user is None and self.open_accounts:
            user = self.users[user_id] = spec.User(
                user_id=user_id, status="active", tier="basic", email=f"{user_id}@example.test",
                name=user_id, created_at="2026-01-01T00:00:00Z")
            self.storage.setdefault(user_id, spec.StorageUsage(user_id=user_id, used_bytes=0,
                                                               quota_bytes=10 * GIB))
        return user

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self.ids):06d}"

    def to_json(self) -> dict[str, Any]:
        """Everything, as JSON (``GET /_standin/state``): what the services did, not what they were asked."""
        return {
            "users": [u.to_json() for u in self.users.values()],
            "wallets": [w.to_json() for w in self.wallets.values()],
            "transactions": [t.to_json() for t in self.transactions],
            "plans": [p.to_json() for p in self.plans.values()],
            "subscriptions": sorted([user, plan] for user, plan in self.subscriptions),
            "billing_records": [r.to_json() for r in self.billing],
            "notifications": list(self.notifications),
            "payment_intents": [i.to_json() for i in self.intents.values()],
            "storage": [u.to_json() for u in self.storage.values()],
        }


def seeded_world() -> World:
    """The seeded users, wallets, plans, storage and one paid intent (see the module docstring)."""
    world = World()
    for user_id, status, tier in (("u-demo", "active", "basic"), ("u-pro", "active", "pro"),
                                  ("u-empty", "active", "basic"), ("u-disabled", "disabled", "basic"),
                                  ("u-deleted", "deleted", "basic")):
        world.users[user_id] = spec.User(user_id=user_id, status=status, tier=tier,
                                         email=f"{user_id}@example.test", name=user_id.title(),
                                         created_at="2026-01-01T00:00:00Z")
    world.payment_methods["u-demo"] = [spec.PaymentMethod(
        payment_method_id="pm_card_visa", type="card", brand="visa", last4="4242", is_default=True)]
    world.payment_methods["u-pro"] = [
        spec.PaymentMethod(payment_method_id="pm_card_mastercard", type="card", brand="mastercard",
                           last4="4444", is_default=True),
        spec.PaymentMethod(payment_method_id="pm_sepa_debit", type="sepa_debit", last4="3000")]
    for user_id, balance in (("u-demo", 10_000), ("u-pro", 250_000), ("u-empty", 0), ("u-disabled", 5_000)):
        world.wallets[user_id] = spec.Wallet(wallet_id=f"w-{user_id}", user_id=user_id,
                                             balance_amount=balance, currency="EUR", status="active")
    for plan_id, name, amount, quota, active in (("plan-basic", "Basic", 999, 10 * GIB, True),
                                                 ("plan-pro", "Pro", 2999, 100 * GIB, True),
                                                 ("plan-legacy", "Legacy", 499, 5 * GIB, False)):
        world.plans[plan_id] = spec.Plan(plan_id=plan_id, name=name, amount=amount, currency="EUR",
                                         interval="month", active=active, features=["storage", name.lower()],
                                         storage_quota_bytes=quota)
    world.subscriptions.add(("u-pro", "plan-pro"))
    for user_id, used, quota in (("u-demo", 2 * GIB, 10 * GIB), ("u-pro", 95 * GIB, 100 * GIB),
                                 ("u-empty", 0, 10 * GIB)):
        world.storage[user_id] = spec.StorageUsage(user_id=user_id, used_bytes=used, quota_bytes=quota)
    world.intents["pi_standin_paid"] = spec.PaymentIntent(
        payment_intent_id="pi_standin_paid", order_id="o-paid", status="succeeded", amount=2500,
        currency="EUR", client_secret="pi_standin_paid_secret")
    return world


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------
# What each method does


def _user(world: World, user_id: str) -> spec.User:
    user = world.user(user_id)
    if user is None:
        raise StandinError(404, "user_not_found", "no such user")
    return user


def _wallet(world: World, user_id: str) -> spec.Wallet:
    wallet = world.wallets.get(user_id)
    if wallet is None:
        raise StandinError(404, "wallet_not_found", "the user has no wallet")
    return wallet


def _validate_user(world: World, req: spec.UserRef) -> spec.UserValidation:
    user = world.user(req.user_id)
    if user is None:
        return spec.UserValidation(user_id=req.user_id, valid=False, reason="user_not_found")
    reason = None if user.status == "active" else f"user_{user.status}"
    return spec.UserValidation(user_id=req.user_id, valid=reason is None, reason=reason, status=user.status)


def _move(world: World, req: spec.CreditsRequest, kind: str) -> spec.WalletTransaction:
    wallet = _wallet(world, req.user_id)
    if req.amount <= 0:
        raise StandinError(422, "invalid_amount", "amount must be positive")
    if req.currency.upper() != wallet.currency:
        raise StandinError(422, "currency_mismatch", f"the wallet holds {wallet.currency}")
    delta = req.amount if kind == "credit" else -req.amount
    if wallet.balance_amount + delta < 0:
        raise StandinError(409, "insufficient_funds", "the balance does not cover the amount")
    wallet = spec.Wallet(wallet_id=wallet.wallet_id, user_id=wallet.user_id, currency=wallet.currency,
                         status=wallet.status, balance_amount=wallet.balance_amount + delta)
    world.wallets[req.user_id] = wallet
    transaction = spec.WalletTransaction(
        transaction_id=world.new_id("wtx"), wallet_id=wallet.wallet_id, user_id=wallet.user_id, kind=kind,
        amount=req.amount, currency=wallet.currency, balance_amount=wallet.balance_amount,
        reference_id=req.reference_id)
    world.transactions.append(transaction)
    return transaction


def _positive(amount: int) -> None:
    if amount < 0:
        raise StandinError(422, "invalid_amount", "amount must not be negative")


def _billing_record(world: World, req: spec.BillingRecordRequest) -> spec.BillingRecord:
    _positive(req.amount)
    record = spec.BillingRecord(
        record_id=world.new_id("br"), user_id=req.user_id, amount=req.amount, currency=req.currency,
        kind=req.kind, created_at=_now(), description=req.description,
        payment_intent_id=req.payment_intent_id, invoice_id=req.invoice_id,
        source_event_id=req.source_event_id)
    world.billing.append(record)
    return record


def _order_billing_record(world: World, req: spec.OrderBillingRecordRequest) -> spec.BillingRecord:
    _positive(req.amount)
    record = spec.BillingRecord(
        record_id=world.new_id("br"), user_id=req.user_id, amount=req.amount, currency=req.currency,
        kind="order", created_at=_now(), order_id=req.order_id, order_status=req.order_status,
        payment_intent_id=req.payment_intent_id, source_event_id=req.source_event_id)
    world.billing.append(record)
    return record


def _history(world: World, req: spec.BillingHistoryRequest) -> spec.BillingHistory:
    records = [r for r in reversed(world.billing) if r.user_id == req.user_id]
    if req.limit is not None:
        records = records[: max(req.limit, 0)]
    return spec.BillingHistory(user_id=req.user_id, records=records)


def _plan(world: World, req: spec.PlanRef) -> spec.Plan:
    plan = world.plans.get(req.plan_id)
    if plan is None:
        raise StandinError(404, "plan_not_found", "no such plan")
    return plan


def _validate_subscription(world: World, req: spec.SubscriptionCheck) -> spec.SubscriptionValidation:
    plan = world.plans.get(req.plan_id)
    reason = None
    if plan is None:
        reason = "plan_not_found"
    elif not plan.active:
        reason = "plan_inactive"
    elif (req.user_id, req.plan_id) in world.subscriptions:
        reason = "already_subscribed"
    return spec.SubscriptionValidation(user_id=req.user_id, plan_id=req.plan_id, valid=reason is None,
                                       reason=reason)


def _notify(kind: str) -> Callable[[World, Model], spec.NotificationAccepted]:
    def send(world: World, req: Model) -> spec.NotificationAccepted:
        accepted = spec.NotificationAccepted(notification_id=world.new_id("ntf"), status="queued",
                                             channel="email")
        world.notifications.append({"kind": kind, "notification_id": accepted.notification_id,
                                    **req.to_json()})
        return accepted
    return send


def _create_intent(world: World, req: spec.PaymentIntentRequest) -> spec.PaymentIntent:
    if req.amount <= 0:
        raise StandinError(422, "invalid_amount", "amount must be positive")
    intent_id = world.new_id("pi_standin")
    intent = spec.PaymentIntent(payment_intent_id=intent_id, order_id=req.order_id,
                                status="requires_payment_method", amount=req.amount,
                                currency=req.currency, client_secret=f"{intent_id}_secret")
    world.intents[intent_id] = intent
    return intent


def _intent(world: World, intent_id: str) -> spec.PaymentIntent:
    intent = world.intents.get(intent_id)
    if intent is None:
        raise StandinError(404, "payment_not_found", "no such payment intent")
    return intent


def _status(intent: spec.PaymentIntent) -> spec.PaymentStatus:
    return spec.PaymentStatus(payment_intent_id=intent.payment_intent_id, order_id=intent.order_id,
                              status=intent.status, amount=intent.amount, currency=intent.currency)


def _cancel(world: World, req: spec.CancelPaymentRequest) -> spec.PaymentStatus:
    intent = _intent(world, req.payment_intent_id)
    if intent.status == "succeeded":
        raise StandinError(409, "payment_not_cancelable", "the payment succeeded")
    intent = spec.PaymentIntent(payment_intent_id=intent.payment_intent_id, order_id=intent.order_id,
                                status="canceled", amount=intent.amount, currency=intent.currency,
                                client_secret=intent.client_secret)
    world.intents[intent.payment_intent_id] = intent
    return _status(intent)


def _storage(world: World, user_id: str) -> spec.StorageUsage:
    world.user(user_id)  # an open world provisions storage with the user
    usage = world.storage.get(user_id)
    if usage is None:
        raise StandinError(404, "user_not_found", "storage knows no such user")
    return usage


def _validate_quota(world: World, req: spec.QuotaCheck) -> spec.QuotaValidation:
    if req.requested_bytes < 0:
        raise StandinError(400, "invalid_request", "requested_bytes must not be negative")
    usage = _storage(world, req.user_id)
    allowed = usage.used_bytes + req.requested_bytes <= usage.quota_bytes
    return spec.QuotaValidation(user_id=req.user_id, allowed=allowed, used_bytes=usage.used_bytes,
                                quota_bytes=usage.quota_bytes, requested_bytes=req.requested_bytes,
                                reason=None if allowed else "quota_exceeded")


Handler = Callable[[World, Any], Model]

#: (service, method) -> what the stand-in does; every spec endpoint has one.
HANDLERS: dict[tuple[str, str], Handler] = {
    ("account", "get_user"): lambda w, r: _user(w, r.user_id),
    ("account", "validate_user"): _validate_user,
    ("account", "get_payment_methods"): lambda w, r: spec.PaymentMethods(
        user_id=_user(w, r.user_id).user_id, payment_methods=w.payment_methods.get(r.user_id, [])),
    ("account", "get_user_tier"): lambda w, r: spec.UserTier(
        user_id=r.user_id, tier=_user(w, r.user_id).tier),
    ("wallet", "get_wallet"): lambda w, r: _wallet(w, r.user_id),
    ("wallet", "get_balance"): lambda w, r: spec.Balance(
        user_id=r.user_id, wallet_id=_wallet(w, r.user_id).wallet_id,
        balance_amount=w.wallets[r.user_id].balance_amount, currency=w.wallets[r.user_id].currency),
    ("wallet", "add_credits"): lambda w, r: _move(w, r, "credit"),
    ("wallet", "deduct_credits"): lambda w, r: _move(w, r, "debit"),
    ("billing", "create_billing_record"): _billing_record,
    ("billing", "get_billing_history"): _history,
    ("billing", "create_order_billing_record"): _order_billing_record,
    ("product", "get_plan"): _plan,
    ("product", "validate_subscription"): _validate_subscription,
    ("notification", "send_payment_receipt"): _notify("payment_receipt"),
    ("notification", "send_invoice"): _notify("invoice"),
    ("notification", "send_order_confirmation"): _notify("order_confirmation"),
    ("notification", "send_order_status"): _notify("order_status"),
    ("payment", "create_payment_intent"): _create_intent,
    ("payment", "get_payment_status"): lambda w, r: _status(_intent(w, r.payment_intent_id)),
    ("payment", "cancel_payment"): _cancel,
    ("storage", "get_storage_usage"): lambda w, r: _storage(w, r.user_id),
    ("storage", "validate_quota"): _validate_quota,
}


# ----------------------------------------------------------------------
# One stand-in


@dataclass
class Failure:
    mode: str  # "error", "slow" or "drop"
    status: int = 503
    delay_seconds: float = 5.0
    times: int | None = None
    methods: frozenset[str] | None = None
    retry_after: float | None = None


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    body = ErrorBody(error=ErrorDetail(code=code, message=message)).to_json()
    return web.json_response(body, status=status, headers=headers)


class Standin:
    """One service's stand-in: its aiohttp app, what it received, its failure mode, its keys."""

    def __init__(self, service: str, holder: WorldHolder) -> None:
        self.service = service
        self.holder = holder
        self.received: list[dict[str, Any]] = []
        self.failure: Failure | None = None
        self.answers: dict[tuple[str, str], tuple[str, int, dict[str, Any]]] = {}
        self.app = web.Application()
        for endpoint in spec.endpoints_of(service):
            self.app.router.add_route(endpoint.http_method, endpoint.path_template, self._handler(endpoint))
        self.app.router.add_get("/_standin/health", self._health)
        self.app.router.add_get("/_standin/received", self._received)
        self.app.router.add_get("/_standin/state", self._state)
        self.app.router.add_delete("/_standin/received", self._forget)
        self.app.router.add_post("/_standin/fail", self._fail)
        self.app.router.add_delete("/_standin/fail", self._heal)
        self.app.router.add_post("/_standin/reset", self._reset)
        self.app.router.add_post("/_standin/seed", self._seed)

    def reset(self) -> None:
        self.received.clear()
        self.failure = None
        self.answers.clear()

    def _handler(self, endpoint: Endpoint) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(endpoint, request)
        return handle

    def _take_failure(self, method: str) -> Failure | None:
        failure = self.failure
        if failure is None or (failure.methods is not None and method not in failure.methods):
            return None
        if failure.times is not None:
            failure.times -= 1
            if failure.times <= 0:
                self.failure = None
        return failure

    async def _handle(self, endpoint: Endpoint, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        key = request.headers.get(IDEMPOTENCY_HEADER)
        entry: dict[str, Any] = {"method": endpoint.method_name, "http_method": request.method,
                                 "path": request.path, "query": dict(request.query), "idempotency_key": key,
                                 "body": body, "status": None}
        self.received.append(entry)
        failure = self._take_failure(endpoint.method_name)
        if failure is not None:
            if failure.mode == "drop":
                entry["status"] = "dropped"
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError  # aiohttp drops a handler cancelled with its connection
            if failure.mode == "error":
                entry["status"] = failure.status
                after = failure.retry_after
                headers = {"Retry-After": f"{after:g}"} if after is not None else None
                return _error(failure.status, "standin_failure", f"injected HTTP {failure.status}", headers)
            await asyncio.sleep(failure.delay_seconds)  # "slow": then answer as usual
        status, answer, replayed = self._answer(endpoint, request, body, key)
        entry["status"] = status
        headers = {"Idempotent-Replayed": "true"} if replayed else None
        return web.json_response(answer, status=status, headers=headers)

    def _answer(self, endpoint: Endpoint, request: web.Request, body: Any,
                key: str | None) -> tuple[int, dict[str, Any], bool]:
        """(status, body, replayed): the method's answer, from memory for a repeated key.

        No await in here: checking the key, doing the work and remembering the
        answer happen in one step of the event loop.
        """
        where = f"{self.service}.{endpoint.method_name}"
        try:
            if endpoint.http_method == "GET":
                model = endpoint.request.from_query(request.query, request.match_info, where=where)
            else:
                if not isinstance(body, dict):
                    raise StandinError(400, "invalid_request", "the body must be a JSON object")
                model = endpoint.request.from_json({**body, **request.match_info}, where=where)
        except SpecError as error:
            return 400, _body("invalid_request", str(error)), False
        except StandinError as error:
            return error.status, _body(error.code, error.message), False
        fingerprint = json.dumps(model.to_json(), sort_keys=True)
        if endpoint.needs_key:
            if not key:
                return 400, _body("idempotency_key_required", f"{IDEMPOTENCY_HEADER} is required"), False
            seen = self.answers.get((endpoint.method_name, key))
            if seen is not None:
                if seen[0] != fingerprint:
                    return 422, _body("idempotency_key_reused", "the key was used for another request"), False
                return seen[1], seen[2], True
        try:
            status, answer = endpoint.success_status, HANDLERS[(self.service, endpoint.method_name)](
                self.holder.world, model).to_json()
        except StandinError as error:
            status, answer = error.status, _body(error.code, error.message)
        if endpoint.needs_key and key:
            self.answers[(endpoint.method_name, key)] = (fingerprint, status, answer)
        return status, answer, False

    # -- control ---------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"service": self.service, "ok": True})

    async def _received(self, request: web.Request) -> web.Response:
        method = request.query.get("method")
        chosen = [e for e in self.received if method is None or e["method"] == method]
        return web.json_response({"service": self.service, "requests": chosen})

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.holder.world.to_json())

    async def _forget(self, request: web.Request) -> web.Response:
        self.received.clear()
        return web.json_response({"ok": True})

    async def _fail(self, request: web.Request) -> web.Response:
        try:
            order = await request.json()
            mode = order.get("mode")
            if mode == "ok":
                self.failure = None
                return web.json_response({"ok": True, "failure": None})
            if mode not in ("error", "slow", "drop"):
                raise ValueError("mode must be error, slow, drop or ok")
            methods = order.get("methods")
            self.failure = Failure(
                mode=mode, status=int(order.get("status") or 503),
                delay_seconds=float(order.get("delay_seconds") or 5.0),
                times=None if order.get("times") is None else int(order["times"]),
                methods=None if methods is None else frozenset(methods),
                retry_after=None if order.get("retry_after") is None else float(order["retry_after"]))
        except (ValueError, TypeError, AttributeError) as error:
            return _error(400, "invalid_request", str(error))
        return web.json_response({"ok": True, "failure": {"mode": mode, "times": self.failure.times}})

    async def _heal(self, request: web.Request) -> web.Response:
        self.failure = None
        return web.json_response({"ok": True})

    async def _reset(self, request: web.Request) -> web.Response:
        self.holder.reset()
        return web.json_response({"ok": True})

    async def _seed(self, request: web.Request) -> web.Response:
        try:
            self.holder.seed(await request.json())
        except (ValueError, SpecError, AttributeError, TypeError) as error:
            return _error(400, "invalid_request", str(error))
        return web.json_response({"ok": True})


def _body(code: str, message: str) -> dict[str, Any]:
    return ErrorBody(error=ErrorDetail(code=code, message=message)).to_json()


class WorldHolder:
    """The world the stand-ins of one process share, and their reset."""

    def __init__(self, world: World | None = None) -> None:
        self.world = world or seeded_world()
        self.standins: list[Standin] = []

    def reset(self) -> None:
        self.world = seeded_world()
        for standin in self.standins:
            standin.reset()

    def seed(self, data: Mapping[str, Any]) -> None:
        world = self.world
        for raw in data.get("users") or ():
            user = spec.User.from_json(raw)
            world.users[user.user_id] = user
        for raw in data.get("wallets") or ():
            wallet = spec.Wallet.from_json(raw)
            world.wallets[wallet.user_id] = wallet
        for raw in data.get("plans") or ():
            plan = spec.Plan.from_json(raw)
            world.plans[plan.plan_id] = plan
        for raw in data.get("storage") or ():
            usage = spec.StorageUsage.from_json(raw)
            world.storage[usage.user_id] = usage


# ----------------------------------------------------------------------
# All of them


class Standins:
    """Every stand-in of one process, each on a port of its own, sharing one :class:`World`."""

    def __init__(self, services: Iterable[str] = STANDIN_SERVICES, world: World | None = None) -> None:
        self.holder = WorldHolder(world)
        self.standins = {name: Standin(name, self.holder) for name in services}
        self.holder.standins.extend(self.standins.values())
        self.host = "127.0.0.1"
        self.ports: dict[str, int] = {}
        self._runners: dict[str, web.AppRunner] = {}

    @property
    def world(self) -> World:
        return self.holder.world

    async def start(self, ports: Mapping[str, int] | None = None, host: str = "127.0.0.1") -> dict[str, str]:
        """Serve every stand-in (port 0 or absent: a free port); answer service -> base URL."""
        self.host = host
        for name in self.standins:
            await self._start(name, (ports or {}).get(name, 0))
        return self.urls()

    async def _start(self, name: str, port: int) -> None:
        runner = web.AppRunner(self.standins[name].app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        self._runners[name] = runner
        self.ports[name] = int(runner.addresses[0][1])

    async def stop_service(self, name: str) -> None:
        """Stop one stand-in: its port refuses connections until :meth:`start_service`."""
        runner = self._runners.pop(name, None)
        if runner is not None:
            await runner.cleanup()

    async def start_service(self, name: str) -> None:
        """Serve a stopped stand-in again, on the port it had."""
        if name not in self._runners:
            await self._start(name, self.ports[name])

    async def stop(self) -> None:
        for name in list(self._runners):
            await self.stop_service(name)

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.ports[name]}"

    def urls(self) -> dict[str, str]:
        return {name: self.url(name) for name in self.ports}

    async def __aenter__(self) -> Standins:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def settings_ports(settings: Settings) -> tuple[str, dict[str, int]]:
    """(host, service -> port) of the stand-ins from the ``<SERVICE>_SERVICE_URL`` settings."""
    ports: dict[str, int] = {}
    hosts = set()
    for name, service in spec.SERVICES.items():
        url = urlsplit(getattr(settings, service.settings_attribute))
        if url.port is None:
            raise ValueError(f"{service.settings_attribute.upper()}={url.geturl()!r} names no port")
        ports[name] = url.port
        hosts.add(url.hostname or "127.0.0.1")
    host = "127.0.0.1" if hosts <= {"localhost", "127.0.0.1"} else hosts.pop()
    return host, ports


async def serve(settings: Settings, ready: Callable[[dict[str, str]], None] | None = None) -> None:
    """Serve every stand-in on the ports of the settings until cancelled."""
    host, ports = settings_ports(settings)
    standins = Standins()
    urls = await standins.start(ports, host)
    try:
        if ready is not None:
            ready(urls)
        await asyncio.Event().wait()
    finally:
        await standins.stop()


def run(settings: Settings) -> int:
    """Run :func:`serve` in the foreground until SIGINT/SIGTERM (the CLI's ``paystream standins``)."""

    def announce(urls: dict[str, str]) -> None:
        for name, url in urls.items():
            print(f"standin {name:<13} {url}", flush=True)

    async def main() -> None:
        task = asyncio.ensure_future(serve(settings, announce))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    except OSError as error:
        print(f"standins: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(Settings.from_env()))
