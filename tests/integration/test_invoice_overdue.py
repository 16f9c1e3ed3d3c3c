"""invoice.overdue from the invoice aggregate's persisted deadlines, end to end.

A stack of this module's own (:func:`tests.integration.payment_support.running_stack`):
private topics on the real broker, ``paystream ingress`` and ``paystream worker``
subprocesses (domains orders, payments, subscriptions), localstripe as Stripe.
Invoices reach the worker the way Stripe reports them: signed
``invoice.finalized`` / ``invoice.paid`` webhooks in Stripe's payload shape
(``tests/fixtures/stripe/docs_invoice_payment_failed.json`` with ids, dates and
status replaced) posted to the ingress, which stores them on ``stripe.events``;
``handle_stripe_webhook`` forwards them to the invoice aggregate.

The cadence is ``INVOICE_OVERDUE_DAYS=0,1``: day 0 falls due at the due date
itself, so an invoice due a few seconds from now goes overdue within the
test, and one due a day ago has reached both days.  Outcomes are read from the
topics (distinct event ids: a replay after a crash may repeat a record, never
under a new id) and from ``GET /invoices/{id}``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from streams.devtools.localstripe import LocalStripe
from tables import invoice_state
from tests.integration.payment_support import PaymentStack, running_stack, stripe_event
from tests.integration.pipeline_support import EventReader

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

INVOICE_EVENTS = ("invoice.created", "invoice.paid", "invoice.overdue")
DAY_S = 24 * 60 * 60
#: Timer interval (0.5 s), the command round trip and a busy machine.
SETTLE = 4.0
SERVE_TIMEOUT = 120.0


class InvoiceStack:
    """The module's stack and a reader of the invoice topics."""

    def __init__(self, stack: PaymentStack) -> None:
        self.stack = stack
        self.reader = EventReader(stack.settings, INVOICE_EVENTS)

    async def finalize(self, user: str, due_s: int, *, amount: int = 2900) -> str:
        """A signed ``invoice.finalized`` of a new open invoice due at ``due_s`` (epoch s)."""
        invoice_id = f"in_test{uuid.uuid4().hex[:16]}"
        await self.post(invoice_id, "invoice.finalized", "open", user, due_s, amount)
        return invoice_id

    async def post(self, invoice_id: str, stripe_type: str, status: str, user: str, due_s: int,
                   amount: int = 2900) -> None:
        now = int(time.time())
        paid = status == "paid"
        event = stripe_event("invoice_payment_failed", {
            "id": invoice_id, "status": status, "collection_method": "send_invoice",
            "due_date": due_s, "created": now, "attempt_count": 1 if paid else 0,
            "amount_due": amount, "amount_paid": amount if paid else 0,
            "amount_remaining": 0 if paid else amount, "next_payment_attempt": None,
            "metadata": {"user_id": user}, "subscription_details": {"metadata": {"user_id": user}},
            "status_transitions": {"finalized_at": now, "marked_uncollectible_at": None,
                                   "paid_at": now if paid else None, "voided_at": None},
        }, created=now)
        event["type"] = stripe_type
        await self.stack.deliver(event)

    async def events(self, topic: str, invoice_id: str, count: int = 1, timeout: float = 60.0
                     ) -> list[dict[str, Any]]:
        return await self.reader.wait_for(topic, count, timeout, invoice_id=invoice_id)

    def distinct(self, topic: str, invoice_id: str) -> dict[str, dict[str, Any]]:
        """The events of ``topic`` about ``invoice_id`` read so far, by event id."""
        return {e["event_id"]: e for e in self.reader.events(topic, invoice_id=invoice_id)}

    async def settle(self) -> None:
        await asyncio.sleep(SETTLE)
        await asyncio.get_running_loop().run_in_executor(None, self.reader.poll, 1.0)

    async def invoice(self, invoice_id: str) -> dict[str, Any]:
        answer = await self.stack.api.get(f"/invoices/{invoice_id}")
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def restart(self, how: str) -> None:
        """Stop the worker (SIGTERM: a clean exit; SIGKILL), start it again, wait until it serves."""
        worker = self.stack.worker
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, worker.stop if how == "sigterm" else worker.kill)
        assert code == (0 if how == "sigterm" else -9), (how, code, worker.log_tail())
        worker.launch()
        await loop.run_in_executor(None, worker.wait_serving, SERVE_TIMEOUT)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def invoices(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
                   tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InvoiceStack]:
    state: Path = tmp_path_factory.mktemp("invoices")
    async with running_stack(kafka_bootstrap, registry_url, localstripe, state, "invoices",
                             domains="orders,payments,subscriptions",
                             invoice_overdue_days="0,1") as stack:
        wrapped = InvoiceStack(stack)
        try:
            yield wrapped
        finally:
            wrapped.reader.close()


