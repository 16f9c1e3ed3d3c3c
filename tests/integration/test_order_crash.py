"""Kill -9 in the suite: SIGKILL the worker at random points while orders live their lives.

One ``paystream worker`` subprocess serves the order API while the test drives
a few dozen orders through every path of the order service, as outside
clients would: created and canceled over HTTP by a careful client (one
``Idempotency-Key`` per operation, retried under the same key on connection
errors, 503 and 504), paid and refunded by payment events written with
confluent-kafka's AvroSerializer, fulfilled by ``wallet.credits_added``,
canceled by ``user.deleted``, or left to expire.  Meanwhile the worker is
SIGKILLed several times and restarted at once: at random delays, and once at
the moment a burst of wallet/user events is being turned into order commands
(the inbound handlers' crash window).  One restart starts from a wiped state
directory, so the tables come back from their changelog topics.

When everything has settled, the verdict comes from the topics themselves,
read with a plain confluent-kafka consumer and AvroDeserializer: every
expected ``order.*`` event is there, no transition was published under two
event ids (the same event id twice is at-least-once delivery and allowed),
every unpaid order expired exactly once, nothing was dead-lettered, and
every row reads as expected over the API after the last restart.  Last, the
worker is stopped and started on a wiped state directory: every row must
come back from the changelog exactly as it was served (a SIGKILL must not
leave the local RocksDB state ahead of the changelog).

The plan and the kill schedule come from a seeded RNG printed in the summary;
``PAYSTREAM_CRASH_SEED=<seed>`` replays them.  Where a kill lands also depends
on timing, so a replay is close to the original run, not identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from streams.settings import Settings
from tests.integration.pipeline_support import (
    ORDER_EVENTS,
    DeadLetterReader,
    EventReader,
    EventWriter,
    drain,
    group_lag,
    wait_until,
)
from tests.integration.worker_process import WorkerProcess, settings_env

pytestmark = pytest.mark.integration

#: How long a restarted worker may take to serve the API again.  A SIGKILLed
#: worker may be away for a whole group session timeout (~60 s) unless the
#: group knows the restarted process as the same member.
SERVE_TIMEOUT = 90.0
#: After the last restart: how long client steps and expected events may
#: take to complete.  While kills go on, a client step never gives up.
SETTLE_TIMEOUT = 90.0
#: A random kill waits this long at most for the worker to publish something.
BUSY_WAIT = 2.0
#: Quiet time after everything expected arrived: late duplicates would show up here.
QUIET = 4.0
CURRENCY = "EUR"

#: kind -> (final status, the order.* event types besides order.created and
#: order.refunded, the order.canceled reason if any).  Refunds are per plan.
KINDS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "paid": ("COMPLETED", ("order.payment_pending", "order.completed"), None),
    "partially_refunded": ("PARTIALLY_REFUNDED", ("order.payment_pending", "order.completed"), None),
    "refunded": ("REFUNDED", ("order.payment_pending", "order.completed"), None),
    "api_canceled": ("CANCELED", ("order.canceled",), "USER_REQUESTED"),
    "expired": ("EXPIRED", ("order.expired",), None),
    "topup_fulfilled": ("FULFILLED", ("order.payment_pending", "order.completed", "order.fulfilled"), None),
    "topup_unpaid": ("PENDING", (), None),
    "deleted_pending": ("CANCELED", ("order.canceled",), "USER_DELETED"),
    "deleted_payment_pending": ("CANCELED", ("order.payment_pending", "order.canceled"), "USER_DELETED"),
    "deleted_paid": ("COMPLETED", ("order.payment_pending", "order.completed"), None),
}


#: Units that prepare one user's orders for a fan-out event (sent together in one burst).
FANOUT = ("wallet_user", "deleted_user")


class StepFailed(Exception):
    """A client step that did not get what it needs within its patience."""


class Patience:
    """When client steps give up: not while kills go on, SETTLE_TIMEOUT after the last restart."""

    def __init__(self) -> None:
        self.until: float | None = None

    def renew(self) -> None:
        self.until = time.monotonic() + SETTLE_TIMEOUT

    def over(self) -> bool:
        return self.until is not None and time.monotonic() > self.until


# ----------------------------------------------------------------------
# The plan: drawn up front from the seeded RNG.


@dataclass
class PlannedOrder:
    label: str
    kind: str
    user_id: str
    body: dict[str, Any]
    refunds: list[tuple[str, int]] = field(default_factory=list)
    create_key: str = field(default_factory=lambda: str(uuid.uuid4()))
    cancel_key: str = field(default_factory=lambda: str(uuid.uuid4()))
    order_id: str | None = None
    payment_id: str | None = None
    step: str = "not started"
    failure: str | None = None

    @property
    def total(self) -> int:
        return sum(i["quantity"] * i["unit_amount"] for i in self.body["items"])

    def expected_events(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(event type, discriminator) -> fields each such event must carry."""
        _status, types, reason = KINDS[self.kind]
        expected: dict[tuple[str, str], dict[str, Any]] = {("order.created", ""): {
            "user_id": self.user_id, "total_amount": self.total, "currency": CURRENCY}}
        for event_type in types:
            expected[event_type, ""] = {}
        if reason is not None:
            expected["order.canceled", ""] = {"reason": reason}
        if "order.fulfilled" in types:
            expected["order.fulfilled", ""] = {"order_type": "WALLET_TOPUP"}
        for refund_id, amount in self.refunds:
            expected["order.refunded", refund_id] = {"amount": amount, "payment_id": self.payment_id}
        return expected

    def expected_row(self) -> dict[str, Any]:
        status, _types, reason = KINDS[self.kind]
        row: dict[str, Any] = {"status": status, "refunded_amount": sum(a for _, a in self.refunds)}
        if reason is not None:
            row["cancel_reason"] = reason
        return row


