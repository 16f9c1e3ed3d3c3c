"""The external services' HTTP contract, written down once: paths, methods, payload shapes.

The seed's seven services (account, wallet, billing, product, notification,
payment, storage) are not part of paystream; this module is our written
record of how we talk to them.  Both sides read it: the clients in
:mod:`connectors.clients` build their requests and parse their answers from
it, and the local stand-ins (``streams.devtools.standins``) route, validate
and answer from it, so the two cannot drift apart silently.

Shapes are frozen dataclasses on :class:`Model`: ``to_json()`` gives the wire
form, ``from_json()`` checks the declared fields' types (unknown fields are
ignored, so a service may add fields) and raises :class:`SpecError` on a
missing required field or a wrong type.  Amounts are integers in minor units
(cents), like every amount in our Avro contracts; currencies are ISO codes.

An :class:`Endpoint` says where a method lives:

- ``{name}`` placeholders of ``path_template`` are filled from the request
  fields of the same name; the other request fields go in the query string
  (GET) or the JSON body (POST);
- ``idempotent``: repeating the request as is cannot do anything twice (the
  GETs); the client retries it after a transient failure;
- ``needs_key``: the POST creates a record or moves money; the caller must
  give an idempotency key derived from the cause (sent as
  ``Idempotency-Key``), and the request is retried only with that key; the
  service answers a repeated key with its first answer;
- ``moves_money``: the POST changes a balance or a payment.

Errors are answered as ``{"error": {"code": ..., "message": ...}}`` with a
4xx/5xx status (:class:`ErrorBody`); ``Endpoint.errors`` lists the codes a
method's refusals may carry, for the reader and the stand-ins.
"""

from __future__ import annotations

import dataclasses
import string
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

#: The header a keyed POST carries.
IDEMPOTENCY_HEADER = "Idempotency-Key"


class SpecError(ValueError):
    """A payload does not have the shape the spec gives it."""


# ----------------------------------------------------------------------
# Models


