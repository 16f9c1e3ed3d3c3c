"""The Stripe adapter without a server: error classification, configuration, the views.

Errors are the stripe library's own classes, built the way its requestor
builds them from an error response.
"""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from connectors.stripe_gateway import (
    GatewayOptions,
    StripeConfigError,
    StripeCredentialsRejected,
    StripeGateway,
    StripeUnavailable,
    classify,
)
from streams.kernel import CallRefused, transient
from streams.settings import Settings
from tables.aggregate import Call


def body(**error: Any) -> dict[str, Any]:
    return {"error": {"type": "invalid_request_error", "message": "refused", **error}}


def test_a_decline_is_a_refusal_with_the_decline_code() -> None:
    error = stripe.CardError("Your card has insufficient funds.", None, "card_declined", http_status=402,
                             json_body=body(type="card_error", code="card_declined",
                                            decline_code="insufficient_funds"))
    refused = classify(error, "create_payment_intent")
    assert isinstance(refused, CallRefused)
    assert refused.code == "insufficient_funds"
    assert "insufficient funds" in str(refused)
    assert not transient(refused)


def test_a_decline_without_decline_code_keeps_stripe_code() -> None:
    # localstripe's 402: {"error": {"code": "card_declined", "charge": ..., "type": "invalid_request_error"}}
    error = stripe.CardError("Your card was declined.", None, "card_declined", http_status=402,
                             json_body=body(code="card_declined", charge="ch_1"))
    refused = classify(error, "confirm_payment_intent")
    assert isinstance(refused, CallRefused) and refused.code == "card_declined"


@pytest.mark.parametrize(("status", "code", "expected"), [
    (400, "payment_intent_unexpected_state", "payment_intent_unexpected_state"),
    (400, "amount_too_large", "amount_too_large"),
    (404, "resource_missing", "resource_missing"),
    (400, None, "invalid_request_error"),  # localstripe: no code, only the type
])
def test_an_invalid_request_is_a_refusal(status: int, code: str | None, expected: str) -> None:
    error = stripe.InvalidRequestError("refused", None, code, http_status=status,
                                       json_body=body(**({"code": code} if code else {})))
    refused = classify(error, "create_refund")
    assert isinstance(refused, CallRefused) and refused.code == expected
    assert not transient(refused)


def test_a_reused_idempotency_key_is_a_refusal() -> None:
    error = stripe.IdempotencyError("Keys for idempotent requests can only be used with the same parameters",
                                    http_status=400, json_body=body(type="idempotency_error"))
    refused = classify(error, "create_payment_intent")
    assert isinstance(refused, CallRefused) and refused.code == "idempotency_error"


@pytest.mark.parametrize("error", [
    stripe.APIConnectionError("connection refused", should_retry=True),
    stripe.RateLimitError("slow down", http_status=429, json_body=body(code="rate_limit")),
    stripe.APIError("internal", http_status=500, json_body=body()),
    stripe.APIError("unavailable", http_status=503),
    stripe.APIError("lock_timeout", http_status=409, json_body=body(code="lock_timeout")),
    stripe.APIError("no status"),
], ids=["connection", "429", "500", "503", "409", "no-status"])
def test_an_unwell_stripe_is_transient(error: stripe.StripeError) -> None:
    unavailable = classify(error, "create_payment_intent")
    assert isinstance(unavailable, StripeUnavailable)
    assert transient(unavailable)
    assert unavailable.status == error.http_status


def test_another_4xx_is_a_refusal() -> None:
    refused = classify(stripe.APIError("method not allowed", http_status=405), "create_refund")
    assert isinstance(refused, CallRefused) and refused.code == "http_405"


@pytest.mark.parametrize("error", [
    stripe.AuthenticationError("Invalid API Key provided: sk_test_****cret", http_status=401),
    stripe.PermissionError("The provided key does not have access", http_status=403),
], ids=["401", "403"])
def test_a_rejected_key_holds_the_batch_and_names_no_key(error: stripe.StripeError) -> None:
    rejected = classify(error, "create_refund")
    assert isinstance(rejected, StripeCredentialsRejected)
    assert isinstance(rejected, StripeConfigError)
    assert transient(rejected)  # retried, never dead-lettered
    assert "sk_" not in str(rejected) and "STRIPE_API_KEY" in str(rejected)


@pytest.mark.parametrize(("key", "message"), [
    ("", "STRIPE_API_KEY is not set"),
    ("   ", "STRIPE_API_KEY is not set"),
    ("pk_test_abc", "publishable key"),
    ("whsec_abc", "not a Stripe secret key"),
])
def test_a_missing_or_wrong_key_fails_at_construction(key: str, message: str) -> None:
    with pytest.raises(StripeConfigError, match=message) as raised:
        StripeGateway.from_settings(Settings.from_env(env={}, stripe_api_key=key))
    assert not transient(raised.value)
    if key.strip():
        assert key not in str(raised.value)


