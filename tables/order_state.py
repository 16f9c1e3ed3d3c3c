"""The order aggregate as pure decisions: its row, its transition table, and what
every event and command does to it.

Nothing here imports Faust, Kafka or aiohttp, so every rule of the order
lifecycle is unit-tested without a broker (STYLE.md).  :func:`order_flow` is
the flow table the kernel (:mod:`streams.kernel`) runs: for each input, its
seed handler, its decision, the topics it may emit and its deadline effect.
The kernel writes the returned row and publishes its emissions together, and
derives the payment deadline from the row (:func:`deadline_of`), so state,
outgoing events and timers cannot disagree.

Idempotency lives in the row: :attr:`Order.applied_event_ids` holds the ids of
the last events/commands applied, so the seen-id check and the state change it
guards are written together and cannot be torn apart by a crash between two
table writes.  Some facts can also arrive twice under *different* event ids
(a producer that re-emitted after a crash, Stripe webhooks out of order); those
are recognised by their business key (PaymentIntent, payment, refund id) and
answered with a no-op :class:`Decision` rather than an error.

Contracts are not restated: the payload of every emission is built from the
non-envelope fields of its topic's ``.avsc`` (:func:`schemas.contracts.payload`)
and the enum symbols (order types, cancel reasons) come from the schemas too,
so a contract change shows up here as a failing import or test, not as events
the encoder rejects in production.

Seed names (``seed/payment-order-architecture.md``, order service) are the
``handler`` column of :func:`order_flow`: ``handle_payment_completed`` is
:func:`on_payment_completed`, ``handle_payment_failed`` is
:func:`on_payment_failed`, ``handle_payment_refunded`` is
:func:`on_payment_refunded`; the handlers of ``wallet.credits_added``,
``subscription.canceled`` and ``user.deleted`` (:mod:`tables.order_index`)
issue the :func:`fulfill` and :func:`cancel` commands.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from fastavro import parse_schema
from fastavro.validation import validate

from schemas import contracts
from streams.catalog import ORDER_COMMANDS, ORDER_SERVICE, SUBSCRIPTION_ORDER_INDEX, USER_ORDER_INDEX
from tables import aggregate
from tables.aggregate import (
    DUPLICATE,
    NOOP,
    DeadlineEffect,
    Decision,
    Emission,
    IdempotencyKeyReused,
    Send,
    Step,
)
from tables.payment_state import RETRYABLE_FAILURES


class OrderStatus(StrEnum):
    """Where an order is in its life; stored and shown by these names."""

    PENDING = "PENDING"
    PAYMENT_PENDING = "PAYMENT_PENDING"
    COMPLETED = "COMPLETED"
    FULFILLED = "FULFILLED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"


#: The legal transitions, the one place they are written.  Every
#: status-changing decision goes through :func:`_require_transition`, so this
#: table *is* the state machine; the tests check the behaviour against it.
TRANSITIONS: Mapping[OrderStatus, frozenset[OrderStatus]] = MappingProxyType(
    {
        OrderStatus.PENDING: frozenset(
            {
                OrderStatus.PAYMENT_PENDING,
                OrderStatus.COMPLETED,
                OrderStatus.CANCELED,
                OrderStatus.EXPIRED,
            }
        ),
        OrderStatus.PAYMENT_PENDING: frozenset(
            {OrderStatus.COMPLETED, OrderStatus.CANCELED, OrderStatus.EXPIRED}
        ),
        OrderStatus.COMPLETED: frozenset(
            {OrderStatus.FULFILLED, OrderStatus.PARTIALLY_REFUNDED, OrderStatus.REFUNDED}
        ),
        OrderStatus.FULFILLED: frozenset({OrderStatus.PARTIALLY_REFUNDED, OrderStatus.REFUNDED}),
        OrderStatus.PARTIALLY_REFUNDED: frozenset({OrderStatus.PARTIALLY_REFUNDED, OrderStatus.REFUNDED}),
        OrderStatus.REFUNDED: frozenset(),
        OrderStatus.CANCELED: frozenset(),
        OrderStatus.EXPIRED: frozenset(),
    }
)

#: Statuses no event or command leaves.
TERMINAL_STATUSES: frozenset[OrderStatus] = frozenset(
    status for status, targets in TRANSITIONS.items() if not targets
)

#: Statuses of an unpaid order: it can still be changed, paid, canceled or expire.
OPEN_STATUSES: frozenset[OrderStatus] = frozenset({OrderStatus.PENDING, OrderStatus.PAYMENT_PENDING})

#: Statuses in which the order's money has been received (some may be returned).
PAID_STATUSES: frozenset[OrderStatus] = frozenset(
    {
        OrderStatus.COMPLETED,
        OrderStatus.FULFILLED,
        OrderStatus.PARTIALLY_REFUNDED,
        OrderStatus.REFUNDED,
    }
)

#: How many applied event/command ids a row remembers.  An order sees a
#: handful of events in its life, so 128 covers every redelivery Kafka can
#: produce (a consumer re-reading an uncommitted batch) while keeping the row
#: small; a replay older than that is still caught by the business-key checks
#: or refused by the transition table.
MAX_APPLIED_IDS = 128

#: Topics the order aggregate emits.
ORDER_CREATED = "order.created"
ORDER_PAYMENT_PENDING = "order.payment_pending"
ORDER_COMPLETED = "order.completed"
ORDER_CANCELED = "order.canceled"
ORDER_REFUNDED = "order.refunded"
ORDER_FULFILLED = "order.fulfilled"
ORDER_UPDATED = "order.updated"
ORDER_EXPIRED = "order.expired"
EMITTED_TOPICS: tuple[str, ...] = (
    ORDER_CREATED,
    ORDER_PAYMENT_PENDING,
    ORDER_COMPLETED,
    ORDER_CANCELED,
    ORDER_REFUNDED,
    ORDER_FULFILLED,
    ORDER_UPDATED,
    ORDER_EXPIRED,
)


# --------------------------------------------------------------------------
# What the contracts say, read once at import so a renamed field or symbol
# fails loudly here instead of producing events the encoder rejects.


_ORDER_TYPE_ENUM = contracts.named_type(ORDER_CREATED, "order_type", "enum")

#: Order types a producer may write.  The enum's default is the reader-side
#: fallback for symbols added later ("producers never write it", says the
#: contract), so an order can never be created with it.
ORDER_TYPES: frozenset[str] = frozenset(_ORDER_TYPE_ENUM["symbols"]) - {_ORDER_TYPE_ENUM.get("default")}

#: Reasons an order.canceled may carry (all symbols: OTHER is a real reason too).
CANCEL_REASONS: frozenset[str] = frozenset(contracts.enum_symbols(ORDER_CANCELED, "reason"))


def _cancel_reason(symbol: str) -> str:
    if symbol not in CANCEL_REASONS:
        raise LookupError(f"{ORDER_CANCELED}: reason enum lacks {symbol!r}")
    return symbol


REASON_USER_REQUESTED = _cancel_reason("USER_REQUESTED")
REASON_PAYMENT_FAILED = _cancel_reason("PAYMENT_FAILED")

_ITEM_RECORD = contracts.named_type(ORDER_CREATED, "items", "array")["items"]
_ITEM_SCHEMA = parse_schema(copy.deepcopy(_ITEM_RECORD))
#: Fields of one order line (OrderItem), in contract order, with their defaults.
_ITEM_FIELDS: tuple[tuple[str, bool, Any], ...] = tuple(
    (spec["name"], "default" in spec, spec.get("default")) for spec in _ITEM_RECORD["fields"]
)

#: An event payload built from its contract (:func:`schemas.contracts.payload`).
_payload = contracts.payload


# --------------------------------------------------------------------------
# Errors


class IllegalTransition(aggregate.Conflict):
    """A well-formed event or command that the order's current state forbids.

    The kernel dead-letters it with ``str(exc)``; the API answers 409.  The
    attributes let both report it without parsing the message.
    """

    def __init__(
        self,
        order_id: str,
        current: OrderStatus | None,
        action: str,
        target: OrderStatus | None = None,
        detail: str = "",
    ) -> None:
        self.order_id = order_id
        self.current = current
        self.action = action
        self.target = target
        self.detail = detail
        where = "does not exist" if current is None else f"is {current.value}"
        to = f" (to {target.value})" if target is not None else ""
        message = f"order {order_id!r} {where}: cannot {action}{to}"
        if detail:
            message = f"{message}: {detail}"
        super().__init__(message)


class OrderNotFound(IllegalTransition):
    """An event or command for an order id that has no row (the API's 404)."""

    status = aggregate.NotFound.status
    code = aggregate.NotFound.code

    def __init__(self, order_id: str, action: str) -> None:
        super().__init__(order_id, None, action)


class InvalidCommand(aggregate.Invalid):
    """Malformed input: a missing or mistyped field, a field that may not be
    patched, a negative amount, an unknown command.  Distinct from
    :class:`IllegalTransition` because retrying it can never succeed, whatever
    the order's state (the API's 400).
    """

    def __init__(self, message: str, *, order_id: str | None = None, field: str | None = None) -> None:
        self.order_id = order_id
        self.field = field
        prefix = f"order {order_id!r}: " if order_id else ""
        super().__init__(f"{prefix}{message}")


# --------------------------------------------------------------------------
# The row


@dataclass(slots=True)
class Order:
    """One order row of the orders table (stored as :meth:`to_dict`).

    Amounts are integers in minor units of ``currency``.  ``created_at_ms`` is
    the time of the order.created event (the order's own fact time, on which
    the payment deadline is based); the other ``*_at_ms`` are the processing
    times passed to the decisions.  ``payment_deadline_ms`` is kept after the
    order leaves the open states, as the record of when payment was due.
    """

    order_id: str
    user_id: str
    order_type: str
    status: OrderStatus
    total_amount: int
    currency: str
    items: list[dict[str, Any]]
    created_at_ms: int
    updated_at_ms: int
    payment_deadline_ms: int | None = None
    payment_intent_id: str | None = None
    payment_id: str | None = None
    subscription_id: str | None = None
    payment_method: str | None = None  # None: a card through Stripe; "wallet": wallet credits
    refunded_amount: int = 0
    refund_ids: list[str] = field(default_factory=list)
    cancel_reason: str | None = None
    cancel_detail: str | None = None
    payment_error: str | None = None  # the last failed attempt's error, while a retry may pay
    fulfillment_details: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    completed_at_ms: int | None = None
    fulfilled_at_ms: int | None = None
    closed_at_ms: int | None = None
    applied_event_ids: list[str] = field(default_factory=list)
    idempotency_keys: dict[str, str] = field(default_factory=dict)
    create_key: str | None = None  # the Idempotency-Key that created it: kept for its life

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for the table: only str, int, None, lists and dicts.

        Copied (every list and map; an item is a flat map), so the stored value
        never aliases the live object.  Written out rather than
        ``dataclasses.asdict``, whose generic deep copy costs more than the
        rest of a decision on the agent's hot path.
        """
        return _copied(self.stored())

    def stored(self) -> dict[str, Any]:
        """What the table stores: :meth:`to_dict` without the copies.

        The lists and maps are the row's own: for the kernel, which encodes
        the value at once (the flow's ``dump``); rows are not changed in place
        once decided (:func:`_evolve` works on a copy).
        """
        data = _vars_of(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Order:
        """Read a row written by :meth:`to_dict`, by this or another version.

        Optional keys may be missing (a row written before they existed) and
        unknown keys are ignored (a row written by a newer version), so rows
        survive rolling deploys and changelog rebuilds.  Raises ``ValueError``
        when a key the order cannot exist without is missing.
        """
        missing = [name for name in _REQUIRED_ROW_KEYS if name not in data]
        if missing:
            raise ValueError(f"order row lacks required key(s) {', '.join(missing)}")
        created_at_ms = int(data["created_at_ms"])
        return cls(
            order_id=str(data["order_id"]),
            user_id=str(data["user_id"]),
            order_type=str(data["order_type"]),
            status=OrderStatus(data["status"]),
            total_amount=int(data["total_amount"]),
            currency=str(data["currency"]),
            items=[dict(item) for item in data.get("items") or []],
            created_at_ms=created_at_ms,
            updated_at_ms=int(data.get("updated_at_ms", created_at_ms)),
            payment_deadline_ms=_optional_int(data.get("payment_deadline_ms")),
            payment_intent_id=data.get("payment_intent_id"),
            payment_id=data.get("payment_id"),
            subscription_id=data.get("subscription_id"),
            payment_method=data.get("payment_method"),
            refunded_amount=int(data.get("refunded_amount") or 0),
            refund_ids=list(data.get("refund_ids") or []),
            cancel_reason=data.get("cancel_reason"),
            cancel_detail=data.get("cancel_detail"),
            payment_error=data.get("payment_error"),
            fulfillment_details=dict(data.get("fulfillment_details") or {}),
            metadata=dict(data.get("metadata") or {}),
            completed_at_ms=_optional_int(data.get("completed_at_ms")),
            fulfilled_at_ms=_optional_int(data.get("fulfilled_at_ms")),
            closed_at_ms=_optional_int(data.get("closed_at_ms")),
            applied_event_ids=list(data.get("applied_event_ids") or [])[-MAX_APPLIED_IDS:],
            idempotency_keys=dict(data.get("idempotency_keys") or {}),
            create_key=data.get("create_key"),
        )


_REQUIRED_ROW_KEYS = (
    "order_id",
    "user_id",
    "order_type",
    "status",
    "total_amount",
    "currency",
    "created_at_ms",
)
_ORDER_FIELD_ORDER = tuple(f.name for f in dataclasses.fields(Order))
_ORDER_FIELD_NAMES = frozenset(_ORDER_FIELD_ORDER)
#: The row's list and map fields (str, int, None and the status everywhere else).
_CONTAINER_FIELDS = ("items", "refund_ids", "fulfillment_details", "metadata", "idempotency_keys")


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# --------------------------------------------------------------------------
# Decisions


_NOOP = NOOP
_DUPLICATE = DUPLICATE


def _require_transition(order: Order, target: OrderStatus, action: str, detail: str = "") -> None:
    if target not in TRANSITIONS[order.status]:
        raise IllegalTransition(order.order_id, order.status, action, target, detail)


def _evolve(order: Order, applied_id: str, now_ms: int, **changes: Any) -> Order:
    """The next row: ``changes`` applied, the input's id remembered, time bumped.

    Works on a copy, so the caller's row (which the agent may still hold, or
    which a test compares against) is never mutated.
    """
    values = _vars_of(order)
    for name in _CONTAINER_FIELDS:  # what _copied would copy: the other fields are immutable
        if name not in changes:
            value = values[name]
            values[name] = ([dict(v) if isinstance(v, dict) else v for v in value]
                            if isinstance(value, list) else dict(value))
    values.update(changes)
    values["applied_event_ids"] = [*order.applied_event_ids, applied_id][-MAX_APPLIED_IDS:]
    values["updated_at_ms"] = now_ms
    return Order(**values)


def _vars_of(order: Order) -> dict[str, Any]:
    """The row's fields by name (shared values: copy with :func:`_copied`)."""
    return {name: getattr(order, name) for name in _ORDER_FIELD_ORDER}


def _copied(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every list and map copied (two levels: rows hold lists of flat maps)."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, list):
            value = [dict(v) if isinstance(v, dict) else v for v in value]
        elif isinstance(value, dict):
            value = dict(value)
        out[name] = value
    return out


# --------------------------------------------------------------------------
# Reading inputs


_CURRENCY = re.compile(r"[A-Z]{3}")


def _text(source: Mapping[str, Any], name: str, *, order_id: str | None = None) -> str:
    value = source.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidCommand(
            f"{name} must be a non-empty string, not {value!r}", order_id=order_id, field=name
        )
    return value


def _optional_text(source: Mapping[str, Any], name: str, *, order_id: str | None = None) -> str | None:
    value = source.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidCommand(f"{name} must be a string or null, not {value!r}", order_id=order_id, field=name)
    return value


def _int_value(value: Any, name: str, *, minimum: int, order_id: str | None = None) -> int:
    # bool is an int subclass; True as an amount is a caller bug, not 1 cent.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidCommand(
            f"{name} must be an integer >= {minimum}, not {value!r}", order_id=order_id, field=name
        )
    return value


def _int(source: Mapping[str, Any], name: str, *, minimum: int, order_id: str | None = None) -> int:
    return _int_value(source.get(name), name, minimum=minimum, order_id=order_id)


def _currency_value(value: Any, name: str = "currency", *, order_id: str | None = None) -> str:
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        raise InvalidCommand(
            f"{name} must be an upper-case ISO-4217 code, not {value!r}",
            order_id=order_id,
            field=name,
        )
    return value


def _message_id(message: Mapping[str, Any], key: str) -> str:
    if not isinstance(message, Mapping):
        raise InvalidCommand(f"expected a mapping, not {type(message).__name__}")
    return _text(message, key)


def _is_duplicate(order: Order | None, message_id: str) -> bool:
    return order is not None and message_id in order.applied_event_ids


def _target(order: Order | None, message: Mapping[str, Any], action: str) -> Order:
    """The row ``message`` is about, checked against the row the agent loaded."""
    order_id = _text(message, "order_id")
    if order is None:
        raise OrderNotFound(order_id, action)
    if order.order_id != order_id:
        raise InvalidCommand(
            f"{action}: message for order {order_id!r} applied to order {order.order_id!r}",
            order_id=order.order_id,
            field="order_id",
        )
    return order


def _items(raw: Any, *, order_id: str | None) -> list[dict[str, Any]]:
    """Order lines checked against the contract's OrderItem record and normalised
    to its shape (every field present, defaults filled), plus the rules a
    schema cannot say: a product id, at least one unit, no negative price.
    """
    if not isinstance(raw, list) or not raw:
        raise InvalidCommand("items must be a non-empty list", order_id=order_id, field="items")
    names = {name for name, _, _ in _ITEM_FIELDS}
    lines: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        where = f"items[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidCommand(f"{where} must be an object", order_id=order_id, field="items")
        unknown = sorted(str(key) for key in item if key not in names)
        if unknown:
            raise InvalidCommand(
                f"{where} has unknown field(s) {', '.join(unknown)}",
                order_id=order_id,
                field="items",
            )
        line: dict[str, Any] = {}
        for name, has_default, default in _ITEM_FIELDS:
            if name in item:
                line[name] = item[name]
            elif has_default:
                line[name] = default if default is None or isinstance(default, str | int) \
                    else copy.deepcopy(default)
            else:
                raise InvalidCommand(f"{where} lacks {name}", order_id=order_id, field="items")
        if isinstance(line.get("quantity"), bool) or isinstance(line.get("unit_amount"), bool):
            raise InvalidCommand(f"{where}: amounts must be integers", order_id=order_id, field="items")
        if not validate(line, _ITEM_SCHEMA, raise_errors=False):
            raise InvalidCommand(
                f"{where} does not match the OrderItem contract: {line!r}",
                order_id=order_id,
                field="items",
            )
        if not line["product_id"]:
            raise InvalidCommand(f"{where}: product_id is empty", order_id=order_id, field="items")
        if line["quantity"] < 1 or line["unit_amount"] < 0:
            raise InvalidCommand(
                f"{where}: quantity must be >= 1 and unit_amount >= 0",
                order_id=order_id,
                field="items",
            )
        lines.append(line)
    return lines


def _items_total(items: list[dict[str, Any]]) -> int:
    return sum(int(line["quantity"]) * int(line["unit_amount"]) for line in items)


def _check_args(command: Mapping[str, Any], name: str, allowed: frozenset[str]) -> None:
    """Refuse unknown arguments: a misspelt ``reson`` must not cancel with the default."""
    given = command.get("command", name)
    if given != name:
        raise InvalidCommand(f"command {given!r} passed to {name}", field="command")
    unknown = sorted(str(key) for key in command if key not in _COMMAND_KEYS | allowed)
    if unknown:
        raise InvalidCommand(f"{name}: unknown argument(s) {', '.join(unknown)}", field=unknown[0])


#: Keys every command may carry besides its own arguments: its id, verb and
#: target, when it was issued, and the caller's Idempotency-Key with the
#: fingerprint of the request's parameters (see :func:`_repeated_request`).
_COMMAND_KEYS = frozenset(
    {"command_id", "command", "order_id", "issued_at", "idempotency_key", "fingerprint"}
)

#: How many Idempotency-Keys an order remembers (with the fingerprint of the
#: request each came with).  An order sees a handful of requests in its life;
#: the key of the request that created it is kept for as long as the order.
MAX_IDEMPOTENCY_KEYS = 32


def _repeated_request(order: Order | None, command: Mapping[str, Any]) -> bool:
    """Whether ``command`` repeats a request this order already applied, by Idempotency-Key.

    The same key with the same parameters (fingerprint) is the same request:
    True, the caller answers with the order as it is.  The same key with other
    parameters raises IdempotencyKeyReused (422), as Stripe does.  Keys are
    scoped by the order (and, for creates, by the user, whose key derives the
    order id), so another caller's key never reaches this row.
    """
    key = command.get("idempotency_key")
    if key is None:
        return False
    fingerprint = command.get("fingerprint")
    if not isinstance(key, str) or not key or not isinstance(fingerprint, str):
        raise InvalidCommand("idempotency_key and fingerprint must be non-empty strings",
                             field="idempotency_key")
    if order is None or key not in order.idempotency_keys:
        return False
    if order.idempotency_keys[key] == fingerprint:
        return True
    raise IdempotencyKeyReused(
        f"order {order.order_id!r}: Idempotency-Key {key!r} was used with other parameters; "
        "a key names one request"
    )


def _remember_request(order: Order, command: Mapping[str, Any]) -> Order:
    """``order`` (a fresh copy from :func:`_evolve`) remembering the command's key."""
    key = command.get("idempotency_key")
    if key is not None:
        keys = {**order.idempotency_keys, key: str(command["fingerprint"])}
        kept = dict(list(keys.items())[-MAX_IDEMPOTENCY_KEYS:])
        if order.create_key is not None and order.create_key in keys:  # never forgotten
            kept[order.create_key] = keys[order.create_key]
        order.idempotency_keys = kept
    return order


# --------------------------------------------------------------------------
# Events


def on_order_created(
    order: Order | None,
    event: Mapping[str, Any],
    now_ms: int,
    default_window_ms: int,
    *,
    subscription_id: str | None = None,
) -> Decision:
    """order.created: a new PENDING order whose payment deadline starts a timer.

    The deadline is the event's ``expires_at`` (a per-order payment window)
    or else ``occurred_at + default_window_ms``: based on the event's time,
    not the processing time, so a replay computes the same deadline.  The
    event's ``subscription_id`` (or the keyword, for callers that hold it
    apart) links a recurring order to its subscription.
    An order.created for an existing id under another event id is a
    duplicate order id: IllegalTransition, never a silent overwrite.
    """
    event_id = _message_id(event, "event_id")
    if _is_duplicate(order, event_id):
        return _DUPLICATE
    if default_window_ms <= 0:
        raise ValueError(f"default_window_ms must be > 0, not {default_window_ms}")
    order_id = _text(event, "order_id")
    if order is not None:
        if order.order_id != order_id:
            raise InvalidCommand(
                f"order.created for {order_id!r} applied to order {order.order_id!r}",
                order_id=order.order_id,
                field="order_id",
            )
        raise IllegalTransition(
            order_id,
            order.status,
            "create",
            OrderStatus.PENDING,
            f"order id already taken (event {event_id} is not the one that created it)",
        )
    user_id = _text(event, "user_id", order_id=order_id)
    order_type = event.get("order_type")
    if order_type not in ORDER_TYPES:
        raise InvalidCommand(
            f"order_type must be one of {', '.join(sorted(ORDER_TYPES))}, not {order_type!r}",
            order_id=order_id,
            field="order_type",
        )
    currency = _currency_value(event.get("currency"), order_id=order_id)
    items = _items(event.get("items"), order_id=order_id)
    total_amount = _int(event, "total_amount", minimum=0, order_id=order_id)
    if total_amount != _items_total(items):
        raise InvalidCommand(
            f"total_amount {total_amount} is not the sum of the items ({_items_total(items)})",
            order_id=order_id,
            field="total_amount",
        )
    subscription_id = event.get("subscription_id") or subscription_id
    if subscription_id is not None and (not isinstance(subscription_id, str) or not subscription_id):
        raise InvalidCommand(
            "subscription_id must be a non-empty string or None", order_id=order_id, field="subscription_id"
        )
    occurred_at = _int(event, "occurred_at", minimum=0, order_id=order_id)
    expires_at = event.get("expires_at")
    if expires_at is not None:
        deadline = _int_value(expires_at, "expires_at", minimum=occurred_at + 1, order_id=order_id)
    else:
        deadline = occurred_at + default_window_ms
    created = Order(
        order_id=order_id,
        user_id=user_id,
        order_type=str(order_type),
        status=OrderStatus.PENDING,
        total_amount=total_amount,
        currency=currency,
        items=items,
        created_at_ms=occurred_at,
        updated_at_ms=now_ms,
        payment_deadline_ms=deadline,
        subscription_id=subscription_id,
        applied_event_ids=[event_id],
    )
    return Decision(row=created)


def on_payment_intent_created(order: Order | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """payment.intent.created: the order now waits for the payer (PAYMENT_PENDING).

    The intent's amount is deliberately not checked here: the order, not the
    intent, says what is owed, and order.payment_pending (read by
    payment_service) announces the order's amount so the intent can be kept
    in line, e.g. after a PATCH raced the intent's creation.  The money is
    checked where it moves, in :func:`on_payment_completed`.  The same intent
    reported again (under another event id, or late after the order moved on)
    is a no-op.
    """
    action = "await payment"
    event_id = _message_id(event, "event_id")
    if _is_duplicate(order, event_id):
        return _DUPLICATE
    current = _target(order, event, action)
    intent_id = _text(event, "payment_intent_id", order_id=current.order_id)
    if current.payment_intent_id == intent_id and current.status is not OrderStatus.PENDING:
        return _NOOP
    _require_transition(current, OrderStatus.PAYMENT_PENDING, action, f"PaymentIntent {intent_id}")
    updated = _evolve(
        current, event_id, now_ms, status=OrderStatus.PAYMENT_PENDING, payment_intent_id=intent_id
    )
    return Decision(row=updated, emit=(_payment_pending_emission(updated, intent_id),))


def _payment_pending_emission(order: Order, intent_id: str) -> Emission:
    return Emission(
        ORDER_PAYMENT_PENDING,
        _payload(
            ORDER_PAYMENT_PENDING,
            order_id=order.order_id,
            user_id=order.user_id,
            payment_intent_id=intent_id,
            amount=order.total_amount,
            currency=order.currency,
        ),
    )


def on_payment_completed(order: Order | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """payment.completed (seed: ``handle_payment_completed``): COMPLETED, timer cancelled.

    Refused (IllegalTransition, hence dead-lettered for a human to refund)
    when the money does not fit the order: a wrong amount or currency, a
    payment by another PaymentIntent than the order's, a second payment of a
    paid order, a payment of an order already canceled or expired.  The same
    payment reported again is a no-op.
    """
    action = "complete"
    event_id = _message_id(event, "event_id")
    if _is_duplicate(order, event_id):
        return _DUPLICATE
    current = _target(order, event, action)
    payment_id = _text(event, "payment_intent_id", order_id=current.order_id)
    amount = _int(event, "amount", minimum=0, order_id=current.order_id)
    currency = _currency_value(event.get("currency"), order_id=current.order_id)
    if current.payment_id == payment_id:
        return _NOOP
    if current.status in PAID_STATUSES:
        detail = (
            f"already paid by {current.payment_id}; payment {payment_id} is a second "
            "payment and must be refunded"
        )
    elif current.status in TERMINAL_STATUSES:
        detail = (
            f"payment {payment_id} captured {amount} {currency} for an order that can no "
            "longer be completed; it must be refunded"
        )
    else:
        detail = f"payment {payment_id}"
    _require_transition(current, OrderStatus.COMPLETED, action, detail)
    if current.payment_intent_id is not None and current.payment_intent_id != payment_id:
        raise IllegalTransition(
            current.order_id,
            current.status,
            action,
            OrderStatus.COMPLETED,
            f"payment {payment_id} is not the order's PaymentIntent {current.payment_intent_id}",
        )
    if amount != current.total_amount or currency != current.currency:
        raise IllegalTransition(
            current.order_id,
            current.status,
            action,
            OrderStatus.COMPLETED,
            f"payment {payment_id} paid {amount} {currency}, the order totals "
            f"{current.total_amount} {current.currency}",
        )
    updated = _evolve(
        current,
        event_id,
        now_ms,
        status=OrderStatus.COMPLETED,
        payment_intent_id=payment_id,
        payment_id=payment_id,
        payment_error=None,
        completed_at_ms=now_ms,
    )
    emission = Emission(
        ORDER_COMPLETED,
        _payload(
            ORDER_COMPLETED,
            order_id=updated.order_id,
            user_id=updated.user_id,
            order_type=updated.order_type,
            total_amount=updated.total_amount,
            currency=updated.currency,
            payment_id=payment_id,
        ),
    )
    return Decision(row=updated, emit=(emission,))


def on_payment_failed(order: Order | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """payment.failed (seed: ``handle_payment_failed``): CANCELED, reason PAYMENT_FAILED.

    Except a failure for want of funds (:data:`tables.payment_state.RETRYABLE_FAILURES`):
    the payment service retries it when the payer's balance rises
    (``handle_wallet_balance_changed``), so the order stays PAYMENT_PENDING
    with the error as ``payment_error`` and its payment window running.

    The Stripe error (code and message) is kept as ``cancel_detail`` for
    support and the order view.  A failure of the order's own intent once the
    order is no longer open is moot (Stripe webhooks arrive out of order: a
    failed attempt may be reported after the retry that succeeded), so it is
    a no-op; a failure of another intent is refused.
    """
    action = "cancel on failed payment"
    event_id = _message_id(event, "event_id")
    if _is_duplicate(order, event_id):
        return _DUPLICATE
    current = _target(order, event, action)
    intent_id = _text(event, "payment_intent_id", order_id=current.order_id)
    message = event.get("error_message")
    if not isinstance(message, str):
        raise InvalidCommand(
            "error_message must be a string", order_id=current.order_id, field="error_message"
        )
    code = _optional_text(event, "error_code", order_id=current.order_id)
    if current.payment_intent_id == intent_id and current.status not in OPEN_STATUSES:
        return _NOOP
    _require_transition(current, OrderStatus.CANCELED, action, f"PaymentIntent {intent_id}")
    if current.payment_intent_id is not None and current.payment_intent_id != intent_id:
        raise IllegalTransition(
            current.order_id,
            current.status,
            action,
            OrderStatus.CANCELED,
            f"PaymentIntent {intent_id} is not the order's {current.payment_intent_id}",
        )
    detail = f"{code}: {message}" if code else message
    if code in RETRYABLE_FAILURES:
        updated = _evolve(current, event_id, now_ms, status=OrderStatus.PAYMENT_PENDING,
                          payment_intent_id=intent_id, payment_error=detail or None)
        if current.status is OrderStatus.PENDING:  # read before payment.intent.created
            return Decision(row=updated, emit=(_payment_pending_emission(updated, intent_id),))
        return Decision(row=updated)
    updated = _evolve(
        current,
        event_id,
        now_ms,
        status=OrderStatus.CANCELED,
        payment_intent_id=intent_id,
        cancel_reason=REASON_PAYMENT_FAILED,
        cancel_detail=detail or None,
        closed_at_ms=now_ms,
    )
    return Decision(row=updated, emit=(_canceled_emission(updated),))


def on_payment_refunded(order: Order | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """payment.refunded (seed: ``handle_payment_refunded``): money returned.

    Refunds add up in ``refunded_amount``; the order is REFUNDED when they
    reach ``total_amount``, PARTIALLY_REFUNDED before.  A refund beyond what
    remains, of another payment, or in another currency is refused.  The same
    refund id seen again (Stripe reports a refund on several webhooks) is a
    no-op, so a refund is never counted twice.
    """
    action = "refund"
    event_id = _message_id(event, "event_id")
    if _is_duplicate(order, event_id):
        return _DUPLICATE
    current = _target(order, event, action)
    payment_id = _text(event, "payment_id", order_id=current.order_id)
    refund_id = _text(event, "refund_id", order_id=current.order_id)
    amount = _int(event, "amount", minimum=1, order_id=current.order_id)
    currency = _currency_value(event.get("currency"), order_id=current.order_id)
    if refund_id in current.refund_ids:
        return _NOOP
    remaining = current.total_amount - current.refunded_amount
    target = OrderStatus.REFUNDED if amount >= remaining else OrderStatus.PARTIALLY_REFUNDED
    _require_transition(current, target, action, f"refund {refund_id} of {amount} {currency}")
    if payment_id != current.payment_id:
        raise IllegalTransition(
            current.order_id,
            current.status,
            action,
            target,
            f"refund {refund_id} is of payment {payment_id}, the order was paid by {current.payment_id}",
        )
    if currency != current.currency:
        raise IllegalTransition(
            current.order_id,
            current.status,
            action,
            target,
            f"refund {refund_id} is in {currency}, the order in {current.currency}",
        )
    if amount > remaining:
        raise IllegalTransition(
            current.order_id,
            current.status,
            action,
            target,
            f"refund {refund_id} of {amount} exceeds the {remaining} that remains of "
            f"{current.total_amount} {current.currency}",
        )
    updated = _evolve(
        current,
        event_id,
        now_ms,
        status=target,
        refunded_amount=current.refunded_amount + amount,
        refund_ids=[*current.refund_ids, refund_id],
        closed_at_ms=now_ms if target is OrderStatus.REFUNDED else current.closed_at_ms,
    )
    emission = Emission(
        ORDER_REFUNDED,
        _payload(
            ORDER_REFUNDED,
            order_id=updated.order_id,
            user_id=updated.user_id,
            refund_id=refund_id,
            payment_id=payment_id,
            amount=amount,
            currency=currency,
        ),
    )
    return Decision(row=updated, emit=(emission,))


def _canceled_emission(order: Order) -> Emission:
    # Orders are canceled only while unpaid (TRANSITIONS), so nothing is owed back.
    return Emission(
        ORDER_CANCELED,
        _payload(
            ORDER_CANCELED,
            order_id=order.order_id,
            user_id=order.user_id,
            reason=order.cancel_reason,
            refund_amount=0,
            currency=order.currency,
        ),
    )


# --------------------------------------------------------------------------
# Commands: {"command_id": str, "command": name, "order_id": str, ...args}


def cancel(order: Order | None, command: Mapping[str, Any], now_ms: int) -> Decision:
    """Cancel an unpaid order: from the API, or for subscription.canceled / user.deleted.

    Arguments: ``reason`` (an order.canceled reason symbol, default
    USER_REQUESTED), ``detail`` (free text, optional), ``if_open`` (bool,
    default False).  ``if_open`` turns "the order is no longer open" into a
    no-op instead of an error: fan-out handlers (cancel all pending orders of
    a user) race with payments, and losing that race is not a failure.
    """
    command_id = _message_id(command, "command_id")
    if _repeated_request(order, command) or _is_duplicate(order, command_id):
        return _DUPLICATE
    _check_args(command, "cancel", frozenset({"reason", "detail", "if_open"}))
    current = _target(order, command, "cancel")
    reason = command.get("reason", REASON_USER_REQUESTED)
    if reason not in CANCEL_REASONS:
        raise InvalidCommand(
            f"reason must be one of {', '.join(sorted(CANCEL_REASONS))}, not {reason!r}",
            order_id=current.order_id,
            field="reason",
        )
    detail = _optional_text(command, "detail", order_id=current.order_id)
    if_open = command.get("if_open", False)
    if not isinstance(if_open, bool):
        raise InvalidCommand("if_open must be a boolean", order_id=current.order_id, field="if_open")
    if if_open and current.status not in OPEN_STATUSES:
        return _NOOP
    _require_transition(
        current,
        OrderStatus.CANCELED,
        "cancel",
        "only an unpaid order can be canceled" if current.status in PAID_STATUSES else "",
    )
    updated = _evolve(
        current,
        command_id,
        now_ms,
        status=OrderStatus.CANCELED,
        cancel_reason=str(reason),
        cancel_detail=detail,
        closed_at_ms=now_ms,
    )
    _remember_request(updated, command)
    return Decision(row=updated, emit=(_canceled_emission(updated),))


def fulfill(order: Order | None, command: Mapping[str, Any], now_ms: int) -> Decision:
    """Record delivery of a paid order (e.g. on wallet.credits_added): FULFILLED.

    Argument: ``fulfillment_details``, a string -> string map (default empty),
    whose keys depend on the order type (see the order.fulfilled contract).
    Only from COMPLETED: an order partly refunded before delivery needs a
    human decision, not an automatic fulfilment.
    """
    command_id = _message_id(command, "command_id")
    if _repeated_request(order, command) or _is_duplicate(order, command_id):
        return _DUPLICATE
    _check_args(command, "fulfill", frozenset({"fulfillment_details"}))
    current = _target(order, command, "fulfill")
    raw = command.get("fulfillment_details", {})
    if not isinstance(raw, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in raw.items()
    ):
        raise InvalidCommand(
            "fulfillment_details must map strings to strings",
            order_id=current.order_id,
            field="fulfillment_details",
        )
    details = dict(raw)
    _require_transition(current, OrderStatus.FULFILLED, "fulfill")
    updated = _evolve(
        current,
        command_id,
        now_ms,
        status=OrderStatus.FULFILLED,
        fulfillment_details=details,
        fulfilled_at_ms=now_ms,
    )
    _remember_request(updated, command)
    emission = Emission(
        ORDER_FULFILLED,
        _payload(
            ORDER_FULFILLED,
            order_id=updated.order_id,
            user_id=updated.user_id,
            order_type=updated.order_type,
            fulfillment_details=dict(details),
        ),
    )
    return Decision(row=updated, emit=(emission,))


#: Fields a PATCH may name, in the order changes are applied and reported.
#: ``total_amount`` is derived from the items (the order.created contract
#: defines it as their sum), so a PATCH may repeat it only as a check of the
#: new items; ``currency`` may change only together with new items, because
#: the items' prices are in the order's currency and re-denominating them
#: silently (1000 EUR cents -> 1000 JPY) would be wrong.  ``metadata`` is
#: merged (JSON Merge Patch: a null value removes a key).  Everything else
#: (ids, type, status, payment and refund data, timestamps) may not change.
PATCHABLE_FIELDS: tuple[str, ...] = ("items", "total_amount", "currency", "metadata")

#: Metadata limits, Stripe's own, so the map can be copied onto a PaymentIntent.
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_LENGTH = 40
MAX_METADATA_VALUE_LENGTH = 500


def _merged_metadata(current: dict[str, str], patch: Any, *, order_id: str) -> dict[str, str]:
    if not isinstance(patch, Mapping):
        raise InvalidCommand("metadata must be an object", order_id=order_id, field="metadata")
    merged = dict(current)
    for key, value in patch.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_METADATA_KEY_LENGTH:
            raise InvalidCommand(
                f"metadata key {key!r} must be a string of 1..{MAX_METADATA_KEY_LENGTH} chars",
                order_id=order_id,
                field="metadata",
            )
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, str) and len(value) <= MAX_METADATA_VALUE_LENGTH:
            merged[key] = value
        else:
            raise InvalidCommand(
                f"metadata[{key!r}] must be a string of at most {MAX_METADATA_VALUE_LENGTH} "
                "chars, or null to remove it",
                order_id=order_id,
                field="metadata",
            )
    if len(merged) > MAX_METADATA_KEYS:
        raise InvalidCommand(
            f"metadata may hold at most {MAX_METADATA_KEYS} keys", order_id=order_id, field="metadata"
        )
    return merged


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def update(order: Order | None, command: Mapping[str, Any], now_ms: int) -> Decision:
    """PATCH an unpaid order (see :data:`PATCHABLE_FIELDS`): order.updated.

    Argument: ``changes``, field -> new value.  Malformed changes are
    InvalidCommand whatever the state; a valid change of an order that is no
    longer open is IllegalTransition (its money has moved or never will).
    Values equal to the current ones change nothing: if nothing differs, the
    decision is a no-op and nothing is emitted.  An amount is reported
    together with its currency (the order.updated contract asks for it).
    While PAYMENT_PENDING, payment_service reads order.updated to bring the
    PaymentIntent's amount in line before the payer confirms it.
    """
    command_id = _message_id(command, "command_id")
    if _repeated_request(order, command) or _is_duplicate(order, command_id):
        return _DUPLICATE
    _check_args(command, "update", frozenset({"changes"}))
    current = _target(order, command, "update")
    order_id = current.order_id
    changes = command.get("changes")
    if not isinstance(changes, Mapping):
        raise InvalidCommand("changes must be an object", order_id=order_id, field="changes")
    for name in changes:
        if name not in PATCHABLE_FIELDS:
            why = "may not change" if name in _ORDER_FIELD_NAMES else "is not an order field"
            raise InvalidCommand(
                f"{name!r} {why}; a PATCH may change {', '.join(PATCHABLE_FIELDS)}",
                order_id=order_id,
                field=str(name),
            )
    items = _items(changes["items"], order_id=order_id) if "items" in changes else current.items
    currency = current.currency
    if "currency" in changes:
        currency = _currency_value(changes["currency"], order_id=order_id)
        if currency != current.currency and "items" not in changes:
            raise InvalidCommand(
                "currency may change only together with items priced in the new currency",
                order_id=order_id,
                field="currency",
            )
    total = _items_total(items)
    if "total_amount" in changes:
        given = _int_value(changes["total_amount"], "total_amount", minimum=0, order_id=order_id)
        if given != total:
            raise InvalidCommand(
                f"total_amount {given} is not the sum of the items ({total}); the total is "
                "derived from the items",
                order_id=order_id,
                field="total_amount",
            )
    metadata = (
        _merged_metadata(current.metadata, changes["metadata"], order_id=order_id)
        if "metadata" in changes
        else current.metadata
    )
    if current.status not in OPEN_STATUSES:
        raise IllegalTransition(
            order_id, current.status, "update", None, "an order can be changed only before it is paid"
        )

    diff: dict[str, str] = {}
    if items != current.items:
        diff["items"] = _json(items)
    if total != current.total_amount or currency != current.currency:
        diff["total_amount"] = _json(total)
        diff["currency"] = _json(currency)
    if metadata != current.metadata:
        diff["metadata"] = _json(metadata)
    if not diff:
        if command.get("idempotency_key") is None:
            return _NOOP
        # Nothing changes, but the key now names this request: remember it.
        return Decision(row=_remember_request(_evolve(current, command_id, now_ms), command))
    updated = _evolve(
        current,
        command_id,
        now_ms,
        items=copy.deepcopy(items),
        total_amount=total,
        currency=currency,
        metadata=dict(metadata),
    )
    _remember_request(updated, command)
    emission = Emission(
        ORDER_UPDATED,
        _payload(
            ORDER_UPDATED,
            order_id=order_id,
            user_id=updated.user_id,
            changes=diff,
            updated_fields=list(diff),
        ),
    )
    return Decision(row=updated, emit=(emission,))


def expire(order: Order | None, command: Mapping[str, Any], now_ms: int) -> Decision:
    """The payment timer fired (argument ``deadline_ms``, the deadline it handed over).

    EXPIRED if the order is still unpaid and its deadline has passed.  Not an
    error otherwise, because a timer races with payment and cancellation: an
    order that is no longer open (or no longer exists) is a no-op, and the
    kernel drops the handed-over deadline because :func:`deadline_of` no
    longer wants it; an order not yet due (a timer that fired early) is a
    no-op whose deadline the kernel re-asserts.
    """
    command_id = _message_id(command, "command_id")
    if _is_duplicate(order, command_id):
        return _DUPLICATE
    _check_args(command, "expire", frozenset({"deadline_ms"}))
    _int(command, "deadline_ms", minimum=0)
    order_id = _text(command, "order_id")
    if order is None:
        return _NOOP
    current = _target(order, command, "expire")
    deadline = current.payment_deadline_ms
    if deadline is None or current.status not in OPEN_STATUSES or now_ms < deadline:
        return _NOOP
    _require_transition(current, OrderStatus.EXPIRED, "expire")
    updated = _evolve(current, command_id, now_ms, status=OrderStatus.EXPIRED, closed_at_ms=now_ms)
    emission = Emission(
        ORDER_EXPIRED,
        _payload(
            ORDER_EXPIRED,
            order_id=order_id,
            user_id=updated.user_id,
            payment_intent_id=updated.payment_intent_id,
            expired_at=deadline,
        ),
    )
    return Decision(row=updated, emit=(emission,))


#: Arguments of a create command: the order.created payload's fields the
#: requester chooses (the order id is the command's target).
CREATE_ARGS = frozenset({"user_id", "order_type", "items", "currency", "total_amount", "expires_at",
                         "subscription_id", "payment_method", "wallet_transaction_id"})

#: The one payment method besides a card: the user's wallet credits.
WALLET = "wallet"


def create(order: Order | None, command: Mapping[str, Any], now_ms: int, default_window_ms: int) -> Decision:
    """Create an order (from the API, or for storage.quota_exceeded / subscription.created).

    Publishes order.created and stores the PENDING order.  The event's time is
    the command's ``issued_at``, so a re-decided create computes the same
    deadline (``expires_at``, else ``issued_at + default_window_ms``) and
    publishes the same event under the same id.  A create repeated under its
    Idempotency-Key with the same parameters is a duplicate (the requester
    gets the order it created), with other parameters IdempotencyKeyReused.
    """
    command_id = _message_id(command, "command_id")
    created_id = aggregate.derived_id(command_id, ORDER_CREATED, "")
    if _repeated_request(order, command) or _is_duplicate(order, created_id):
        return _DUPLICATE
    _check_args(command, "create", CREATE_ARGS)
    issued_at = _int(command, "issued_at", minimum=0)
    order_id = _text(command, "order_id")
    event = {name: command[name] for name in CREATE_ARGS if name in command}
    event.update(event_id=created_id, occurred_at=issued_at, order_id=order_id)
    transaction_id = _wallet_payment(command, order_id)
    created = on_order_created(order, event, now_ms, default_window_ms).row
    created.create_key = command.get("idempotency_key")
    created.payment_method = WALLET if transaction_id else None
    _remember_request(created, command)
    payload = _payload(
        ORDER_CREATED,
        order_id=order_id,
        user_id=created.user_id,
        order_type=created.order_type,
        total_amount=created.total_amount,
        currency=created.currency,
        items=[dict(item) for item in created.items],  # checked flat maps (_items): a copy each
        subscription_id=created.subscription_id,
        expires_at=created.payment_deadline_ms,
        payment_method=created.payment_method,
    )
    emitted = Emission(ORDER_CREATED, payload, occurred_at=issued_at)
    if transaction_id is None:
        return Decision(row=created, emit=(emitted,))
    # Paid when placed: the API deducted the credits (under a key derived from
    # the order) before it sent this command, so the order completes at once.
    completed = on_payment_completed(created, {
        "event_id": aggregate.derived_id(command_id, ORDER_COMPLETED, "wallet"),
        "order_id": order_id, "payment_intent_id": transaction_id, "amount": created.total_amount,
        "currency": created.currency}, now_ms)
    completed.row.payment_intent_id = None  # paid by the wallet transaction (payment_id), no intent
    return Decision(row=completed.row, emit=(emitted, *completed.emit))


def _wallet_payment(command: Mapping[str, Any], order_id: str) -> str | None:
    """The wallet transaction that paid the order being created, or None (a card will)."""
    method = command.get("payment_method")
    if method is None:
        return None
    if method != WALLET:
        raise InvalidCommand(f"payment_method must be {WALLET!r} or absent (a card), not {method!r}",
                             order_id=order_id, field="payment_method")
    return _text(command, "wallet_transaction_id", order_id=order_id)


# --------------------------------------------------------------------------
# Queries


def is_open(order: Order) -> bool:
    """Unpaid and still payable: may be changed, canceled, paid or expire."""
    return order.status in OPEN_STATUSES


def awaiting_fulfilment(order: Order) -> bool:
    """Paid and not yet delivered: what the fulfilment handlers look for."""
    return order.status is OrderStatus.COMPLETED


def refundable_amount(order: Order) -> int:
    """What may still be refunded: nothing before payment, the unrefunded rest after."""
    if order.status not in PAID_STATUSES:
        return 0
    return order.total_amount - order.refunded_amount


def order_summary(order: Order) -> dict[str, Any]:
    """A row of the user -> orders index.

    Enough to list a user's orders and to pick the ones a fan-out handler
    must act on (user.deleted: the open ones; subscription.canceled: the open
    ones of that subscription) without loading every order row.
    """
    return {
        "order_id": order.order_id,
        "status": order.status.value,
        "order_type": order.order_type,
        "subscription_id": order.subscription_id,
        "total_amount": order.total_amount,
        "currency": order.currency,
        "created_at_ms": order.created_at_ms,
    }


def order_view(order: Order) -> dict[str, Any]:
    """The JSON body of GET /orders/{id}: the row without its bookkeeping.

    ``applied_event_ids`` is internal (idempotency) and left out;
    ``refundable_amount`` is added so clients need not re-derive the rule.
    """
    view = order.to_dict()
    del view["applied_event_ids"]
    del view["idempotency_keys"]
    del view["create_key"]
    view["refundable_amount"] = refundable_amount(order)
    return view


def deadline_of(order: Order) -> int | None:
    """The payment deadline an order has pending: only an open order can expire."""
    return order.payment_deadline_ms if order.status in OPEN_STATUSES else None


def index_updates(before: Order | None, after: Order) -> tuple[Send, ...]:
    """The user -> orders (and subscription -> orders) index updates a row change causes.

    Only when the summary changed; ``version`` (the row's update time) lets the
    index keep the newest summary when two arrive out of order.
    """
    summary = order_summary(after)
    if before is not None and order_summary(before) == summary:
        return ()
    update = {"order": summary, "version": after.updated_at_ms, "user_id": after.user_id}
    sends = [Send(USER_ORDER_INDEX, after.user_id, update)]
    if after.subscription_id:
        sends.append(Send(SUBSCRIPTION_ORDER_INDEX, after.subscription_id, update))
    return tuple(sends)


# --------------------------------------------------------------------------
# The flow table: every input of the order aggregate, its seed handler, its
# decision, what it may emit, and what it does to the payment deadline.


def _for_order(decide: Callable[[Order | None, Mapping[str, Any], int], Decision]) -> Any:
    """Payment events outside any order (a subscription invoice's) are not the order's."""

    def decide_for_order(order: Order | None, event: Mapping[str, Any], now_ms: int) -> Decision:
        return decide(order, event, now_ms) if event.get("order_id") else _NOOP

    decide_for_order.__doc__ = decide.__doc__
    return decide_for_order


def order_flow(default_window_ms: int) -> aggregate.Flow:
    """The order aggregate on the kernel; ``default_window_ms`` is the payment window."""
    if default_window_ms <= 0:
        raise ValueError(f"default_window_ms must be > 0, not {default_window_ms}")
    E = DeadlineEffect

    def create_order(order: Order | None, command: Mapping[str, Any], now_ms: int) -> Decision:
        return create(order, command, now_ms, default_window_ms)

    steps = (
        Step("create", "create_order", create_order, (ORDER_CREATED, ORDER_COMPLETED), deadline=E.SET),
        Step("payment.intent.created", "handle_payment_intent_created",
             _for_order(on_payment_intent_created), (ORDER_PAYMENT_PENDING,)),
        Step("payment.completed", "handle_payment_completed", _for_order(on_payment_completed),
             (ORDER_COMPLETED,), deadline=E.CLEAR),
        Step("payment.failed", "handle_payment_failed", _for_order(on_payment_failed),
             (ORDER_CANCELED,), deadline=E.CLEAR),
        Step("payment.refunded", "handle_payment_refunded", _for_order(on_payment_refunded),
             (ORDER_REFUNDED,)),
        Step("cancel", "cancel_order", cancel, (ORDER_CANCELED,), deadline=E.CLEAR),
        Step("fulfill", "fulfill_order", fulfill, (ORDER_FULFILLED,)),
        Step("update", "update_order", update, (ORDER_UPDATED,)),
        Step("expire", "expire_order", expire, (ORDER_EXPIRED,), deadline=E.FIRE),
    )
    return aggregate.Flow(
        name="orders",
        producer=ORDER_SERVICE,
        key_field="order_id",
        steps=steps,
        load=Order.from_dict,
        dump=Order.stored,
        command_topic=ORDER_COMMANDS,
        deadline_of=deadline_of,
        follow=index_updates,
        view=order_view,
        shares_rows=True,  # decisions work on copies (_evolve); the tests check it
    )
