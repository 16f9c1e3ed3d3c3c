"""The user -> subscriptions index: ``create_subscription`` and the user fan-outs.

Keyed by user, on ``paystream.user-subscription-index``: every input about "a
user's subscriptions" arrives here, and the row holds what deciding them
needs, without loading every subscription row:

- the summaries of the user's subscriptions (the subscription rows' ``index``
  commands, :func:`tables.subscription_state.index_updates`; a newer version
  of a summary wins);
- the user's Stripe customer (``customer_id``), made once and reused by every
  later subscription of the user;
- the subscriptions the API created, by command id, so a request retried
  under its Idempotency-Key is answered with what it made.

``create_subscription`` takes three commands, each one round of Stripe calls,
sent one after the other by the API (:mod:`agents.subscriptions_api`) after
the user and plan checks: ``ensure_customer`` (Stripe customer, key derived
from the user), ``attach_payment_method`` (when the request names one: made
the customer's default, which pays the first invoice), then
``create_subscription`` (key derived from the command), whose answer goes to
the subscription aggregate as ``open`` (-> ``subscription.created``).  Why
three: the kernel runs a step's calls in one concurrent round, and Stripe
needs the customer before it can attach a method, and the default method
before the subscription charges its first invoice.  A crash between them
leaves at most a customer or an attached card, which the client's retry
(same Idempotency-Key) finds and reuses.

The fan-outs (seed names): ``handle_user_deleted`` -> ``cancel_for_user_deleted``
to every subscription of the user (the subscription decides whether it is
its to cancel and refund), ``handle_user_upgraded`` -> ``change_plan`` of the
user's newest running subscription, ``handle_wallet_insufficient_funds`` ->
``mark_past_due`` (the subscription the event names, else every active or
trialing one; why past due and not pause: :mod:`tables.subscription_state`).
Each command's id is derived from the event and its target, and the kernel
publishes the commands before it writes the row with the event's id, so a
replayed event re-sends the same commands, which the targets recognise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streams.catalog import PAYMENT_SERVICE, SUBSCRIPTION_COMMANDS, USER_SUBSCRIPTION_INDEX
from tables import aggregate
from tables.aggregate import (
    DUPLICATE,
    NOOP,
    Call,
    Conflict,
    Decision,
    Flow,
    IdempotencyKeyReused,
    Invalid,
    Outcome,
    Send,
    Step,
)
from tables.payment_state import STRIPE
from tables.subscription_state import MARKABLE

#: Inbound event ids a row remembers (a user sees few such events; an older
#: redelivery re-sends commands with derived ids the targets have applied).
MAX_APPLIED = 128
#: Subscriptions created through the API a row remembers for retried requests.
MAX_CREATED = 32
#: Statuses of a subscription ``handle_user_upgraded`` may move to a new plan.
UPGRADABLE = frozenset({"active", "trialing", "past_due"})

Row = dict[str, Any]


def load(stored: Mapping[str, Any]) -> Row:
    return {"subscriptions": dict(stored.get("subscriptions") or {}),
            "applied": list(stored.get("applied") or []),
            "customer_id": stored.get("customer_id"),
            "created": dict(stored.get("created") or {}),
            "keys": dict(stored.get("keys") or {})}


def dump(row: Row) -> Row:
    return row


def _row(row: Row | None) -> Row:
    return load(row or {})


def subscriptions_of(row: Row | None) -> list[dict[str, Any]]:
    """The summaries of an index row, oldest first."""
    found = _row(row)["subscriptions"].values()
    return sorted(found, key=lambda s: (s.get("created_at_ms") or 0, s["subscription_id"]))


def _applied(row: Row | None, input_id: str) -> Row:
    current = _row(row)
    current["applied"] = [*current["applied"], input_id][-MAX_APPLIED:]
    return current


def _seen(row: Row | None, input_id: str) -> bool:
    return row is not None and input_id in (row.get("applied") or ())


def _text(message: Mapping[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str) or not value:
        raise Invalid(f"{name} must be a non-empty string, not {value!r}")
    return value


# --------------------------------------------------------------------------
# index: a subscription row's summary


def merge_index_update(row: Row | None, command: Mapping[str, Any], now_ms: int) -> Decision:
    """A subscription's new summary: kept unless a newer one of it is there."""
    summary = command.get("subscription")
    version = command.get("version")
    if not isinstance(summary, Mapping) or not isinstance(summary.get("subscription_id"), str) \
            or isinstance(version, bool) or not isinstance(version, int):
        raise Invalid("index update must carry a subscription summary and an integer version")
    current = _row(row)
    known = current["subscriptions"].get(summary["subscription_id"])
    if known is not None and known.get("version", 0) >= version:
        return NOOP  # this summary, or an older one arriving late
    current["subscriptions"][summary["subscription_id"]] = {**summary, "version": version}
    return Decision(row=current)


