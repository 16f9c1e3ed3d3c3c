"""A first order through the real pipeline."""

from __future__ import annotations

import pytest

from streams.app import create_app
from streams.settings import Settings
from tests.integration.pipeline_support import Api, EventReader, EventWriter, wait_until

pytestmark = pytest.mark.integration


async def test_order_lifecycle_create_pay_complete(app_settings: Settings) -> None:
    app = create_app(app_settings)
    await app.start()
    api = Api(app_settings.worker_web_port)
    reader = EventReader(app_settings, ["order.created", "order.payment_pending", "order.completed"])
    writer = EventWriter(app_settings)
    try:
        await wait_until(lambda: app.consumer.assignment(), what="assignment")
        response = await api.create_order()
        assert response.status_code == 201, response.text
        order = response.json()
        order_id = order["order_id"]
        assert order["status"] == "PENDING"
        writer.send("payment.intent.created", {
            "payment_intent_id": "pi_1", "user_id": "u-1", "amount": 2500, "currency": "EUR",
            "order_id": order_id,
        })
        await reader.wait_for("order.payment_pending", order_id=order_id)
        writer.send("payment.completed", {
            "payment_intent_id": "pi_1", "user_id": "u-1", "amount": 2500, "currency": "EUR",
            "order_id": order_id,
        })
        [completed] = await reader.wait_for("order.completed", order_id=order_id)
        assert completed["total_amount"] == 2500
        got = (await api.client.get(f"/orders/{order_id}")).json()
        assert got["status"] == "COMPLETED"
        created = reader.events("order.created", order_id=order_id)
        assert len(created) == 1
    finally:
        reader.close()
        await api.close()
        await app.stop()