@dataclass(eq=False)
class Unit:
    """What one client script does: one order, or one user's orders for a fan-out."""

    kind: str
    orders: list[PlannedOrder]
    wave: int
    start_after: float
    pause: float
    window: float | None = None


@dataclass
class Plan:
    seed: int
    kills: int
    random_delays: list[float]
    wipe_at: int
    aim_jitter: float
    units: list[Unit]

    @property
    def orders(self) -> list[PlannedOrder]:
        return [o for u in self.units for o in u.orders]


def draw_plan(seed: int, run: str) -> Plan:
    """Everything random about the run, from ``seed`` alone."""
    rng = random.Random(seed)
    kills = rng.randint(4, 6)
    random_delays = [rng.uniform(2.0, 5.0) for _ in range(kills - 1)]
    wipe_at = rng.randrange(kills - 1)  # which random kill is followed by a wiped restart
    aim_jitter = rng.uniform(0.0, 0.01)
    units: list[Unit] = []
    count = Counter[str]()

    def order(kind: str, user_id: str, order_type: str = "ONE_TIME", **extra: Any) -> PlannedOrder:
        count[kind] += 1
        items = [{"product_id": f"sku-{rng.randint(1, 9)}", "quantity": rng.randint(1, 3),
                  "unit_amount": rng.randrange(500, 5000, 10)}]
        body = {"user_id": user_id, "order_type": order_type, "currency": CURRENCY, "items": items, **extra}
        return PlannedOrder(f"{kind}-{count[kind]}", kind, user_id, body)

    def user(label: str) -> str:
        return f"u-crash-{run}-{label}-{len(units)}"

    # The fan-out users are prepared in the first wave, so their burst of
    # inbound events (and the kill aimed at it) comes while kills still follow.
    for _ in range(5):
        owner = user("wallet")
        orders = [order("topup_fulfilled", owner, "WALLET_TOPUP"),
                  order("topup_fulfilled", owner, "WALLET_TOPUP"),
                  order("topup_unpaid", owner, "WALLET_TOPUP")]
        units.append(Unit("wallet_user", orders, 0, rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)))
    for _ in range(5):
        owner = user("deleted")
        orders = [order("deleted_pending", owner), order("deleted_payment_pending", owner),
                  order("deleted_paid", owner)]
        units.append(Unit("deleted_user", orders, 0, rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)))
    for kind, how_many in (("paid", 4), ("partially_refunded", 3), ("refunded", 3), ("api_canceled", 5),
                           ("expired", 8)):
        for _ in range(how_many):
            window = rng.uniform(3.0, 8.0) if kind == "expired" else None
            planned = order(kind, user(kind), **({"payment_window_seconds": window} if window else {}))
            if kind == "partially_refunded":
                planned.refunds = [(f"re_{planned.label}_1", rng.randint(1, planned.total - 1))]
            elif kind == "refunded":
                first = rng.randint(1, planned.total - 1)
                planned.refunds = [(f"re_{planned.label}_1", first),
                                   (f"re_{planned.label}_2", planned.total - first)]
            units.append(Unit(kind, [planned], rng.randrange(kills), rng.uniform(0.0, 2.0),
                              rng.uniform(0.0, 2.0), window))
    return Plan(seed, kills, random_delays, wipe_at, aim_jitter, units)


