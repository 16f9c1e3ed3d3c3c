"""The order service's stream handlers (seed: "Order Service / Should Subscribe To").

Three agents, one per key the inputs arrive by, so each aggregate has exactly
one writer and no locks are needed:

- ``order_events`` (key order_id): payment.intent.created, payment.completed,
  payment.failed, payment.refunded and the internal order commands (create,
  cancel, fulfill, update, expire).  It owns the ``orders`` table and the
  payment deadlines, and publishes every ``order.*`` event.
- ``user_order_events`` (key user_id): wallet.credits_added,
  storage.quota_exceeded, user.deleted, and the user -> orders index fed by a
  repartition topic.  It turns each inbound event into order commands.
- ``subscription_order_events`` (key subscription_id): subscription.created,
  subscription.canceled and the subscription -> orders index.

Idempotency: an order row keeps the ids of the events/commands it applied;
the index rows keep theirs.  Every event we publish gets an id derived from
its cause, so a record re-processed after a crash republishes the same event
id and downstream de-duplication holds.  Derived events are acknowledged by
Kafka before the state change is written.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from faust.types import EventT

from streams import catalog
from streams.dispatch import DeadLetters, Dispatcher, dead_letter_topic, json_topic
from streams.envelope import new_event
from streams.routing import ReplyBook
from tables import order_state
from tables.deadlines import Deadlines, now_ms
from tables.order_state import Decision, Emission, Order

log = logging.getLogger(__name__)

ORDER_SERVICE = catalog.ORDER_SERVICE
#: Namespace of every id this service derives (uuid5), so that the same cause
#: always yields the same event id, command id or order id.
ID_NAMESPACE = uuid.UUID("6f1c1a52-4d0e-4f4b-9a55-0d7e8f0c2b11")
#: How many applied ids an index row remembers (its idempotency window).
MAX_INDEX_APPLIED = 256


def derived_id(*parts: object) -> str:
    """A stable id for something caused by ``parts`` (same parts, same id)."""
    return str(uuid.uuid5(ID_NAMESPACE, "/".join(str(p) for p in parts)))


def make_command(
    command: str, order_id: str, *, cause: Mapping[str, Any] | None, command_id: str | None = None,
    **args: Any,
) -> dict[str, Any]:
    """An order command: its verb and arguments plus the flow it belongs to.

    A command caused by an event gets a derived id (re-processing the event
    re-sends the same command, which the order row recognises).
    """
    if command_id is None:
        command_id = derived_id(cause["event_id"], command, order_id) if cause else str(uuid.uuid4())
    return {
        "command": command,
        "command_id": command_id,
        "order_id": order_id,
        "correlation_id": (cause or {}).get("correlation_id") or str(uuid.uuid4()),
        "causation_id": (cause or {}).get("event_id"),
        "issued_at": now_ms(),
        "args": args,
    }


class CommandRejected(Exception):
    """What the web layer gets back when the agent refused a command."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        super().__init__(str(error))


