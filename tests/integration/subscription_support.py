"""The subscription tests' harness: a payment stack running the subscription domain too.

:func:`subscription_stack` wraps :func:`tests.integration.payment_support.running_stack`
(private topics on the real broker, ``paystream ingress`` and ``paystream
worker`` subprocesses, the session's localstripe and stand-ins) with:

- the worker's domains "orders,payments,subscriptions";
- localstripe's webhook endpoint for the stack widened to the subscription
  and invoice events localstripe sends (``customer.subscription.created`` /
  ``.deleted``, ``invoice.created`` / ``.payment_succeeded`` /
  ``.payment_failed``), besides the payment ones;
- the plans the product stand-in offers (``plan-basic`` 9.99 EUR,
  ``plan-pro`` 29.99 EUR, monthly) set up at localstripe under the same ids,
  as an operator sets them up in Stripe's dashboard;
- a reader of the subscription topics, ``order.created`` and ``payment.refunded``.

Outcomes are read from the topics, localstripe and the API.  localstripe sends
every event to every endpoint of the session: other stacks' subscriptions'
events may reach this stack, so assertions select by this test's ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from streams.devtools.localstripe import LocalStripe
from tables import subscription_index, subscription_state
from tests.integration.payment_support import (
    LOCALSTRIPE_EVENTS,
    WEBHOOK_SECRET,
    PaymentStack,
    running_stack,
    stripe_event,
)
from tests.integration.pipeline_support import EventReader, drain, group_lag, wait_until

#: What localstripe sends about subscriptions and their invoices.
SUBSCRIPTION_WEBHOOKS = ("customer.subscription.created", "customer.subscription.deleted",
                         "invoice.created", "invoice.payment_succeeded", "invoice.payment_failed")
SUBSCRIPTION_EVENTS = ("subscription.created", "subscription.updated", "subscription.canceled",
                       "subscription.expired", "payment.refunded", "order.created",
                       "invoice.created")
#: The product stand-in's plans (streams.devtools.standins), as localstripe holds them.
PLANS = {"plan-basic": 999, "plan-pro": 2999}
CARD = "pm_card_visa"
SUBSCRIPTION_FLOWS = (subscription_state.subscription_flow(), subscription_index.USER_SUBSCRIPTIONS)


class SubscriptionStack:
    """A :class:`PaymentStack` with the subscription domain, and a reader of its topics."""

    def __init__(self, stack: PaymentStack) -> None:
        self.stack = stack
        self.reader = EventReader(stack.settings, SUBSCRIPTION_EVENTS)

    @property
    def api(self) -> httpx.AsyncClient:
        return self.stack.api

    async def subscribe(self, user_id: str, plan_id: str = "plan-basic", *, key: str | None = None,
                        payment_method: str | None = CARD, **body: Any) -> httpx.Response:
        """POST /subscriptions (a new Idempotency-Key unless ``key`` is given)."""
        payload = {"user_id": user_id, "plan_id": plan_id, **body}
        if payment_method is not None:
            payload["payment_method"] = payment_method
        return await self.api.post("/subscriptions", json=payload,
                                   headers={"Idempotency-Key": key or uuid.uuid4().hex})

    async def subscribed(self, user_id: str, plan_id: str = "plan-basic") -> dict[str, Any]:
        """A new subscription (201), once its subscription.created is on the topic."""
        answer = await self.subscribe(user_id, plan_id)
        assert answer.status_code == 201, answer.text
        view = answer.json()
        await self.events_of("subscription.created", subscription_id=view["subscription_id"])
        return dict(view)

    async def subscription(self, subscription_id: str) -> dict[str, Any]:
        answer = await self.api.get(f"/subscriptions/{subscription_id}")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    async def wait_indexed(self, user_id: str, *subscription_ids: str, timeout: float = 30.0) -> None:
        """Until GET /users/{user_id}/subscriptions lists exactly ``subscription_ids``.

        A user fan-out (user.deleted, user.upgraded, wallet.insufficient_funds)
        reaches the subscriptions its index knows when it is decided.
        """
        async def listed() -> bool:
            answer = (await self.api.get(f"/users/{user_id}/subscriptions")).json()
            return sorted(s["subscription_id"] for s in answer["subscriptions"]) == sorted(subscription_ids)

        await wait_until(listed, timeout=timeout, what=f"{subscription_ids} in {user_id}'s index")

    async def events_of(self, topic: str, count: int = 1, timeout: float = 45.0,
                        **match: Any) -> list[dict[str, Any]]:
        return await self.reader.wait_for(topic, count, timeout, **match)

    def events(self, topic: str, **match: Any) -> list[dict[str, Any]]:
        return self.reader.events(topic, **match)

    async def settle(self, timeout: float = 45.0) -> None:
        """The worker consumed every record of its subscription, order and payment inputs so far
        (twice in a row), and the readers read every event written by then."""
        loop = asyncio.get_running_loop()
        settings = self.stack.settings
        topics = sorted({*self.stack.topics, *(settings.topic(t) for flow in SUBSCRIPTION_FLOWS
                                               for t in flow.topics)})
        for _ in range(2):
            deadline = time.monotonic() + timeout
            while lagging := await loop.run_in_executor(
                    None, group_lag, settings.kafka_bootstrap_servers, settings.app_id, topics):
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker did not consume within {timeout}s: {lagging}\n"
                                         f"{self.stack.worker.log_tail()}")
                await asyncio.sleep(0.3)
        await self.stack.settle(timeout)
        await drain(self.reader)

    # -- localstripe ---------------------------------------------------

    async def stripe_get(self, path: str, **params: Any) -> Any:
        return await self.stack.stripe_get(path, **params)

    async def stripe_customers_of(self, user_id: str) -> list[dict[str, Any]]:
        """Every customer localstripe holds with ``metadata.user_id`` = ``user_id``."""
        listed = (await self.stripe_get("/v1/customers", limit=100000))["data"]
        return [c for c in listed if (c.get("metadata") or {}).get("user_id") == user_id]

    async def stripe_subscriptions_of(self, customer_id: str) -> list[dict[str, Any]]:
        listed = (await self.stripe_get("/v1/subscriptions", customer=customer_id, limit=100))["data"]
        return list(listed)

    async def stripe_refunds_of_charge(self, charge_id: str) -> list[dict[str, Any]]:
        listed = (await self.stripe_get("/v1/refunds", limit=100000))["data"]
        return [r for r in listed if _id(r.get("charge")) == charge_id]


def _id(value: Any) -> Any:
    return value.get("id") if isinstance(value, dict) else value


@contextlib.asynccontextmanager
async def subscription_stack(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
                             state_dir: Path, name: str, **overrides: Any
                             ) -> AsyncIterator[SubscriptionStack]:
    """A started :class:`SubscriptionStack`, stopped on leaving the block."""
    for plan_id, amount in PLANS.items():
        localstripe.ensure_plan(plan_id, amount, "eur", "month")
    overrides.setdefault("domains", "orders,payments,subscriptions")
    async with running_stack(kafka_bootstrap, registry_url, localstripe, state_dir, name,
                             **overrides) as stack:
        localstripe.register_webhook(stack.endpoint_id, stack.ingress.webhook_url, WEBHOOK_SECRET,
                                     events=(*LOCALSTRIPE_EVENTS, *SUBSCRIPTION_WEBHOOKS))
        wrapped = SubscriptionStack(stack)
        try:
            yield wrapped
        finally:
            wrapped.reader.close()


# ----------------------------------------------------------------------
# Added for the expiry and crash tests (test_subscription_expiry.py, test_subscription_crash.py)


def period_ending_event(view: dict[str, Any], user_id: str, end: int, *, now: int | None = None
                        ) -> dict[str, Any]:
    """Stripe's ``customer.subscription.updated`` of a subscription set to cancel at its period end.

    localstripe never sends ``.updated``, and its periods are a month long:
    this is the event Stripe would send for ``view`` (a subscription of this
    stack, as POST /subscriptions answered it) whose current period ends at
    ``end`` (epoch seconds), in Stripe's payload shape
    (``docs_customer_subscription_updated.json``, the period on the item too,
    as 2025 API versions put it), ``cancel_at_period_end`` true, the plan and
    price of ``view``.  ``previous_attributes`` names the period end it
    replaced.  Post it signed with ``stack.deliver``.
    """
    now = int(time.time()) if now is None else now
    start = end - 30 * 86_400
    event = stripe_event("customer_subscription_updated", created=now)
    obj = event["data"]["object"]
    obj.update({"id": view["subscription_id"], "customer": view["customer_id"], "status": "active",
                "metadata": {"user_id": user_id}, "cancel_at_period_end": True, "cancel_at": end,
                "canceled_at": now, "ended_at": None, "current_period_start": start,
                "current_period_end": end})
    item = obj["items"]["data"][0]
    item["quantity"] = view.get("quantity") or 1
    amount = PLANS.get(view["plan_id"], view.get("amount"))
    for field in ("price", "plan"):
        item[field] = {**item[field], "id": view["plan_id"], "unit_amount": amount, "amount": amount,
                       "currency": "eur"}
    item["current_period_start"], item["current_period_end"] = start, end
    event["data"]["previous_attributes"] = {"current_period_end": now + 30 * 86_400}
    return event


async def restart_worker(stack: SubscriptionStack, how: str, *, down_until: float | None = None,
                         serve_timeout: float = 120.0) -> float:
    """Stop the stack's worker (``"sigterm"``: a clean exit; ``"sigkill"``: a crash) and start it again.

    ``down_until`` (epoch seconds): the worker stays down until then.
    Returns the epoch time the stop was complete.  Raises if the exit code
    is not the one the signal gives (0 after SIGTERM, -9 after SIGKILL).
    """
    worker = stack.stack.worker
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, worker.stop if how == "sigterm" else worker.kill)
    stopped = time.time()
    assert code == (0 if how == "sigterm" else -9), (how, code, worker.log_tail())
    if down_until is not None and time.time() < down_until:
        await asyncio.sleep(down_until - time.time())
    worker.launch()
    await loop.run_in_executor(None, worker.wait_serving, serve_timeout)
    return stopped