# ----------------------------------------------------------------------
# Outside clients: the careful HTTP client and the order.* topics.


class CarefulClient:
    """The order API as a careful client calls it.

    Each operation has one Idempotency-Key; a connection error, 503 or 504 is
    retried under the same key with backoff.  Any other 5xx is retried too
    (the key makes that safe) but recorded: no request should answer one.
    """

    def __init__(self, base_url: str, patience: Patience) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30.0)
        self.patience = patience
        self.jitter = random.Random()  # not the plan's RNG: timing must not shift the plan
        self.requests = 0
        self.retries = Counter[str]()
        self.anomalies: list[str] = []

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, method: str, path: str, what: str, *, body: Any = None, key: str | None = None,
                   expect: tuple[int, ...] = (200,)) -> httpx.Response:
        why: list[str] = []
        while True:
            self.requests += 1
            try:
                answer = await self.http.request(
                    method, path, json=body, headers={"Idempotency-Key": key} if key else {})
            except httpx.TransportError as exc:
                reason = type(exc).__name__
            else:
                if answer.status_code in expect:
                    return answer
                if answer.status_code < 500:
                    raise StepFailed(f"{what}: {answer.status_code} {answer.text[:300]} after "
                                     f"{len(why) + 1} attempt(s) (retried after: {', '.join(why) or '-'})")
                if answer.status_code not in (503, 504):
                    self.anomalies.append(f"{what}: {answer.status_code} {answer.text[:200]}")
                reason = str(answer.status_code)
            why.append(reason)
            self.retries[reason] += 1
            if self.patience.over():
                raise StepFailed(f"{what}: no answer; retried after {dict(Counter(why))}")
            await asyncio.sleep(min(2.0, 0.1 * 2 ** min(len(why), 5)) * (0.5 + self.jitter.random()))


class OrderTopics:
    """Every order.* event, read in a thread by a plain consumer, indexed per order."""

    def __init__(self, settings: Settings, patience: Patience) -> None:
        self.reader = EventReader(settings, ORDER_EVENTS)
        self.patience = patience
        self.by_order: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._indexed = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="order-topics", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.reader.poll(0.3)
        except BaseException as exc:  # surfaced by refresh(): a dead reader must fail the test
            self._error = exc

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def refresh(self) -> None:
        if self._error is not None:
            raise AssertionError(f"the order.* reader died: {self._error!r}")
        seen = self.reader.seen
        end = len(seen)
        for event in seen[self._indexed:end]:
            self.by_order[event["order_id"]].append(event)
        self._indexed = end

    def events(self, order_id: str, event_type: str, **match: Any) -> list[dict[str, Any]]:
        self.refresh()
        return [e for e in self.by_order.get(order_id, ()) if e["event_type"] == event_type
                and all(e.get(k) == v for k, v in match.items())]

    async def wait(self, order_id: str, event_type: str, **match: Any) -> None:
        while not self.events(order_id, event_type, **match):
            if self.patience.over():
                raise StepFailed(f"no {event_type} {match or ''} {SETTLE_TIMEOUT}s after the last restart")
            await asyncio.sleep(0.1)


def discriminator(event: dict[str, Any]) -> str:
    """What tells two transitions of one type on one order apart (a refund's id)."""
    return event.get("refund_id") or "" if event["event_type"] == "order.refunded" else ""


def epoch_ms(value: Any) -> int:
    return int(value.timestamp() * 1000) if hasattr(value, "timestamp") else int(value)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ----------------------------------------------------------------------