class OrderService:
    """Tables, topics and handlers of the order domain on one app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.window_ms = int(app.settings.order_payment_window_seconds * 1000)
        # key_type=bytes gives the tables the raw key serializer of the topics,
        # so the web router finds a key's owner where the agent stored it
        # (faust-streaming #514: a str key_type would hash JSON-quoted keys).
        table = dict(key_type=bytes, value_type=None, partitions=catalog.EVENT_PARTITIONS,
                     default=None)
        self.orders = app.Table("orders", **table)
        self.user_orders = app.Table("user-orders", **table)
        self.subscription_orders = app.Table("subscription-orders", **table)
        self.commands = json_topic(app, catalog.ORDER_COMMANDS)
        self.user_index = json_topic(app, catalog.USER_ORDER_INDEX)
        self.subscription_index = json_topic(app, catalog.SUBSCRIPTION_ORDER_INDEX)
        self.replies = ReplyBook()
        self.deadlines = Deadlines(app, "order-deadlines", self.on_payment_deadline)
        dead_letters = DeadLetters(dead_letter_topic(app))

        orders_in = Dispatcher(app, dead_letters)
        orders_in.on(catalog.ORDER_COMMANDS, self.handle_order_command)
        orders_in.on("payment.intent.created", self.handle_payment_intent_created)
        orders_in.on("payment.completed", self.handle_payment_completed)
        orders_in.on("payment.failed", self.handle_payment_failed)
        orders_in.on("payment.refunded", self.handle_payment_refunded)

        users_in = Dispatcher(app, dead_letters)
        users_in.on(catalog.USER_ORDER_INDEX, self.handle_user_index_update)
        users_in.on("wallet.credits_added", self.handle_wallet_credits_added)
        users_in.on("storage.quota_exceeded", self.handle_storage_quota_exceeded)
        users_in.on("user.deleted", self.handle_user_deleted)

        subscriptions_in = Dispatcher(app, dead_letters)
        subscriptions_in.on(catalog.SUBSCRIPTION_ORDER_INDEX, self.handle_subscription_index_update)
        subscriptions_in.on("subscription.created", self.handle_subscription_created)
        subscriptions_in.on("subscription.canceled", self.handle_subscription_canceled)

        for name, dispatcher in (
            ("order_events", orders_in),
            ("user_order_events", users_in),
            ("subscription_order_events", subscriptions_in),
        ):
            app.agent(dispatcher.source(), name=name)(_consume_with(dispatcher))

    # ------------------------------------------------------------------
    # Publishing and applying decisions

    def _event(self, emission: Emission, cause: Mapping[str, Any], at_ms: int) -> dict[str, Any]:
        return new_event(
            emission.topic, emission.payload, producer=ORDER_SERVICE, cause=cause, now_ms=at_ms,
            event_id=derived_id(cause["event_id"], emission.topic, emission.discriminator),
        )

    async def publish(
        self,
        events: Iterable[dict[str, Any]],
        records: Iterable[tuple[Any, str, dict[str, Any]]] = (),
    ) -> None:
        """Send events (and internal ``(topic, key, value)`` records), then wait for every ack.

        Everything is handed to the producer before the first wait, so one
        round trip to the broker covers all of them.
        """
        pending = []
        for event in events:
            topic = event["event_type"]
            pending.append(await self.app.event_topic(topic).send(
                key=catalog.record_key(topic, event), value=event,
            ))
        for topic, key, value in records:
            pending.append(await topic.send(key=key, value=value))
        for fut in pending:
            await fut

    async def apply(
        self,
        order_id: str,
        decide: Callable[[Order | None, int], Decision],
        cause: Mapping[str, Any],
        *,
        first: Iterable[dict[str, Any]] = (),
    ) -> Order | None:
        """Decide on the current row, publish what it emits, then store the row.

        ``first`` are events to publish before the decision's own (the
        order.created of a create command).
        """
        at = now_ms()
        row = self.orders.get(order_id)
        current = Order.from_dict(row) if row is not None else None
        decision = decide(current, at)
        if decision.duplicate:
            return current
        events = [*first, *(self._event(e, cause, at) for e in decision.emit)]
        updated = decision.order
        index_updates = self._index_updates(current, updated)
        await self.publish(events, index_updates)
        if updated is not None:
            self.orders[order_id] = updated.to_dict()
        if decision.deadline_cleared is not None:
            self.deadlines.cancel(order_id, decision.deadline_cleared)
        if decision.deadline_set is not None:
            self.deadlines.schedule(order_id, decision.deadline_set)
        return updated if updated is not None else current

    def _index_updates(
        self, before: Order | None, after: Order | None
    ) -> list[tuple[Any, str, dict[str, Any]]]:
        if after is None:
            return []
        summary = order_state.order_summary(after)
        if before is not None and order_state.order_summary(before) == summary:
            return []
        update = {"order": summary, "version": after.updated_at_ms, "user_id": after.user_id}
        updates = [(self.user_index, after.user_id, update)]
        if after.subscription_id:
            updates.append((self.subscription_index, after.subscription_id, update))
        return updates

    # ------------------------------------------------------------------
    # Order-keyed inputs (agent ``order_events``)

    async def handle_order_command(self, command: dict[str, Any], event: EventT) -> None:
        """Commands from the API, the fan-out handlers and the payment timer."""
        command_id = str(command.get("command_id") or "")
        try:
            order = await self._apply_command(command)
        except Exception as exc:
            self.replies.fail(command_id, CommandRejected(exc))
            raise
        self.replies.resolve(command_id, order)

    async def _apply_command(self, command: dict[str, Any]) -> Order | None:
        name, order_id = command.get("command"), command.get("order_id")
        if not isinstance(order_id, str) or not order_id:
            raise order_state.InvalidCommand("command without an order_id", field="order_id")
        args = command.get("args") or {}
        if not isinstance(args, dict):
            raise order_state.InvalidCommand("command args must be an object", field="args")
        cause = {"event_id": command.get("command_id"), "correlation_id": command.get("correlation_id")}
        if name == "create":
            return await self._create(order_id, args, cause)
        verb = {"command_id": command.get("command_id"), "command": name, "order_id": order_id, **args}
        return await self.apply(
            order_id, lambda order, at: order_state.apply_command(order, verb, at), cause,
        )

    async def _create(
        self, order_id: str, args: Mapping[str, Any], cause: Mapping[str, Any]
    ) -> Order | None:
        """create: publish order.created and store the new PENDING order."""
        row = self.orders.get(order_id)
        created = new_event(
            "order.created", {"order_id": order_id, **args}, producer=ORDER_SERVICE, cause=cause,
            event_id=derived_id(cause["event_id"], "order.created"),
        )
        if row is not None and created["event_id"] in row.get("applied_event_ids", ()):
            return Order.from_dict(row)  # this create was applied already
        return await self.apply(
            order_id,
            lambda order, at: order_state.on_order_created(order, created, at, self.window_ms),
            cause,
            first=[created],
        )

    async def handle_payment_intent_created(self, event: dict[str, Any], _: EventT) -> None:
        """payment.intent.created for an order: PAYMENT_PENDING, order.payment_pending."""
        if not event.get("order_id"):
            return  # an intent outside any order (a subscription invoice): not ours
        await self.apply(event["order_id"], _decide(order_state.on_payment_intent_created, event), event)

    async def handle_payment_completed(self, event: dict[str, Any], _: EventT) -> None:
        """payment.completed: complete the order, publish order.completed."""
        if not event.get("order_id"):
            return
        await self.apply(event["order_id"], _decide(order_state.on_payment_completed, event), event)

    async def handle_payment_failed(self, event: dict[str, Any], _: EventT) -> None:
        """payment.failed: cancel the order with the payment error as its reason."""
        if not event.get("order_id"):
            return
        await self.apply(event["order_id"], _decide(order_state.on_payment_failed, event), event)

    async def handle_payment_refunded(self, event: dict[str, Any], _: EventT) -> None:
        """payment.refunded: (partially) refunded status and amount, order.refunded."""
        if not event.get("order_id"):
            return
        await self.apply(event["order_id"], _decide(order_state.on_payment_refunded, event), event)

    async def on_payment_deadline(self, order_id: str, deadline_ms: int) -> None:
        """The timer found a due payment deadline: ask the order's owner to expire it."""
        command = make_command(
            "expire", order_id, cause=None, command_id=derived_id("expire", order_id, deadline_ms),
        )
        await self.commands.send(key=order_id, value=command)

    # ------------------------------------------------------------------
    # User-keyed inputs (agent ``user_order_events``)

    async def handle_user_index_update(self, update: dict[str, Any], _: EventT) -> None:
        """Keep the user -> orders index (newest summary of each order wins)."""
        _merge_index(self.user_orders, update["user_id"], update)

    async def handle_wallet_credits_added(self, event: dict[str, Any], _: EventT) -> None:
        """wallet.credits_added: fulfil the user's paid wallet top-up orders."""
        user_id = event["user_id"]
        if not self._first_time(self.user_orders, user_id, event["event_id"]):
            return
        if event.get("order_id"):
            targets = [event["order_id"]]
        else:
            targets = [
                summary["order_id"]
                for summary in _index_orders(self.user_orders, user_id)
                if summary["order_type"] == "WALLET_TOPUP"
                and summary["status"] == order_state.OrderStatus.COMPLETED
            ]
        details = {"wallet_id": event["wallet_id"], "credited_amount": str(event["amount"]),
                   "currency": event["currency"]}
        if event.get("transaction_id"):
            details["transaction_id"] = event["transaction_id"]
        for order_id in targets:
            await self._send_command(make_command(
                "fulfill", order_id, cause=event, fulfillment_details=details,
            ))

    async def handle_storage_quota_exceeded(self, event: dict[str, Any], _: EventT) -> None:
        """storage.quota_exceeded: create the storage upgrade order storage_service suggests."""
        user_id = event["user_id"]
        # Validate before marking the event seen: a refused event goes to the
        # dead letters and may be replayed from there once it is mended.
        if event.get("suggested_product_id") is None or event.get("suggested_amount") is None:
            raise order_state.InvalidCommand(
                "storage.quota_exceeded without suggested_product_id and suggested_amount: "
                "no upgrade order can be priced", field="suggested_amount",
            )
        if event.get("currency") is None:
            # Refuse the event itself: a create command without a currency would be
            # dead-lettered later, on the command topic, far from its cause.
            raise order_state.InvalidCommand(
                "storage.quota_exceeded with a suggested_amount but no currency: "
                "no upgrade order can be priced", field="currency",
            )
        if not self._first_time(self.user_orders, user_id, event["event_id"]):
            return
        amount = int(event["suggested_amount"])
        order_id = derived_id(event["event_id"], "storage-upgrade-order")
        await self._send_command(make_command(
            "create", order_id, cause=event,
            user_id=user_id, order_type="STORAGE_UPGRADE", total_amount=amount,
            currency=event["currency"],
            items=[{"product_id": event["suggested_product_id"], "quantity": 1,
                    "unit_amount": amount, "description": "storage upgrade"}],
        ))

    async def handle_user_deleted(self, event: dict[str, Any], _: EventT) -> None:
        """user.deleted: cancel all of the user's unpaid orders."""
        user_id = event["user_id"]
        if not self._first_time(self.user_orders, user_id, event["event_id"]):
            return
        for summary in _index_orders(self.user_orders, user_id):
            if summary["status"] in order_state.OPEN_STATUSES:
                await self._send_command(make_command(
                    "cancel", summary["order_id"], cause=event, reason="USER_DELETED",
                    detail=event.get("reason") or "user deleted", if_open=True,
                ))

    # ------------------------------------------------------------------
    # Subscription-keyed inputs (agent ``subscription_order_events``)

    async def handle_subscription_index_update(self, update: dict[str, Any], _: EventT) -> None:
        """Keep the subscription -> orders index."""
        _merge_index(self.subscription_orders, update["order"]["subscription_id"], update)

    async def handle_subscription_created(self, event: dict[str, Any], _: EventT) -> None:
        """subscription.created: create the subscription's recurring order record."""
        subscription_id = event["subscription_id"]
        if not self._first_time(self.subscription_orders, subscription_id, event["event_id"]):
            return
        amount = event.get("amount") or 0  # metered plans have no fixed price: a zero-amount record
        order_id = derived_id(event["event_id"], "subscription-order")
        await self._send_command(make_command(
            "create", order_id, cause=event,
            user_id=event["user_id"], order_type="SUBSCRIPTION", total_amount=amount,
            currency=event.get("currency") or "USD", subscription_id=subscription_id,
            items=[{"product_id": event["plan_id"], "quantity": 1, "unit_amount": amount,
                    "description": "subscription"}],
        ))

    async def handle_subscription_canceled(self, event: dict[str, Any], _: EventT) -> None:
        """subscription.canceled: cancel that subscription's unpaid orders."""
        subscription_id = event["subscription_id"]
        if not self._first_time(self.subscription_orders, subscription_id, event["event_id"]):
            return
        for summary in _index_orders(self.subscription_orders, subscription_id):
            if summary["status"] in order_state.OPEN_STATUSES:
                await self._send_command(make_command(
                    "cancel", summary["order_id"], cause=event, reason="SUBSCRIPTION_CANCELED",
                    detail=event.get("comment") or f"subscription {subscription_id} canceled",
                    if_open=True,
                ))

    # ------------------------------------------------------------------

    async def _send_command(self, command: dict[str, Any]) -> None:
        fut = await self.commands.send(key=command["order_id"], value=command)
        await fut

    @staticmethod
    def _first_time(table: Any, key: str, event_id: str) -> bool:
        """Record ``event_id`` on the index row; False when it was applied before.

        Marked before the commands go out: a crash in between re-processes
        the event, and the commands it re-sends carry the same derived ids.
        """
        row = dict(table.get(key) or {"orders": {}, "applied": []})
        applied = list(row.get("applied", []))
        if event_id in applied:
            return False
        applied.append(event_id)
        row["applied"] = applied[-MAX_INDEX_APPLIED:]
        table[key] = row
        return True


def _decide(
    decision: Callable[[Order | None, Mapping[str, Any], int], Decision], event: Mapping[str, Any]
) -> Callable[[Order | None, int], Decision]:
    return lambda order, at: decision(order, event, at)


def _merge_index(table: Any, key: str, update: Mapping[str, Any]) -> None:
    row = dict(table.get(key) or {"orders": {}, "applied": []})
    orders = dict(row.get("orders", {}))
    summary = update["order"]
    known = orders.get(summary["order_id"])
    if known is not None and known.get("version", 0) > update["version"]:
        return  # an older summary arriving late
    orders[summary["order_id"]] = {**summary, "version": update["version"]}
    row["orders"] = orders
    table[key] = row


def _index_orders(table: Any, key: str) -> list[dict[str, Any]]:
    return list((table.get(key) or {}).get("orders", {}).values())


def _consume_with(dispatcher: Dispatcher) -> Callable[[Any], Any]:
    async def consume(stream: Any) -> None:
        async for event in stream.events():
            await dispatcher.dispatch(event)

    return consume


def register(app: Any) -> OrderService:
    """Declare the order domain on ``app`` (and its web API)."""
    from agents.orders_api import register_routes

    service = OrderService(app)
    app.orders = service
    register_routes(app, service)
    return service