@pytest.mark.parametrize("options", [
    GatewayOptions("sk_test_x", "localhost:8420"),
    GatewayOptions("sk_test_x", "http://localhost:8420", max_network_retries=-1),
    GatewayOptions("sk_test_x", "http://localhost:8420", timeout_seconds=0),
])
def test_a_bad_base_or_budget_fails_at_construction(options: GatewayOptions) -> None:
    with pytest.raises(StripeConfigError):
        StripeGateway(options)


async def test_from_settings_reads_the_stripe_settings() -> None:
    settings = Settings.from_env(env={}, stripe_api_key="sk_test_abc", stripe_api_base="http://127.0.0.1:9",
                                 stripe_max_network_retries=5, stripe_timeout_seconds=3.5)
    async with StripeGateway.from_settings(settings) as gateway:
        expected = GatewayOptions("sk_test_abc", "http://127.0.0.1:9", 5, 3.5, send_reasons=False,
                                  stand_in=True)
        assert gateway.options == expected
        assert "sk_test_abc" not in repr(gateway.options)
    real = Settings.from_env(env={}, stripe_api_key="sk_live_abc", stripe_api_base="https://api.stripe.com")
    async with StripeGateway.from_settings(real) as gateway:
        assert gateway.options.send_reasons and not gateway.options.stand_in


async def test_an_unknown_operation_or_missing_argument_is_refused_before_any_request() -> None:
    # Port 9 (discard) on 127.0.0.1: nothing answers, so a request would fail as transient.
    async with StripeGateway(GatewayOptions("sk_test_x", "http://127.0.0.1:9", 0, 1.0)) as gateway:
        with pytest.raises(CallRefused) as unknown:
            await gateway.call(Call("stripe", "charge_everyone", {}, "k1"))
        assert unknown.value.code == "unknown_operation"
        with pytest.raises(CallRefused) as missing:
            await gateway.call(Call("stripe", "create_payment_intent", {"currency": "eur"}, "k2"))
        assert missing.value.code == "missing_argument" and "amount" in str(missing.value)
        with pytest.raises(CallRefused) as keyless:
            await gateway.call(Call("stripe", "create_refund", {"payment_intent_id": "pi_1"}, ""))
        assert keyless.value.code == "missing_idempotency_key"


@pytest.mark.parametrize(("operation", "args", "missing"), [
    ("create_customer", {"email": "a@example.com"}, "user_id"),
    ("attach_payment_method", {"customer_id": "cus_1"}, "payment_method"),
    ("create_subscription", {"customer_id": "cus_1", "metadata": {}}, "plan_id"),
    ("retrieve_subscription", {}, "subscription_id"),
    ("update_subscription", {"plan_id": "plan_1"}, "subscription_id"),
    ("cancel_subscription", {"prorate": True}, "subscription_id"),
    ("create_invoice_item", {"customer_id": "cus_1", "amount": 5, "currency": "eur"}, "description"),
    ("create_invoice", {"subscription_id": "sub_1"}, "customer_id"),
    ("retrieve_invoice", {}, "invoice_id"),
    ("latest_paid_invoice", {}, "subscription_id"),
    ("create_refund", {"amount": 100}, "payment_intent_id or a charge"),
])
async def test_a_subscription_or_invoice_call_without_its_argument_is_refused_before_any_request(
        operation: str, args: dict[str, object], missing: str) -> None:
    async with StripeGateway(GatewayOptions("sk_test_x", "http://127.0.0.1:9", 0, 1.0)) as gateway:
        assert operation in gateway.operations
        with pytest.raises(CallRefused) as refused:
            await gateway.call(Call("stripe", operation, args, "k"))
    assert refused.value.code == "missing_argument" and missing in str(refused.value)


async def test_a_proration_behavior_stripe_does_not_take_here_is_refused_before_any_request() -> None:
    async with StripeGateway(GatewayOptions("sk_test_x", "http://127.0.0.1:9", 0, 1.0)) as gateway:
        with pytest.raises(CallRefused) as refused:
            await gateway.call(Call("stripe", "update_subscription", {
                "subscription_id": "sub_1", "proration_behavior": "always_invoice"}, "k"))
    assert refused.value.code == "invalid_argument"


def test_intent_view_takes_ids_and_the_decline_code() -> None:
    localstripe_shape = {
        "id": "pi_1", "status": "requires_payment_method", "amount": 900, "currency": "eur",
        "client_secret": "pi_1_secret_x", "latest_charge": {"id": "ch_1", "object": "charge"},
        "last_payment_error": {"charge": "ch_1", "code": "card_declined", "message": "declined"},
    }
    stripe_shape = {**localstripe_shape, "latest_charge": "ch_1", "last_payment_error": {
        "type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"}}
    for intent, code in ((localstripe_shape, "card_declined"), (stripe_shape, "insufficient_funds")):
        view = StripeGateway.intent_view(stripe.PaymentIntent.construct_from(intent, "sk_test_x"))
        assert view == {"id": "pi_1", "status": "requires_payment_method", "amount": 900, "currency": "eur",
                        "client_secret": "pi_1_secret_x", "latest_charge": "ch_1", "last_payment_error": code}
