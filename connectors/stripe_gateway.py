"""The Stripe adapter: the one place paystream calls Stripe's API.

:class:`StripeGateway` wraps stripe-python's ``StripeClient`` (async methods on
the aiohttp transport, which is a runtime dependency) and is the kernel's
``"stripe"`` service: :meth:`StripeGateway.call` takes a
:class:`tables.aggregate.Call`, runs its operation under the call's
idempotency key and answers a plain JSON-able dict.  Stripe stores the first
answer to a key for 24 hours and replays it for a retry with the same
parameters, so a batch the kernel replays after a crash repeats the call
without moving money twice.

Errors come out in three kinds, because the kernel acts on three kinds:

- a definitive "no" (a declined card, a request Stripe refuses: an unknown
  intent, a refund of a failed payment, a cancel of a succeeded intent, a key
  reused with other parameters) raises :class:`streams.kernel.CallRefused`
  with Stripe's machine-readable code; the decision gets it as
  ``Outcome.code`` and records the refusal;
- Stripe unreachable, slow, rate-limiting or failing (5xx, 409 lock
  conflicts) raises :class:`StripeUnavailable` (``retriable = True``): the
  kernel holds the batch back and retries it, under the same keys;
- a key Stripe does not accept raises :class:`StripeCredentialsRejected`,
  also retriable: a rotated or revoked key is the operator's problem, not the
  payment's, so the batch waits (logged at every retry) until the key is fixed
  instead of dead-lettering payments that would have gone through.  A key that
  is missing or not a secret key fails at construction with
  :class:`StripeConfigError`, so a worker does not start without one.

Logs name the operation, the idempotency key, object ids, statuses and
amounts; never the API key, a client secret or card details.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import stripe

from streams.kernel import CallRefused
from streams.settings import Settings
from tables.aggregate import Call

log = logging.getLogger(__name__)

#: The host of Stripe's own API.  Any other API base is a stand-in
#: (localstripe), which refuses the optional parameters listed below.
STRIPE_API_HOST = "api.stripe.com"

#: Stripe's values for a refund's ``reason`` and a cancel's
#: ``cancellation_reason``; anything else stays in metadata only.
REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
CANCELLATION_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer", "abandoned"})


class StripeConfigError(RuntimeError):
    """Stripe is not configured (no key, a publishable key, a malformed API base)."""

    retriable = False


class StripeCredentialsRejected(StripeConfigError):
    """Stripe refused the key (401/403): retried, see the module docstring."""

    retriable = True


class StripeUnavailable(Exception):
    """Stripe could not answer now (network, timeout, 429, 409, 5xx): the kernel retries."""

    retriable = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def classify(error: stripe.StripeError, operation: str) -> Exception:
    """The exception the kernel should see for a Stripe library error.

    Pure, so the rules are unit-tested on their own:

    - ``CardError`` (402): :class:`CallRefused`, code = Stripe's
      ``decline_code`` when it gives one (``insufficient_funds``), else its
      ``code`` (``card_declined``);
    - ``InvalidRequestError``, ``IdempotencyError`` and any other 4xx but 409
      and 429: :class:`CallRefused`, code = Stripe's ``code``
      (``payment_intent_unexpected_state``, ``resource_missing``), else the
      error's ``type`` (localstripe answers most refusals without a code, as
      ``invalid_request_error``);
    - ``AuthenticationError``/``PermissionError``: :class:`StripeCredentialsRejected`;
    - ``APIConnectionError`` (network, timeout), ``RateLimitError``, 409, 5xx
      and errors without a status: :class:`StripeUnavailable`.
    """
    status = error.http_status
    message = error.user_message or type(error).__name__
    if isinstance(error, stripe.AuthenticationError | stripe.PermissionError):
        return StripeCredentialsRejected(
            f"Stripe refused the API key for {operation} (HTTP {status}): check STRIPE_API_KEY")
    if isinstance(error, stripe.APIConnectionError | stripe.RateLimitError):
        return StripeUnavailable(f"Stripe {operation}: {type(error).__name__}: {message}", status=status)
    if isinstance(error, stripe.CardError):
        code = _error_field(error, "decline_code") or error.code or "card_declined"
        return CallRefused(f"Stripe {operation}: {message}", code=code)
    if isinstance(error, stripe.IdempotencyError):
        return CallRefused(f"Stripe {operation}: {message}", code="idempotency_error")
    if status is not None and 400 <= status < 500 and status not in (409, 429):
        code = error.code or _error_field(error, "type") or f"http_{status}"
        return CallRefused(f"Stripe {operation}: {message}", code=code)
    return StripeUnavailable(f"Stripe {operation}: {type(error).__name__} (HTTP {status}): {message}",
                             status=status)


def _error_field(error: stripe.StripeError, name: str) -> str | None:
    body = error.json_body if isinstance(error.json_body, dict) else {}
    detail = body.get("error")
    value = detail.get(name) if isinstance(detail, dict) else None
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """How one gateway talks to Stripe (:meth:`StripeGateway.from_settings` fills it)."""

    api_key: str = field(repr=False)
    api_base: str
    max_network_retries: int = 2
    timeout_seconds: float = 20.0
    #: Send the optional ``reason``/``cancellation_reason`` parameters.
    #: Stripe takes them; localstripe answers 400 "Unexpected ..." to both.
    send_reasons: bool = True


class StripeGateway:
    """The kernel's Stripe service: ``await gateway.call(Call(...))`` -> dict.

    Operations (``Call.operation``) and what they answer:

    - ``create_payment_intent`` {amount, currency, metadata, customer?,
      payment_method?, confirm?, off_session?} -> :meth:`intent_view`;
    - ``retrieve_payment_intent`` {payment_intent_id} -> :meth:`intent_view`;
    - ``confirm_payment_intent`` {payment_intent_id, payment_method?} ->
      :meth:`intent_view`; the payment method is set by an update first and
      the confirm carries no parameters (localstripe answers 500 to a confirm
      with ``payment_method``; Stripe takes both forms);
    - ``cancel_payment_intent`` {payment_intent_id, cancellation_reason?} ->
      {id, status}; the reason is sent only to Stripe itself and only when
      it is one of Stripe's values;
    - ``create_refund`` {payment_intent_id, amount?, reason?, metadata} ->
      {id, status, amount, currency, payment_intent, charge}; ``reason`` is
      always kept in the refund's metadata and also sent as Stripe's
      ``reason`` when it is one of Stripe's values (and not to a stand-in).

    Every call sends ``Call.idempotency_key`` as Stripe's ``Idempotency-Key``;
    ``confirm_payment_intent``'s update uses the key with ``:payment_method``
    appended, so both of its requests are repeatable.
    """

    def __init__(self, options: GatewayOptions) -> None:
        key = options.api_key.strip()
        if not key:
            raise StripeConfigError("STRIPE_API_KEY is not set")
        if not key.startswith(("sk_", "rk_")):
            kind = "a publishable key" if key.startswith("pk_") else "not a Stripe secret key"
            raise StripeConfigError(f"STRIPE_API_KEY is {kind} (it must start with sk_ or rk_)")
        base = urlsplit(options.api_base)
        if base.scheme not in ("http", "https") or not base.netloc:
            raise StripeConfigError(f"STRIPE_API_BASE={options.api_base!r} is not an http(s) URL")
        if options.max_network_retries < 0 or options.timeout_seconds <= 0:
            raise StripeConfigError("STRIPE_MAX_NETWORK_RETRIES must be >= 0 and STRIPE_TIMEOUT_SECONDS > 0")
        self.options = options
        self._http = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=options.timeout_seconds))
        self._client = stripe.StripeClient(
            key,
            http_client=self._http,
            base_addresses={"api": options.api_base.rstrip("/")},
            max_network_retries=options.max_network_retries,
        )
        self._operations = {
            "create_payment_intent": self.create_payment_intent,
            "retrieve_payment_intent": self.retrieve_payment_intent,
            "confirm_payment_intent": self.confirm_payment_intent,
            "update_payment_intent": self.update_payment_intent,
            "cancel_payment_intent": self.cancel_payment_intent,
            "create_refund": self.create_refund,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> StripeGateway:
        """A gateway on ``STRIPE_API_KEY``/``STRIPE_API_BASE`` and the retry and timeout settings."""
        return cls(GatewayOptions(
            api_key=settings.stripe_api_key,
            api_base=settings.stripe_api_base,
            max_network_retries=settings.stripe_max_network_retries,
            timeout_seconds=settings.stripe_timeout_seconds,
            send_reasons=urlsplit(settings.stripe_api_base).hostname == STRIPE_API_HOST,
        ))

    @property
    def operations(self) -> frozenset[str]:
        return frozenset(self._operations)

    async def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        await self._http.close_async()

    async def __aenter__(self) -> StripeGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, call: Call) -> dict[str, Any]:
        """Run ``call.operation`` under ``call.idempotency_key`` (the kernel's service signature)."""
        operation = self._operations.get(call.operation)
        if operation is None:
            raise CallRefused(f"Stripe has no operation {call.operation!r}", code="unknown_operation")
        if not call.idempotency_key:
            raise CallRefused(f"Stripe {call.operation}: an idempotency key is required",
                              code="missing_idempotency_key")
        return await operation(call.args, call.idempotency_key)

    # ------------------------------------------------------------------
    # Operations

    async def create_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "amount": int(_required(args, "amount")),
            "currency": str(_required(args, "currency")).lower(),
            "metadata": _metadata(args.get("metadata")),
        }
        for name in ("customer", "payment_method"):
            if args.get(name):
                params[name] = str(args[name])
        for name in ("confirm", "off_session"):
            if args.get(name) is not None:
                params[name] = bool(args[name])
        create = self._client.v1.payment_intents.create_async(params, {"idempotency_key": key})
        intent = await self._run("create_payment_intent", key, create)
        return self.intent_view(intent)

    async def retrieve_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        intent_id = str(_required(args, "payment_intent_id"))
        retrieve = self._client.v1.payment_intents.retrieve_async(intent_id)
        intent = await self._run("retrieve_payment_intent", key, retrieve)
        return self.intent_view(intent)

    async def confirm_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        intent_id = str(_required(args, "payment_intent_id"))
        intents = self._client.v1.payment_intents
        if args.get("payment_method"):
            await self._run("confirm_payment_intent", key, intents.update_async(
                intent_id, {"payment_method": str(args["payment_method"])},
                {"idempotency_key": f"{key}:payment_method"}))
        intent = await self._run("confirm_payment_intent", key,
                                 intents.confirm_async(intent_id, options={"idempotency_key": key}))
        return self.intent_view(intent)

    async def update_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        """Bring an open intent's amount (and currency) in line with its order."""
        intent_id = str(_required(args, "payment_intent_id"))
        params: dict[str, Any] = {"amount": int(_required(args, "amount"))}
        if args.get("currency"):
            params["currency"] = str(args["currency"]).lower()
        intent = await self._run("update_payment_intent", key, self._client.v1.payment_intents.update_async(
            intent_id, params, {"idempotency_key": key}))
        return self.intent_view(intent)

    async def cancel_payment_intent(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        params: dict[str, Any] = {}
        reason = args.get("cancellation_reason")
        if self.options.send_reasons and reason in CANCELLATION_REASONS:
            params["cancellation_reason"] = reason
        intent = await self._run("cancel_payment_intent", key, self._client.v1.payment_intents.cancel_async(
            str(_required(args, "payment_intent_id")), params or None, {"idempotency_key": key}))
        return {"id": intent.id, "status": intent.status}

    async def create_refund(self, args: Mapping[str, Any], key: str) -> dict[str, Any]:
        metadata = _metadata(args.get("metadata"))
        reason = args.get("reason")
        if reason:
            metadata.setdefault("reason", str(reason))
        intent_id = str(_required(args, "payment_intent_id"))
        params: dict[str, Any] = {"payment_intent": intent_id, "metadata": metadata}
        if args.get("amount") is not None:
            params["amount"] = int(args["amount"])
        if self.options.send_reasons and reason in REFUND_REASONS:
            params["reason"] = reason
        refund = await self._run("create_refund", key,
                                 self._client.v1.refunds.create_async(params, {"idempotency_key": key}))
        return {
            "id": refund.id,
            "status": refund.status,
            "amount": refund.amount,
            "currency": refund.currency,
            "payment_intent": _id_of(_field(refund, "payment_intent")),
            "charge": _id_of(_field(refund, "charge")),
        }

    @staticmethod
    def intent_view(intent: Any) -> dict[str, Any]:
        """The part of a PaymentIntent the payment flow uses, as plain JSON.

        ``latest_charge`` is an id (localstripe inlines the whole charge);
        ``last_payment_error`` is the decline's code (``decline_code`` when
        Stripe gives one), or None.
        """
        error = _field(intent, "last_payment_error")
        error_code = None
        if error is not None:
            error_code = _field(error, "decline_code") or _field(error, "code")
        return {
            "id": intent.id,
            "status": intent.status,
            "amount": int(intent.amount),  # localstripe answers an updated amount as text
            "currency": intent.currency,
            "client_secret": _field(intent, "client_secret"),
            "latest_charge": _id_of(_field(intent, "latest_charge")),
            "last_payment_error": error_code,
        }

    # ------------------------------------------------------------------

    async def _run(self, operation: str, key: str, request: Any) -> Any:
        try:
            result = await request
        except stripe.StripeError as error:
            translated = classify(error, operation)
            log.info("stripe %s key=%s -> %s (HTTP %s, code %s)", operation, key,
                     type(translated).__name__, error.http_status, getattr(translated, "code", None))
            raise translated from error
        except TimeoutError as error:  # a timeout while reading the body, after the request
            log.info("stripe %s key=%s -> timeout", operation, key)
            raise StripeUnavailable(f"Stripe {operation}: timed out") from error
        except aiohttp.ClientError as error:
            log.info("stripe %s key=%s -> %s", operation, key, type(error).__name__)
            raise StripeUnavailable(f"Stripe {operation}: {type(error).__name__}") from error
        log.debug("stripe %s key=%s -> %s %s", operation, key, result.id, _field(result, "status"))
        return result


def _required(args: Mapping[str, Any], name: str) -> Any:
    """``args[name]``; a call without it is refused (a bug in the decision, not in Stripe)."""
    value = args.get(name)
    if value is None or value == "":
        raise CallRefused(f"Stripe call without argument {name!r}", code="missing_argument")
    return value


def _metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Stripe metadata: string keys and values; None values are left out."""
    return {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}


def _field(obj: Any, name: str) -> Any:
    """``obj[name]`` for a StripeObject or a dict, None when absent."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    try:
        return obj[name]
    except KeyError:
        return None


def _id_of(value: Any) -> str | None:
    """An object's id whether Stripe sent the id or the expanded object."""
    if value is None or isinstance(value, str):
        return value
    return _field(value, "id")
