"""The order API over HTTP on a real in-process worker: status codes, bodies, events.

One app serves the module; every test uses its own users and orders.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.integration.pipeline_support import (
    Pipeline,
    assert_app_healthy,
    uid,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ITEMS = [{"product_id": "sku-1", "quantity": 2, "unit_amount": 1250}]




def body(user_id: str, **fields: Any) -> dict[str, Any]:
    return {"user_id": user_id, "order_type": "ONE_TIME", "currency": "EUR", "items": ITEMS, **fields}


async def test_create_validates_the_body(pipe: Pipeline) -> None:
    user = uid("u-create")
    client = pipe.api.client

    response = await client.post("/orders", json=body(user, total_amount=2500))
    assert response.status_code == 201, response.text
    order = response.json()
    assert (order["user_id"], order["order_type"], order["status"], order["total_amount"],
            order["currency"]) == (user, "ONE_TIME", "PENDING", 2500, "EUR")
    assert [(i["product_id"], i["quantity"], i["unit_amount"]) for i in order["items"]] \
        == [("sku-1", 2, 1250)]
    assert "applied_event_ids" not in order
    assert (await client.get(f"/orders/{order['order_id']}")).json() == order
    [created] = await pipe.reader.wait_for("order.created", order_id=order["order_id"])
    assert (created["user_id"], created["total_amount"]) == (user, 2500)

    bad_requests = {
        "not JSON": dict(content=b"{not json", headers={"Content-Type": "application/json"}),
        "not an object": dict(json=[body(user)]),
        "missing currency": dict(json={k: v for k, v in body(user).items() if k != "currency"}),
        "unknown field": dict(json=body(user, coupon="FREE")),
        "bad order_type": dict(json=body(user, order_type="GIFT")),
        "fallback order_type": dict(json=body(user, order_type="UNKNOWN")),
        "total not the items' sum": dict(json=body(user, total_amount=2499)),
        "empty items": dict(json=body(user, items=[])),
        "negative quantity": dict(json=body(user, items=[{**ITEMS[0], "quantity": -1}])),
        "lower-case currency": dict(json=body(user, currency="eur")),
    }
    for what, request in bad_requests.items():
        response = await client.post("/orders", **request)
        assert response.status_code == 400, f"{what}: {response.status_code} {response.text}"
        assert response.json()["error"] in {"bad_request", "invalid"}, what
    expected_words = {"missing currency": "currency", "unknown field": "coupon",
                      "bad order_type": "order_type", "total not the items' sum": "total_amount"}
    for what, word in expected_words.items():
        response = await client.post("/orders", **bad_requests[what])
        assert word in response.json()["message"], (what, response.json())

    response = await client.get(f"/orders/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"

    await pipe.settle()
    assert [e["order_id"] for e in pipe.reader.events("order.created", user_id=user)] \
        == [order["order_id"]]
    assert_app_healthy(pipe.app)


async def test_cancel_and_fulfill_follow_the_state_machine(pipe: Pipeline) -> None:
    client = pipe.api.client
    order = await pipe.create_order(uid("u-cancel"))
    order_id = order["order_id"]

    response = await client.post(f"/orders/{order_id}/cancel", json={"detail": "changed my mind"})
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["cancel_reason"],
            response.json()["cancel_detail"]) == ("CANCELED", "USER_REQUESTED", "changed my mind")
    [canceled] = await pipe.reader.wait_for("order.canceled", order_id=order_id)
    assert canceled["reason"] == "USER_REQUESTED"

    again = await client.post(f"/orders/{order_id}/cancel")
    assert again.status_code == 409, again.text
    assert again.json()["error"] == "illegal_transition"

    missing = await client.post(f"/orders/{uuid.uuid4()}/cancel")
    assert missing.status_code == 404, missing.text

    bad_reason = await pipe.create_order(uid("u-cancel"))
    response = await client.post(f"/orders/{bad_reason['order_id']}/cancel", json={"reason": "BORED"})
    assert response.status_code == 400, response.text
    assert (await pipe.order(bad_reason["order_id"]))["status"] == "PENDING"

    pending = await pipe.create_order(uid("u-fulfill"))
    response = await client.post(f"/orders/{pending['order_id']}/fulfill",
                                 json={"fulfillment_details": {"note": "too early"}})
    assert response.status_code == 409, response.text
    assert (await pipe.order(pending["order_id"]))["status"] == "PENDING"

    paid = await pipe.pay(await pipe.create_order(uid("u-fulfill")))
    response = await client.post(f"/orders/{paid['order_id']}/fulfill",
                                 json={"fulfillment_details": {"tracking": "TR-1"}})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "FULFILLED"
    [fulfilled] = await pipe.reader.wait_for("order.fulfilled", order_id=paid["order_id"])
    assert fulfilled["fulfillment_details"] == {"tracking": "TR-1"}

    await pipe.settle()
    assert pipe.order_events(order_id).count("order.canceled") == 1
    assert pipe.order_events(pending["order_id"]) == ["order.created"]
    assert pipe.order_events(bad_reason["order_id"]) == ["order.created"]
    assert (await pipe.order(order_id))["status"] == "CANCELED"
    assert_app_healthy(pipe.app)


async def test_patch_changes_an_unpaid_order_only(pipe: Pipeline) -> None:
    client = pipe.api.client
    order = await pipe.create_order(uid("u-patch"))
    order_id = order["order_id"]

    new_items = [{"product_id": "sku-2", "quantity": 1, "unit_amount": 4000}]
    response = await client.patch(f"/orders/{order_id}", json={"items": new_items})
    assert response.status_code == 200, response.text
    patched = response.json()
    assert (patched["status"], patched["total_amount"]) == ("PENDING", 4000)
    assert [i["product_id"] for i in patched["items"]] == ["sku-2"]
    [updated] = await pipe.reader.wait_for("order.updated", order_id=order_id)
    assert updated["updated_fields"] == ["items", "total_amount", "currency"]
    assert set(updated["changes"]) == set(updated["updated_fields"])
    assert [(i["product_id"], i["unit_amount"]) for i in json.loads(updated["changes"]["items"])] \
        == [("sku-2", 4000)]
    assert json.loads(updated["changes"]["total_amount"]) == 4000
    assert json.loads(updated["changes"]["currency"]) == "EUR"
    assert await pipe.order(order_id) == patched

    # The same items again change nothing: 200 and no event.
    response = await client.patch(f"/orders/{order_id}", json={"items": new_items})
    assert response.status_code == 200, response.text
    for change, status in (({"status": "COMPLETED"}, 400), ({"total_amount": 1}, 400), ({}, 400)):
        response = await client.patch(f"/orders/{order_id}", json=change)
        assert response.status_code == status, (change, response.text)
    response = await client.patch(f"/orders/{uuid.uuid4()}", json={"items": new_items})
    assert response.status_code == 404, response.text

    paid = await pipe.pay(patched)
    response = await client.patch(f"/orders/{order_id}", json={"items": ITEMS})
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "illegal_transition"

    await pipe.settle()
    assert await pipe.order(order_id) == paid
    assert paid["total_amount"] == 4000
    assert pipe.order_events(order_id).count("order.updated") == 1
    assert_app_healthy(pipe.app)


async def test_idempotency_key_and_user_orders(pipe: Pipeline) -> None:
    client = pipe.api.client
    user = uid("u-idem")
    key = uid("idem")
    first = await client.post("/orders", json=body(user), headers={"Idempotency-Key": key})
    second = await client.post("/orders", json=body(user), headers={"Idempotency-Key": key})
    assert (first.status_code, second.status_code) == (201, 201), (first.text, second.text)
    assert first.json()["order_id"] == second.json()["order_id"]
    assert first.json() == second.json()
    other = await client.post("/orders", json=body(user), headers={"Idempotency-Key": uid("idem")})
    assert other.status_code == 201 and other.json()["order_id"] != first.json()["order_id"]

    expected = {first.json()["order_id"], other.json()["order_id"]}

    async def listed() -> Any:
        response = await client.get(f"/users/{user}/orders")
        assert response.status_code == 200, response.text
        orders = response.json()["orders"]
        return orders if {o["order_id"] for o in orders} == expected else None

    orders = await wait_until(listed, what=f"{user}'s two orders listed")
    assert all((o["status"], o["total_amount"], o["order_type"]) == ("PENDING", 2500, "ONE_TIME")
               for o in orders)
    nobody = await client.get(f"/users/{uid('u-nobody')}/orders")
    assert nobody.status_code == 200 and nobody.json()["orders"] == []

    await pipe.settle()
    assert len(pipe.reader.events("order.created", order_id=first.json()["order_id"])) == 1
    assert len(pipe.reader.events("order.created", user_id=user)) == 2
    assert_app_healthy(pipe.app)
