"""The synchronous service checks an API makes before it sends a command.

The seed's decision matrix makes validation a synchronous call: ``POST /orders``
and ``POST /subscriptions`` ask the account (and product, storage, wallet)
services first, and send their command only when every answer allows it.
One mapping of the clients' errors to answers serves both, so a refused user
reads the same on either endpoint:

- a refusal of the service (:class:`connectors.clients.NotFound`,
  :class:`connectors.clients.Rejected`): 400 with the service's code (402
  ``insufficient_funds``); a refusal of the aggregate's own rules checked on
  the way (:class:`tables.aggregate.Refusal`): its status and code;
- a service that cannot answer now (:class:`connectors.clients.ServiceUnavailable`,
  after the client's retries or with its breaker open): 503 with
  Retry-After, and nothing was created.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from connectors.clients import NotFound, Rejected, ServiceUnavailable
from streams.aggregate_api import error, unavailable
from tables.aggregate import Refusal


async def checked(checks: Callable[[], Awaitable[web.Response | None]]) -> web.Response | None:
    """Run ``checks`` (None: the request may go on); the clients' errors become answers."""
    try:
        return await checks()
    except ServiceUnavailable as exc:
        return unavailable(f"the {exc.service} service cannot answer now ({exc.code}); "
                           "nothing was created")
    except NotFound as exc:
        return error(400, exc.code or "not_found", f"{exc.service}: {exc}")
    except Rejected as exc:
        status = 402 if exc.code == "insufficient_funds" else 400
        return error(status, exc.code or "rejected", f"{exc.service}: {exc}")
    except Refusal as refusal:
        return error(refusal.status, refusal.code, str(refusal))


async def user_refused(clients: Any, user_id: str, doing: str) -> web.Response | None:
    """400 with the account service's reason unless it knows ``user_id`` as active; else None."""
    verdict = await clients.account.validate_user(user_id)
    if not verdict.valid:
        return error(400, verdict.reason or "invalid_user",
                     f"user {user_id} may not {doing}: {verdict.reason}")
    return None