# The run.


@dataclass
class Kill:
    number: int
    at: float
    kind: str
    served_for: float
    wiped: bool
    serve_again: float = float("nan")


class CrashRun:
    """The scripts, the kills and what they leave behind."""

    def __init__(self, settings: Settings, worker: WorkerProcess, plan: Plan) -> None:
        self.settings = settings
        self.worker = worker
        self.plan = plan
        self.patience = Patience()
        self.client = CarefulClient(worker.url, self.patience)
        self.writer = EventWriter(settings)
        self.topics = OrderTopics(settings, self.patience)
        self.dead_letters = DeadLetterReader(settings)
        self.began = time.monotonic()
        self.kills: list[Kill] = []
        self.scripts: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        #: fan-out unit (index in the plan) -> whether it got its orders ready for the burst
        self.fanout_ready: dict[int, asyncio.Future[bool]] = {
            n: loop.create_future() for n, unit in enumerate(plan.units) if unit.kind in FANOUT}
        self.burst_targets: list[PlannedOrder] = []
        self.burst_sent_at: float | None = None
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.cold_restart_took = float("nan")

    async def close(self) -> None:
        self.topics.stop()
        self.topics.reader.close()
        self.dead_letters.close()
        await self.client.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    # -- client steps ---------------------------------------------------

    async def create(self, order: PlannedOrder) -> None:
        order.step = "POST /orders"
        answer = await self.client.send("POST", "/orders", f"create {order.label}", body=order.body,
                                        key=order.create_key, expect=(200, 201))
        body = answer.json()
        order.order_id = body["order_id"]
        if (body["user_id"], body["total_amount"]) != (order.user_id, order.total):
            raise StepFailed(f"create {order.label} answered {answer.status_code} {body}")

    async def pay(self, order: PlannedOrder, *, complete: bool = True) -> None:
        assert order.order_id is not None
        payment = {"payment_intent_id": f"pi_{order.label}_{order.order_id[:8]}", "order_id": order.order_id,
                   "user_id": order.user_id, "amount": order.total, "currency": CURRENCY}
        order.step = "payment.intent.created -> order.payment_pending"
        self.writer.send("payment.intent.created", payment)
        await self.topics.wait(order.order_id, "order.payment_pending")
        if complete:
            order.step = "payment.completed -> order.completed"
            self.writer.send("payment.completed", payment)
            await self.topics.wait(order.order_id, "order.completed")
            order.payment_id = payment["payment_intent_id"]

    async def refund(self, order: PlannedOrder, pause: float) -> None:
        assert order.order_id is not None
        for refund_id, amount in order.refunds:
            order.step = f"payment.refunded {refund_id}"
            self.writer.send("payment.refunded", {
                "payment_id": order.payment_id, "refund_id": refund_id, "order_id": order.order_id,
                "user_id": order.user_id, "amount": amount, "currency": CURRENCY,
                "reason": "REQUESTED_BY_CUSTOMER"})
            await asyncio.sleep(pause / 2)  # same topic and key: Kafka keeps the refunds in order

    async def cancel(self, order: PlannedOrder) -> None:
        order.step = "POST /orders/{id}/cancel"
        answer = await self.client.send(
            "POST", f"/orders/{order.order_id}/cancel", f"cancel {order.label}",
            body={"reason": "USER_REQUESTED", "detail": "crash test"}, key=order.cancel_key)
        if answer.json()["status"] != "CANCELED":
            raise StepFailed(f"cancel {order.label} answered {answer.status_code} {answer.text}")

    async def wait_index(self, user_id: str, statuses: dict[str, str]) -> None:
        """Until GET /users/{id}/orders lists exactly these orders in these statuses."""
        seen: dict[str, str] = {}
        while True:
            answer = await self.client.send("GET", f"/users/{user_id}/orders", f"index of {user_id}")
            seen = {o["order_id"]: o["status"] for o in answer.json()["orders"]}
            if seen == statuses:
                return
            if self.patience.over():
                raise StepFailed(f"index of {user_id} is {seen}, not {statuses} {SETTLE_TIMEOUT}s "
                                 "after the last restart")
            await asyncio.sleep(0.3)

    # -- scripts ----------------------------------------------------------

    async def script(self, unit: Unit) -> None:
        """Drive ``unit``; a failed step is recorded on its orders (the verdict comes later)."""
        await asyncio.sleep(unit.start_after)
        try:
            await self._script(unit)
            for order in unit.orders:
                order.step = "done"
        except Exception as exc:  # a client that got something unexpected: the verdict reports it
            for order in unit.orders:
                order.failure = order.failure or f"{order.step}: {exc!r}"
        finally:
            ready = self.fanout_ready.get(self.plan.units.index(unit))
            if ready is not None and not ready.done():
                ready.set_result(all(o.failure is None for o in unit.orders))

    async def _script(self, unit: Unit) -> None:
        orders = unit.orders
        if unit.kind in FANOUT:
            await asyncio.gather(*(self.create(o) for o in orders))
            first, second, third = orders
            if unit.kind == "wallet_user":
                await asyncio.gather(self.pay(first), self.pay(second))
                statuses = {first.order_id: "COMPLETED", second.order_id: "COMPLETED",
                            third.order_id: "PENDING"}
            else:
                await asyncio.gather(self.pay(second, complete=False), self.pay(third))
                statuses = {first.order_id: "PENDING", second.order_id: "PAYMENT_PENDING",
                            third.order_id: "COMPLETED"}
            for order in orders:
                order.step = "user -> orders index"
            await self.wait_index(unit.orders[0].user_id, statuses)
            inbound = "wallet.credits_added" if unit.kind == "wallet_user" else "user.deleted"
            for order in orders:
                order.step = f"ready for the {inbound}"
            return
        [order] = orders
        await self.create(order)
        if unit.kind in ("paid", "partially_refunded", "refunded"):
            await asyncio.sleep(unit.pause)
            await self.pay(order)
            await self.refund(order, unit.pause)
        elif unit.kind == "api_canceled":
            await asyncio.sleep(unit.pause)
            await self.cancel(order)

    async def burst(self) -> None:
        """Once every fan-out user is prepared: their wallet/user events, all at once."""
        await asyncio.gather(*self.fanout_ready.values())
        events = []
        for n, ready in self.fanout_ready.items():
            unit = self.plan.units[n]
            if not ready.result():
                continue  # its orders carry the failure; sending would prove nothing
            user_id = unit.orders[0].user_id
            if unit.kind == "wallet_user":
                paid = [o for o in unit.orders if o.kind == "topup_fulfilled"]
                amount = sum(o.total for o in paid)
                events.append(("wallet.credits_added", {
                    "user_id": user_id, "wallet_id": f"w-{user_id}", "amount": amount, "currency": CURRENCY,
                    "balance_amount": amount, "transaction_id": f"tx-{user_id}"}))
                self.burst_targets += paid
            else:
                events.append(("user.deleted", {"user_id": user_id, "deleted_at": now_ms(),
                                                "reason": "crash test: account closed"}))
                self.burst_targets += [o for o in unit.orders if o.kind != "deleted_paid"]
        random.Random(self.plan.seed).shuffle(events)
        for topic, payload in events:
            self.writer.send(topic, payload)
        self.burst_sent_at = self.elapsed()

    def burst_effect_seen(self) -> bool:
        """An order.fulfilled / order.canceled of the burst arrived: the worker is in the middle of it."""
        if self.burst_sent_at is None:
            return False
        for order in self.burst_targets:
            kind = "order.fulfilled" if order.kind == "topup_fulfilled" else "order.canceled"
            if order.order_id and self.topics.events(order.order_id, kind):
                return True
        return False

    # -- kills ------------------------------------------------------------

    def start_wave(self, wave: int) -> None:
        for unit in self.plan.units:
            if unit.wave == wave:
                self.scripts.append(asyncio.create_task(self.script(unit), name=unit.orders[0].label))

    async def chaos(self) -> None:
        """SIGKILL the worker ``plan.kills`` times, restarting it at once after each.

        One kill is aimed at the fan-out burst (as soon as its first effect is
        published).  The others come after their random delay, at the next
        order.* record the worker publishes (within :data:`BUSY_WAIT`), so they
        land while a batch is being written rather than on an idle worker.
        """
        loop = asyncio.get_running_loop()
        random_kills = 0
        aimed = False
        for number in range(1, self.plan.kills + 1):
            self.start_wave(number - 1)
            serving_since = time.monotonic()
            busy_since: float | None = None
            published = 0
            kind = ""
            while not kind:
                now = time.monotonic()
                if not aimed and self.burst_effect_seen():
                    await asyncio.sleep(self.plan.aim_jitter)
                    kind, aimed = "aimed at the fan-out burst", True
                elif random_kills < len(self.plan.random_delays):
                    if busy_since is None and now - serving_since >= self.plan.random_delays[random_kills]:
                        busy_since, published = now, len(self.topics.reader.seen)
                    if busy_since is not None and len(self.topics.reader.seen) > published:
                        kind = "random, while publishing"
                    elif busy_since is not None and now - busy_since > BUSY_WAIT:
                        kind = "random, idle"
                elif now - serving_since > SERVE_TIMEOUT:
                    kind = "random (the fan-out burst never showed)"
                    self.problems["chaos"].append("no effect of the wallet/user burst ever showed; "
                                                  "the aimed kill became a random one")
                    aimed = True
                if not kind:
                    await asyncio.sleep(0.005)
            at_random = kind.startswith("random,")
            wiped = at_random and random_kills == self.plan.wipe_at
            if at_random:
                random_kills += 1
            served_for = time.monotonic() - serving_since
            killed = time.monotonic()
            await loop.run_in_executor(None, self.worker.kill)
            kill = Kill(number, self.elapsed(), kind, served_for, wiped)
            self.kills.append(kill)
            if wiped:
                self.worker.wipe_state()
            self.worker.launch()
            await loop.run_in_executor(None, self.worker.wait_serving, SERVE_TIMEOUT)
            kill.serve_again = time.monotonic() - killed
            print(f"kill #{number} at {kill.at:6.1f}s ({kind}, after {served_for:.2f}s serving"
                  f"{', state wiped' if wiped else ''}): serving again after {kill.serve_again:.1f}s",
                  flush=True)

    # -- settling and the verdict ---------------------------------------

    def missing_events(self) -> list[str]:
        missing = []
        for order in self.plan.orders:
            if order.order_id is None:
                continue
            for event_type, disc in order.expected_events():
                events = self.topics.events(order.order_id, event_type)
                if not [e for e in events if discriminator(e) == disc]:
                    missing.append(f"{order.label} {order.order_id}: {event_type} {disc}".rstrip())
        return missing

    async def settle(self) -> None:
        """After the last restart: scripts finish, expected events arrive, the worker catches up."""
        loop = asyncio.get_running_loop()
        _done, stuck = await asyncio.wait(self.scripts, timeout=SETTLE_TIMEOUT + 10)
        for task in stuck:
            task.cancel()
        for order in self.plan.orders:
            if order.step != "done" and order.failure is None:
                order.failure = f"still at step {order.step!r} {SETTLE_TIMEOUT}s after the last restart"
        with contextlib.suppress(AssertionError):  # what is still missing then is the verdict's
            await wait_until(lambda: not self.missing_events(), interval=0.5,
                             timeout=max(5.0, (self.patience.until or 0) - time.monotonic()))
        deadline = time.monotonic() + 30
        lag = await loop.run_in_executor(None, self.lag)
        while lag and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            lag = await loop.run_in_executor(None, self.lag)
        if lag:
            self.problems["worker did not consume everything"].append(", ".join(lag))
        await asyncio.sleep(QUIET)
        self.topics.stop()
        await drain(self.topics.reader)
        self.topics.refresh()
        await self.dead_letters.drain()

    def lag(self) -> list[str]:
        written = [self.settings.topic(t) for t in ("payment.intent.created", "payment.completed",
                                                    "payment.refunded", "wallet.credits_added",
                                                    "user.deleted")]
        return group_lag(self.settings.kafka_bootstrap_servers, self.settings.app_id, written)

    async def verdict(self) -> None:
        problems = self.problems
        problems["client anomalies (5xx other than 503/504)"] += self.client.anomalies
        planned = {o.order_id: o for o in self.plan.orders if o.order_id}
        for order in self.plan.orders:
            if order.failure:
                problems["client steps that failed"].append(
                    f"{order.label} {order.order_id}: {order.failure}")

        created = {e["order_id"] for e in self.topics.reader.seen if e["event_type"] == "order.created"}
        for order_id in sorted(created - set(planned)):
            problems["orders created that no client got a 2xx for"].append(order_id)
        for order_id in sorted(set(self.topics.by_order) - set(planned)):
            if order_id not in created:
                problems["order.* events of unknown orders"].append(order_id)

        rows = await self.read_rows(planned, "rows not readable after the last restart")

        for order_id, order in planned.items():
            expected = order.expected_events()
            seen: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
            for event in self.topics.by_order.get(order_id, ()):
                seen[event["event_type"], discriminator(event)].append(event)
            for key, fields in expected.items():
                if key not in seen:
                    problems["expected events missing"].append(
                        f"{order.label} {order_id}: {' '.join(key).strip()}")
                    continue
                for event in seen[key]:
                    wrong = {k: (event.get(k), v) for k, v in fields.items() if event.get(k) != v}
                    if wrong:
                        problems["events with wrong fields"].append(
                            f"{order.label} {order_id} {key[0]}: (got, expected) {wrong}")
            for key, events in seen.items():
                ids = {e["event_id"] for e in events}
                if key not in expected:
                    problems["events that should not exist"].append(
                        f"{order.label} {order_id}: {' '.join(key).strip()} x{len(ids)}")
                if len(ids) > 1:
                    problems["transitions published under different event ids"].append(
                        f"{order.label} {order_id}: {' '.join(key).strip()} ids {sorted(ids)}")
            row = rows.get(order_id)
            if row is None:
                continue
            want = order.expected_row()
            got = {k: row.get(k) for k in want}
            if got != want:
                problems["rows not in their expected final state"].append(
                    f"{order.label} {order_id}: got {got}, expected {want}")
            if order.kind == "expired":
                for event in seen.get(("order.expired", ""), []):
                    expired_at = epoch_ms(event["expired_at"])
                    if expired_at != row.get("payment_deadline_ms"):
                        problems["events with wrong fields"].append(
                            f"{order.label} {order_id} order.expired: expired_at {expired_at}"
                            f" != payment_deadline_ms {row.get('payment_deadline_ms')}")

        # The rows the worker serves must also be what its changelog holds: a
        # worker that lost its disk (or a partition moving to another worker)
        # restores them from there.
        await self.cold_restart()
        restored = await self.read_rows(planned, "rows not restored from the changelog", missing_grace=15.0)
        for order_id, row in rows.items():
            again = restored.get(order_id)
            if again is not None and again != row:
                changed = {k: (row.get(k), again.get(k)) for k in sorted(set(row) | set(again))
                           if row.get(k) != again.get(k)}
                problems["rows that differ after a cold restore from the changelog"].append(
                    f"{planned[order_id].label} {order_id}: (served, restored) {changed}")

        for letter in self.dead_letters.seen:
            headers = {k: v.decode(errors="replace") for k, v in letter.headers.items()
                       if k.startswith("dlq.")}
            problems["dead letters (the test sends nothing bad)"].append(str(headers))

    async def read_rows(self, planned: dict[str, PlannedOrder], problem: str,
                        missing_grace: float = 0.0) -> dict[str, dict[str, Any]]:
        """GET every planned order; a 404 is retried for ``missing_grace`` seconds (restoring)."""
        self.patience.renew()
        rows: dict[str, dict[str, Any]] = {}
        grace_until = time.monotonic() + missing_grace
        for order_id, order in planned.items():
            try:
                while True:
                    answer = await self.client.send("GET", f"/orders/{order_id}", f"GET {order.label}",
                                                    expect=(200, 404) if missing_grace else (200,))
                    if answer.status_code == 200:
                        rows[order_id] = answer.json()
                        break
                    if time.monotonic() > grace_until:
                        raise StepFailed(f"GET {order.label}: 404 {answer.text[:200]}")
                    await asyncio.sleep(0.5)
            except StepFailed as exc:
                self.problems[problem].append(f"{order.label}: {exc}")
        return rows

    async def cold_restart(self) -> None:
        """Stop the worker (SIGTERM), wipe its state directory, start it again."""
        await in_thread(self.worker.stop)
        self.worker.wipe_state()
        began = time.monotonic()
        await in_thread(self.worker.start, SERVE_TIMEOUT)
        self.cold_restart_took = time.monotonic() - began

    def summary(self) -> str:
        orders = self.plan.orders
        unpaid = [o for o in orders if o.kind == "expired"]
        expired_once = sum(
            1 for o in unpaid if o.order_id
            and len({e["event_id"] for e in self.topics.events(o.order_id, "order.expired")}) == 1)
        per_type = Counter(e["event_type"] for e in self.topics.reader.seen)
        distinct = Counter(t for t, _ in {(e["event_type"], e["event_id"]) for e in self.topics.reader.seen})
        serve = [k.serve_again for k in self.kills]
        lines = [
            f"crash test: seed {self.plan.seed} (replay: PAYSTREAM_CRASH_SEED={self.plan.seed}), "
            f"{self.elapsed():.0f}s",
            f"kills: {len(self.kills)} ({sum(k.kind.startswith('random') for k in self.kills)} random, "
            f"{sum(k.kind.startswith('aimed') for k in self.kills)} aimed at the fan-out burst sent at "
            f"{self.burst_sent_at if self.burst_sent_at is None else round(self.burst_sent_at, 1)}s); "
            f"restarts: {len(self.kills)} ({sum(k.wiped for k in self.kills)} with the state wiped)",
            *(f"  kill #{k.number} at {k.at:.1f}s {k.kind}, after {k.served_for:.2f}s serving"
              f"{', state wiped' if k.wiped else ''}: serving again after {k.serve_again:.1f}s"
              for k in self.kills),
            f"serving again after a kill: min {min(serve, default=0):.1f}s max {max(serve, default=0):.1f}s; "
            f"after the final stop + wiped state: {self.cold_restart_took:.1f}s",
            f"orders: {len(orders)} " + str(dict(Counter(o.kind for o in orders))),
            f"unpaid orders expired exactly once: {expired_once}/{len(unpaid)}",
            f"api requests: {self.client.requests}, retried: {dict(self.client.retries)}",
            "events read (records / distinct event ids): "
            + ", ".join(f"{t.removeprefix('order.')} {per_type[t]}/{distinct[t]}" for t in sorted(per_type)),
            f"dead letters: {len(self.dead_letters.seen)}; worker log: {self.worker.log_path}",
        ]
        return "\n".join(lines)


