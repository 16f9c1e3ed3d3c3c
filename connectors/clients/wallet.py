"""WalletClient: the wallet service (a user's credit balance, credits and debits).

``add_credits`` and ``deduct_credits`` move money: each takes an
``idempotency_key`` derived from its cause (e.g. the order id and the
command that pays it), sent as ``Idempotency-Key`` on every attempt, so a
retry or a replay moves the money once.
"""

from __future__ import annotations

from connectors.clients.base import BaseClient
from connectors.clients.spec import Balance, CreditsRequest, UserRef, Wallet, WalletTransaction


class WalletClient(BaseClient):
    service = "wallet"

    async def get_wallet(self, user_id: str) -> Wallet:
        """The user's wallet; :class:`NotFound` ("wallet_not_found") when the user has none."""
        return await self.request("get_wallet", UserRef(user_id=user_id))

    async def get_balance(self, user_id: str) -> Balance:
        """The user's balance (minor units); :class:`NotFound` when the user has no wallet."""
        return await self.request("get_balance", UserRef(user_id=user_id))

    async def add_credits(self, user_id: str, amount: int, currency: str, *, reason: str,
                          idempotency_key: str, reference_id: str | None = None) -> WalletTransaction:
        """Credit ``amount``; :class:`Rejected` ("currency_mismatch", "invalid_amount", ...)."""
        return await self.request("add_credits", CreditsRequest(
            user_id=user_id, amount=amount, currency=currency, reason=reason, reference_id=reference_id),
            idempotency_key=idempotency_key)

    async def deduct_credits(self, user_id: str, amount: int, currency: str, *, reason: str,
                             idempotency_key: str, reference_id: str | None = None) -> WalletTransaction:
        """Debit ``amount``; :class:`Rejected` ("insufficient_funds", "currency_mismatch", ...)."""
        return await self.request("deduct_credits", CreditsRequest(
            user_id=user_id, amount=amount, currency=currency, reason=reason, reference_id=reference_id),
            idempotency_key=idempotency_key)
