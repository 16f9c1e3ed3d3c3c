"""The operator console (agents.console): escaping, headers, and the replay POST's guards.

Rendering is checked by parsing the pages: whatever a dead letter's key,
value or headers hold, the page has no element or attribute the console
did not put there itself.  The request handling runs on a real aiohttp
server behind the same token middleware the worker uses; the dead-letter
functions are replaced by recording ones (no broker here: the real ones are
exercised in tests/integration/test_console.py).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agents import console_html as pages
from agents.console import CSRF_COOKIE, Console, Lookup, RateSampler, id_problem
from agents.console_html import ROOT, AgentHealth, Frame, Health, PartitionLag
from streams import access
from streams.ops import dlq
from streams.ops.records import Decoded
from streams.settings import Settings

TOKEN = "tok-console-5c1d9e"
EVIL = "<script>alert('x')</script>"
EVIL_ATTR = '"><img src=x onerror=alert(1)>'
FRAME = Frame("t-app.paystream", "http://127.0.0.1:6066")

#: The only elements and attributes the console's own markup uses.
ALLOWED_TAGS = {"html", "head", "meta", "title", "link", "body", "header", "nav", "span", "a", "main",
                "h1", "h2", "h3", "p", "ul", "li", "table", "thead", "tbody", "tr", "th", "td",
                "pre", "form", "label", "input", "select", "option", "button"}
ALLOWED_ATTRS = {"lang", "charset", "name", "content", "rel", "href", "class", "id", "method",
                 "action", "value", "placeholder", "size", "type", "aria-label", "required",
                 "selected"}


class _Audit(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def audit(markup: str) -> _Audit:
    """Parse ``markup``; fail on any element or attribute the console does not emit itself."""
    parsed = _Audit()
    parsed.feed(markup)
    parsed.close()
    assert set(parsed.tags) <= ALLOWED_TAGS, set(parsed.tags) - ALLOWED_TAGS
    names = {name for name, _ in parsed.attrs}
    assert names <= ALLOWED_ATTRS, names - ALLOWED_ATTRS
    for name, value in parsed.attrs:
        if name == "href" and value is not None:
            assert value.startswith(("/console", "#")), value
    assert "<script" not in markup.lower()
    return parsed


def evil_letter(partition: int = 1, offset: int = 7) -> dlq.DeadLetter:
    return dlq.DeadLetter(
        topic="t.paystream.dead-letters", partition=partition, offset=offset,
        timestamp_ms=1_764_000_000_000, key=EVIL.encode(), value=f'{{"note": "{EVIL}"}}'.encode(),
        headers=(("dlq.reason", EVIL_ATTR.encode()), ("dlq.error", f"MalformedRecord: {EVIL}".encode()),
                 ("dlq.source.topic", f"t.{EVIL}".encode()), ("dlq.source.partition", b"2"),
                 ("dlq.source.offset", b"11"), ("dlq.source.timestamp", b"1764000000000"),
                 (EVIL, EVIL_ATTR.encode()), ("Authorization", b"Bearer s3cr3t-value")))


def shown_letter() -> dlq.ShownDeadLetter:
    letter = evil_letter()
    return dlq.ShownDeadLetter(letter, Decoded("json", {"note": EVIL, EVIL: [EVIL_ATTR],
                                                        "client_secret": "pi_1_secret_hush"}))


# ----------------------------------------------------------------------
# Rendering


def test_a_dead_letter_with_markup_everywhere_renders_inert() -> None:
    markup = pages.dead_letter_page(FRAME, shown_letter())
    parsed = audit(markup)
    text = "".join(parsed.text)
    assert EVIL in text and EVIL_ATTR in text  # shown, as text
    assert "&lt;script&gt;" in markup and "&quot;&gt;&lt;img" in markup
    assert "s3cr3t-value" not in markup and "pi_1_secret_hush" not in markup
    assert markup.count(pages.REDACTED) == 2


def test_hex_and_tombstone_values() -> None:
    letter = evil_letter()
    hexed = pages.dead_letter_page(FRAME, dlq.ShownDeadLetter(letter, Decoded("hex", "de" * 40)))
    audit(hexed)
    assert "dede" in hexed
    tomb = pages.dead_letter_page(FRAME, dlq.ShownDeadLetter(letter, Decoded("null", None)))
    assert "tombstone" in tomb


def test_the_list_and_the_confirmation_render_inert() -> None:
    letters = [evil_letter(0, 1), evil_letter(1, 7)]
    where = pages.LetterFilter(source_topic=EVIL_ATTR, reason=EVIL, since="2h", until="", limit=100)
    listed = pages.dead_letters_page(FRAME, where, letters)
    parsed = audit(listed)
    assert ("value", EVIL_ATTR) in parsed.attrs  # the filter shown back, as a value
    positions = [v for k, v in parsed.attrs if k == "value" and v and re.fullmatch(r"\d+:\d+", v)]
    assert positions == ["1:7", "0:1"]  # newest first
    assert "/console/dead-letters/1/7" in listed
    failed = pages.dead_letters_page(FRAME, where, None, f"bad time {EVIL}")
    audit(failed)
    confirm = pages.replay_confirm_page(FRAME, letters, [(evil_letter(2, 3), EVIL)], [], "tok" * 12, 3)
    parsed = audit(confirm)
    assert ("value", "tok" * 12) in parsed.attrs and 'method="post"' in confirm
    refused = pages.replay_confirm_page(FRAME, [], [], [EVIL], "t" * 40, 3)
    assert 'method="post"' not in refused
    audit(refused)


def test_health_and_lookup_render_inert_and_redact() -> None:
    health = Health(agents=(AgentHealth(EVIL, EVIL_ATTR, (EVIL,), 1.5, 60.0, 90.0,
                                        (PartitionLag(EVIL, 0, 5, 9),)),),
                    metrics_on=False, rebalancing=True, assigned=4)
    markup = pages.health_page(FRAME, health)
    audit(markup)
    assert "1.50/s over 60 s" in markup and "holds 4 assigned" in markup
    answer = {"order_id": EVIL, "items": [{"product_id": EVIL_ATTR}], "client_secret": "pi_secret_x",
              "payment": {"stripe_token": "tok_abc"}}
    looked = pages.lookup_page(FRAME, {"order": "Order (order id)"}, "order", EVIL, 200, answer)
    audit(looked)
    assert "pi_secret_x" not in looked and "tok_abc" not in looked
    missing = pages.lookup_page(FRAME, {"order": "Order"}, "order", "o-1", 404,
                                {"error": "not_found", "message": EVIL})
    audit(missing)


def test_rates_come_from_the_counter_samples() -> None:
    class _Counter:
        def __init__(self) -> None:
            self.values = {"order_events": 0.0}

        def collect(self) -> list[Any]:
            from prometheus_client import Metric

            family = Metric("paystream_agent_input_records", "", "counter")
            for agent, value in self.values.items():
                family.add_sample("paystream_agent_input_records_total",
                                  {"agent": agent, "topic": "t.order.commands"}, value)
            return [family]

    class _Metrics:
        input_records = _Counter()

    metrics = _Metrics()
    sampler = RateSampler(metrics)
    assert sampler.rates(at=100.0) == {"order_events": (None, None, 0.0)}
    sampler.take(at=100.0)
    metrics.input_records.values["order_events"] = 300.0
    assert sampler.rates(at=130.0) == {"order_events": (10.0, 30.0, 300.0)}


def test_ids_that_cannot_be_a_path_segment_are_refused() -> None:
    assert id_problem("9b2e7c9e-8f54-4c47-9a52-0bb2b1a3b0c1") is None
    assert id_problem("pi_3Nabc") is None
    for bad in ("", "a/b", "a b", "a?b", "../x", "%2F", "x" * 201, "a\nb"):
        assert id_problem(bad) is not None, bad


# ----------------------------------------------------------------------
# The request handling, behind the worker's token middleware


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def replay(self, settings: Settings, **kwargs: Any) -> dlq.ReplayResult:
        self.calls.append(kwargs)
        positions = kwargs["positions"]
        if (9, 9) in positions:
            raise dlq.ReplayRefused([f"no record at x[9] offset 9 {EVIL}"])
        if kwargs.get("dry_run"):
            return dlq.ReplayResult(planned=[evil_letter(p, o) for p, o in positions])
        return dlq.ReplayResult(replayed=[dlq.Replayed(p, o, "t.payment.completed", 1, 2, 40 + o)
                                          for p, o in positions], seconds=0.01)

    @property
    def sends(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if not c.get("dry_run")]


@pytest.fixture
async def served() -> AsyncIterator[tuple[TestClient, Recorder]]:
    recorder = Recorder()

    async def read(request: web.Request, ident: str) -> web.Response:
        # What the API saw: the routed path and the caller's token, no cookie.
        return web.json_response({"order_id": ident, "path": request.path,
                                  "credentials_forwarded": "Authorization" in request.headers,
                                  "cookie_forwarded": "Cookie" in request.headers},
                                 status=200 if ident != "missing" else 404)

    settings = Settings.from_env(dlq_replay_limit=3)
    console = Console(settings, FRAME, health=lambda: Health((), True, False, 0),
                      lookups={"order": Lookup("Order", "/orders/{}", read)},
                      list_letters=lambda s, where, limit: [evil_letter()],
                      show_letter=lambda s, p, o: shown_letter(), replay=recorder.replay)
    app = web.Application(middlewares=[access.token_middleware([TOKEN])])
    for method, path, handler in console.routes():
        app.router.add_route(method, path, handler)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, recorder
    finally:
        await client.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _confirm(client: TestClient, position: str = "1:7") -> tuple[str, str]:
    """GET the confirmation page: (the form's CSRF token, the cookie the browser got)."""
    answer = await client.get(f"{ROOT}/dead-letters/replay", params={"position": position},
                              headers=AUTH)
    assert answer.status == 200, await answer.text()
    markup = await answer.text()
    [token] = re.findall(rf'name="{pages.CSRF_FIELD}" value="([^"]+)"', markup)
    cookie = client.session.cookie_jar.filter_cookies(client.make_url(ROOT)).get(CSRF_COOKIE)
    assert cookie is not None and cookie.value == token
    if CSRF_COOKIE in answer.cookies:  # set when the browser had none (or a used one)
        morsel = answer.cookies[CSRF_COOKIE]
        assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == ROOT
    return token, cookie.value


def _form(token: str, *positions: str, confirm: bool = True) -> dict[str, Any]:
    form: dict[str, Any] = {pages.CSRF_FIELD: token, "position": list(positions) or ["1:7"]}
    if confirm:
        form[pages.CONFIRM_FIELD] = pages.CONFIRM_VALUE
    return form


async def test_every_console_route_needs_the_token(served: tuple[TestClient, Recorder]) -> None:
    client, recorder = served
    for method, path in (("GET", ROOT), ("GET", f"{ROOT}/dead-letters"),
                         ("GET", f"{ROOT}/dead-letters/1/7"), ("GET", f"{ROOT}/lookup"),
                         ("GET", f"{ROOT}/dead-letters/replay?position=1:7"),
                         ("POST", f"{ROOT}/dead-letters/replay")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = await client.request(method, path, headers=headers)
            assert answer.status == 401, (method, path, headers)
        answer = await client.request(method, path, headers=AUTH)
        assert answer.status != 401, (method, path)
    assert recorder.sends == []


async def test_pages_carry_the_security_headers(served: tuple[TestClient, Recorder]) -> None:
    client, _ = served
    for path in (ROOT, f"{ROOT}/dead-letters", f"{ROOT}/dead-letters/1/7", f"{ROOT}/lookup"):
        answer = await client.get(path, headers=AUTH)
        assert answer.status == 200, path
        csp = answer.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "script-src" not in csp and "unsafe-inline" not in csp
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.content_type == "text/html"
        audit(await answer.text())
    css = await client.get(f"{ROOT}/static/console.css", headers=AUTH)
    assert css.status == 200 and css.content_type == "text/css"


async def test_the_replay_post_needs_the_csrf_token_and_a_same_origin_form(
        served: tuple[TestClient, Recorder]) -> None:
    client, recorder = served
    url = f"{ROOT}/dead-letters/replay"
    # No console cookie at all (a form posted from another site, or by a script).
    client.session.cookie_jar.clear()
    answer = await client.post(url, data=_form("x" * 43), headers=AUTH)
    assert answer.status == 403 and "CSRF" in await answer.text()

    token, _ = await _confirm(client)
    assert client.session.cookie_jar.filter_cookies(client.make_url(ROOT))[CSRF_COOKIE].value == token
    # A wrong token in the form.
    answer = await client.post(url, data=_form("y" * 43), headers=AUTH)
    assert answer.status == 403
    # The right token, sent from another site.
    answer = await client.post(url, data=_form(token), headers={**AUTH, "Origin": "http://evil.example"})
    assert answer.status == 403 and "Origin" in await answer.text()
    answer = await client.post(url, data=_form(token), headers={**AUTH, "Sec-Fetch-Site": "cross-site"})
    assert answer.status == 403
    answer = await client.post(url, data=_form(token), headers={**AUTH, "Origin": "null"})
    assert answer.status == 403
    assert recorder.sends == []

    # The right token but the box not ticked: nothing sent, and the token is used up.
    answer = await client.post(url, data=_form(token, confirm=False), headers=AUTH)
    assert answer.status == 400 and "confirmation" in await answer.text()
    assert recorder.sends == []
    answer = await client.post(url, data=_form(token), headers=AUTH)
    assert answer.status == 403, "a token is good for one POST"

    # From the console's own page: sent, and the result shown.
    token, _ = await _confirm(client, "1:7")
    origin = str(client.make_url("")).rstrip("/")
    answer = await client.post(url, data=_form(token, "1:7", "0:2"),
                               headers={**AUTH, "Origin": origin, "Sec-Fetch-Site": "same-origin"})
    markup = await answer.text()
    assert answer.status == 200, markup
    assert recorder.sends == [{"positions": [(1, 7), (0, 2)]}]
    assert "Replayed 2 record(s)" in markup and "t.payment.completed[2]" in markup
    audit(markup)
    # The same form again (a reload): refused, nothing more sent.
    answer = await client.post(url, data=_form(token, "1:7", "0:2"), headers={**AUTH, "Origin": origin})
    assert answer.status == 403
    assert len(recorder.sends) == 1


async def test_a_refused_replay_shows_why_and_offers_no_form(served: tuple[TestClient, Recorder]) -> None:
    client, recorder = served
    answer = await client.get(f"{ROOT}/dead-letters/replay", params={"position": "9:9"}, headers=AUTH)
    markup = await answer.text()
    assert answer.status == 409 and "refused" in markup and 'method="post"' not in markup
    audit(markup)
    answer = await client.get(f"{ROOT}/dead-letters/replay", params={"position": "nope"}, headers=AUTH)
    assert answer.status == 400
    answer = await client.get(f"{ROOT}/dead-letters/replay", headers=AUTH)
    assert answer.status == 400
    token, _ = await _confirm(client)
    answer = await client.post(f"{ROOT}/dead-letters/replay", data=_form(token, "9:9"), headers=AUTH)
    assert answer.status == 409 and "nothing was sent" in await answer.text()
    assert recorder.sends == [{"positions": [(9, 9)]}]  # refused by the library, before producing


async def test_the_lookup_reads_through_the_api_with_the_token_and_without_cookies(
        served: tuple[TestClient, Recorder]) -> None:
    client, _ = served
    await _confirm(client)  # the browser holds a console cookie now
    answer = await client.get(f"{ROOT}/lookup", params={"kind": "order", "id": "o-42"}, headers=AUTH)
    markup = await answer.text()
    assert answer.status == 200, markup
    assert "/orders/o-42" in markup  # the API saw its own path
    parsed = "".join(audit(markup).text)
    assert "credentials_forwarded" in parsed and "True" in parsed.split("credentials_forwarded", 1)[1][:20]
    assert "False" in parsed.split("cookie_forwarded", 1)[1][:20]
    answer = await client.get(f"{ROOT}/lookup", params={"kind": "order", "id": "missing"}, headers=AUTH)
    assert answer.status == 404
    answer = await client.get(f"{ROOT}/lookup", params={"kind": "order", "id": "a/b"}, headers=AUTH)
    assert answer.status == 400
    answer = await client.get(f"{ROOT}/lookup", params={"kind": "invoice", "id": "in_1"}, headers=AUTH)
    assert answer.status == 400 and "no domain" in await answer.text()


# ----------------------------------------------------------------------
# On a real (not started) worker app


def test_the_worker_app_serves_the_console_over_every_kernel_agent(tmp_path: Any) -> None:
    from agents.console import health_of, kernel_agents
    from streams.app import create_app

    settings = Settings.from_env(env={}, state_dir=tmp_path, domains="orders,payments",
                                 stripe_api_key="sk_test_console")
    app = create_app(settings)
    views = " ".join(str(v) for v in app.web.views)
    for path in ("/console", "/console/dead-letters", "/console/dead-letters/replay",
                 "/console/dead-letters/{partition}/{offset}", "/console/lookup",
                 "/console/static/console.css"):
        assert path in views, path
    assert [name for name, _ in kernel_agents(app)] == [
        "order_events", "payment_events", "stripe_events", "subscription_order_events",
        "user_order_events", "user_payment_events"]
    assert sorted(app.console.lookups) == ["order", "payment", "payment_intent"]
    health = health_of(app, None)  # before the start: no consumer, no partitions, no rates
    assert [a.agent for a in health.agents] == [name for name, _ in kernel_agents(app)]
    assert all(a.partitions == () and a.rate is None for a in health.agents)
    orders_only = create_app(Settings.from_env(env={"PAYSTREAM_METRICS": "off"}, state_dir=tmp_path,
                                               domains="orders"))
    assert sorted(orders_only.console.lookups) == ["order"]
    off = orders_only.console.health()
    assert off.metrics_on is False and "off" in pages.health_page(FRAME, off)
