"""ProductClient: the product service (subscription plans)."""

from __future__ import annotations

from connectors.clients.base import BaseClient
from connectors.clients.spec import Plan, PlanRef, SubscriptionCheck, SubscriptionValidation


class ProductClient(BaseClient):
    service = "product"

    async def get_plan(self, plan_id: str) -> Plan:
        """The plan; :class:`NotFound` ("plan_not_found") for an unknown plan."""
        return await self.request("get_plan", PlanRef(plan_id=plan_id))

    async def validate_subscription(self, user_id: str, plan_id: str) -> SubscriptionValidation:
        """A verdict: ``valid``, or the ``reason`` ("plan_not_found", "plan_inactive", ...)."""
        check = SubscriptionCheck(user_id=user_id, plan_id=plan_id)
        return await self.request("validate_subscription", check)