def user() -> str:
    return f"usr_{uuid.uuid4().hex[:10]}"


async def test_an_open_invoice_past_its_due_date_is_overdue_once(invoices: InvoiceStack) -> None:
    buyer = user()
    due = int(time.time()) + 3
    invoice_id = await invoices.finalize(buyer, due)
    [created] = await invoices.events("invoice.created", invoice_id)
    assert (created["user_id"], created["amount"], created["currency"]) == (buyer, 2900, "EUR")
    assert int(created["due_date"].timestamp()) == due
    assert created["event_id"] == invoice_state.fact_event_id("invoice.created", invoice_id)

    [overdue] = await invoices.events("invoice.overdue", invoice_id)
    fired = time.time()
    assert due <= fired <= due + 15, (due, fired)
    assert (overdue["days_overdue"], overdue["user_id"], overdue["amount"]) == (0, buyer, 2900)
    assert overdue["event_id"] == invoice_state.fact_event_id("invoice.overdue", invoice_id, 0)
    await invoices.settle()
    assert len(invoices.reader.events("invoice.overdue", invoice_id=invoice_id)) == 1
    assert len(invoices.reader.events("invoice.created", invoice_id=invoice_id)) == 1
    row = await invoices.invoice(invoice_id)
    assert (row["status"], row["overdue_days_sent"], row["due_date"]) == ("open", [0], due * 1000)
    unknown = await invoices.stack.api.get(f"/invoices/in_unknown{uuid.uuid4().hex[:8]}")
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found", unknown.text


async def test_a_late_invoice_announces_each_cadence_day_reached_once(invoices: InvoiceStack) -> None:
    due = int(time.time()) - DAY_S + 4  # day 0 passed a day ago; day 1 comes in 4 s
    invoice_id = await invoices.finalize(user(), due)
    found = await invoices.events("invoice.overdue", invoice_id, count=2)
    assert [e["days_overdue"] for e in found] == [0, 1]
    assert [int(e["occurred_at"].timestamp()) for e in found] == [due, due + DAY_S]
    await invoices.settle()
    assert len(invoices.reader.events("invoice.overdue", invoice_id=invoice_id)) == 2
    assert (await invoices.invoice(invoice_id))["overdue_days_sent"] == [0, 1]


async def test_an_invoice_paid_before_its_due_date_is_never_overdue(invoices: InvoiceStack) -> None:
    buyer = user()
    due = int(time.time()) + 6
    invoice_id = await invoices.finalize(buyer, due)
    await invoices.events("invoice.created", invoice_id)
    await invoices.post(invoice_id, "invoice.paid", "paid", buyer, due)
    [paid] = await invoices.events("invoice.paid", invoice_id)
    assert paid["amount"] == 2900 and time.time() < due, "paid too late for this test to mean anything"

    await asyncio.sleep(max(0.0, due - time.time()))
    await invoices.settle()
    assert invoices.reader.events("invoice.overdue", invoice_id=invoice_id) == []
    row = await invoices.invoice(invoice_id)
    assert (row["status"], row["overdue_days_sent"]) == ("paid", [])


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_overdue_fires_once_across_a_worker_restart(invoices: InvoiceStack, how: str) -> None:
    """One invoice went overdue just before the worker stopped; one falls due while it is down.

    After the restart each has exactly one invoice.overdue (one event id),
    and the one that fell due while no worker ran is announced once the
    worker is back.
    """
    fired_before, due_later = user(), user()
    first = await invoices.finalize(fired_before, int(time.time()) + 1)
    second = await invoices.finalize(due_later, int(time.time()) + 8)
    await invoices.events("invoice.overdue", first)
    await invoices.events("invoice.created", second)
    await invoices.restart(how)  # right after the first fired: its batch may be replayed

    [overdue] = await invoices.events("invoice.overdue", second, timeout=90)
    assert overdue["days_overdue"] == 0 and overdue["user_id"] == due_later
    await invoices.settle()
    for invoice_id in (first, second):
        announced = invoices.distinct("invoice.overdue", invoice_id)
        assert list(announced) == [invoice_state.fact_event_id("invoice.overdue", invoice_id, 0)], how
        assert len(invoices.distinct("invoice.created", invoice_id)) == 1
        assert (await invoices.invoice(invoice_id))["overdue_days_sent"] == [0]
    invoices.stack.worker.assert_running()