@pytest.fixture
def worker(app_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(settings_env(app_settings), app_settings.worker_web_port, tmp_path / "state",
                            name="worker")
    try:
        yield process
    finally:
        process.stop()


async def in_thread(call: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, call, *args)


async def test_orders_survive_sigkills_of_the_worker(app_settings: Settings, worker: WorkerProcess) -> None:
    seed = int(os.environ.get("PAYSTREAM_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    plan = draw_plan(seed, uuid.uuid4().hex[:6])
    print(f"\ncrash test seed {seed}: {plan.kills} kills, {len(plan.orders)} orders", flush=True)
    started = time.monotonic()
    await in_thread(worker.start, SERVE_TIMEOUT)
    print(f"worker serving after {time.monotonic() - started:.1f}s", flush=True)

    run = CrashRun(app_settings, worker, plan)
    summary = ""
    try:
        run.topics.start()
        burst = asyncio.create_task(run.burst())
        await run.chaos()
        run.patience.renew()  # from now on a client step that gets nowhere gives up
        await asyncio.wait([burst], timeout=SETTLE_TIMEOUT + 10)
        if not burst.done():
            burst.cancel()
            run.problems["chaos"].append("the fan-out users never got ready for their burst")
        await run.settle()
        await run.verdict()
        summary = run.summary()
        print(summary, flush=True)
    finally:
        if not summary:
            print(f"stopped after {len(run.kills)} kill(s): {run.kills}", flush=True)
        await run.close()
    problems = {k: v for k, v in run.problems.items() if v}
    report = "\n".join(f"{what} ({len(items)}):\n    " + "\n    ".join(items[:25])
                       for what, items in problems.items())
    assert not problems, f"{summary}\n\n{report}"