# --------------------------------------------------------------------------
# create_subscription, in three commands (see the module docstring)


def _check_key(row: Row | None, command: Mapping[str, Any]) -> str | None:
    """The subscription an earlier request under this Idempotency-Key made (422 if other parameters)."""
    key = command.get("idempotency_key")
    known = _row(row)["keys"].get(key) if isinstance(key, str) else None
    if known is None:
        return None
    if known["fingerprint"] != str(command.get("fingerprint")):
        raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was used with other parameters by "
                                   f"user {command.get('user_id')}")
    return known["subscription_id"]


def _customer_key(user_id: str) -> str:
    # Derived from the user: one Stripe customer per user, however often asked.
    return aggregate.derived_id("create_customer", user_id)


def plan_ensure_customer(row: Row | None, command: Mapping[str, Any]) -> list[Call]:
    if _row(row)["customer_id"] is not None:
        return []
    _check_key(row, command)
    args = {"user_id": _text(command, "user_id")}
    if isinstance(command.get("email"), str):
        args["email"] = command["email"]
    return [Call(STRIPE, "create_customer", args, _customer_key(args["user_id"]))]


def ensure_customer(row: Row | None, command: Mapping[str, Any], now_ms: int,
                    outcomes: Mapping[str, Outcome]) -> Decision:
    """ensure_customer: the user's Stripe customer, made once (reply: its id)."""
    user_id = _text(command, "user_id")
    _check_key(row, command)
    current = _row(row)
    reply = {"user_id": user_id, "customer_id": current["customer_id"]}
    if current["customer_id"] is not None:
        return Decision(reply=reply)  # known: nothing to make, nothing to write
    outcome = outcomes[_customer_key(user_id)]
    if not outcome.ok:
        raise Conflict(f"Stripe refused a customer for user {user_id}: {outcome.refused}")
    current["customer_id"] = _text(outcome.value, "customer_id")
    return Decision(row=current, reply={**reply, "customer_id": current["customer_id"]})


def _attach_key(command: Mapping[str, Any]) -> str:
    return aggregate.derived_id("attach_payment_method", command["command_id"])


def plan_attach(row: Row | None, command: Mapping[str, Any]) -> list[Call]:
    customer_id = _row(row)["customer_id"]
    if customer_id is None or _seen(row, command["command_id"]):
        return []
    return [Call(STRIPE, "attach_payment_method",
                 {"customer_id": customer_id, "payment_method": _text(command, "payment_method")},
                 _attach_key(command))]


def attach_payment_method(row: Row | None, command: Mapping[str, Any], now_ms: int,
                          outcomes: Mapping[str, Outcome]) -> Decision:
    """attach_payment_method: the card becomes the customer's default (it pays the invoices).

    A card Stripe refuses (declined, unknown) is 409 with Stripe's reason.
    """
    current = _row(row)
    if current["customer_id"] is None:
        raise Conflict(f"user {command.get('user_id')} has no Stripe customer yet")
    reply = {"customer_id": current["customer_id"], "payment_method": command.get("payment_method")}
    if _seen(row, command["command_id"]):
        return Decision(duplicate=True, reply=reply)
    outcome = outcomes[_attach_key(command)]
    if not outcome.ok:
        raise Conflict(f"Stripe refused payment method {command.get('payment_method')}: "
                       f"{outcome.refused}")
    return Decision(row=_applied(current, command["command_id"]), reply=reply)


