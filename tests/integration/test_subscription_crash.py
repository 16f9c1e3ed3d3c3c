"""Kill -9 of the worker while subscriptions are created, canceled and a user deleted.

The payment crash test (``test_payment_crash.py``) for the subscription
domain, on a deployed stack of this module's own
(:func:`tests.integration.subscription_support.subscription_stack`: worker
and ingress as subprocesses, localstripe as Stripe, whose
``customer.subscription.*`` and ``invoice.*`` webhooks reach the ingress
whatever state the worker is in).  A careful client (one Idempotency-Key per
operation, retried on connection errors, 503 and 504; the client of
``test_payment_crash.py``) creates subscriptions concurrently through
``POST /subscriptions`` (two users with two subscriptions each, on
different plans), cancels some of them now through
``POST /subscriptions/{id}/cancel``, and once both subscriptions of one user
are listed by the user index, ``user.deleted`` for that user is written to
its topic (``handle_user_deleted``: cancel at Stripe, refund the unused
share).  Meanwhile the worker is SIGKILLed and restarted at once: right
after the first of a burst of creates were answered (the others in flight), at a random delay (creates and
cancels go on across both), within half a second of the ``user.deleted`` or
as soon as its first ``subscription.canceled`` shows (between a cancel and
its refund, which a follow-up command makes), and at random again.

The verdict, once everything settled, is read from the topics and from
localstripe: localstripe holds exactly one customer per user (by
``metadata.user_id``) and exactly one subscription per requested one (the
user's customer's subscriptions, by plan: a user's requests are on
different plans), the ones the client was answered; every subscription has
``subscription.created`` under exactly one event id (derived from it) and
one subscription order; every one canceled through the API has exactly one
``subscription.canceled`` id (CANCELLATION_REQUESTED) and is canceled at
Stripe; the deleted user's two are canceled at Stripe with exactly one
refund each at localstripe (of the invoice's charge) and one
``payment.refunded`` id each naming it, ``subscription.canceled``
USER_DELETED once; the others are active at Stripe and in their rows; no
transition (a subscription's created / canceled / expired / updated, an
invoice's created / paid, a refund) is published under two event ids (the
same id twice is at-least-once delivery and allowed); no subscription.created
names a subscription no client was answered; nothing is dead-lettered; the
worker consumed every input.

Seen once in about twenty runs (seed 777, the first kill while the burst's
subscription.created were first consumed): three subscriptions announced,
every input committed, no dead letter, and no subscription order for them.
A subscription left without its order is therefore traced on failure (every
record naming its subscription.created or its order, with the group's
committed offset), to show where the chain stopped.

``PAYSTREAM_CRASH_SEED=<seed>`` replays the plan and the kill delays (timing still varies).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from streams import access, catalog
from streams.devtools.localstripe import LocalStripe
from streams.settings import Settings
from tables import aggregate
from tables.payment_state import fact_event_id as payment_fact_event_id
from tables.subscription_state import fact_event_id
from tests.integration.pipeline_support import EventReader, drain
from tests.integration.subscription_support import (
    PLANS,
    SUBSCRIPTION_EVENTS,
    SubscriptionStack,
    subscription_stack,
)
from tests.integration.test_payment_crash import CarefulClient, StepFailed, kill_and_restart

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

#: Users with one subscription each, besides the two users with two (one of them deleted).
SINGLE_USERS = 9
#: Subscriptions requested at once at the start; the first kill comes when BURST of them
#: are answered, while the others are in flight (between the API's commands or Stripe calls).
STARTING = 8
BURST = 2
#: Of the subscriptions of users not deleted, those canceled now through the API.
CANCEL_SHARE = 0.4
#: Later subscriptions start at random within this many seconds.
SPREAD = 30.0
SERVE_TIMEOUT = 90.0
#: After the last restart: how long client steps and expected events may take.
SETTLE_TIMEOUT = 90.0
QUIET = 3.0
#: Every event the verdict reads (one reader, polled all along).
TOPICS = (*SUBSCRIPTION_EVENTS, "invoice.paid", "subscription.payment_failed")

CLIENT_STUCK = "client steps that failed"
NEVER_COMMITTED = "records the worker never consumed (committed offset / end)"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def crash_subs(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
                     tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SubscriptionStack]:
    """A stack of this module's own: its worker is killed."""
    async with subscription_stack(kafka_bootstrap, registry_url, localstripe,
                                  tmp_path_factory.mktemp("subscription-crash"), "sub-crash") as stack:
        yield stack


