"""AccountClient: the account service (users, their status, tier and payment methods).

Sync by the seed's decision matrix: validating a user is an answer a request
needs before it goes on.
"""

from __future__ import annotations

from connectors.clients.base import BaseClient
from connectors.clients.spec import PaymentMethods, User, UserRef, UserTier, UserValidation


class AccountClient(BaseClient):
    service = "account"

    async def get_user(self, user_id: str) -> User:
        """The user's profile; :class:`NotFound` ("user_not_found") for an unknown user."""
        return await self.request("get_user", UserRef(user_id=user_id))

    async def validate_user(self, user_id: str) -> UserValidation:
        """A verdict for any user id: ``valid``, or the ``reason`` ("user_not_found", "user_disabled")."""
        return await self.request("validate_user", UserRef(user_id=user_id))

    async def get_payment_methods(self, user_id: str) -> PaymentMethods:
        """The user's saved payment methods; :class:`NotFound` for an unknown user."""
        return await self.request("get_payment_methods", UserRef(user_id=user_id))

    async def get_user_tier(self, user_id: str) -> UserTier:
        """The user's tier; :class:`NotFound` for an unknown user."""
        return await self.request("get_user_tier", UserRef(user_id=user_id))
