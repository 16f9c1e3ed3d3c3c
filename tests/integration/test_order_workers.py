"""Two ``paystream worker`` processes of one app: routing, forwarding, take-over.

Each worker owns some of the order partitions; an API request reaching the
other worker must be answered by the owner (faust-streaming #514 broke this
for str keys; Faust's own ``table_route`` also drops request bodies, which
``streams.routing.owner_response`` forwards).  Payment deadlines set while
one worker owned every partition fire once, on whichever worker owns them
after the rebalance; when a worker leaves, the other serves all orders from
the changelog.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka.partitioner import murmur2

from streams import catalog
from streams.settings import Settings
from tests.integration.pipeline_support import EventReader
from tests.integration.worker_process import WorkerProcess, settings_env

pytestmark = pytest.mark.integration

ORDER = {"user_id": "u-workers", "order_type": "ONE_TIME", "currency": "EUR",
         "items": [{"product_id": "sku-1", "quantity": 1, "unit_amount": 700}]}


def partition_of(order_id: str) -> int:
    """The partition of an order key (Java-compatible murmur2, as producers use)."""
    return (murmur2(order_id.encode()) & 0x7FFFFFFF) % catalog.EVENT_PARTITIONS


def order_owners(worker: WorkerProcess, changelog: str) -> dict[int, str]:
    """partition -> owner URL, as ``worker`` sees the assignment."""
    return {p: url for url, topics in worker.routes().items() for p in topics.get(changelog, [])}


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached within {timeout}s (last {last!r})")


def assert_healthy(*workers: WorkerProcess) -> None:
    for worker in workers:
        worker.assert_running()
        assert not worker.error_lines(), worker.log_tail(120)


def create_with_retries(http: httpx.Client, url: str, body: dict, within: float = 90.0) -> httpx.Response:
    """POST /orders as a careful client does: retry 503/504 under one Idempotency-Key.

    Right after a rebalance the owner may still be restoring its tables; the
    API then answers 503/504 and the retry must not create a second order.
    """
    key = str(uuid.uuid4())
    deadline = time.monotonic() + within
    while True:
        answer = http.post(f"{url}/orders", json=body, headers={"Idempotency-Key": key})
        if answer.status_code not in (503, 504) or time.monotonic() > deadline:
            return answer
        time.sleep(1.0)


@pytest.fixture
def workers(app_settings: Settings, free_port: Callable[[], int], tmp_path: Path
            ) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    env = settings_env(app_settings)
    a = WorkerProcess(env, free_port(), tmp_path / "state-a", name="worker-a")
    b = WorkerProcess(env, free_port(), tmp_path / "state-b", name="worker-b")
    try:
        yield a, b
    finally:
        for worker in (b, a):
            worker.stop()


def test_two_workers_route_reads_and_commands_to_the_owner(
    app_settings: Settings, workers: tuple[WorkerProcess, WorkerProcess],
    request: pytest.FixtureRequest,
) -> None:
    a, b = workers
    changelog = f"{app_settings.app_id}-orders-changelog"
    a.start(timeout=90)
    reader = EventReader(app_settings, ["order.expired"])
    request.addfinalizer(reader.close)

    # Orders with a payment deadline while A owns every partition: two per
    # partition (the API takes the order id a first worker chose), so some of
    # these deadlines move to B in the rebalance and must fire there.
    expiring: dict[str, int] = {}
    with httpx.Client(timeout=30.0) as http:
        while len(expiring) < 2 * catalog.EVENT_PARTITIONS:
            order_id = str(uuid.uuid4())
            if sum(partition_of(o) == partition_of(order_id) for o in expiring) == 2:
                continue
            answer = http.post(f"{a.url}/orders", json={**ORDER, "payment_window_seconds": 30},
                               headers={"X-Paystream-Order-Id": order_id})
            assert answer.status_code == 201, answer.text
            assert answer.json()["order_id"] == order_id
            expiring[order_id] = answer.json()["payment_deadline_ms"]
    b.start(timeout=90)

    # The group rebalanced when B joined: wait until both workers see the same
    # split of the order partitions between the two of them.
    def split() -> dict[int, str] | None:
        seen_a, seen_b = order_owners(a, changelog), order_owners(b, changelog)
        if seen_a != seen_b or len(seen_a) != catalog.EVENT_PARTITIONS:
            return None
        return seen_a if set(seen_a.values()) == {a.url, b.url} else None

    owners = wait_for(split, 90, "both workers owning order partitions")
    assert isinstance(owners, dict)
    assert time.time() * 1000 < min(expiring.values()) - 2_000, "rebalance too slow for this test"
    a.wait_serving(60)
    b.wait_serving(60)

    with httpx.Client(timeout=30.0) as http:
        # Orders created through A until each worker owns at least three.
        created: dict[str, dict] = {}
        by_owner: dict[str, list[str]] = {a.url: [], b.url: []}
        while len(created) < 8 or min(len(ids) for ids in by_owner.values()) < 3:
            assert len(created) < 40, f"orders never spread over both workers: {by_owner}"
            answer = create_with_retries(http, a.url, ORDER)
            assert answer.status_code == 201, answer.text
            order = answer.json()
            assert order["status"] == "PENDING"
            created[order["order_id"]] = order
            by_owner[owners[partition_of(order["order_id"])]].append(order["order_id"])

        # Every order reads the same through both workers: the non-owner routes
        # the GET to the owner (its own table has no row for the key).
        for order_id, order in created.items():
            via_a = http.get(f"{a.url}/orders/{order_id}")
            via_b = http.get(f"{b.url}/orders/{order_id}")
            assert via_a.status_code == 200, (order_id, via_a.text)
            assert via_b.status_code == 200, (order_id, via_b.text)
            assert via_a.json() == via_b.json() == order

        # A command with a body sent to the non-owner: the body reaches the owner.
        canceled = {}
        for owner, other in ((a, b), (b, a)):
            order_id = by_owner[owner.url][0]
            answer = http.post(f"{other.url}/orders/{order_id}/cancel",
                               json={"reason": "USER_REQUESTED", "detail": f"via {other.name}"})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["status"], body["cancel_reason"], body["cancel_detail"]) == (
                "CANCELED", "USER_REQUESTED", f"via {other.name}")
            canceled[order_id] = body
            again = http.get(f"{owner.url}/orders/{order_id}").json()
            assert again == body
        # A bad body is judged by the owner too (it did get the body).
        order_id = by_owner[b.url][1]
        answer = http.post(f"{a.url}/orders/{order_id}/cancel", json={"reason": "NOT_A_REASON"})
        assert answer.status_code == 400, answer.text
        assert "reason" in answer.json()["message"]

        # The deadlines fire after the rebalance, each once, on their new owners.
        def all_expired() -> bool:
            reader.poll(0.5)
            return all(reader.events("order.expired", order_id=o) for o in expiring)

        wait_for(all_expired, 60, "an order.expired for every deadline")
        reader.poll(3.0)  # a few timer intervals more: no second order.expired
        for order_id, deadline in expiring.items():
            [expired] = reader.events("order.expired", order_id=order_id)
            assert int(expired["expired_at"].timestamp() * 1000) == deadline
        assert {owners[partition_of(o)] for o in expiring} == {a.url, b.url}
        for order_id in expiring:
            via_a = http.get(f"{a.url}/orders/{order_id}").json()
            assert via_a["status"] == "EXPIRED"
            assert http.get(f"{b.url}/orders/{order_id}").json() == via_a
            created[order_id] = via_a
        assert_healthy(a, b)

        # B leaves: A takes over every partition and restores B's rows from the
        # changelog topics (A never had them on its disk).
        assert b.stop() == 0, b.log_tail()
        wait_for(lambda: set(order_owners(a, changelog).values()) == {a.url}
                 and len(order_owners(a, changelog)) == catalog.EVENT_PARTITIONS,
                 90, "worker A owning every order partition")

        def all_served() -> bool:
            for order_id, order in created.items():
                answer = http.get(f"{a.url}/orders/{order_id}")
                if answer.status_code != 200:
                    return False
                assert answer.json() == canceled.get(order_id, order)
            return True

        wait_for(all_served, 60, "worker A serving every order after B left")
        assert_healthy(a)
