"""streams.access: the service-token middleware, on real aiohttp servers (no broker)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streams import access, logs
from streams.settings import Settings

CURRENT, PREVIOUS = "tok-current-3f9a1c", "tok-previous-77b2e0"


def _app(tokens: Sequence[str], **options: object) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "path": request.path})

    app = web.Application(middlewares=[access.token_middleware(tokens, **options)])  # type: ignore[arg-type]
    for path in ("/orders/{id}", "/healthz", "/readyz", "/metrics", "/console",
                 "/subjects/{subject}", "/subjects/{subject}/versions",
                 "/compatibility/subjects/{subject}/versions", "/webhooks/stripe"):
        app.router.add_route("*", path, ok)
    return app


async def _client(app: web.Application) -> TestClient:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def guarded() -> AsyncIterator[TestClient]:
    client = await _client(_app([CURRENT, PREVIOUS]))
    yield client
    await client.close()


async def test_the_current_and_the_previous_token_pass(guarded: TestClient) -> None:
    for token in (CURRENT, PREVIOUS):
        answer = await guarded.get("/orders/o-1", headers={"Authorization": f"Bearer {token}"})
        assert answer.status == 200, await answer.text()
    # The scheme is case-insensitive (RFC 7235); surrounding blanks are tolerated.
    answer = await guarded.post("/orders/o-1", headers={"Authorization": f"  bearer   {CURRENT} "})
    assert answer.status == 200


@pytest.mark.parametrize(("header", "reason", "challenge"), [
    (None, access.MISSING, 'Bearer realm="paystream"'),
    ("Basic dXNlcjpwYXNz", access.MALFORMED, 'Bearer realm="paystream", error="invalid_token"'),
    ("Bearer", access.MALFORMED, 'Bearer realm="paystream", error="invalid_token"'),
    (f"Bearer {CURRENT} extra", access.MALFORMED, 'Bearer realm="paystream", error="invalid_token"'),
    ("Bearer wrong-token", access.UNKNOWN, 'Bearer realm="paystream", error="invalid_token"'),
    ("Bearer tok-rotated-out-000000", access.UNKNOWN, 'Bearer realm="paystream", error="invalid_token"'),
    (f"Bearer {CURRENT[:-1]}", access.UNKNOWN, 'Bearer realm="paystream", error="invalid_token"'),
    (f"Bearer {CURRENT}x", access.UNKNOWN, 'Bearer realm="paystream", error="invalid_token"'),
    ("Bearer t\u00f6ken", access.UNKNOWN, 'Bearer realm="paystream", error="invalid_token"'),
])
async def test_anything_else_is_401_with_a_bearer_challenge_and_a_json_error(
    guarded: TestClient, header: str | None, reason: str, challenge: str,
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    for method in ("GET", "POST", "DELETE"):
        answer = await guarded.request(method, "/orders/o-1", headers=headers)
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"] == challenge
        assert answer.content_type == "application/json"
        assert await answer.json() == {"error": "unauthorized", "message": reason}


async def test_unknown_paths_are_refused_before_routing(guarded: TestClient) -> None:
    """Deny by default: a route added later (or none at all) is behind the token too."""
    assert (await guarded.get("/no/such/route")).status == 401
    assert (await guarded.get("/console")).status == 401
    answer = await guarded.get("/no/such/route", headers={"Authorization": f"Bearer {CURRENT}"})
    assert answer.status == 404


async def test_probes_and_metrics_are_public(guarded: TestClient) -> None:
    for path in sorted(access.PUBLIC_PATHS):
        assert (await guarded.get(path)).status == 200, path
    # Only the exact paths: one below a public path is not public.
    assert (await guarded.get("/metrics/orders")).status == 401


async def test_without_tokens_everything_is_open() -> None:
    for tokens in ([], [""]):
        client = await _client(_app(tokens))
        try:
            assert (await client.post("/orders/o-1")).status == 200
            assert (await client.get("/console", headers={"Authorization": "Bearer junk"})).status == 200
        finally:
            await client.close()


async def test_the_token_is_never_logged(guarded: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await guarded.get("/orders/o-1", headers={"Authorization": "Bearer wrong-secret-value"})
    await guarded.get("/orders/o-1", headers={"Authorization": f"Bearer {CURRENT}"})
    text = caplog.text
    assert f"GET /orders/o-1 refused 401: {access.UNKNOWN}" in text
    # The reasons survive the secret filter as they are.
    assert all(logs.scrub(r) == r for r in (access.MISSING, access.MALFORMED, access.UNKNOWN))
    assert "wrong-secret-value" not in text and CURRENT not in text


async def test_the_ingress_rule_lets_only_the_webhook_and_probes_through() -> None:
    client = await _client(_app([CURRENT], public=access.ingress_is_public))
    try:
        assert (await client.post("/webhooks/stripe")).status == 200
        assert (await client.get("/readyz")).status == 200
        assert (await client.get("/orders/o-1")).status == 401
    finally:
        await client.close()


async def test_the_registry_rule_opens_reads_and_guards_writes() -> None:
    client = await _client(_app([CURRENT], public=access.registry_is_public,
                                refuse=access.registry_refusal))
    try:
        for method, path in (("GET", "/subjects/s-value/versions"),
                             ("POST", "/subjects/s-value"),  # lookup: a read
                             ("POST", "/compatibility/subjects/s-value/versions"),
                             ("GET", "/metrics")):
            assert (await client.request(method, path)).status == 200, (method, path)
        for method, path in (("POST", "/subjects/s-value/versions"), ("DELETE", "/subjects/s-value"),
                             ("PUT", "/subjects/s-value"), ("POST", "/no/such/route")):
            answer = await client.request(method, path)
            assert answer.status == 401, (method, path)
            assert answer.content_type == "application/vnd.schemaregistry.v1+json"
            assert (await answer.json())["error_code"] == 40101
        answer = await client.post("/subjects/s-value/versions",
                                   headers={"Authorization": f"Bearer {CURRENT}"})
        assert answer.status == 200
    finally:
        await client.close()


def test_token_comparison_checks_every_configured_token() -> None:
    assert access.token_accepted("b", ["a", "b"]) and not access.token_accepted("c", ["a", "b"])
    assert not access.token_accepted("", ["a"]) and not access.token_accepted("a", [])
    assert access.bearer_token("Bearer abc") == "abc"
    assert access.bearer_token("Token abc") is None and access.bearer_token(None) is None


def test_settings_read_several_tokens_and_send_the_first() -> None:
    settings = Settings.from_env(env={"PAYSTREAM_SERVICE_TOKENS": f" {CURRENT}, ,{PREVIOUS} "})
    assert settings.service_token_list == (CURRENT, PREVIOUS)
    assert settings.service_token == CURRENT
    assert CURRENT not in repr(settings)
    assert Settings.from_env(env={}).service_token is None
    assert access.authorization(None) == {} and access.registry_client_config(None) == {}
    assert access.authorization(CURRENT) == {"Authorization": f"Bearer {CURRENT}"}
    assert access.registry_client_config(CURRENT)["bearer.auth.token"] == CURRENT


def test_docker_compose_configures_a_token_for_the_worker_and_the_ingress() -> None:
    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    for service in ("worker", "ingress"):
        environment = compose["services"][service]["environment"]
        tokens = Settings.from_env(env={k: str(v) for k, v in environment.items()
                                        if k in ("PAYSTREAM_SERVICE_TOKENS", "LOG_FORMAT")})
        assert environment["PAYSTREAM_SERVICE_TOKENS"].startswith("${PAYSTREAM_SERVICE_TOKENS:-")
        assert tokens.service_token_list and tokens.log_format == "json"


async def test_the_worker_app_guards_its_web_server_and_registrars_may_open_a_path(tmp_path: Path) -> None:
    """The Faust app's own aiohttp application carries the middleware (streams.app.create_app)."""
    from streams.app import create_app

    settings = Settings.from_env(env={"PAYSTREAM_SERVICE_TOKENS": f"{CURRENT},{PREVIOUS}"},
                                 state_dir=tmp_path, app_id=f"t-access-{tmp_path.name}")
    app = create_app(settings, registrars=[])
    assert app.public_paths == set(access.PUBLIC_PATHS)

    async def page(request: web.Request) -> web.Response:
        return web.json_response({"page": request.path})

    web_app = app.web.web_app
    for path in ("/shell", "/orders/o-1", "/metrics"):
        web_app.router.add_get(path, page)
    app.public_paths.add("/shell")  # after the middleware was built: read per request
    client = await _client(web_app)
    try:
        assert (await client.get("/shell")).status == 200
        assert (await client.get("/metrics")).status == 200
        assert (await client.get("/orders/o-1")).status == 401
        guarded = await client.get("/orders/o-1", headers={"Authorization": f"Bearer {PREVIOUS}"})
        assert guarded.status == 200
    finally:
        await client.close()