def _subscription_key(command: Mapping[str, Any]) -> str:
    return aggregate.derived_id("create_subscription", command["command_id"])


def _quantity(command: Mapping[str, Any]) -> int:
    quantity = command.get("quantity", 1)
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
        raise Invalid(f"quantity must be a positive integer, not {quantity!r}")
    return quantity


def plan_create_subscription(row: Row | None, command: Mapping[str, Any]) -> list[Call]:
    current = _row(row)
    if current["customer_id"] is None or command["command_id"] in current["created"] \
            or _check_key(row, command) is not None:
        return []
    user_id = _text(command, "user_id")
    args: dict[str, Any] = {"customer_id": current["customer_id"], "plan_id": _text(command, "plan_id"),
                            "quantity": _quantity(command), "metadata": {"user_id": user_id}}
    trial = command.get("trial_period_days")
    if trial is not None:
        if isinstance(trial, bool) or not isinstance(trial, int) or trial < 1:
            raise Invalid(f"trial_period_days must be a positive integer, not {trial!r}")
        args["trial_period_days"] = trial
    return [Call(STRIPE, "create_subscription", args, _subscription_key(command))]


def create_subscription(row: Row | None, command: Mapping[str, Any], now_ms: int,
                        outcomes: Mapping[str, Outcome]) -> Decision:
    """create_subscription: the subscription at Stripe -> ``open`` to the subscription aggregate.

    Reply: Stripe's subscription (:func:`tables.stripe_objects.subscription_view`).
    A retry (same command, or the same Idempotency-Key and parameters) is
    answered with the subscription it made; the key with other parameters
    is 422.  Stripe refusing (an unknown plan, a card declined on the first
    invoice) is 409 with its reason.
    """
    command_id = _text(command, "command_id")
    current = _row(row)
    made = _check_key(row, command)
    if made is not None or command_id in current["created"]:
        known = current["created"].get(command_id) or next(
            (v for v in current["created"].values() if v.get("subscription_id") == made), None)
        return Decision(duplicate=True, reply=known or {"subscription_id": made})
    if current["customer_id"] is None:
        raise Conflict(f"user {command.get('user_id')} has no Stripe customer yet")
    outcome = outcomes[_subscription_key(command)]
    if not outcome.ok:
        raise Conflict(f"Stripe refused the subscription to {command.get('plan_id')}: "
                       f"{outcome.refused}")
    view = dict(outcome.value)
    subscription_id = _text(view, "subscription_id")
    current["created"] = dict(list({**current["created"], command_id: view}.items())[-MAX_CREATED:])
    key = command.get("idempotency_key")
    if isinstance(key, str):
        keys = {**current["keys"], key: {"fingerprint": str(command.get("fingerprint")),
                                         "subscription_id": subscription_id}}
        current["keys"] = dict(list(keys.items())[-MAX_CREATED:])
    if subscription_id not in current["subscriptions"]:  # shown at once; the row's summary replaces it
        current["subscriptions"][subscription_id] = {
            "subscription_id": subscription_id, "status": view.get("status"),
            "plan_id": view.get("plan_id"), "quantity": view.get("quantity"),
            "cancel_at_period_end": bool(view.get("cancel_at_period_end")),
            "current_period_end": view.get("current_period_end"), "created_at_ms": now_ms,
            "version": 0}
    opening = aggregate.command("open", "subscription_id", subscription_id,
                                cause={"event_id": command_id,
                                       "correlation_id": command.get("correlation_id")},
                                now_ms=now_ms, subscription=view)
    return Decision(row=_applied(current, command_id), reply=view,
                    send=(Send(SUBSCRIPTION_COMMANDS, subscription_id, opening),))


