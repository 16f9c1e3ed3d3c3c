"""The service clients' spec is consistent with the seed, the clients, the stand-ins and the settings."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from connectors.clients import CLIENT_CLASSES, CircuitBreaker, ClientOptions, SessionPool, spec
from connectors.clients.base import BaseClient
from streams.devtools.standins import HANDLERS
from streams.settings import Settings

#: The seed's "Service Clients (Sync - HTTP)" tables of both services, merged.
SEED_METHODS = {
    "account": {"get_user", "validate_user", "get_payment_methods", "get_user_tier"},
    "wallet": {"get_wallet", "get_balance", "add_credits", "deduct_credits"},
    "billing": {"create_billing_record", "get_billing_history", "create_order_billing_record"},
    "product": {"get_plan", "validate_subscription"},
    "notification": {"send_payment_receipt", "send_invoice", "send_order_confirmation", "send_order_status"},
    "payment": {"create_payment_intent", "get_payment_status", "cancel_payment"},
    "storage": {"get_storage_usage", "validate_quota"},
}

SCALARS = {str, int, bool, str | None, int | None, bool | None}


def test_the_spec_names_exactly_the_seeds_methods_once() -> None:
    names = [(e.service, e.method_name) for e in spec.ENDPOINTS]
    assert len(names) == len(set(names)) == 22
    assert {s: {m for sv, m in names if sv == s} for s in SEED_METHODS} == SEED_METHODS
    assert set(spec.SERVICES) == set(SEED_METHODS) == set(CLIENT_CLASSES)


@pytest.mark.parametrize("endpoint", spec.ENDPOINTS, ids=lambda e: f"{e.service}.{e.method_name}")
def test_endpoint_rules(endpoint: spec.Endpoint) -> None:
    assert endpoint.http_method in ("GET", "POST")
    assert endpoint.path_template.startswith("/") and not endpoint.path_template.startswith("/_standin")
    assert set(endpoint.path_params) <= set(endpoint.request_fields)
    assert dataclasses.is_dataclass(endpoint.request) and dataclasses.is_dataclass(endpoint.response)
    if endpoint.http_method == "GET":
        # Safe to repeat, no key, and every field fits a path segment or a query parameter.
        assert endpoint.idempotent and not endpoint.needs_key and not endpoint.moves_money
        assert all(hint in SCALARS for _, hint, _ in endpoint.request.fields_spec())
        assert endpoint.success_status == 200
    else:
        # Every POST creates a record or moves money: keyed, retried only with the key.
        assert not endpoint.idempotent and endpoint.needs_key
        assert "idempotency_key_reused" in endpoint.errors
    if endpoint.moves_money:
        assert endpoint.needs_key


def test_routes_of_a_service_do_not_collide() -> None:
    for service in spec.SERVICES:
        routes = [(e.http_method, e.path_template) for e in spec.endpoints_of(service)]
        assert len(routes) == len(set(routes)), service


@pytest.mark.parametrize("endpoint", spec.ENDPOINTS, ids=lambda e: f"{e.service}.{e.method_name}")
def test_each_client_method_takes_the_request_fields(endpoint: spec.Endpoint) -> None:
    cls = CLIENT_CLASSES[endpoint.service]
    method = getattr(cls, endpoint.method_name)
    assert inspect.iscoroutinefunction(method)
    parameters = inspect.signature(method).parameters
    taken = [name for name in parameters if name != "self"]
    expected = set(endpoint.request_fields) | ({"idempotency_key"} if endpoint.needs_key else set())
    assert set(taken) == expected
    if endpoint.needs_key:
        key = parameters["idempotency_key"]
        assert key.kind is inspect.Parameter.KEYWORD_ONLY and key.default is inspect.Parameter.empty
    # The return annotation is the spec's response model.
    assert inspect.signature(method).return_annotation in (endpoint.response.__name__, endpoint.response)


def test_clients_have_no_methods_beyond_the_spec() -> None:
    base = set(dir(BaseClient))
    for service, cls in CLIENT_CLASSES.items():
        public = {n for n in dir(cls) if not n.startswith("_") and n not in base}
        assert public == {e.method_name for e in spec.endpoints_of(service)}, service


def test_every_endpoint_has_a_standin_handler() -> None:
    assert set(HANDLERS) == {(e.service, e.method_name) for e in spec.ENDPOINTS}


def test_every_service_url_is_a_setting() -> None:
    settings = Settings.from_env({})
    ports = set()
    for service in spec.SERVICES.values():
        url = getattr(settings, service.settings_attribute)
        assert url.startswith("http://localhost:")
        ports.add(url)
    assert len(ports) == len(spec.SERVICES)


def test_models_round_trip_and_check_types() -> None:
    plan = spec.Plan(plan_id="p", name="P", amount=10, currency="EUR", interval="month", active=True,
                     features=["a"], storage_quota_bytes=None)
    assert spec.Plan.from_json(plan.to_json()) == plan
    history = spec.BillingHistory(user_id="u", records=[spec.BillingRecord(
        record_id="r", user_id="u", amount=1, currency="EUR", kind="payment", created_at="t")])
    assert spec.BillingHistory.from_json(history.to_json()) == history
    # Unknown fields are ignored (a service may add some); optional fields may be absent.
    assert spec.UserTier.from_json({"user_id": "u", "tier": "pro", "new": 1}) == spec.UserTier(
        user_id="u", tier="pro")
    with pytest.raises(spec.SpecError, match=r"Plan.amount: expected an integer"):
        spec.Plan.from_json({**plan.to_json(), "amount": True})
    with pytest.raises(spec.SpecError, match=r"Plan.features\[0\]: expected a string"):
        spec.Plan.from_json({**plan.to_json(), "features": [1]})
    with pytest.raises(spec.SpecError, match=r"UserTier.tier: required"):
        spec.UserTier.from_json({"user_id": "u"})
    with pytest.raises(spec.SpecError, match="expected an object"):
        spec.UserTier.from_json(["u"])
    # A required field whose type admits null may be null.
    status = spec.PaymentStatus.from_json({"payment_intent_id": "pi", "order_id": None, "status": "x",
                                           "amount": 1, "currency": "EUR"})
    assert status.order_id is None


def test_query_form_is_typed() -> None:
    check = spec.QuotaCheck.from_query({"requested_bytes": "42"}, {"user_id": "u"})
    assert check == spec.QuotaCheck(user_id="u", requested_bytes=42)
    with pytest.raises(spec.SpecError, match="expected an integer"):
        spec.QuotaCheck.from_query({"requested_bytes": "lots"}, {"user_id": "u"})
    assert spec.query_text(True) == "true" and spec.query_text(5) == "5"


def test_personal_data_and_secrets_stay_out_of_reprs() -> None:
    user = spec.User(user_id="u", status="active", tier="basic", email="a@b.test", name="Ann")
    assert "a@b.test" not in repr(user) and "Ann" not in repr(user)
    intent = spec.PaymentIntent(payment_intent_id="pi", order_id="o", status="s", amount=1, currency="EUR",
                                client_secret="pi_secret_x")
    assert "pi_secret_x" not in repr(intent)
    method = spec.PaymentMethod(payment_method_id="pm", type="card", last4="4242")
    assert "4242" not in repr(method)


# ----------------------------------------------------------------------
# The breaker and the backoff, on a fake clock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_failures_probes_once_and_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker("account", failures=3, cooldown_seconds=5.0, clock=clock)
    for _ in range(2):
        assert breaker.admit()
        breaker.failure()
    assert breaker.state == "closed"
    assert breaker.admit()
    breaker.success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert breaker.admit()
        breaker.failure()
    assert breaker.state == "open" and not breaker.admit()
    clock.now += 4.9
    assert not breaker.admit()
    clock.now += 0.1
    assert breaker.state == "half_open"
    assert breaker.admit()  # the probe
    assert not breaker.admit()  # only one at a time
    breaker.success()
    assert breaker.state == "closed" and breaker.admit()


def test_a_failed_probe_opens_the_breaker_for_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker("wallet", failures=1, cooldown_seconds=2.0, clock=clock)
    breaker.admit()
    breaker.failure()
    clock.now += 2.0
    assert breaker.admit()
    breaker.failure()
    assert breaker.state == "open"
    clock.now += 1.9
    assert not breaker.admit()
    clock.now += 0.1
    assert breaker.admit()
    breaker.abandon()  # a cancelled probe lets the next caller probe
    assert breaker.admit()


def test_backoff_is_jittered_exponential_and_bounded() -> None:
    options = ClientOptions(backoff_base_seconds=0.1, backoff_max_seconds=0.3)
    client = CLIENT_CLASSES["account"]("http://localhost:1", SessionPool(options))
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.3), (6, 0.3)):
        delays = [client._backoff(attempt, None) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered
    assert client._backoff(1, 0.25) >= 0.25  # Retry-After honoured...
    assert client._backoff(1, 60.0) <= 0.3  # ...up to the cap


def test_options_and_urls_are_checked() -> None:
    with pytest.raises(ValueError):
        ClientOptions(max_attempts=0)
    with pytest.raises(ValueError):
        ClientOptions(timeout_seconds=0)
    with pytest.raises(ValueError, match="not an http"):
        CLIENT_CLASSES["wallet"]("localhost:8102", SessionPool())


def test_a_client_needs_a_started_session() -> None:
    pool = SessionPool()
    with pytest.raises(RuntimeError, match="not started"):
        _ = pool.session


def test_the_clients_never_import_dev_tooling() -> None:
    import ast
    from pathlib import Path

    import connectors.clients

    for path in Path(connectors.clients.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [alias.name for alias in node.names])
                assert not any(n.startswith(("streams.devtools", "tests")) for n in names), path
