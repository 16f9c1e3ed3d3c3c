"""subscription.expired from the subscription aggregate's persisted deadline, across a worker stop.

A stack of this module's own (:func:`tests.integration.subscription_support.subscription_stack`:
private topics on the real broker, ``paystream ingress`` and ``paystream
worker`` subprocesses, localstripe as Stripe), since its worker is stopped.

Each test makes two subscriptions through ``POST /subscriptions`` and sets
both to cancel at the period's end through the API (at localstripe too);
Stripe's ``customer.subscription.updated`` (which localstripe never sends,
and its periods are a month long) is posted signed, reporting the period
ending a few seconds from now.  The first subscription's period ends while
the worker runs: it expires just before the worker is stopped.  The second
one's period ends while no worker runs: the worker is stopped (SIGTERM: a
clean exit; SIGKILL: a crash) before it and started again after it.

After the restart each subscription has exactly one ``subscription.expired``
(one event id, derived from the subscription; for the one that fired while
the worker ran, one record after SIGTERM, while after SIGKILL a replay may
repeat the record under the same id), the one that ended while the worker
was down is announced once the worker is back (one record), and the rows
over the API show them expired at their period's end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from streams.devtools.localstripe import LocalStripe
from tables.subscription_state import fact_event_id
from tests.integration.pipeline_support import wait_until
from tests.integration.subscription_support import (
    SubscriptionStack,
    period_ending_event,
    restart_worker,
    subscription_stack,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

#: The second period ends this long after its webhook is posted: time to see
#: the fact in the row and to stop the worker (a SIGTERM stop takes seconds).
DOWN_MARGIN = 20
#: After the expected events: late duplicates would show up here.
QUIET = 3.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def subs(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SubscriptionStack]:
    state: Path = tmp_path_factory.mktemp("subscription-expiry")
    async with subscription_stack(kafka_bootstrap, registry_url, localstripe, state,
                                  "sub-expiry") as stack:
        yield stack


def user() -> str:
    return f"u-subx-{uuid.uuid4().hex[:8]}"


async def set_to_end(subs: SubscriptionStack, view: dict, buyer: str, end: int) -> None:
    """Cancel at period end through the API, then Stripe's period-end fact; until the row shows it."""
    sub_id = view["subscription_id"]
    answer = await subs.api.post(f"/subscriptions/{sub_id}/cancel", json={"at_period_end": True},
                                 headers={"Idempotency-Key": uuid.uuid4().hex})
    assert answer.status_code == 200 and answer.json()["cancel_at_period_end"] is True, answer.text
    assert (await subs.stripe_get(f"/v1/subscriptions/{sub_id}"))["cancel_at_period_end"] is True
    await subs.stack.deliver(period_ending_event(view, buyer, end))

    async def period_ending() -> bool:
        row = await subs.subscription(sub_id)
        return row["current_period_end"] == end * 1000 and row["cancel_at_period_end"] is True

    await wait_until(period_ending, timeout=30.0, what=f"the period end of {sub_id} in its row")


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_a_subscription_ending_while_the_worker_is_down_expires_once_after_the_restart(
        subs: SubscriptionStack, how: str) -> None:
    fired_before, ends_while_down = user(), user()
    first = await subs.subscribed(fired_before, "plan-basic")
    second = await subs.subscribed(ends_while_down, "plan-pro")
    first_id, second_id = first["subscription_id"], second["subscription_id"]

    first_end = int(time.time()) + 2
    await set_to_end(subs, first, fired_before, first_end)
    await subs.events_of("subscription.expired", subscription_id=first_id, timeout=60.0)

    second_end = int(time.time()) + DOWN_MARGIN
    await set_to_end(subs, second, ends_while_down, second_end)
    assert subs.events("subscription.expired", subscription_id=second_id) == []
    # Stopped right after the first fired (after SIGKILL its batch may be read again).
    stopped = await restart_worker(subs, how, down_until=second_end + 1.0)
    assert stopped < second_end, (
        f"the worker took until {stopped:.1f} to stop, after the period's end {second_end}: "
        "raise DOWN_MARGIN, the test proves nothing this way")
    print(f"\n{how}: worker down {second_end - stopped:.1f}s before the period's end, "
          f"serving again {time.time() - second_end:.1f}s after it", flush=True)

    [expired] = await subs.events_of("subscription.expired", subscription_id=second_id, timeout=90.0)
    assert expired["event_id"] == fact_event_id("subscription.expired", second_id)
    assert int(expired["expiration_date"].timestamp()) == second_end
    assert (expired["user_id"], expired["plan_id"]) == (ends_while_down, "plan-pro")
    await asyncio.sleep(QUIET)
    await subs.settle()

    for sub_id, end in ((first_id, first_end), (second_id, second_end)):
        records = subs.events("subscription.expired", subscription_id=sub_id)
        assert {e["event_id"] for e in records} == {fact_event_id("subscription.expired", sub_id)}, how
        row = await subs.subscription(sub_id)
        assert (row["expired"], row["expired_at_ms"], row["status"]) == (True, end * 1000, "active")
        # Nothing but the period moved: no subscription.updated, and it was never canceled.
        assert subs.events("subscription.updated", subscription_id=sub_id) == []
        assert subs.events("subscription.canceled", subscription_id=sub_id) == []
        assert subs.stack.dead_letters_of(sub_id.encode()) == []
    # Expired after the restart, with no stop after it: one record.
    assert len(subs.events("subscription.expired", subscription_id=second_id)) == 1
    if how == "sigterm":  # a clean stop committed what it had published
        assert len(subs.events("subscription.expired", subscription_id=first_id)) == 1
    subs.stack.worker.assert_running()
