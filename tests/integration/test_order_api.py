"""The order API over HTTP on a real in-process worker: status codes, bodies, events.

Besides the endpoints themselves: Idempotency-Keys scoped per user (create) or
per order (commands) with a fingerprint of the request (422 on reuse), the
refusals the API answers (400/404/409) and that it does not also dead-letter
them, 503 + Retry-After when a key's owner is unreachable, 504 with the
command id when the aggregate does not answer in time.

One app serves the module; every test uses its own users and orders.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from typing import Any

import pytest
from yarl import URL

from agents import orders_api
from streams import aggregate_api, catalog
from tables import order_state
from tests.integration.pipeline_support import (
    EventReader,
    Pipeline,
    Sent,
    assert_app_healthy,
    drain,
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


# ----------------------------------------------------------------------
# Idempotency-Key (issue 6, items 3 and 4), the error mapping, routing.

def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def command_records(pipe: Pipeline, order_ids: set[str], user_id: str | None = None) -> list[Sent]:
    """The records on the order command topic for one of ``order_ids`` (or creates by ``user_id``)."""
    reader = EventReader(pipe.settings, [catalog.ORDER_COMMANDS])
    try:
        await drain(reader)
        found = []
        for m in reader.raw:
            command = json.loads(m.value() or b"{}")
            if command.get("order_id") in order_ids or (
                    user_id is not None and (command.get("args") or {}).get("user_id") == user_id):
                found.append(Sent(m.topic(), m.key(), m.value(), list(m.headers() or []),
                                  m.partition(), m.offset()))
        return found
    finally:
        reader.close()


def unavailable(response: Any) -> dict[str, Any]:
    """The body of a 503 that asks the client to retry later."""
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0, response.headers
    assert response.json()["error"] == "unavailable", response.json()
    return response.json()


async def test_create_key_is_scoped_to_the_user_and_fingerprinted(pipe: Pipeline) -> None:
    client = pipe.api.client
    owner, other = uid("u-key-owner"), uid("u-key-other")
    key = uid("key")

    first = await client.post("/orders", json=body(owner), headers=keyed(key))
    assert first.status_code == 201, first.text
    order = first.json()
    # The same request again, its JSON keys in another order: the same request.
    again = await client.post("/orders", json=dict(reversed(body(owner).items())), headers=keyed(key))
    assert again.status_code == 201, again.text
    assert again.json() == order

    # Another user with the same key: a new order of their own, nothing of the first.
    theirs = await client.post("/orders", json=body(other), headers=keyed(key))
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["order_id"] != order["order_id"]
    assert theirs.json()["user_id"] == other
    assert owner not in theirs.text and order["order_id"] not in theirs.text
    # ... and their retry finds their order, not the first user's.
    theirs_again = await client.post("/orders", json=body(other), headers=keyed(key))
    assert (theirs_again.status_code, theirs_again.json()) == (201, theirs.json())

    # The same user, the same key, other parameters: 422, and nothing changes.
    for changed in (body(owner, items=[{**ITEMS[0], "quantity": 3}]),
                    body(owner, currency="USD"),
                    body(owner, payment_window_seconds=60)):
        reused = await client.post("/orders", json=changed, headers=keyed(key))
        assert reused.status_code == 422, (changed, reused.text)
        assert reused.json()["error"] == "idempotency_key_reused", reused.json()
        assert key in reused.json()["message"]

    # A key is 1..255 characters: a longer (or empty) one is a bad request, no order.
    longest = await client.post("/orders", json=body(owner), headers=keyed("k" * 255))
    assert longest.status_code == 201, longest.text
    for bad in ("k" * 256, ""):
        response = await client.post("/orders", json=body(owner), headers=keyed(bad))
        assert response.status_code == 400, (len(bad), response.text)
        assert response.json()["error"] == "bad_request"
        assert "Idempotency-Key" in response.json()["message"]

    await pipe.settle()
    assert await pipe.order(order["order_id"]) == order
    assert pipe.order_events(order["order_id"]) == ["order.created"]
    assert sorted(e["order_id"] for e in pipe.reader.events("order.created", user_id=owner)) \
        == sorted([order["order_id"], longest.json()["order_id"]])
    assert [e["order_id"] for e in pipe.reader.events("order.created", user_id=other)] \
        == [theirs.json()["order_id"]]
    assert_app_healthy(pipe.app)


async def test_keyed_cancel_retried_gets_the_first_outcome(pipe: Pipeline) -> None:
    client = pipe.api.client
    order = await pipe.create_order(uid("u-kcancel"))
    order_id = order["order_id"]
    key = uid("cancel")

    first = await client.post(f"/orders/{order_id}/cancel", json={"detail": "changed my mind"},
                              headers=keyed(key))
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "CANCELED"
    # A client retrying after a timeout learns what its first attempt did.
    retry = await client.post(f"/orders/{order_id}/cancel", json={"detail": "changed my mind"},
                              headers=keyed(key))
    assert (retry.status_code, retry.json()) == (200, first.json()), retry.text
    # The same key with other parameters names another request: 422.
    for other in ({"detail": "something else"}, {"detail": "changed my mind", "reason": "OTHER"}, {}):
        reused = await client.post(f"/orders/{order_id}/cancel", json=other, headers=keyed(key))
        assert reused.status_code == 422, (other, reused.text)
        assert reused.json()["error"] == "idempotency_key_reused"
    # Without a key, or with a new one, a second cancel is what it is: illegal.
    for headers in ({}, keyed(uid("cancel"))):
        again = await client.post(f"/orders/{order_id}/cancel", headers=headers)
        assert again.status_code == 409, again.text
        assert again.json()["error"] == "illegal_transition"

    # Keys are scoped by the order: the same key cancels another order.
    second = await pipe.create_order(uid("u-kcancel"))
    response = await client.post(f"/orders/{second['order_id']}/cancel",
                                 json={"detail": "changed my mind"}, headers=keyed(key))
    assert response.status_code == 200, response.text
    assert response.json()["order_id"] == second["order_id"]
    # The key that created an order names that request: it cannot cancel it.
    create_key = uid("create")
    created = await client.post("/orders", json=body(uid("u-kcancel")), headers=keyed(create_key))
    assert created.status_code == 201, created.text
    response = await client.post(f"/orders/{created.json()['order_id']}/cancel",
                                 headers=keyed(create_key))
    assert response.status_code == 422, response.text

    await pipe.settle()
    assert await pipe.order(order_id) == first.json()
    assert pipe.order_events(order_id) == ["order.created", "order.canceled"]
    assert pipe.order_events(second["order_id"]) == ["order.created", "order.canceled"]
    assert (await pipe.order(created.json()["order_id"]))["status"] == "PENDING"
    assert_app_healthy(pipe.app)


async def test_keyed_fulfill_and_patch_retried_get_the_first_outcome(pipe: Pipeline) -> None:
    client = pipe.api.client

    paid = await pipe.pay(await pipe.create_order(uid("u-kfulfill")))
    path, key = f"/orders/{paid['order_id']}/fulfill", uid("fulfill")
    details = {"fulfillment_details": {"tracking": "TR-1"}}
    first = await client.post(path, json=details, headers=keyed(key))
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "FULFILLED"
    retry = await client.post(path, json=details, headers=keyed(key))
    assert (retry.status_code, retry.json()) == (200, first.json()), retry.text
    reused = await client.post(path, json={"fulfillment_details": {"tracking": "TR-2"}},
                               headers=keyed(key))
    assert reused.status_code == 422, reused.text
    assert reused.json()["error"] == "idempotency_key_reused"
    again = await client.post(path, json=details)
    assert again.status_code == 409, again.text

    order = await pipe.create_order(uid("u-kpatch"))
    path, key = f"/orders/{order['order_id']}", uid("patch")
    change = {"items": [{"product_id": "sku-2", "quantity": 1, "unit_amount": 4000}]}
    patched = await client.patch(path, json=change, headers=keyed(key))
    assert patched.status_code == 200, patched.text
    assert patched.json()["total_amount"] == 4000
    retry = await client.patch(path, json=change, headers=keyed(key))
    assert (retry.status_code, retry.json()) == (200, patched.json()), retry.text
    reused = await client.patch(path, json={"items": ITEMS}, headers=keyed(key))
    assert reused.status_code == 422, reused.text
    assert reused.json()["error"] == "idempotency_key_reused"
    too_long = await client.patch(path, json={"items": ITEMS}, headers=keyed("k" * 256))
    assert too_long.status_code == 400, too_long.text

    await pipe.settle()
    assert await pipe.order(paid["order_id"]) == first.json()
    assert pipe.order_events(paid["order_id"]).count("order.fulfilled") == 1
    assert await pipe.order(order["order_id"]) == patched.json()
    assert pipe.order_events(order["order_id"]) == ["order.created", "order.updated"]
    assert_app_healthy(pipe.app)


async def test_refusals_map_to_400_404_409_and_are_not_dead_lettered(pipe: Pipeline) -> None:
    client = pipe.api.client
    user = uid("u-refuse")
    canceled = (await pipe.create_order(user))["order_id"]
    assert (await client.post(f"/orders/{canceled}/cancel")).status_code == 200
    pending = (await pipe.create_order(user))["order_id"]
    missing = str(uuid.uuid4())
    new_items = {"items": [{"product_id": "sku-2", "quantity": 1, "unit_amount": 4000}]}

    # (method, path, request, status, error): each reaches the order aggregate.
    refusals: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", f"/orders/{canceled}/cancel", {}, 409, "illegal_transition"),
        ("PATCH", f"/orders/{canceled}", {"json": new_items}, 409, "illegal_transition"),
        ("POST", f"/orders/{pending}/fulfill", {}, 409, "illegal_transition"),
        ("POST", f"/orders/{missing}/cancel", {}, 404, "not_found"),
        ("POST", f"/orders/{missing}/fulfill", {}, 404, "not_found"),
        ("PATCH", f"/orders/{missing}", {"json": new_items}, 404, "not_found"),
        ("POST", f"/orders/{pending}/cancel", {"json": {"reason": "BORED"}}, 400, "invalid"),
        ("PATCH", f"/orders/{pending}", {"json": {"status": "COMPLETED"}}, 400, "invalid"),
        ("POST", f"/orders/{pending}/fulfill", {"json": {"fulfillment_details": {"n": 1}}}, 400,
         "invalid"),
        ("POST", "/orders", {"json": body(user, currency="eur")}, 400, "invalid"),
    ]
    for method, path, request, status, error in refusals:
        response = await client.request(method, path, **request)
        assert response.status_code == status, (method, path, request, response.text)
        assert response.json()["error"] == error, (method, path, response.json())

    # Malformed bodies are answered before any command is sent.
    for method, path in (("POST", f"/orders/{pending}/cancel"), ("POST", f"/orders/{pending}/fulfill"),
                         ("PATCH", f"/orders/{pending}")):
        for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
            response = await client.request(method, path, content=content,
                                             headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (method, path, content, response.text)
            assert response.json()["error"] == "bad_request"

    # A command nobody waits for, refused the same way, is dead-lettered: the
    # dead-letter check below can see what it looks for.
    unanswered = {"command": "cancel", "command_id": str(uuid.uuid4()), "order_id": canceled,
                  "issued_at": 0, "args": {}}
    commands_topic = pipe.settings.topic(catalog.ORDER_COMMANDS)
    pipe.writer.send_raw(commands_topic, canceled, json.dumps(unanswered).encode())
    letter = await pipe.dead_letters.wait_for(pipe.writer.last())
    assert letter.header("dlq.reason") == "rejected"

    await pipe.settle()
    records = [r for r in await command_records(pipe, {canceled, pending, missing}, user)
               if json.loads(r.value or b"{}").get("command_id") != unanswered["command_id"]]
    # Two creates and a cancel set the scene; then one command per refusal, none per bad body.
    assert len(records) == 3 + len(refusals), [json.loads(r.value or b"") for r in records]
    dead = {(r.partition, r.offset): pipe.dead_letters.of(r) for r in records}
    assert not any(dead.values()), dead
    assert pipe.order_events(canceled) == ["order.created", "order.canceled"]
    assert pipe.order_events(pending) == ["order.created"]
    assert pipe.order_events(missing) == []
    assert sorted(e["order_id"] for e in pipe.reader.events("order.created", user_id=user)) \
        == sorted([canceled, pending])
    assert_app_healthy(pipe.app)


async def test_an_unreachable_owner_answers_503_with_retry_after(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = pipe.api.client
    user, key = uid("u-route"), uid("route")
    order = await pipe.create_order(user)
    order_id = order["order_id"]
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        closed = URL(f"http://127.0.0.1:{sock.getsockname()[1]}")

    def elsewhere(table: str, key: Any) -> URL:
        return closed

    monkeypatch.setattr(pipe.app.router, "key_store", elsewhere)
    routed = [
        ("GET", f"/orders/{order_id}", {}),
        ("PATCH", f"/orders/{order_id}", {"json": {"items": ITEMS}, "headers": keyed(key)}),
        ("POST", f"/orders/{order_id}/cancel", {"headers": keyed(key)}),
        ("POST", f"/orders/{order_id}/fulfill", {}),
        ("POST", "/orders", {"json": body(user), "headers": keyed(key)}),
        ("POST", "/orders", {"json": body(user)}),
        ("GET", f"/users/{user}/orders", {}),
    ]
    for method, path, request in routed:
        unavailable(await client.request(method, path, **request))
    # A request another worker routed here, for a key this one does not own
    # (the assignment moved between the hops): 503, not a second hop.
    unavailable(await client.get(f"/orders/{order_id}", headers={"X-Paystream-Routed": "orders"}))

    def unassigned(table: str, key: Any) -> URL:
        raise KeyError(key)  # what faust raises before the partition has an owner

    monkeypatch.setattr(pipe.app.router, "key_store", unassigned)
    unavailable(await client.post(f"/orders/{order_id}/cancel"))
    unavailable(await client.post("/orders", json=body(user), headers=keyed(key)))

    monkeypatch.undo()
    # The owner is back: the client's retry is the first attempt that arrives.
    created = await client.post("/orders", json=body(user), headers=keyed(key))
    assert created.status_code == 201, created.text
    await pipe.settle()
    assert await pipe.order(order_id) == order
    assert pipe.order_events(order_id) == ["order.created"]
    assert sorted(e["order_id"] for e in pipe.reader.events("order.created", user_id=user)) \
        == sorted([order_id, created.json()["order_id"]])
    assert_app_healthy(pipe.app)


async def test_a_command_not_answered_in_time_answers_504_with_its_command_id(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = pipe.api.client
    user, create_key, cancel_key = uid("u-slow"), uid("create"), uid("cancel")
    monkeypatch.setattr(aggregate_api, "COMMAND_TIMEOUT", 0.0)  # no aggregate answers in 0 s

    def timed_out(response: Any) -> str:
        assert response.status_code == 504, response.text
        assert response.json()["error"] == "timeout"
        return str(response.json()["command_id"])

    create_id = timed_out(await client.post("/orders", json=body(user), headers=keyed(create_key)))
    [created] = await pipe.reader.wait_for("order.created", user_id=user)
    order_id = created["order_id"]
    cancel_id = timed_out(await client.post(f"/orders/{order_id}/cancel", headers=keyed(cancel_key)))
    await pipe.reader.wait_for("order.canceled", order_id=order_id)
    unkeyed_id = timed_out(await client.post(f"/orders/{order_id}/cancel"))

    monkeypatch.undo()
    # Retried under their keys, the requests learn what their first attempts did.
    again = await client.post("/orders", json=body(user), headers=keyed(create_key))
    assert (again.status_code, again.json()["order_id"]) == (201, order_id), again.text
    canceled = await client.post(f"/orders/{order_id}/cancel", headers=keyed(cancel_key))
    assert (canceled.status_code, canceled.json()["status"]) == (200, "CANCELED"), canceled.text

    await pipe.settle()
    # The ids in the 504 bodies are the commands that were sent.
    sent = [json.loads(r.value or b"")["command_id"] for r in await command_records(pipe, {order_id})]
    assert {create_id, cancel_id, unkeyed_id} <= set(sent), (create_id, cancel_id, unkeyed_id, sent)
    assert len({create_id, cancel_id, unkeyed_id}) == 3
    assert pipe.order_events(order_id) == ["order.created", "order.canceled"]
    assert_app_healthy(pipe.app)


async def test_concurrent_retries_under_one_key_get_one_order(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = pipe.api.client
    user, key = uid("u-race"), uid("race")
    slow_orders(pipe, monkeypatch)
    answers = await asyncio.gather(*(client.post("/orders", json=body(user), headers=keyed(key))
                                     for _ in range(3)))
    assert [a.status_code for a in answers] == [201] * 3, [a.text for a in answers]
    assert len({a.json()["order_id"] for a in answers}) == 1
    await pipe.settle()
    assert len(pipe.reader.events("order.created", user_id=user)) == 1
    assert_app_healthy(pipe.app)


def slow_orders(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, delay: float = 0.5) -> None:
    """Make the order aggregate take ``delay`` before each batch, so requests overlap."""
    orders = pipe.app.orders.orders
    process = orders.process

    async def slowly(events: Any) -> None:
        await asyncio.sleep(delay)
        await process(events)

    monkeypatch.setattr(orders, "process", slowly)


async def test_concurrent_requests_under_one_key_with_other_parameters(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = pipe.api.client
    user, key = uid("u-race"), uid("race")
    slow_orders(pipe, monkeypatch)
    mine = client.post("/orders", json=body(user), headers=keyed(key))
    other = client.post("/orders", json=body(user, currency="USD"), headers=keyed(key))
    answers = await asyncio.gather(mine, other)
    assert sorted(a.status_code for a in answers) == [201, 422], [a.text for a in answers]
    [created] = [a.json() for a in answers if a.status_code == 201]
    await pipe.settle()
    assert await pipe.order(created["order_id"]) == created


async def test_a_client_cannot_pick_the_order_id_of_another_users_order(pipe: Pipeline) -> None:
    client = pipe.api.client
    victim = await pipe.create_order(uid("u-victim"))
    attacker = uid("u-attacker")
    response = await client.post("/orders", json=body(attacker, currency="USD"),
                                 headers={orders_api.ORDER_ID_HEADER: victim["order_id"]})
    assert victim["user_id"] not in response.text, response.text
    assert response.status_code != 201 or response.json()["user_id"] == attacker, response.text


async def test_the_create_key_outlives_many_keyed_commands(pipe: Pipeline) -> None:
    client = pipe.api.client
    user, key = uid("u-keys"), uid("create")
    created = await client.post("/orders", json=body(user), headers=keyed(key))
    assert created.status_code == 201, created.text
    order_id = created.json()["order_id"]
    other_items = [{"product_id": "sku-2", "quantity": 1, "unit_amount": 4000}]
    for n in range(order_state.MAX_IDEMPOTENCY_KEYS):
        items = other_items if n % 2 == 0 else ITEMS
        response = await client.patch(f"/orders/{order_id}", json={"items": items},
                                      headers=keyed(uid("patch")))
        assert response.status_code == 200, response.text
    reused = await client.post("/orders", json=body(user, currency="USD"), headers=keyed(key))
    assert reused.status_code == 422, reused.text
