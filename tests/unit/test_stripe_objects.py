"""Stripe Subscription / Invoice objects -> paystream views (tables.stripe_objects).

Three shapes each: Stripe's API reference before 2025-03-31
(``docs_customer_subscription_updated.json``, ``docs_invoice_payment_failed.json``,
API version 2024-06-20), the 2025 shape (``*_2025.json``, 2025-03-31.basil:
periods on the items, the invoice's subscription under
``parent.subscription_details``, no top-level payment ids), and what
localstripe 1.15.10 really sent (``localstripe/*.json``, recorded from a
running localstripe by ``tests/integration/test_localstripe_webhooks.py``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tables.stripe_objects import NotAStripeObject, invoice_view, subscription_view

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe"

SUBSCRIPTION_KEYS = {
    "subscription_id", "customer_id", "user_id", "status", "plan_id", "quantity", "amount", "currency",
    "current_period_start", "current_period_end", "cancel_at_period_end", "cancel_at", "canceled_at",
    "ended_at", "latest_invoice_id", "metadata",
}
INVOICE_KEYS = {
    "invoice_id", "customer_id", "subscription_id", "user_id", "status", "amount_due", "amount_paid",
    "amount_remaining", "currency", "due_date", "created", "attempt_count", "next_payment_attempt",
    "payment_intent_id", "charge_id", "billing_reason", "period_start", "period_end", "metadata",
}


def docs(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"docs_{name}.json").read_bytes())["data"]["object"]


def localstripe(event_type: str) -> dict[str, Any]:
    return json.loads((FIXTURES / "localstripe" / f"{event_type}.json").read_bytes())["data"]["object"]


# -- subscriptions --------------------------------------------------------------------------


def test_subscription_of_the_2024_api_reads_the_top_level_periods_and_the_items_price() -> None:
    view = subscription_view(docs("customer_subscription_updated"))
    assert set(view) == SUBSCRIPTION_KEYS
    assert view == {
        "subscription_id": "sub_1QfZ2aLkdIwHu7ixq3mC8Ndv",
        "customer_id": "cus_RYz8kq1mQpA2sT",
        "user_id": "usr_42b1e0c9",
        "status": "active",
        "plan_id": "price_1QfYz0LkdIwHu7ixPRO12mth",
        "quantity": 3,
        "amount": 8700,
        "currency": "EUR",
        "current_period_start": 1764230400_000,
        "current_period_end": 1766822400_000,
        "cancel_at_period_end": False,
        "cancel_at": None,
        "canceled_at": None,
        "ended_at": None,
        "latest_invoice_id": "in_1QgA7aLkdIwHu7ixPrOr4t1n",
        "metadata": {"user_id": "usr_42b1e0c9"},
    }


def test_subscription_of_the_2025_api_takes_the_periods_from_its_item() -> None:
    obj = docs("customer_subscription_updated_2025")
    assert "current_period_end" not in obj  # the shape this test is about
    view = subscription_view(obj)
    assert view["current_period_start"] == 1764230400_000
    assert view["current_period_end"] == 1766822400_000
    assert view["cancel_at_period_end"] is True
    assert view["cancel_at"] == 1766822400_000 and view["canceled_at"] == 1764489600_000
    assert view["plan_id"] == "price_1SkC1aLkdIwHu7ixTEAM1yr0"
    assert (view["quantity"], view["amount"], view["currency"]) == (5, 6000, "USD")
    assert view["user_id"] == "usr_9d0c1e77"
    assert view["metadata"] == {"user_id": "usr_9d0c1e77", "tier": "team"}


def test_the_top_level_period_wins_over_the_items() -> None:
    obj = docs("customer_subscription_updated_2025")
    obj["current_period_end"] = 1700000000
    assert subscription_view(obj)["current_period_end"] == 1700000000_000


def test_subscription_as_localstripe_sends_it() -> None:
    created = localstripe("customer.subscription.created")
    view = subscription_view(created)
    assert set(view) == SUBSCRIPTION_KEYS
    # localstripe's item has a plan and no price, and the subscription no currency.
    assert "price" not in created["items"]["data"][0] and "currency" not in created
    assert view["subscription_id"] == created["id"] and view["subscription_id"].startswith("sub_")
    assert view["customer_id"] == created["customer"]
    plan = created["items"]["data"][0]["plan"]
    assert (view["plan_id"], view["quantity"]) == ("plan_webhooks_monthly", 1)
    assert (plan["id"], created["quantity"]) == ("plan_webhooks_monthly", 1)
    assert (view["amount"], view["currency"]) == (1500, "EUR")
    assert view["status"] == "active" and view["user_id"] == created["metadata"]["user_id"]
    assert view["current_period_start"] == created["current_period_start"] * 1000
    assert view["current_period_end"] == created["current_period_end"] * 1000
    assert view["latest_invoice_id"] == created["latest_invoice"]
    deleted = subscription_view(localstripe("customer.subscription.deleted"))
    assert deleted["status"] == "canceled"
    assert deleted["ended_at"] is not None and deleted["ended_at"] % 1000 == 0


def test_a_subscription_with_expanded_references_yields_their_ids() -> None:
    obj = docs("customer_subscription_updated")
    obj["customer"] = {"id": "cus_RYz8kq1mQpA2sT", "object": "customer", "email": "x@example.com"}
    obj["latest_invoice"] = {"id": "in_1QgA7aLkdIwHu7ixPrOr4t1n", "object": "invoice"}
    view = subscription_view(obj)
    assert view["customer_id"] == "cus_RYz8kq1mQpA2sT"
    assert view["latest_invoice_id"] == "in_1QgA7aLkdIwHu7ixPrOr4t1n"


def test_a_tiered_price_has_no_amount_and_a_missing_quantity_is_one() -> None:
    obj = docs("customer_subscription_updated")
    item = obj["items"]["data"][0]
    item["price"].update(billing_scheme="tiered", unit_amount=None, unit_amount_decimal=None)
    item["plan"].update(billing_scheme="tiered", amount=None, amount_decimal=None)
    del item["quantity"]
    view = subscription_view(obj)
    assert (view["quantity"], view["amount"]) == (1, None)


def test_subscription_without_items_or_metadata() -> None:
    view = subscription_view({"id": "sub_x", "object": "subscription", "status": "incomplete_expired"})
    assert view["plan_id"] is None and view["amount"] is None and view["currency"] is None
    assert view["user_id"] is None and view["metadata"] == {} and view["quantity"] == 1
    assert view["current_period_end"] is None and view["cancel_at_period_end"] is False


def test_non_string_metadata_values_are_left_out() -> None:
    obj = docs("customer_subscription_updated")
    obj["metadata"] = {"user_id": 42, "plan": "pro"}
    view = subscription_view(obj)
    assert view["metadata"] == {"plan": "pro"} and view["user_id"] is None


@pytest.mark.parametrize(("change", "message"), [
    (lambda o: o.pop("id"), "without a string id"),
    (lambda o: o.update(id=17), "without a string id"),
    (lambda o: o.update(id=""), "without a string id"),
    (lambda o: o.update(object="invoice"), "not a Stripe subscription"),
    (lambda o: o.update(current_period_end="soon"), "current_period_end is not an integer"),
    (lambda o: o.update(canceled_at=True), "canceled_at is not an integer"),
    (lambda o: o.update(metadata=["user_id"]), "metadata is not an object"),
    (lambda o: o.update(items={"data": "si_1"}), "items is not a list"),
])
def test_a_broken_subscription_is_refused_without_its_payload(change: Any, message: str) -> None:
    obj = docs("customer_subscription_updated")
    obj["metadata"]["email"] = "secret@example.com"
    change(obj)
    with pytest.raises(NotAStripeObject, match=message) as refused:
        subscription_view(obj)
    assert "secret@example.com" not in str(refused.value)
    assert isinstance(refused.value, ValueError)


def test_not_a_mapping_is_refused() -> None:
    with pytest.raises(NotAStripeObject, match="JSON object"):
        subscription_view(["sub_1"])  # type: ignore[arg-type]
    with pytest.raises(NotAStripeObject, match="JSON object"):
        invoice_view("in_1")  # type: ignore[arg-type]


def test_the_view_does_not_share_the_objects_metadata() -> None:
    obj = docs("customer_subscription_updated")
    before = copy.deepcopy(obj)
    view = subscription_view(obj)
    view["metadata"]["user_id"] = "changed"
    assert obj == before


# -- invoices -------------------------------------------------------------------------------


def test_invoice_of_the_2024_api_reads_the_top_level_ids() -> None:
    view = invoice_view(docs("invoice_payment_failed"))
    assert set(view) == INVOICE_KEYS
    assert view == {
        "invoice_id": "in_1QhC2zLkdIwHu7ixRnw2Fail",
        "customer_id": "cus_RYz8kq1mQpA2sT",
        "subscription_id": "sub_1QfZ2aLkdIwHu7ixq3mC8Ndv",
        "user_id": "usr_42b1e0c9",  # from subscription_details.metadata
        "status": "open",
        "amount_due": 2900,
        "amount_paid": 0,
        "amount_remaining": 2900,
        "currency": "EUR",
        "due_date": None,
        "created": 1766822400_000,
        "attempt_count": 2,
        "next_payment_attempt": 1767085200_000,
        "payment_intent_id": "pi_3QhC30LkdIwHu7ix0Rnw2Pay",
        "charge_id": "ch_3QhC30LkdIwHu7ix1Dcl9nEd",
        "billing_reason": "subscription_cycle",
        "period_start": 1764230400_000,
        "period_end": 1766822400_000,
        "metadata": {},
    }


def test_invoice_of_the_2025_api_reads_the_parent_and_has_no_payment_ids() -> None:
    obj = docs("invoice_paid_2025")
    assert "subscription" not in obj and "charge" not in obj and "payment_intent" not in obj
    view = invoice_view(obj)
    assert view["subscription_id"] == "sub_1SkC9xLkdIwHu7ixZ5n2Qa7w"
    assert view["user_id"] == "usr_9d0c1e77"
    assert (view["status"], view["amount_paid"], view["amount_remaining"]) == ("paid", 6000, 0)
    assert view["payment_intent_id"] is None and view["charge_id"] is None
    assert view["billing_reason"] == "subscription_create" and view["currency"] == "USD"


def test_invoice_payments_list_of_the_2025_api_gives_the_paid_payments_ids() -> None:
    obj = docs("invoice_paid_2025")
    obj["payments"] = {"object": "list", "has_more": False, "url": "/v1/invoice_payments", "data": [
        {"id": "inpay_1", "object": "invoice_payment", "status": "canceled", "is_default": False,
         "payment": {"type": "payment_intent", "payment_intent": "pi_first_canceled"}},
        {"id": "inpay_2", "object": "invoice_payment", "status": "paid", "is_default": True,
         "payment": {"type": "payment_intent", "charge": "ch_paid",
                     "payment_intent": {"id": "pi_paid", "object": "payment_intent"}}},
    ]}
    view = invoice_view(obj)
    assert (view["payment_intent_id"], view["charge_id"]) == ("pi_paid", "ch_paid")
    obj["payments"]["data"] = obj["payments"]["data"][:1]
    assert invoice_view(obj)["payment_intent_id"] == "pi_first_canceled"
    obj["payments"] = "inpay_1"
    with pytest.raises(NotAStripeObject, match="payments is not a list"):
        invoice_view(obj)


def test_the_invoices_own_user_id_wins_over_the_subscriptions() -> None:
    obj = docs("invoice_paid_2025")
    obj["metadata"] = {"user_id": "usr_invoice"}
    assert invoice_view(obj)["user_id"] == "usr_invoice"


def test_invoice_as_localstripe_sends_it() -> None:
    created = localstripe("invoice.created")
    view = invoice_view(created)
    assert set(view) == INVOICE_KEYS
    assert view["invoice_id"] == created["id"] and view["invoice_id"].startswith("in_")
    assert view["status"] == "draft" and view["payment_intent_id"] is None and view["charge_id"] is None
    assert view["subscription_id"] == created["subscription"]
    # localstripe has no amount_remaining: amount_due - amount_paid.
    assert "amount_remaining" not in created
    assert (view["amount_due"], view["amount_paid"], view["amount_remaining"]) == (1500, 0, 1500)
    assert view["user_id"] is None  # localstripe's parent has no subscription metadata
    assert view["due_date"] is None and view["created"] == created["created"] * 1000

    paid_object = localstripe("invoice.payment_succeeded")
    paid = invoice_view(paid_object)
    assert (paid["status"], paid["amount_paid"], paid["amount_remaining"]) == ("paid", 1500, 0)
    assert paid["payment_intent_id"] == paid_object["payment_intent"]
    # localstripe inlines the whole charge: its id is taken.
    assert paid["charge_id"] == paid_object["charge"]["id"] and paid["charge_id"].startswith("ch_")
    assert paid["period_end"] == paid_object["period_end"] * 1000
    assert paid["next_payment_attempt"] is None


def test_a_failed_invoice_as_localstripe_sends_it() -> None:
    failed_object = localstripe("invoice.payment_failed")
    failed = invoice_view(failed_object)
    assert (failed["status"], failed["amount_paid"], failed["amount_remaining"]) == ("open", 0, 1500)
    assert failed["attempt_count"] == 1
    assert failed["next_payment_attempt"] == failed_object["next_payment_attempt"] * 1000
    assert failed["subscription_id"] == failed_object["subscription"]
    assert failed["payment_intent_id"] == failed_object["payment_intent"]
    assert failed["charge_id"] == failed_object["charge"]["id"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda o: o.pop("id"), "without a string id"),
    (lambda o: o.update(id=None), "without a string id"),
    (lambda o: o.update(object="subscription"), "not a Stripe invoice"),
    (lambda o: o.pop("amount_due"), "no integer amount_due"),
    (lambda o: o.update(amount_paid="12.5"), "amount_paid is not an integer"),
    (lambda o: o.pop("created"), "no 'created' time"),
    (lambda o: o.update(due_date=1.5), "due_date is not an integer"),
    (lambda o: o.update(metadata="user_id=1"), "metadata is not an object"),
])
def test_a_broken_invoice_is_refused_without_its_payload(change: Any, message: str) -> None:
    obj = docs("invoice_payment_failed")
    obj["metadata"] = {"email": "secret@example.com"}
    change(obj)
    with pytest.raises(NotAStripeObject, match=message) as refused:
        invoice_view(obj)
    assert "secret@example.com" not in str(refused.value)


def test_localstripe_digit_strings_are_read_as_integers() -> None:
    obj = docs("invoice_payment_failed")
    obj.update(amount_due="2900", attempt_count="3")
    view = invoice_view(obj)
    assert (view["amount_due"], view["attempt_count"]) == (2900, 3)
