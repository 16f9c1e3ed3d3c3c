"""The seed's service clients on one HTTP base (:mod:`connectors.clients.base`).

One :class:`ServiceClients` per process holds the seven clients, their one
pooled ``aiohttp`` session and one circuit breaker per service::

    clients = ServiceClients.from_settings(settings)
    app.add_dependency(ClientsService(clients))   # start with the app, close at stop
    verdict = await clients.account.validate_user("u-demo")
    Aggregate(app, flow, services=clients.services())   # {"account": clients.account.call, ...}

Paths and payloads are in :mod:`connectors.clients.spec`, which the local
stand-ins (``streams.devtools.standins``) read too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from mode import Service as ModeService

from connectors.clients.account import AccountClient
from connectors.clients.base import (
    BadResponse,
    BaseClient,
    CircuitBreaker,
    ClientOptions,
    NotFound,
    Rejected,
    ServiceError,
    ServiceUnavailable,
    SessionPool,
)
from connectors.clients.billing import BillingClient
from connectors.clients.notification import NotificationClient
from connectors.clients.payment import PaymentClient
from connectors.clients.product import ProductClient
from connectors.clients.spec import SERVICES
from connectors.clients.storage import StorageClient
from connectors.clients.wallet import WalletClient
from streams.kernel import Service
from streams.settings import Settings

__all__ = [
    "CLIENT_CLASSES",
    "AccountClient",
    "BadResponse",
    "BaseClient",
    "BillingClient",
    "CircuitBreaker",
    "ClientOptions",
    "ClientsService",
    "NotFound",
    "NotificationClient",
    "PaymentClient",
    "ProductClient",
    "Rejected",
    "ServiceClients",
    "ServiceError",
    "ServiceUnavailable",
    "SessionPool",
    "StorageClient",
    "WalletClient",
]

#: Service name (the kernel's ``Call.service``) -> client class.
CLIENT_CLASSES: dict[str, type[BaseClient]] = {
    cls.service: cls for cls in (AccountClient, WalletClient, BillingClient, ProductClient,
                                 NotificationClient, PaymentClient, StorageClient)
}


class ServiceClients:
    """The process's service clients: one session pool, one breaker per service.

    Build it at app build time, :meth:`start` it at app start (opens the
    session) and :meth:`close` it at stop; or ``async with``.  ``urls``
    overrides base URLs by service name (tests point clients at their own
    servers); everything else comes from ``settings``.
    """

    def __init__(self, settings: Settings, options: ClientOptions | None = None, *,
                 session: aiohttp.ClientSession | None = None, urls: Mapping[str, str] | None = None) -> None:
        self.options = options or ClientOptions()
        self.pool = SessionPool(self.options, session=session)
        chosen = {name: getattr(settings, spec.settings_attribute) for name, spec in SERVICES.items()}
        chosen.update(urls or {})
        self._clients: dict[str, BaseClient] = {
            name: cls(chosen[name], self.pool, options=self.options) for name, cls in CLIENT_CLASSES.items()}
        self.account: AccountClient = self._clients["account"]  # type: ignore[assignment]
        self.wallet: WalletClient = self._clients["wallet"]  # type: ignore[assignment]
        self.billing: BillingClient = self._clients["billing"]  # type: ignore[assignment]
        self.product: ProductClient = self._clients["product"]  # type: ignore[assignment]
        self.notification: NotificationClient = self._clients["notification"]  # type: ignore[assignment]
        self.payment: PaymentClient = self._clients["payment"]  # type: ignore[assignment]
        self.storage: StorageClient = self._clients["storage"]  # type: ignore[assignment]

    @classmethod
    def from_settings(cls, settings: Settings, options: ClientOptions | None = None) -> ServiceClients:
        return cls(settings, options)

    async def start(self) -> None:
        """Open the pooled session (idempotent)."""
        await self.pool.start()

    async def close(self) -> None:
        """Close the pooled session (idempotent; a session handed in stays open)."""
        await self.pool.close()

    async def __aenter__(self) -> ServiceClients:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def client(self, service: str) -> BaseClient:
        """The client of ``service`` (KeyError for a service the spec does not name)."""
        return self._clients[service]

    def services(self, *names: str) -> dict[str, Service]:
        """Kernel services (``Aggregate(services=...)``): name -> ``client.call``; all, or ``names``."""
        return {name: self._clients[name].call for name in (names or self._clients)}

    def breakers(self) -> dict[str, str]:
        """Each service's breaker state ("closed", "open", "half_open"), e.g. for a health view."""
        return {name: client.breaker.state for name, client in self._clients.items()}


class ClientsService(ModeService):
    """Starts the clients' session with the Faust app and closes it at stop (``app.add_dependency``)."""

    logger = logging.getLogger("faust.paystream.clients")

    def __init__(self, clients: ServiceClients, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clients = clients

    async def on_start(self) -> None:
        await self.clients.start()

    async def on_stop(self) -> None:
        await self.clients.close()