class Model:
    """Base of every request and response shape: JSON in and out, checked against the fields."""

    __slots__ = ()

    @classmethod
    def fields_spec(cls) -> tuple[tuple[str, Any, bool], ...]:
        """``(name, type, required)`` per field, from the dataclass and its annotations."""
        codec = cls.__dict__.get("_codec_cache")
        if codec is None:
            hints = typing.get_type_hints(cls)
            codec = tuple(
                (f.name, hints[f.name],
                 f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            type.__setattr__(cls, "_codec_cache", codec)
        return codec

    @classmethod
    def _plan(cls) -> tuple[tuple[str, Any, Any, bool, bool], ...]:
        """``(name, scalar type or None, hint, optional, required)`` per field, computed once per class."""
        plan = cls.__dict__.get("_plan_cache")
        if plan is None:
            rows = []
            for name, hint, required in cls.fields_spec():
                optional = _optional(hint)
                bare = next(h for h in hint.__args__ if h is not type(None)) if optional else hint
                rows.append((name, bare if bare in (str, int, bool) else None, hint, optional, required))
            plan = tuple(rows)
            type.__setattr__(cls, "_plan_cache", plan)
        return plan

    @classmethod
    def from_json(cls, data: Any, *, where: str = "") -> Self:
        """The model of a decoded JSON object; :class:`SpecError` when it does not fit."""
        if not isinstance(data, Mapping):
            raise SpecError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for name, scalar, hint, optional, required in cls._plan():
            value = data.get(name)
            if value is None:
                if optional:
                    values[name] = None
                elif required:
                    raise SpecError(f"{where or cls.__name__}.{name}: required")
                continue
            if scalar is not None:
                kind = value.__class__
                if kind is not scalar and (scalar is bool or kind is bool or not isinstance(value, scalar)):
                    raise SpecError(f"{where or cls.__name__}.{name}: expected {_NAMES[scalar]}, "
                                    f"got {kind.__name__}")
                values[name] = value
            else:
                values[name] = _convert(value, hint, f"{where or cls.__name__}.{name}")
        return cls(**values)

    @classmethod
    def from_query(cls, query: Mapping[str, str], path: Mapping[str, str], *, where: str = "") -> Self:
        """The model of a GET request's path parameters and query string (text -> declared types)."""
        data: dict[str, Any] = {}
        hints = {name: hint for name, hint, _ in cls.fields_spec()}
        for source in (query, path):
            for name, raw in source.items():
                if name in hints:
                    data[name] = _from_text(raw, hints[name], f"{where or cls.__name__}.{name}")
        return cls.from_json(data, where=where)

    def to_json(self) -> dict[str, Any]:
        """The wire form: a plain dict (nested models as dicts)."""
        return {name: getattr(self, name) if scalar is not None else _to_json(getattr(self, name))
                for name, scalar, _, _, _ in self._plan()}


_NAMES = {str: "a string", int: "an integer", bool: "a boolean"}


def _optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in hint.__args__


def _convert(value: Any, hint: Any, where: str) -> Any:
    if isinstance(hint, types.UnionType):
        options = [h for h in hint.__args__ if h is not type(None)]
        if value is None:
            return None
        hint = options[0]
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, Model):
        return hint.from_json(value, where=where)
    if hint in _NAMES:
        if (value.__class__ is bool and hint is not bool) or not isinstance(value, hint):
            raise SpecError(f"{where}: expected {_NAMES[hint]}, got {type(value).__name__}")
        return value
    raise SpecError(f"{where}: the spec has no rule for {hint!r}")  # pragma: no cover - spec bug


def _from_text(raw: str, hint: Any, where: str) -> Any:
    if isinstance(hint, types.UnionType):
        hint = next(h for h in hint.__args__ if h is not type(None))
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise SpecError(f"{where}: expected an integer, got {raw!r}") from None
    if hint is bool:
        if raw not in ("true", "false"):
            raise SpecError(f"{where}: expected true or false, got {raw!r}")
        return raw == "true"
    return raw


def _to_json(value: Any) -> Any:
    if isinstance(value, Model):
        return value.to_json()
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def query_text(value: Any) -> str:
    """How a GET request field is written in the query string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def model(cls: type) -> Any:
    """Declare a shape: a frozen, slotted, keyword-only dataclass on :class:`Model`."""
    return dataclass(frozen=True, slots=True, kw_only=True)(cls)


# ----------------------------------------------------------------------
# Shared shapes


@model
class ErrorDetail(Model):
    code: str
    message: str


@model
class ErrorBody(Model):
    """What every service answers with a 4xx/5xx status."""

    error: ErrorDetail


@model
class UserRef(Model):
    user_id: str


# ----------------------------------------------------------------------
# account service


@model
class User(Model):
    user_id: str
    #: "active", "disabled" or "deleted"
    status: str
    tier: str
    #: Personal data: never logged.
    email: str | None = field(default=None, repr=False)
    name: str | None = field(default=None, repr=False)
    created_at: str | None = None


@model
class UserValidation(Model):
    """A verdict, for known and unknown users alike: ``valid`` or the ``reason`` it is not."""

    user_id: str
    valid: bool
    #: None when valid; else "user_not_found", "user_disabled" or "user_deleted".
    reason: str | None = None
    status: str | None = None


@model
class PaymentMethod(Model):
    payment_method_id: str
    type: str
    brand: str | None = None
    last4: str | None = field(default=None, repr=False)
    is_default: bool = False


@model
class PaymentMethods(Model):
    user_id: str
    payment_methods: list[PaymentMethod]


@model
class UserTier(Model):
    user_id: str
    tier: str


# ----------------------------------------------------------------------
# wallet service


@model
class Wallet(Model):
    wallet_id: str
    user_id: str
    balance_amount: int
    currency: str
    status: str


@model
class Balance(Model):
    user_id: str
    wallet_id: str
    balance_amount: int
    currency: str


@model
class CreditsRequest(Model):
    """A credit or a debit of a user's wallet; ``reference_id`` names what it is for (an order)."""

    user_id: str
    amount: int
    currency: str
    reason: str
    reference_id: str | None = None


@model
class WalletTransaction(Model):
    transaction_id: str
    wallet_id: str
    user_id: str
    #: "credit" or "debit"
    kind: str
    amount: int
    currency: str
    #: The balance after this transaction.
    balance_amount: int
    reference_id: str | None = None


# ----------------------------------------------------------------------
# billing service


@model
class BillingRecordRequest(Model):
    user_id: str
    amount: int
    currency: str
    #: "payment", "refund", "invoice", "credit"
    kind: str
    description: str | None = None
    payment_intent_id: str | None = None
    invoice_id: str | None = None
    #: The event this record is made for (the sinks pass it).
    source_event_id: str | None = None


@model
class OrderBillingRecordRequest(Model):
    order_id: str
    user_id: str
    amount: int
    currency: str
    #: The order's status the record is made for ("COMPLETED", "REFUNDED", ...).
    order_status: str
    payment_intent_id: str | None = None
    source_event_id: str | None = None


@model
class BillingRecord(Model):
    record_id: str
    user_id: str
    amount: int
    currency: str
    kind: str
    created_at: str
    order_id: str | None = None
    order_status: str | None = None
    description: str | None = None
    payment_intent_id: str | None = None
    invoice_id: str | None = None
    source_event_id: str | None = None


@model
class BillingHistoryRequest(Model):
    user_id: str
    limit: int | None = None


@model
class BillingHistory(Model):
    user_id: str
    records: list[BillingRecord]


# ----------------------------------------------------------------------
# product service


@model
class PlanRef(Model):
    plan_id: str


@model
class Plan(Model):
    plan_id: str
    name: str
    amount: int
    currency: str
    #: "month" or "year"
    interval: str
    active: bool
    features: list[str]
    storage_quota_bytes: int | None = None


@model
class SubscriptionCheck(Model):
    user_id: str
    plan_id: str


@model
class SubscriptionValidation(Model):
    """A verdict: ``valid`` or the ``reason`` the user may not subscribe to the plan."""

    user_id: str
    plan_id: str
    valid: bool
    #: None when valid; else "plan_not_found", "plan_inactive" or "already_subscribed".
    reason: str | None = None


# ----------------------------------------------------------------------
# notification service


@model
class PaymentReceiptRequest(Model):
    user_id: str
    payment_intent_id: str
    amount: int
    currency: str
    order_id: str | None = None
    source_event_id: str | None = None


@model
class InvoiceNotificationRequest(Model):
    user_id: str
    invoice_id: str
    amount: int
    currency: str
    #: "created", "paid" or "overdue"
    invoice_status: str
    due_date: str | None = None
    source_event_id: str | None = None


@model
class OrderConfirmationRequest(Model):
    user_id: str
    order_id: str
    total_amount: int
    currency: str
    source_event_id: str | None = None


@model
class OrderStatusRequest(Model):
    user_id: str
    order_id: str
    #: The order's new status ("CANCELED", "EXPIRED", "FULFILLED", ...).
    order_status: str
    reason: str | None = None
    source_event_id: str | None = None


@model
class NotificationAccepted(Model):
    notification_id: str
    #: "queued" or "sent"
    status: str
    channel: str


# ----------------------------------------------------------------------
# payment service (the seed's order-service view of it)


@model
class PaymentIntentRequest(Model):
    order_id: str
    user_id: str
    amount: int
    currency: str
    description: str | None = None


@model
class PaymentIntent(Model):
    payment_intent_id: str
    order_id: str
    status: str
    amount: int
    currency: str
    #: Handed to the payer's browser; never logged.
    client_secret: str | None = field(default=None, repr=False)


@model
class PaymentRef(Model):
    payment_intent_id: str


@model
class CancelPaymentRequest(Model):
    payment_intent_id: str
    reason: str | None = None


@model
class PaymentStatus(Model):
    payment_intent_id: str
    order_id: str | None
    status: str
    amount: int
    currency: str


# ----------------------------------------------------------------------
# storage service


@model
class StorageUsage(Model):
    user_id: str
    used_bytes: int
    quota_bytes: int


@model
class QuotaCheck(Model):
    user_id: str
    requested_bytes: int


@model
class QuotaValidation(Model):
    """Whether ``requested_bytes`` more fit in the user's quota (used + requested <= quota)."""

    user_id: str
    allowed: bool
    used_bytes: int
    quota_bytes: int
    requested_bytes: int
    #: None when allowed; else "quota_exceeded".
    reason: str | None = None


# ----------------------------------------------------------------------
# The table


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One method of one service: where it lives and what it takes and answers."""

    service: str
    method_name: str
    http_method: str
    path_template: str
    request: type[Model]
    response: type[Model]
    idempotent: bool
    needs_key: bool = False
    moves_money: bool = False
    #: Status of a successful answer.
    success_status: int = 200
    #: Codes this method's refusals may carry (besides "invalid_request").
    errors: tuple[str, ...] = ()

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.path_template) if name)

    @property
    def request_fields(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.request.fields_spec())

    @property
    def response_fields(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.response.fields_spec())


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A service: its name (the kernel's ``Call.service``) and the setting holding its base URL."""

    name: str
    settings_attribute: str


SERVICES: dict[str, ServiceSpec] = {
    name: ServiceSpec(name, f"{name}_service_url")
    for name in ("account", "wallet", "billing", "product", "notification", "payment", "storage")
}

_USER_ERRORS = ("user_not_found",)

ENDPOINTS: tuple[Endpoint, ...] = (
    # account
    Endpoint("account", "get_user", "GET", "/users/{user_id}", UserRef, User, True,
             errors=_USER_ERRORS),
    Endpoint("account", "validate_user", "GET", "/users/{user_id}/validation", UserRef, UserValidation, True),
    Endpoint("account", "get_payment_methods", "GET", "/users/{user_id}/payment-methods", UserRef,
             PaymentMethods, True, errors=_USER_ERRORS),
    Endpoint("account", "get_user_tier", "GET", "/users/{user_id}/tier", UserRef, UserTier, True,
             errors=_USER_ERRORS),
    # wallet
    Endpoint("wallet", "get_wallet", "GET", "/wallets/{user_id}", UserRef, Wallet, True,
             errors=("wallet_not_found",)),
    Endpoint("wallet", "get_balance", "GET", "/wallets/{user_id}/balance", UserRef, Balance, True,
             errors=("wallet_not_found",)),
    Endpoint("wallet", "add_credits", "POST", "/wallets/{user_id}/credits", CreditsRequest,
             WalletTransaction, False, needs_key=True, moves_money=True, success_status=201,
             errors=("wallet_not_found", "currency_mismatch", "invalid_amount", "idempotency_key_reused")),
    Endpoint("wallet", "deduct_credits", "POST", "/wallets/{user_id}/debits", CreditsRequest,
             WalletTransaction, False, needs_key=True, moves_money=True, success_status=201,
             errors=("wallet_not_found", "currency_mismatch", "invalid_amount", "insufficient_funds",
                     "idempotency_key_reused")),
    # billing
    Endpoint("billing", "create_billing_record", "POST", "/billing/records", BillingRecordRequest,
             BillingRecord, False, needs_key=True, success_status=201,
             errors=("invalid_amount", "idempotency_key_reused")),
    Endpoint("billing", "get_billing_history", "GET", "/billing/users/{user_id}/records",
             BillingHistoryRequest, BillingHistory, True),
    Endpoint("billing", "create_order_billing_record", "POST", "/billing/orders/{order_id}/records",
             OrderBillingRecordRequest, BillingRecord, False, needs_key=True, success_status=201,
             errors=("invalid_amount", "idempotency_key_reused")),
    # product
    Endpoint("product", "get_plan", "GET", "/plans/{plan_id}", PlanRef, Plan, True,
             errors=("plan_not_found",)),
    Endpoint("product", "validate_subscription", "GET", "/plans/{plan_id}/subscription-validation",
             SubscriptionCheck, SubscriptionValidation, True),
    # notification
    Endpoint("notification", "send_payment_receipt", "POST", "/notifications/payment-receipts",
             PaymentReceiptRequest, NotificationAccepted, False, needs_key=True, success_status=202,
             errors=("idempotency_key_reused",)),
    Endpoint("notification", "send_invoice", "POST", "/notifications/invoices",
             InvoiceNotificationRequest, NotificationAccepted, False, needs_key=True, success_status=202,
             errors=("idempotency_key_reused",)),
    Endpoint("notification", "send_order_confirmation", "POST", "/notifications/order-confirmations",
             OrderConfirmationRequest, NotificationAccepted, False, needs_key=True, success_status=202,
             errors=("idempotency_key_reused",)),
    Endpoint("notification", "send_order_status", "POST", "/notifications/order-status",
             OrderStatusRequest, NotificationAccepted, False, needs_key=True, success_status=202,
             errors=("idempotency_key_reused",)),
    # payment
    Endpoint("payment", "create_payment_intent", "POST", "/payments/intents", PaymentIntentRequest,
             PaymentIntent, False, needs_key=True, success_status=201,
             errors=("invalid_amount", "idempotency_key_reused")),
    Endpoint("payment", "get_payment_status", "GET", "/payments/intents/{payment_intent_id}", PaymentRef,
             PaymentStatus, True, errors=("payment_not_found",)),
    Endpoint("payment", "cancel_payment", "POST", "/payments/intents/{payment_intent_id}/cancel",
             CancelPaymentRequest, PaymentStatus, False, needs_key=True, moves_money=True,
             errors=("payment_not_found", "payment_not_cancelable", "idempotency_key_reused")),
    # storage
    Endpoint("storage", "get_storage_usage", "GET", "/storage/users/{user_id}/usage", UserRef,
             StorageUsage, True, errors=_USER_ERRORS),
    Endpoint("storage", "validate_quota", "GET", "/storage/users/{user_id}/quota-validation", QuotaCheck,
             QuotaValidation, True, errors=_USER_ERRORS),
)

_BY_NAME: dict[tuple[str, str], Endpoint] = {(e.service, e.method_name): e for e in ENDPOINTS}


def endpoint(service: str, method_name: str) -> Endpoint:
    """The endpoint of ``service``'s ``method_name`` (KeyError when the spec has none)."""
    return _BY_NAME[(service, method_name)]


def endpoints_of(service: str) -> tuple[Endpoint, ...]:
    """Every endpoint of ``service``, in the table's order."""
    return tuple(e for e in ENDPOINTS if e.service == service)
