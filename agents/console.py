"""The operator console: ``/console`` on the worker's web server (issue 10, point 7).

Server-rendered pages (:mod:`agents.console_html`), no script at all:

- ``GET /console``: pipeline health, per kernel agent (every
  :class:`streams.kernel.Aggregate` on the app, the sinks' too): its input
  rate over the last minute, from the ``paystream_agent_input_records_total``
  counters of :mod:`streams.metrics` sampled every :data:`SAMPLE_SECONDS`,
  and the lag of each of its input partitions this worker holds (log end the
  consumer last fetched minus the group's committed offset, read from the
  consumer's memory as :mod:`streams.metrics` reads it: no broker call).
- ``GET /console/dead-letters``: the dead letters, filtered as ``paystream
  dlq list`` filters them (source topic, reason, time range, the newest N);
  ``GET /console/dead-letters/{partition}/{offset}``: one, decoded;
  ``GET /console/dead-letters/replay?position=P:O...``: the confirmation
  page (a dry run of the replay: what goes where, or why it is refused);
  ``POST /console/dead-letters/replay``: the replay, and its result.  All
  through :mod:`streams.ops.dlq` (its blocking reads in a thread).
- ``GET /console/lookup?kind=order|payment|payment_intent|subscription|invoice&id=...``:
  the domain API's own answer (:class:`agents.orders_api.OrderApi` and its
  peers, for the domains this worker runs), so a key another worker owns
  is forwarded to that worker, exactly as the JSON endpoints forward it.

Access: the worker's token middleware (:mod:`streams.access`) covers every
console path, so with ``PAYSTREAM_SERVICE_TOKENS`` set each request needs
``Authorization: Bearer <token>`` (an operator's browser gets it from the
reverse proxy in front of the console, or a header extension).  The replay
POST is a state change a browser could be tricked into sending, so on top
of the token it needs (:meth:`Console.forgery`): no cross-site
``Origin``/``Sec-Fetch-Site``, the per-browser CSRF token of the
confirmation page (a ``SameSite=Strict`` cookie echoed in the form, used
once: a resubmitted form is refused), and the ticked confirmation box.
Every answer carries a Content-Security-Policy that allows no script, no
framing (``frame-ancestors 'none'``, ``X-Frame-Options: DENY``), forms to
this origin only, and styles from the console's own stylesheet.  The
referrer policy is ``same-origin`` rather than ``no-referrer``: with
``no-referrer`` a browser sends ``Origin: null`` on the form's POST, and
the same-origin check could not tell the console's own form from a
sandboxed page's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web
from mode import Service
from yarl import URL

from agents import console_html as pages
from agents.console_html import ROOT, Frame, Health, LetterFilter
from streams.ops import dlq
from streams.ops.records import OpsError
from streams.settings import Settings

log = logging.getLogger("paystream.console")

#: Seconds between two samples of the input counters.
SAMPLE_SECONDS = 5.0
#: The rate is taken over (at most) this many seconds.
RATE_WINDOW_SECONDS = 60.0
#: Dead letters one replay may name (the list pages show 100 by default).
MAX_POSITIONS = 500
#: The newest dead letters a list shows at most.
MAX_LIST = 5_000
MAX_ID_LENGTH = 200
CSRF_COOKIE = "paystream_console_csrf"

CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self'; "
                           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A domain API read: (the request, routed to the API's path, the id) -> the API's answer.
ApiRead = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


# ----------------------------------------------------------------------
# Pipeline health


def kernel_agents(app: Any) -> list[tuple[str, Any]]:
    """(agent name, :class:`streams.kernel.Aggregate`) of every kernel agent on ``app``.

    The kernel declares each aggregate's agent with its bound ``_consume``,
    so the Faust agent leads back to the aggregate.
    """
    from streams.kernel import Aggregate

    found = []
    for name, agent in sorted(app.agents.items()):
        owner = getattr(getattr(agent, "fun", None), "__self__", None)
        if isinstance(owner, Aggregate):
            found.append((name, owner))
    return found


def input_totals(metrics: Any) -> dict[str, float]:
    """Agent -> input records taken so far (all its topics), from the worker's counters."""
    totals: dict[str, float] = {}
    for family in metrics.input_records.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                agent = sample.labels["agent"]
                totals[agent] = totals.get(agent, 0.0) + sample.value
    return totals


