"""Service tokens: the one aiohttp middleware in front of every paystream HTTP surface.

``PAYSTREAM_SERVICE_TOKENS`` holds the bearer tokens a surface accepts,
comma-separated, so a token can be rotated: add the new one, move the
callers over, drop the old one.  With none configured every request passes
(the local run and most tests work without); with one or more, a request
that needs a token must carry ``Authorization: Bearer <token>`` naming one of
them, or it is answered 401 with ``WWW-Authenticate: Bearer`` and a JSON
error, before any handler (or routing to another worker) runs.

Which requests need one (README: "Access tokens and logs"):

- the worker (orders, payments, subscriptions, invoices, and whatever is
  mounted later, such as ``/console`` or the dead-letter routes, and Faust's
  own ``/router``): every path except ``app.public_paths`` (:data:`PUBLIC_PATHS`,
  plus any path a registrar adds, :func:`public_paths`).  Deny by default, so
  a route added later is protected without anyone remembering to;
- the Stripe ingress: the webhook carries Stripe's signature instead and
  never needs a token; its other routes are the public probes and metrics;
- the schema registry (:func:`registry_is_public`): reads are open, as
  Confluent-compatible consumers expect (a deserializer fetching
  ``/schemas/ids/{id}`` has no token to send), including the two POSTs that
  only read (lookup of a schema under a subject, compatibility checks);
  writes (registering, deleting, changing config or mode) need a token;
- :data:`PUBLIC_PATHS` everywhere: ``/healthz``, ``/readyz`` and ``/metrics``
  (bounded labels, no ids, no secrets: Prometheus scrapes it without a token).

Each configured token is compared with :func:`hmac.compare_digest`, all of
them every time, so the answer's timing says nothing about which token came
close.  Neither the token nor the header is ever logged: the 401 log line
names the method, path and why (missing, malformed, unknown); the aiohttp
access log of every paystream server is off, and
:class:`streams.logs.SecretFilter` scrubs bearer tokens from any line that
slips through.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

from aiohttp import web

log = logging.getLogger("paystream.access")

#: Paths open on every surface: liveness, readiness and Prometheus metrics.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: The realm named in ``WWW-Authenticate``.
REALM = "paystream"
#: The registry's POST routes that only read (Confluent's lookup and compatibility check).
REGISTRY_READ_ONLY_POSTS = frozenset({
    "/subjects/{subject}",
    "/compatibility/subjects/{subject}/versions",
    "/compatibility/subjects/{subject}/versions/{version}",
})
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Whether a request may pass without a token.
IsPublic = Callable[[web.Request], bool]
#: Builds the 401 answer from a short reason (a surface may answer in its own error format).
Refuse = Callable[[str], web.StreamResponse]


def is_public(request: web.Request) -> bool:
    """The default rule: only :data:`PUBLIC_PATHS` pass without a token."""
    return request.path in PUBLIC_PATHS


def public_paths(paths: set[str]) -> IsPublic:
    """A rule letting ``paths`` through, read at each request: the set may grow after start-up.

    The worker's rule: ``app.public_paths`` starts as :data:`PUBLIC_PATHS`,
    and a domain registrar may add a path that reveals and changes nothing
    (say a page shell whose data it fetches with the token).
    """
    return lambda request: request.path in paths


def ingress_is_public(request: web.Request) -> bool:
    """The ingress: :data:`PUBLIC_PATHS` and the Stripe webhook (signed by Stripe instead)."""
    from connectors.stripe_ingress import WEBHOOK_PATH

    return request.path == WEBHOOK_PATH or is_public(request)


def registry_is_public(request: web.Request) -> bool:
    """The registry: reads pass (GET, HEAD, OPTIONS, and the POSTs that only read); writes do not."""
    if request.method in _READ_METHODS or is_public(request):
        return True
    if request.method == "POST":
        route = request.match_info.route
        resource = route.resource
        return resource is not None and resource.canonical in REGISTRY_READ_ONLY_POSTS
    return False


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None when it is not one."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def token_accepted(token: str, tokens: Iterable[str]) -> bool:
    """Whether ``token`` is one of ``tokens``, comparing with every one in constant time.

    SHA-256 digests are compared, so the comparison's time does not depend
    on the tokens' lengths either (:func:`hmac.compare_digest` alone may
    return early on a length mismatch).
    """
    given = _digest(token)
    matches = [hmac.compare_digest(given, _digest(candidate)) for candidate in tokens]
    return any(matches)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def json_refusal(reason: str) -> web.Response:
    """401 with ``WWW-Authenticate: Bearer`` and a JSON error (the worker's and ingress' format)."""
    return web.Response(
        status=401, content_type="application/json",
        text=json.dumps({"error": "unauthorized", "message": reason}),
        headers={"WWW-Authenticate": _challenge(reason)})


def registry_refusal(reason: str) -> web.Response:
    """401 in the Confluent registry's error format (``error_code`` 40101, its content type)."""
    from schemas.registry.http import CONTENT_TYPE

    return web.Response(
        status=401, content_type=CONTENT_TYPE,
        text=json.dumps({"error_code": 40101, "message": f"Unauthorized: {reason}"}),
        headers={"WWW-Authenticate": _challenge(reason)})


def _challenge(reason: str) -> str:
    # RFC 6750 §3: no error code when the request carried no credentials at all.
    if reason == MISSING:
        return f'Bearer realm="{REALM}"'
    return f'Bearer realm="{REALM}", error="invalid_token"'


# Worded so that the secret filter (streams.logs), which redacts "Bearer <value>", leaves them be.
MISSING = "a service token is required (Authorization: Bearer <token>)"
MALFORMED = "the Authorization header is not 'Bearer <token>'"
UNKNOWN = "the service token is not accepted"


def token_middleware(tokens: Sequence[str], *, public: IsPublic = is_public,
                     refuse: Refuse = json_refusal) -> Handler:
    """The middleware: requests ``public`` lets through pass, others need one of ``tokens``.

    With no ``tokens`` every request passes.  ``tokens`` are copied: the set
    in force is the one given when the server was built (a rotation is a
    restart with the new list).
    """
    accepted = tuple(t for t in tokens if t)

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not accepted or public(request):
            return await handler(request)
        header = request.headers.get("Authorization")
        token = bearer_token(header)
        if token is None:
            reason = MISSING if header is None else MALFORMED
        elif token_accepted(token, accepted):
            return await handler(request)
        else:
            reason = UNKNOWN
        log.warning("%s %s refused 401: %s", request.method, request.path, reason)
        return refuse(reason)

    return require_token


def authorization(token: str | None) -> dict[str, str]:
    """The header that carries ``token`` to another paystream service ({} without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def registry_client_config(token: str | None) -> dict[str, str]:
    """confluent-kafka ``SchemaRegistryClient`` options that send ``token`` ({} without one).

    The client's static bearer source also wants a logical cluster, which it
    sends as ``target-sr-cluster``; paystream's registry ignores it, as does
    a Confluent registry without RBAC.
    """
    if not token:
        return {}
    return {"bearer.auth.credentials.source": "STATIC_TOKEN", "bearer.auth.token": token,
            "bearer.auth.logical.cluster": "paystream"}