# --------------------------------------------------------------------------
# The fan-outs


def _fan_out(row: Row | None, event: Mapping[str, Any], verb: str, targets: list[str],
             now_ms: int, **args: Any) -> Decision:
    sends = tuple(
        Send(SUBSCRIPTION_COMMANDS, subscription_id,
             aggregate.command(verb, "subscription_id", subscription_id, cause=event,
                               now_ms=now_ms, **args))
        for subscription_id in targets)
    return Decision(row=_applied(row, event["event_id"]), send=sends)


def handle_user_deleted(row: Row | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """user.deleted: cancel every subscription of the user at Stripe and refund the unused share.

    Sent to every subscription the index knows, ended ones included: the
    subscription row tells one that ended before the deletion (left alone)
    from one our own cancel ended (refunded once, whoever reports it first).
    """
    if _seen(row, event["event_id"]):
        return DUPLICATE
    targets = [s["subscription_id"] for s in subscriptions_of(row)]
    return _fan_out(row, event, "cancel_for_user_deleted", targets, now_ms,
                    user_id=event["user_id"], deleted_at=event.get("deleted_at"),
                    reason=event.get("reason"))


def upgrade_target(row: Row | None) -> str | None:
    """The subscription a tier upgrade moves: the user's newest running one, if any."""
    running = [s for s in subscriptions_of(row)
               if s.get("status") in UPGRADABLE and not s.get("cancel_at_period_end")]
    return running[-1]["subscription_id"] if running else None


def handle_user_upgraded(row: Row | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """user.upgraded: move the user's subscription to the new tier's plan, prorated.

    The event names the plan (``plan_id``); an upgrade without one, or a user
    without a running subscription, changes nothing at Stripe.
    """
    if _seen(row, event["event_id"]):
        return DUPLICATE
    plan_id = event.get("plan_id")
    target = upgrade_target(row)
    targets = [target] if isinstance(plan_id, str) and plan_id and target is not None else []
    return _fan_out(row, event, "change_plan", targets, now_ms, plan_id=plan_id,
                    new_tier=event.get("new_tier"))


def handle_wallet_insufficient_funds(row: Row | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """wallet.insufficient_funds: mark the user's subscriptions past due (not paused: see the docstring).

    The subscription the event names; an event about an order (``order_id``
    and no subscription) is the order's business and marks none; one naming
    neither marks every active or trialing subscription of the user.
    """
    if _seen(row, event["event_id"]):
        return DUPLICATE
    named = event.get("subscription_id")
    if isinstance(named, str) and named:
        targets = [named]
    elif event.get("order_id"):
        targets = []
    else:
        targets = [s["subscription_id"] for s in subscriptions_of(row) if s.get("status") in MARKABLE]
    return _fan_out(row, event, "mark_past_due", targets, now_ms, user_id=event["user_id"],
                    occurred_at_ms=event.get("occurred_at"))


# --------------------------------------------------------------------------
# The flow table

_S = (SUBSCRIPTION_COMMANDS,)

USER_SUBSCRIPTIONS = Flow(
    name="user-subscriptions",
    producer=PAYMENT_SERVICE,
    key_field="user_id",
    steps=(
        Step("index", "merge_index_update", merge_index_update),
        Step("ensure_customer", "ensure_customer", ensure_customer, calls=plan_ensure_customer),
        Step("attach_payment_method", "attach_payment_method", attach_payment_method,
             calls=plan_attach),
        Step("create_subscription", "create_subscription", create_subscription, sends=_S,
             calls=plan_create_subscription),
        Step("user.deleted", "handle_user_deleted", handle_user_deleted, sends=_S),
        Step("user.upgraded", "handle_user_upgraded", handle_user_upgraded, sends=_S),
        Step("wallet.insufficient_funds", "handle_wallet_insufficient_funds",
             handle_wallet_insufficient_funds, sends=_S),
    ),
    load=load,
    dump=dump,
    command_topic=USER_SUBSCRIPTION_INDEX,
)
