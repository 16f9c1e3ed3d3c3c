"""StorageClient: the storage service (a user's usage and quota)."""

from __future__ import annotations

from connectors.clients.base import BaseClient
from connectors.clients.spec import QuotaCheck, QuotaValidation, StorageUsage, UserRef


class StorageClient(BaseClient):
    service = "storage"

    async def get_storage_usage(self, user_id: str) -> StorageUsage:
        """Bytes used and quota; :class:`NotFound` ("user_not_found") for a user storage does not know."""
        return await self.request("get_storage_usage", UserRef(user_id=user_id))

    async def validate_quota(self, user_id: str, requested_bytes: int) -> QuotaValidation:
        """Whether ``requested_bytes`` more fit (used + requested <= quota), with the numbers."""
        check = QuotaCheck(user_id=user_id, requested_bytes=requested_bytes)
        return await self.request("validate_quota", check)