@dataclass
class PlannedSubscription:
    label: str
    user_id: str
    plan_id: str
    start_after: float
    cancel: bool = False
    #: Seconds between subscription.created and the cancel request.
    cancel_after: float = 0.0
    #: Canceled by user.deleted (the deleted user's two).
    deleted: bool = False
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancel_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    subscription_id: str | None = None
    customer_id: str | None = None
    step: str = "not started"
    failure: str | None = None


class CrashRun:
    def __init__(self, subs: SubscriptionStack, planned: list[PlannedSubscription],
                 deleted_user: str, chaos_rng: random.Random) -> None:
        self.subs = subs
        self.planned = planned
        self.deleted_user = deleted_user
        self.rng = chaos_rng
        settings = subs.stack.settings
        self.client = CarefulClient(subs.stack.worker.url)
        self.client.http.headers.update(access.authorization(settings.service_token))
        self.reader = EventReader(settings, TOPICS)
        self.created = 0
        self.burst_answered = asyncio.Event()
        self.delete_now = asyncio.Event()
        self.delete_sent = asyncio.Event()
        self.kills: list[str] = []
        self.polling = True
        self.began = time.monotonic()

    async def tail(self) -> None:
        loop = asyncio.get_running_loop()
        while self.polling:
            await loop.run_in_executor(None, self.reader.poll, 0.2)

    def gave_up(self) -> bool:
        return self.client.give_up_at is not None and time.monotonic() > self.client.give_up_at

    async def wait_events(self, topic: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        while True:
            found = self.reader.events(topic, **match)
            if len(found) >= count:
                return found
            if self.gave_up():
                raise StepFailed(f"{len(found)}/{count} {topic} {match} after the last restart")
            await asyncio.sleep(0.1)

    async def create(self, sub: PlannedSubscription) -> None:
        await asyncio.sleep(sub.start_after)
        sub.step = "create"
        answer = await self.client.send(
            "POST", "/subscriptions", f"subscribe {sub.label}", (201,),
            json={"user_id": sub.user_id, "plan_id": sub.plan_id, "payment_method": "pm_card_visa"},
            headers={"Idempotency-Key": sub.key})
        view = answer.json()
        sub.subscription_id, sub.customer_id = view["subscription_id"], view["customer_id"]
        self.created += 1
        if self.created >= BURST:
            self.burst_answered.set()
        sub.step = "wait for subscription.created"
        await self.wait_events("subscription.created", subscription_id=sub.subscription_id)

    async def script(self, sub: PlannedSubscription) -> None:
        try:
            await self.create(sub)
            if sub.cancel:
                await asyncio.sleep(sub.cancel_after)
                sub.step = "cancel"
                answer = await self.client.send(
                    "POST", f"/subscriptions/{sub.subscription_id}/cancel", f"cancel {sub.label}",
                    (200,), json={"at_period_end": False},
                    headers={"Idempotency-Key": sub.cancel_key})
                if answer.json().get("status") != "canceled":
                    raise StepFailed(f"cancel {sub.label}: answered {answer.json()}")
                sub.step = "wait for subscription.canceled"
                await self.wait_events("subscription.canceled", subscription_id=sub.subscription_id)
            sub.step = "done"
        except StepFailed as exc:
            sub.failure = str(exc)

    async def deleted_script(self, pair: list[PlannedSubscription]) -> None:
        """Both subscriptions of the user, listed by its index; then user.deleted (when chaos says)."""
        try:
            await asyncio.gather(*(self.create(sub) for sub in pair))
            for sub in pair:
                sub.step = "wait indexed"
            wanted = sorted(str(sub.subscription_id) for sub in pair)
            while True:
                answer = await self.client.send("GET", f"/users/{self.deleted_user}/subscriptions",
                                                "list the deleted user's subscriptions", (200,))
                if sorted(s["subscription_id"] for s in answer.json()["subscriptions"]) == wanted:
                    break
                if self.gave_up():
                    raise StepFailed(f"index lists {answer.json()} after the last restart")
                await asyncio.sleep(0.3)
            for sub in pair:
                sub.step = "wait for the chaos to delete the user"
            await self.delete_now.wait()
            self.subs.stack.writer.send("user.deleted", {
                "user_id": self.deleted_user, "deleted_at": int(time.time() * 1000),
                "reason": "crash test"})
            self.delete_sent.set()
            for sub in pair:
                sub.step = "wait for subscription.canceled"
                await self.wait_events("subscription.canceled", subscription_id=sub.subscription_id)
            for sub in pair:
                sub.step = "wait for payment.refunded"
            await self.wait_events("payment.refunded", 2, user_id=self.deleted_user)
            for sub in pair:
                sub.step = "done"
        except StepFailed as exc:
            for sub in pair:
                sub.failure = str(exc)
        finally:
            self.delete_sent.set()

    async def kill_and_restart(self, why: str) -> None:
        at = time.monotonic() - self.began
        line = (f"kill #{len(self.kills) + 1} at {at:5.1f}s ({why}; {self.created} subscriptions "
                f"answered, {len(self.reader.events('subscription.created'))} created, "
                f"{len(self.reader.events('subscription.canceled'))} canceled and "
                f"{len(self.reader.events('payment.refunded'))} refunds published)")
        self.kills.append(await kill_and_restart(self.subs.stack.worker, line, SERVE_TIMEOUT))

    async def chaos(self) -> None:
        await asyncio.wait_for(self.burst_answered.wait(), 90)
        await self.kill_and_restart("aimed: right after the first of a burst of creates were answered")
        await asyncio.sleep(self.rng.uniform(1.0, 4.0))
        await self.kill_and_restart("random")
        self.delete_now.set()
        await asyncio.wait_for(self.delete_sent.wait(), 120)
        if self.rng.random() < 0.5:
            await asyncio.sleep(self.rng.uniform(0.0, 0.5))
            await self.kill_and_restart("aimed: within half a second of user.deleted")
        else:
            # Between a cancel for the user's deletion and its refund (the follow-up command).
            deadline = time.monotonic() + 60
            while True:
                if self.reader.events("subscription.canceled", user_id=self.deleted_user) \
                        or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            await self.kill_and_restart("aimed: as the first USER_DELETED cancel shows")
        await asyncio.sleep(self.rng.uniform(1.0, 4.0))
        await self.kill_and_restart("random")


def plan_run(rng: random.Random, run_id: str) -> tuple[list[PlannedSubscription], str]:
    """The deleted user's two and STARTING - 2 others at once (the other user with two among
    them: its requests race for its one customer); the rest spread evenly over SPREAD."""
    deleted_user = f"u-sxd-{run_id}"
    twice = f"u-sxt-{run_id}"
    planned = [PlannedSubscription(f"{deleted_user}/{plan}", deleted_user, plan, 0.0, deleted=True)
               for plan in PLANS]
    requests = [(f"{twice}/{plan}", twice, plan) for plan in PLANS]
    for i in range(SINGLE_USERS):
        user = f"u-sx1-{run_id}-{i}"
        requests.append((user, user, rng.choice(sorted(PLANS))))
    at_once = STARTING - len(planned)
    later = len(requests) - at_once
    for n, (label, user, plan) in enumerate(requests):
        start = 0.0 if n < at_once else SPREAD * (n - at_once + rng.random()) / later
        planned.append(PlannedSubscription(label, user, plan, start))
    others = [s for s in planned if not s.deleted]
    for sub in rng.sample(others, max(2, round(CANCEL_SHARE * len(others)))):
        sub.cancel, sub.cancel_after = True, rng.uniform(0.0, 2.0)
    return planned, deleted_user


async def test_sigkills_never_make_a_subscription_twice_nor_lose_a_cancel_or_refund(
        crash_subs: SubscriptionStack) -> None:
    subs = crash_subs
    seed = int(os.environ.get("PAYSTREAM_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    planned, deleted_user = plan_run(rng, uuid.uuid4().hex[:6])
    # The kill plan has its own generator: what the scripts do does not shift it.
    chaos_rng = random.Random(rng.getrandbits(64))
    print(f"\nsubscription crash test seed {seed} (replay: PAYSTREAM_CRASH_SEED={seed}): "
          f"{len(planned)} subscriptions of {len({s.user_id for s in planned})} users, "
          f"{sum(s.cancel for s in planned)} canceled through the API, 2 by user.deleted, 4 kills",
          flush=True)
    run = CrashRun(subs, planned, deleted_user, chaos_rng)
    tailer = asyncio.create_task(run.tail())
    try:
        pair = [s for s in planned if s.deleted]
        scripts = [asyncio.create_task(run.script(s)) for s in planned if not s.deleted]
        scripts.append(asyncio.create_task(run.deleted_script(pair)))
        await run.chaos()
        run.client.give_up_at = time.monotonic() + SETTLE_TIMEOUT
        await asyncio.wait(scripts, timeout=SETTLE_TIMEOUT + 10)
        try:
            await subs.settle(timeout=30)
        except AssertionError as exc:  # part of the verdict, which is still drawn up
            stuck = str(exc).splitlines()[0]
        else:
            stuck = ""
        await asyncio.sleep(QUIET)  # late duplicates under new ids would show up here
        run.polling = False
        await tailer
        await drain(run.reader)
        assert subs.stack.dead_letters is not None
        await subs.stack.dead_letters.drain()
    finally:
        run.polling = False
        await asyncio.gather(tailer, return_exceptions=True)
        await run.client.close()
        run.reader.close()

    problems: dict[str, list[str]] = defaultdict(list)
    problems[CLIENT_STUCK] = [f"{s.label} {s.subscription_id} at {s.step!r}: {s.failure}"
                              for s in planned if s.step != "done"]
    problems["5xx other than 503/504"] = run.client.anomalies
    problems[NEVER_COMMITTED] = [stuck] if stuck else []
    refunds_made = await verdict_at_stripe(subs, planned, problems)
    verdict_on_topics(run.reader, planned, deleted_user, refunds_made, problems)
    for sub in planned:
        if sub.subscription_id is None:
            continue
        answer = await subs.api.get(f"/subscriptions/{sub.subscription_id}")
        want = "canceled" if sub.cancel or sub.deleted else "active"
        if answer.status_code != 200 or answer.json().get("status") != want:
            problems["rows not in their expected final state"].append(
                f"{sub.label} {sub.subscription_id}: {answer.status_code} {answer.text[:200]}, "
                f"expected {want}")
    problems["dead letters"] = [str({k: v[:200] for k, v in d.headers.items() if k.startswith("dlq.")})
                                for d in subs.stack.dead_letters.seen]
    orderless = [s for s in planned if s.subscription_id
                 and not run.reader.events("order.created", subscription_id=s.subscription_id)]
    if orderless:  # where the chain subscription.created -> index -> order command -> order stopped
        problems["trace of the subscriptions without an order"] = await asyncio.get_running_loop(
        ).run_in_executor(None, trace_orders, subs.stack.settings,
                          [str(s.subscription_id) for s in orderless])

    per_type = Counter(e["event_type"] for e in run.reader.seen)
    distinct = Counter(t for t, _ in {(e["event_type"], e["event_id"]) for e in run.reader.seen})
    counts = ", ".join(f"{t} {per_type[t]}/{distinct[t]}" for t in sorted(per_type))
    print(f"crash run {time.monotonic() - run.began:.0f}s; retries {dict(run.client.retries)}; "
          f"events (records/distinct ids, every stack's subscriptions): {counts}", flush=True)
    report = {k: v for k, v in problems.items() if v}
    assert not report, f"seed {seed}\n" + "\n".join(run.kills) + "\n" + "\n".join(
        f"{what} ({len(items)}):\n    " + "\n    ".join(items[:20]) for what, items in report.items())


async def verdict_at_stripe(subs: SubscriptionStack, planned: list[PlannedSubscription],
                            problems: dict[str, list[str]]) -> dict[str, tuple[str, int]]:
    """One customer per user, one subscription per request, canceled as planned, refunds once.

    Returns the deleted user's refunds at localstripe (id, amount) by subscription label.
    """
    refunds_made: dict[str, tuple[str, int]] = {}
    users = sorted({s.user_id for s in planned})
    customers: dict[str, list[str]] = {u: [] for u in users}
    for customer in (await subs.stripe_get("/v1/customers", limit=100000))["data"]:
        user = (customer.get("metadata") or {}).get("user_id")
        if user in customers:
            customers[user].append(customer["id"])
    for user in users:
        if len(customers[user]) != 1:
            problems["users without exactly one Stripe customer"].append(f"{user}: {customers[user]}")
        at_stripe: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for customer_id in customers[user]:
            listed = await subs.stripe_get("/v1/subscriptions", customer=customer_id, status="all",
                                           limit=100)
            for stripe_sub in listed["data"]:
                at_stripe[stripe_sub["items"]["data"][0]["plan"]["id"]].append(stripe_sub)
        mine = [s for s in planned if s.user_id == user]
        for plan in sorted(set(at_stripe) - {s.plan_id for s in mine}):
            problems["subscriptions at Stripe nobody asked for"].append(
                f"{user} {plan}: {[s['id'] for s in at_stripe[plan]]}")
        for sub in mine:
            found = at_stripe.get(sub.plan_id, [])
            ids = [s["id"] for s in found]
            if ids != [sub.subscription_id]:
                problems["requests without exactly one subscription at Stripe (the answered one)"].append(
                    f"{sub.label}: at Stripe {ids}, answered {sub.subscription_id}")
                continue
            [stripe_sub] = found
            want = "canceled" if sub.cancel or sub.deleted else "active"
            if stripe_sub["status"] != want or (stripe_sub.get("metadata") or {}).get("user_id") != user:
                problems["subscriptions at Stripe not as planned"].append(
                    f"{sub.label} {sub.subscription_id}: {stripe_sub['status']} "
                    f"{stripe_sub.get('metadata')}, expected {want}")
            if sub.deleted:
                invoices = (await subs.stripe_get("/v1/invoices", subscription=sub.subscription_id))["data"]
                charges = {_id(i.get("charge")) for i in invoices if i.get("status") == "paid"}
                refunds = [r for c in sorted(charges) for r in await subs.stripe_refunds_of_charge(c)]
                if len(charges) != 1 or len(refunds) != 1:
                    problems["deleted user's subscriptions without exactly one refund at Stripe"].append(
                        f"{sub.label} {sub.subscription_id}: charges {sorted(charges)}, "
                        f"refunds {[(r['id'], r['amount']) for r in refunds]}")
                else:
                    refunds_made[sub.label] = (refunds[0]["id"], refunds[0]["amount"])
    return refunds_made


def verdict_on_topics(reader: EventReader, planned: list[PlannedSubscription], deleted_user: str,
                      refunds_made: dict[str, tuple[str, int]], problems: dict[str, list[str]]) -> None:
    """Once per transition, under one id; the events the plan causes and no others."""
    def ids(topic: str, **match: Any) -> set[str]:
        return {e["event_id"] for e in reader.events(topic, **match)}

    known = {s.subscription_id: s for s in planned if s.subscription_id}
    users = {s.user_id for s in planned}
    for sub_id, sub in known.items():
        created = ids("subscription.created", subscription_id=sub_id)
        if created != {fact_event_id("subscription.created", sub_id)}:
            problems["subscription.created not under exactly its one id"].append(
                f"{sub.label} {sub_id}: {sorted(created)}")
        if len(ids("order.created", subscription_id=sub_id)) != 1:
            problems["subscription orders not under exactly one id"].append(
                f"{sub.label} {sub_id}: {sorted(ids('order.created', subscription_id=sub_id))}")
        canceled = reader.events("subscription.canceled", subscription_id=sub_id)
        want_reason = "USER_DELETED" if sub.deleted else "CANCELLATION_REQUESTED" if sub.cancel else None
        if want_reason is None:
            if canceled:
                problems["canceled but not planned to be"].append(f"{sub.label} {sub_id}")
        elif {e["event_id"] for e in canceled} != {fact_event_id("subscription.canceled", sub_id)} \
                or {e["reason"] for e in canceled} != {want_reason}:
            problems["subscription.canceled not under exactly its one id and reason"].append(
                f"{sub.label} {sub_id}: {sorted((e['event_id'], e['reason']) for e in canceled)}, "
                f"expected {want_reason}")
        expired = ids("subscription.expired", subscription_id=sub_id)
        if len(expired) > 1 or (expired and want_reason is None):
            problems["subscription.expired more than once or not ended"].append(
                f"{sub.label} {sub_id}: {sorted(expired)}")
        updated = reader.events("subscription.updated", subscription_id=sub_id)
        if updated:  # nothing in the plan changes a plan, quantity or status other than canceling
            problems["subscription.updated nothing in the plan causes"].append(
                f"{sub.label} {sub_id}: "
                f"{[(e['old_plan'], e['new_plan'], e['status'], e['event_id']) for e in updated]}")
    strangers = {e["subscription_id"] for e in reader.events("subscription.created")
                 if e["user_id"] in users} - set(known)
    problems["subscriptions announced that no client got a 201 for"] = sorted(strangers)

    refunded = reader.events("payment.refunded", user_id=deleted_user)
    by_refund: dict[str, set[str]] = defaultdict(set)
    for event in refunded:
        by_refund[event["refund_id"]].add(event["event_id"])
    for sub in (s for s in planned if s.deleted):
        if sub.label not in refunds_made:
            continue  # reported by verdict_at_stripe
        refund_id, amount = refunds_made[sub.label]
        told = by_refund.get(refund_id, set())
        amounts = {e["amount"] for e in refunded if e["refund_id"] == refund_id}
        if told != {payment_fact_event_id("payment.refunded", refund_id)} \
                or amounts != {amount} or not 0 < amount <= PLANS[sub.plan_id]:
            problems["deleted user's refunds not announced once as made"].append(
                f"{sub.label} refund {refund_id} ({amount}): "
                f"ids {sorted(told)}, amounts {sorted(amounts)}")
    unknown = set(by_refund) - {refund_id for refund_id, _ in refunds_made.values()}
    if unknown:
        problems["refunds announced that localstripe does not hold for the deleted user"].append(
            f"{sorted(unknown)}")
    if any(e["user_id"] in users - {deleted_user} for e in reader.events("payment.refunded")):
        problems["refunds of users not deleted"].append(
            str([e["refund_id"] for e in reader.events("payment.refunded")
                 if e["user_id"] in users - {deleted_user}]))

    # Every stack's invoices of our subscriptions' customers: created and paid once each.
    for topic in ("invoice.created", "invoice.paid"):
        by_invoice: dict[str, set[str]] = defaultdict(set)
        for event in reader.events(topic):
            if event.get("subscription_id") in known:
                by_invoice[event["invoice_id"]].add(event["event_id"])
        for invoice_id, event_ids in sorted(by_invoice.items()):
            if len(event_ids) != 1:
                problems[f"{topic} under more than one id"].append(f"{invoice_id}: {sorted(event_ids)}")


def trace_orders(settings: Settings, subscription_ids: list[str]) -> list[str]:
    """Every record naming these subscriptions' created event or order, with the group's commits.

    Read raw (an id is plain UTF-8 inside Avro and JSON): the subscription.created
    record, the order index's commands and changelog, the order commands.
    """
    wanted: dict[bytes, str] = {}
    for sub_id in subscription_ids:
        event_id = fact_event_id("subscription.created", sub_id)
        wanted[event_id.encode()] = f"{sub_id}'s subscription.created"
        wanted[aggregate.derived_id(event_id, "subscription-order").encode()] = f"{sub_id}'s order"
    bootstrap = settings.kafka_bootstrap_servers
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = sorted(t for t in admin.list_topics(timeout=20).topics
                    if t.startswith(settings.topic_prefix) and any(part in t for part in (
                        "subscription.created", catalog.ORDER_COMMANDS, "subscription-orders",
                        catalog.SUBSCRIPTION_ORDER_INDEX, "order.created")))
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"trace-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False})
    lines: list[str] = []
    try:
        for topic in topics:
            partitions = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
            [future] = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(
                settings.app_id, [TopicPartition(topic, p) for p in partitions])]).values()
            committed = {tp.partition: tp.offset for tp in future.result(timeout=10).topic_partitions}
            ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                    for p in partitions}
            consumer.assign([TopicPartition(topic, p, low) for p, (low, high) in ends.items()
                             if high > low])
            left = sum(high - low for low, high in ends.values())
            while left > 0:
                message = consumer.poll(2.0)
                if message is None:
                    break
                if message.error():
                    continue
                left -= 1
                blob = (message.key() or b"") + (message.value() or b"")
                for needle, what in wanted.items():
                    if needle in blob:
                        lines.append(f"{what}: {topic}[{message.partition()}]@{message.offset()} "
                                     f"(group committed {committed.get(message.partition())}, "
                                     f"end {ends[message.partition()][1]})")
            consumer.unassign()
    finally:
        consumer.close()
    return lines or [f"nothing names {subscription_ids} on {topics}"]


def _id(value: Any) -> Any:
    return value.get("id") if isinstance(value, dict) else value