class RateSampler(Service):
    """Keeps the last minute of input counter samples, so a page can show a rate."""

    logger = logging.getLogger("faust.paystream.console")

    def __init__(self, metrics: Any, *, window: float = RATE_WINDOW_SECONDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics = metrics
        self.samples: deque[tuple[float, dict[str, float]]] = deque(
            maxlen=int(window / SAMPLE_SECONDS) + 1)

    def take(self, at: float | None = None) -> dict[str, float]:
        totals = input_totals(self.metrics)
        self.samples.append((time.monotonic() if at is None else at, totals))
        return totals

    @Service.timer(SAMPLE_SECONDS)
    async def _sample(self) -> None:
        self.take()

    def rates(self, at: float | None = None) -> dict[str, tuple[float | None, float | None, float]]:
        """Agent -> (records/s, over how many seconds, total) from the oldest sample to now."""
        now = time.monotonic() if at is None else at
        totals = input_totals(self.metrics)
        first = self.samples[0] if self.samples else None
        out: dict[str, tuple[float | None, float | None, float]] = {}
        for agent, total in totals.items():
            if first is None or now - first[0] < 1.0:
                out[agent] = (None, None, total)
                continue
            window = now - first[0]
            out[agent] = (max(0.0, total - first[1].get(agent, 0.0)) / window, window, total)
        return out


def partition_lags(app: Any, topics: Sequence[str]) -> list[pages.PartitionLag]:
    """Lag of this worker's assigned partitions of ``topics``: highwater - committed.

    Read from the consumer's memory, as :mod:`streams.metrics` computes
    ``paystream_consumer_lag_records``; a partition with no committed offset
    yet shows as unknown.
    """
    consumer = getattr(app, "_consumer", None)
    if consumer is None:
        return []
    try:
        assignment = sorted(consumer.assignment())
    except Exception:  # not started, or being replaced by a rebalance
        return []
    wanted = set(topics)
    committed = getattr(consumer, "_committed_offset", {})
    lags = []
    for tp in assignment:
        if tp.topic not in wanted:
            continue
        try:
            end = consumer.highwater(tp)
        except Exception:
            end = None
        lags.append(pages.PartitionLag(tp.topic, tp.partition, committed.get(tp), end))
    return lags


def health_of(app: Any, sampler: RateSampler | None) -> Health:
    rates = sampler.rates() if sampler is not None else {}
    agents = []
    for name, aggregate in kernel_agents(app):
        topics = tuple(sorted(aggregate.names))
        rate, window, total = rates.get(name, (None, None, None))
        if sampler is not None and total is None:
            total = 0.0  # counted, but it has taken nothing yet
        agents.append(pages.AgentHealth(
            agent=name, flow=aggregate.flow.name, topics=topics, rate=rate, window=window,
            total=total, partitions=tuple(partition_lags(app, topics))))
    consumer = getattr(app, "_consumer", None)
    try:
        assigned = len(consumer.assignment()) if consumer is not None else 0
    except Exception:
        assigned = 0
    return Health(agents=tuple(agents), metrics_on=sampler is not None,
                  rebalancing=bool(getattr(app, "rebalancing", False)), assigned=assigned)


# ----------------------------------------------------------------------
# Lookups through the domain APIs


@dataclass(frozen=True)
class Lookup:
    label: str
    #: The JSON endpoint's path for an id (the request is routed as that request).
    path: str
    read: ApiRead


def domain_lookups(app: Any) -> dict[str, Lookup]:
    """The lookups of the domains registered on ``app``, through their own API classes."""
    from streams.aggregate_api import router_of

    found: dict[str, Lookup] = {}
    if not any(getattr(app, domain, None) is not None
               for domain in ("orders", "payments", "subscriptions", "invoices")):
        return found  # no domain API (the sinks worker): no router to add either
    router = router_of(app)
    if getattr(app, "orders", None) is not None:
        from agents.orders_api import OrderApi

        orders = OrderApi(app, app.orders, router)
        found["order"] = Lookup("Order (order id)", "/orders/{}", orders.get)
    if getattr(app, "payments", None) is not None:
        from agents.payments_api import PaymentApi

        payments = PaymentApi(app, app.payments, router)
        found["payment"] = Lookup("Payment (order id)", "/orders/{}/payment", payments.payment)
        found["payment_intent"] = Lookup("Payment (PaymentIntent id)", "/payments/{}", payments.get)
    if getattr(app, "subscriptions", None) is not None:
        from agents.subscriptions_api import SubscriptionApi

        subscriptions = SubscriptionApi(app, app.subscriptions, router)
        found["subscription"] = Lookup("Subscription (subscription id)", "/subscriptions/{}",
                                       subscriptions.get)
    if getattr(app, "invoices", None) is not None:
        from agents.invoices_api import InvoiceApi

        invoices = InvoiceApi(app, app.invoices, router)
        found["invoice"] = Lookup("Invoice (invoice id)", "/invoices/{}", invoices.get)
    return found


def id_problem(ident: str) -> str | None:
    """Why ``ident`` cannot be an aggregate id in a path, or None."""
    if not 0 < len(ident) <= MAX_ID_LENGTH:
        return f"an id has 1 to {MAX_ID_LENGTH} characters"
    if any(c in ident for c in "/?#%\\") or any(ord(c) < 33 or ord(c) == 127 for c in ident):
        return "an id has no spaces, control characters or / ? # % \\"
    return None


# ----------------------------------------------------------------------
# The console


class Console:
    """The console's handlers; :func:`register` binds them to Faust pages.

    ``replay``, ``list_letters`` and ``show_letter`` are :mod:`streams.ops.dlq`'s
    (given here so the request handling can be tested on its own); the two
    readers are blocking and run in a thread.
    """

    def __init__(self, settings: Settings, frame: Frame, *,
                 health: Callable[[], Health],
                 lookups: Mapping[str, Lookup] | None = None,
                 list_letters: Callable[..., list[dlq.DeadLetter]] = dlq.list_dead_letters,
                 show_letter: Callable[..., dlq.ShownDeadLetter] = dlq.show_dead_letter,
                 replay: Callable[..., Awaitable[dlq.ReplayResult]] = dlq.replay) -> None:
        self.settings = settings
        self.frame = frame
        self.health = health
        self.lookups = dict(lookups or {})
        self.list_letters = list_letters
        self.show_letter = show_letter
        self.replay = replay

    # -- answers -------------------------------------------------------

    def html(self, body: str, status: int = 200, *, csrf: str | None = None,
             secure: bool = False) -> web.Response:
        response = web.Response(text=body, status=status, content_type="text/html",
                                charset="utf-8", headers=SECURITY_HEADERS)
        if csrf is not None:
            response.set_cookie(CSRF_COOKIE, csrf, path=ROOT, httponly=True, samesite="Strict",
                                secure=secure)
        return response

    def failure(self, title: str, message: str, status: int) -> web.Response:
        return self.html(pages.error_page(self.frame, title, message), status)

    # -- pipeline health -----------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return self.html(pages.health_page(self.frame, self.health()))

    async def stylesheet(self, request: web.Request) -> web.Response:
        return web.Response(text=pages.STYLE, content_type="text/css", charset="utf-8", headers={
            "X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=300"})

    # -- dead letters --------------------------------------------------

    async def dead_letters(self, request: web.Request) -> web.Response:
        query = request.query
        raw_limit = query.get("limit", "100").strip() or "100"
        where = LetterFilter(query.get("source_topic", "").strip(), query.get("reason", "").strip(),
                             query.get("since", "").strip(), query.get("until", "").strip(),
                             int(raw_limit) if raw_limit.isdigit() else 100)
        try:
            if not raw_limit.isdigit() or not 0 < int(raw_limit) <= MAX_LIST:
                raise OpsError(f"newest: give a number of dead letters from 1 to {MAX_LIST}")
            chosen = dlq.DeadLetterFilter(
                source_topic=where.source_topic or None, reason=where.reason or None,
                since_ms=dlq.parse_time(where.since) if where.since else None,
                until_ms=dlq.parse_time(where.until) if where.until else None)
            letters = await asyncio.to_thread(self.list_letters, self.settings, chosen,
                                              limit=where.limit)
        except OpsError as exc:
            return self.html(pages.dead_letters_page(self.frame, where, None, str(exc)), 400)
        return self.html(pages.dead_letters_page(self.frame, where, letters))

    async def dead_letter(self, request: web.Request) -> web.Response:
        partition, offset = request.match_info["partition"], request.match_info["offset"]
        if not (partition.isdigit() and offset.isdigit()):
            return self.failure("Dead letter", "a dead letter is named by its partition and offset "
                                "(whole numbers)", 400)
        try:
            shown = await asyncio.to_thread(self.show_letter, self.settings, int(partition), int(offset))
        except OpsError as exc:
            return self.failure("Dead letter", str(exc), 404)
        return self.html(pages.dead_letter_page(self.frame, shown))

    def _positions(self, raw: Sequence[str]) -> list[tuple[int, int]]:
        if not raw:
            raise OpsError("choose at least one dead letter to replay")
        if len(raw) > MAX_POSITIONS:
            raise OpsError(f"at most {MAX_POSITIONS} dead letters in one replay")
        return list(dict.fromkeys(dlq.parse_position(p) for p in raw))

    async def confirm_replay(self, request: web.Request) -> web.Response:
        """The confirmation page: a dry run of the replay, and the form that sends it."""
        title = "Replay dead letters"
        try:
            positions = self._positions(request.query.getall("position", []))
        except OpsError as exc:
            return self.failure(title, str(exc), 400)
        csrf = request.cookies.get(CSRF_COOKIE, "")
        fresh = None
        if not _token_shaped(csrf):
            csrf = fresh = secrets.token_urlsafe(32)
        limit = self.settings.dlq_replay_limit
        try:
            plan = await self.replay(self.settings, positions=positions, dry_run=True)
        except dlq.ReplayRefused as refused:
            body = pages.replay_confirm_page(self.frame, [], [], refused.problems, csrf, limit)
            return self.html(body, 409, csrf=fresh, secure=request.secure)
        except OpsError as exc:
            body = pages.replay_confirm_page(self.frame, [], [], [str(exc)], csrf, limit)
            return self.html(body, 409, csrf=fresh, secure=request.secure)
        body = pages.replay_confirm_page(self.frame, plan.planned, plan.skipped, [], csrf, limit)
        return self.html(body, csrf=fresh, secure=request.secure)

    def forgery(self, request: web.Request, form: Mapping[str, Any]) -> str | None:
        """Why a replay POST may not come from the console's own form, or None.

        Browsers say where a request comes from (``Sec-Fetch-Site``, and
        ``Origin`` on every POST): anything but this very host is refused.
        The host is compared, not the scheme, so a console behind a
        TLS-terminating proxy that keeps the ``Host`` header still works.
        Then the form's CSRF token must equal the browser's console cookie.
        """
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site != "same-origin":
            return f"a replay may only be sent from the console's own page (Sec-Fetch-Site: {site})"
        origin = request.headers.get("Origin")
        if origin is not None and _authority(origin) != request.host.lower():
            return "a replay may only be sent from the console's own page (Origin of another site)"
        cookie = request.cookies.get(CSRF_COOKIE, "")
        given = form.get(pages.CSRF_FIELD, "")
        if not isinstance(given, str) or not _token_shaped(cookie) or not hmac.compare_digest(
                given.encode(), cookie.encode()):
            return ("the form's CSRF token does not match this browser's console session "
                    "(a form from another page, or one sent already): open the confirmation "
                    "page again")
        return None

    async def replay_now(self, request: web.Request) -> web.Response:
        """The replay POST: checks, then :func:`streams.ops.dlq.replay`, then its result."""
        title = "Replay dead letters"
        form = await request.post()
        why = self.forgery(request, form)
        if why is not None:
            log.warning("console replay refused 403: %s", why)
            return self.failure(title, why, 403)
        fresh = secrets.token_urlsafe(32)  # one use per token: a resent form is refused
        if form.get(pages.CONFIRM_FIELD) != pages.CONFIRM_VALUE:
            body = pages.error_page(self.frame, title, "tick the confirmation box to replay")
            return self.html(body, 400, csrf=fresh, secure=request.secure)
        try:
            positions = self._positions([str(p) for p in form.getall("position", [])])
            result = await self.replay(self.settings, positions=positions)
        except dlq.ReplayRefused as refused:
            body = pages.replay_result_page(self.frame, [], 0.0, refused.problems)
            return self.html(body, 409, csrf=fresh, secure=request.secure)
        except OpsError as exc:
            body = pages.replay_result_page(self.frame, [], 0.0, [str(exc)])
            return self.html(body, 409, csrf=fresh, secure=request.secure)
        log.info("console replayed %d dead letter(s): %s", len(result.replayed),
                 ", ".join(f"{r.partition}:{r.offset}" for r in result.replayed))
        body = pages.replay_result_page(self.frame, result.replayed, result.seconds)
        return self.html(body, csrf=fresh, secure=request.secure)

    # -- lookup --------------------------------------------------------

    async def lookup(self, request: web.Request) -> web.Response:
        kinds = {kind: spec.label for kind, spec in self.lookups.items()}
        kind = request.query.get("kind", next(iter(kinds), ""))
        ident = request.query.get("id", "").strip()
        if not ident:
            return self.html(pages.lookup_page(self.frame, kinds, kind, ""))
        spec = self.lookups.get(kind)
        problem = (f"this worker runs no domain that answers {kind!r}" if spec is None
                   else id_problem(ident))
        if spec is None or problem is not None:
            body = pages.lookup_page(self.frame, kinds, kind, ident, 400,
                                     {"error": "bad_request", "message": problem})
            return self.html(body, 400)
        status, answer = await self.read_api(request, spec, ident)
        return self.html(pages.lookup_page(self.frame, kinds, kind, ident, status, answer),
                         200 if status == 200 else (status if status in (400, 404, 503) else 502))

    async def read_api(self, request: web.Request, spec: Lookup, ident: str) -> tuple[int, Any]:
        """The JSON endpoint's answer, the request routed as a GET of its path.

        The caller's headers go along (its service token), but not its
        cookies: the console's CSRF cookie is no business of the owner.
        """
        headers = {k: v for k, v in request.headers.items() if k.lower() != "cookie"}
        routed = request.clone(method="GET", rel_url=spec.path.format(quote(ident, safe="")),
                               headers=headers)
        try:
            answer = await spec.read(routed, ident)
        except Exception as exc:
            log.exception("console lookup of %s failed", spec.path)
            return 502, {"error": "failed", "message": f"the API failed: {type(exc).__name__}"}
        body = getattr(answer, "body", None)
        try:
            parsed = json.loads(body) if isinstance(body, bytes | bytearray | str) else None
        except ValueError:
            parsed = None
        if parsed is None:
            return answer.status, {"error": "bad_answer", "message": "the API answered no JSON"}
        return answer.status, parsed

    # -- routes ----------------------------------------------------------

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) of every console route."""
        return [
            ("GET", ROOT, self.index),
            ("GET", f"{ROOT}/static/console.css", self.stylesheet),
            ("GET", f"{ROOT}/dead-letters", self.dead_letters),
            ("GET", f"{ROOT}/dead-letters/replay", self.confirm_replay),
            ("POST", f"{ROOT}/dead-letters/replay", self.replay_now),
            ("GET", f"{ROOT}/dead-letters/{{partition}}/{{offset}}", self.dead_letter),
            ("GET", f"{ROOT}/lookup", self.lookup),
        ]


def _token_shaped(value: str) -> bool:
    return 32 <= len(value) <= 64 and all(c.isalnum() or c in "-_" for c in value)


def _authority(origin: str) -> str | None:
    """``host[:port]`` of an ``Origin`` header (None for ``null`` or garbage)."""
    try:
        url = URL(origin)
    except ValueError:
        return None
    if not url.host:
        return None
    port = f":{url.explicit_port}" if url.explicit_port is not None else ""
    return f"{url.host.lower()}{port}"


def register(app: Any) -> Console:
    """Serve the console on ``app``'s web server (after every domain registered)."""
    from streams.aggregate_api import serve

    sampler = None
    if getattr(app, "metrics", None) is not None:
        sampler = RateSampler(app.metrics)
        app.add_dependency(sampler)
    frame = Frame(app.settings.app_id, str(app.conf.canonical_url))
    console = Console(app.settings, frame, health=lambda: health_of(app, sampler),
                      lookups=domain_lookups(app))
    by_path: dict[str, dict[str, Handler]] = {}
    for method, path, handler in console.routes():
        by_path.setdefault(path, {})[method.lower()] = handler
    serve(app, by_path, path_parameters=False)
    app.console = console
    return console
