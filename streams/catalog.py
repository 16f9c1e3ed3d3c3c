"""The topic catalog: the one place paystream names its event topics.

Every topic, its record key, its partitioning and retention, who writes it and
who reads it is declared here once; the Faust app, the admin tooling, the
ingress, the registry tooling and the README table look topics up here rather
than spelling names themselves.  Each topic has an Avro contract of the same
name in ``schemas/avro`` (the tests hold the two sets equal), and its short
description is the first sentence of that contract's doc, so the two cannot
drift apart.

Producers and consumers are the seed's services (``seed/payment-order-
architecture.md``): a topic's consumers are its "Subscribers" column plus the
paystream services whose "Should Subscribe To" table lists it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from schemas.contracts import schema_dict, schema_file
from streams.admin import TopicSettings

#: Partitions of every event topic.  One number for all of them, because a
#: stateful agent that reads several topics needs them co-partitioned (same
#: key -> same partition number in each); changing it later moves keys, so it
#: is fixed here rather than chosen per topic.
EVENT_PARTITIONS = 4

#: Retention of every event topic: 7 days, enough to replay a week of history
#: into a rebuilt consumer; state that must outlive it lives in changelogs.
EVENT_RETENTION_MS = 7 * 24 * 60 * 60 * 1000

#: Retention of the raw Stripe events: a year.  They are the audit log of
#: every webhook and the replay source of payment state; Stripe itself keeps
#: events for 30 days only.
STRIPE_EVENTS_RETENTION_MS = 365 * 24 * 60 * 60 * 1000

#: Replication factor on the single-broker development cluster.
DEV_REPLICATION_FACTOR = 1

PAYMENT_SERVICE = "payment_service"
ORDER_SERVICE = "order_service"

#: The services built in this project; a topic produced by anything else is
#: inbound (its schema is ours, its producer is not).
PAYSTREAM_SERVICES = frozenset({PAYMENT_SERVICE, ORDER_SERVICE})

CleanupPolicy = Literal["delete", "compact"]


class UnknownTopic(KeyError):
    """Raised for a topic name the catalog does not declare.

    A ``KeyError`` so mapping-style callers catch it as usual; the message
    names the topic (a ``KeyError``'s default text would only repeat it).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.message = f"topic {name!r} is not in the paystream catalog (streams/catalog.py)"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class TopicSpec:
    """Everything paystream declares about one topic."""

    name: str
    #: Event fields the record key is taken from, in order of preference: the
    #: key is the first of them that is set (see :func:`record_key`).
    key_fields: tuple[str, ...]
    partitions: int
    cleanup_policy: CleanupPolicy
    #: Retention in milliseconds, -1 for unlimited.
    retention_ms: int
    #: Service that writes the topic.
    producer: str
    #: Services that read the topic.
    consumers: tuple[str, ...]
    #: True when the producer is a service outside this project.
    inbound: bool
    description: str

    def __post_init__(self) -> None:
        if not self.key_fields:
            raise ValueError(f"{self.name}: a topic needs at least one key field")
        if self.partitions < 1:
            raise ValueError(f"{self.name}: partitions must be >= 1, not {self.partitions}")
        if self.cleanup_policy not in ("delete", "compact"):
            raise ValueError(f"{self.name}: unknown cleanup policy {self.cleanup_policy!r}")
        if self.retention_ms != -1 and self.retention_ms <= 0:
            raise ValueError(f"{self.name}: retention_ms must be > 0 or -1")

    @property
    def value_subject(self) -> str:
        """The registry subject of the topic's values (TopicNameStrategy)."""
        return value_subject(self.name)

    @property
    def schema_file(self) -> str:
        """Path of the topic's Avro contract, relative to the repository root."""
        return schema_file(self.name)

    def settings(
        self,
        *,
        partitions_override: int | None = None,
        name_prefix: str = "",
        replication_factor: int = DEV_REPLICATION_FACTOR,
    ) -> TopicSettings:
        """What :func:`streams.admin.ensure_topics` creates this topic with."""
        return TopicSettings(
            name=f"{name_prefix}{self.name}",
            partitions=self.partitions if partitions_override is None else partitions_override,
            replication_factor=replication_factor,
            config={
                "cleanup.policy": self.cleanup_policy,
                "retention.ms": str(self.retention_ms),
            },
        )


_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z])")


def _summary(topic: str) -> str:
    """First sentence of the contract's record doc: the topic's short description."""
    doc = " ".join(schema_dict(topic)["doc"].split())
    return _SENTENCE_END.split(doc, maxsplit=1)[0]


def _event_topic(
    name: str,
    key_fields: tuple[str, ...],
    producer: str,
    consumers: tuple[str, ...],
) -> TopicSpec:
    return TopicSpec(
        name=name,
        key_fields=key_fields,
        partitions=EVENT_PARTITIONS,
        cleanup_policy="delete",
        retention_ms=EVENT_RETENTION_MS,
        producer=producer,
        consumers=consumers,
        inbound=producer not in PAYSTREAM_SERVICES,
        description=_summary(name),
    )


_ORDER = ("order_id",)
_SUBSCRIPTION = ("subscription_id",)
_INVOICE = ("invoice_id",)
_USER = ("user_id",)

_TOPICS = (
    # payment_service publishes.  Payments that belong to an order are keyed by
    # it (the order agent reads them with order.*), the others by their own id.
    _event_topic("payment.completed", ("order_id", "payment_intent_id"), PAYMENT_SERVICE,
                 ("order_service", "wallet_service", "billing_service")),
    _event_topic("payment.failed", ("order_id", "payment_intent_id"), PAYMENT_SERVICE,
                 ("order_service", "notification_service")),
    _event_topic("payment.refunded", ("order_id", "payment_id"), PAYMENT_SERVICE,
                 ("order_service", "wallet_service", "notification_service")),
    _event_topic("payment.intent.created", ("order_id", "payment_intent_id"), PAYMENT_SERVICE,
                 ("billing_service", "analytics_service")),
    _event_topic("subscription.created", _SUBSCRIPTION, PAYMENT_SERVICE,
                 ("product_service", "billing_service", "order_service")),
    _event_topic("subscription.canceled", _SUBSCRIPTION, PAYMENT_SERVICE,
                 ("product_service", "notification_service", "order_service")),
    _event_topic("subscription.updated", _SUBSCRIPTION, PAYMENT_SERVICE,
                 ("product_service", "billing_service")),
    _event_topic("subscription.expired", _SUBSCRIPTION, PAYMENT_SERVICE,
                 ("product_service", "notification_service")),
    _event_topic("subscription.payment_failed", _SUBSCRIPTION, PAYMENT_SERVICE,
                 ("notification_service", "billing_service")),
    _event_topic("invoice.created", _INVOICE, PAYMENT_SERVICE,
                 ("billing_service", "notification_service")),
    _event_topic("invoice.paid", _INVOICE, PAYMENT_SERVICE,
                 ("billing_service", "accounting_service")),
    _event_topic("invoice.overdue", _INVOICE, PAYMENT_SERVICE,
                 ("notification_service", "billing_service")),
    # order_service publishes.
    _event_topic("order.created", _ORDER, ORDER_SERVICE,
                 ("payment_service", "inventory_service", "notification_service")),
    _event_topic("order.updated", _ORDER, ORDER_SERVICE,
                 ("payment_service", "notification_service")),
    _event_topic("order.canceled", _ORDER, ORDER_SERVICE,
                 ("payment_service", "wallet_service", "notification_service")),
    _event_topic("order.completed", _ORDER, ORDER_SERVICE,
                 ("wallet_service", "analytics_service", "notification_service")),
    _event_topic("order.expired", _ORDER, ORDER_SERVICE,
                 ("payment_service", "notification_service")),
    _event_topic("order.payment_pending", _ORDER, ORDER_SERVICE,
                 ("payment_service", "notification_service")),
    _event_topic("order.refunded", _ORDER, ORDER_SERVICE,
                 ("payment_service", "wallet_service", "accounting_service")),
    _event_topic("order.fulfilled", _ORDER, ORDER_SERVICE,
                 ("storage_service", "notification_service")),
    # Inbound: produced by services outside paystream, read by ours.
    _event_topic("wallet.balance_changed", _USER, "wallet_service", (PAYMENT_SERVICE,)),
    _event_topic("wallet.insufficient_funds", _USER, "wallet_service", (PAYMENT_SERVICE,)),
    _event_topic("wallet.credits_added", _USER, "wallet_service", (ORDER_SERVICE,)),
    _event_topic("subscription.usage_exceeded", _SUBSCRIPTION, "product_service",
                 (PAYMENT_SERVICE,)),
    _event_topic("storage.quota_exceeded", _USER, "storage_service", (ORDER_SERVICE,)),
    _event_topic("user.deleted", _USER, "account_service", (PAYMENT_SERVICE, ORDER_SERVICE)),
    _event_topic("user.upgraded", _USER, "account_service", (PAYMENT_SERVICE,)),
)

#: Topic name -> its declaration, in the order above (payment, order, inbound).
CATALOG: Mapping[str, TopicSpec] = MappingProxyType({spec.name: spec for spec in _TOPICS})


@dataclass(frozen=True)
class InternalTopicSpec:
    """A topic paystream uses only inside itself: no Avro contract, no outside reader.

    Commands and index updates are JSON (they are our own plumbing and change
    with the code); dead letters are the original bytes.  Event topics stay
    the only contracts.
    """

    name: str
    #: What the record key is.
    key: str
    partitions: int
    cleanup_policy: CleanupPolicy
    retention_ms: int
    description: str
    #: The field that identifies a record, for idempotency (a Stripe event's
    #: ``id``); None for our own records (commands carry ``command_id``).
    id_field: str | None = None

    def settings(self, *, name_prefix: str = "",
                 replication_factor: int = DEV_REPLICATION_FACTOR) -> TopicSettings:
        return TopicSettings(
            name=f"{name_prefix}{self.name}",
            partitions=self.partitions,
            replication_factor=replication_factor,
            config={"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms)},
        )


#: Stripe events exactly as Stripe signed them, written by the webhook ingress.
STRIPE_EVENTS = "stripe.events"
ORDER_COMMANDS = "paystream.order-commands"
PAYMENT_COMMANDS = "paystream.payment-commands"
USER_PAYMENT_INDEX = "paystream.user-payment-index"
PAYMENT_INTENT_LINKS = "paystream.payment-intent-links"
USER_ORDER_INDEX = "paystream.user-order-index"
SUBSCRIPTION_ORDER_INDEX = "paystream.subscription-order-index"
SUBSCRIPTION_COMMANDS = "paystream.subscription-commands"
USER_SUBSCRIPTION_INDEX = "paystream.user-subscription-index"
INVOICE_COMMANDS = "paystream.invoice-commands"
DEAD_LETTERS = "paystream.dead-letters"

#: Internal topics; keyed ones are co-partitioned with the event topics.
INTERNAL_TOPICS: Mapping[str, InternalTopicSpec] = MappingProxyType({
    spec.name: spec
    for spec in (
        InternalTopicSpec(
            STRIPE_EVENTS, "the Stripe PaymentIntent the event is about, else its object's id",
            EVENT_PARTITIONS, "delete", STRIPE_EVENTS_RETENTION_MS,
            "Every Stripe webhook the ingress accepted, byte for byte as Stripe signed it, with "
            "the Stripe event id, type, api version and account in headers: the audit log of "
            "what Stripe said and the source a payment state is rebuilt from. Read by the "
            "payment agent (handle_stripe_webhook).",
            id_field="id",
        ),
        InternalTopicSpec(
            PAYMENT_COMMANDS, "order_id (the payment's key)", EVENT_PARTITIONS, "delete",
            EVENT_RETENTION_MS,
            "Commands for one payment: refunds from the API, Stripe facts re-keyed from "
            "stripe.events, retries after a wallet top-up; read by the payment agent with "
            "order.*.",
        ),
        InternalTopicSpec(
            PAYMENT_INTENT_LINKS, "payment_intent_id", EVENT_PARTITIONS, "delete",
            EVENT_RETENTION_MS,
            "The order (and user) of each PaymentIntent paystream opens, for the intent "
            "index that re-keys Stripe's webhooks to their payment.",
        ),
        InternalTopicSpec(
            USER_PAYMENT_INDEX, "user_id", EVENT_PARTITIONS, "delete", EVENT_RETENTION_MS,
            "Repartition of retryable payments by user_id, feeding the user -> payments index "
            "that wallet.balance_changed retries.",
        ),
        InternalTopicSpec(
            ORDER_COMMANDS, "order_id", EVENT_PARTITIONS, "delete", EVENT_RETENTION_MS,
            "Commands for one order (create, cancel, fulfill, update, expire) from the API, "
            "the index agents and the expiry timer; read by the order agent with order.* and "
            "payment.*.",
        ),
        InternalTopicSpec(
            USER_ORDER_INDEX, "user_id", EVENT_PARTITIONS, "delete", EVENT_RETENTION_MS,
            "Repartition of order summaries by user_id, feeding the user -> orders index.",
        ),
        InternalTopicSpec(
            SUBSCRIPTION_ORDER_INDEX, "subscription_id", EVENT_PARTITIONS, "delete",
            EVENT_RETENTION_MS,
            "Repartition of subscription orders by subscription_id, feeding the "
            "subscription -> orders index.",
        ),
        InternalTopicSpec(
            SUBSCRIPTION_COMMANDS, "subscription_id (Stripe's sub_ id)", EVENT_PARTITIONS,
            "delete", EVENT_RETENTION_MS,
            "Commands for one subscription: Stripe facts re-keyed from stripe.events, the "
            "subscription paystream just opened at Stripe, cancels from the API, and the "
            "per-subscription work of the user fan-outs (user.deleted, user.upgraded, "
            "wallet.insufficient_funds); read by the subscription agent with "
            "subscription.usage_exceeded.",
        ),
        InternalTopicSpec(
            USER_SUBSCRIPTION_INDEX, "user_id", EVENT_PARTITIONS, "delete", EVENT_RETENTION_MS,
            "Commands for one user's subscriptions (create_subscription from the API) and "
            "repartitioned subscription summaries, feeding the user -> subscriptions index "
            "that user.deleted, user.upgraded and wallet.insufficient_funds fan out from.",
        ),
        InternalTopicSpec(
            INVOICE_COMMANDS, "invoice_id (Stripe's in_ id)", EVENT_PARTITIONS, "delete",
            EVENT_RETENTION_MS,
            "Commands for one invoice: Stripe facts re-keyed from stripe.events and the "
            "invoices paystream opens at Stripe (usage overage); read by the invoice agent.",
        ),
        InternalTopicSpec(
            DEAD_LETTERS, "the original record's key", EVENT_PARTITIONS, "delete",
            30 * 24 * 60 * 60 * 1000,
            "Records an agent could not decode or apply: original bytes, with the error and "
            "source topic/partition/offset in headers. Kept 30 days for replay.",
        ),
    )
})


def internal_topic_settings(name_prefix: str = "") -> list[TopicSettings]:
    """Creation settings of the internal topics (the event topics' are :func:`topic_settings`)."""
    return [spec.settings(name_prefix=name_prefix) for spec in INTERNAL_TOPICS.values()]


def id_field(name: str) -> str:
    """The field that identifies a record of topic ``name`` (events: ``event_id``)."""
    internal = INTERNAL_TOPICS.get(name)
    return (internal.id_field if internal is not None else None) or "event_id"


def topic_spec(name: str) -> TopicSpec:
    """The declaration of topic ``name``; :class:`UnknownTopic` if there is none."""
    try:
        return CATALOG[name]
    except KeyError:
        raise UnknownTopic(name) from None


def value_subject(name: str) -> str:
    """Registry subject of topic ``name``'s values: ``<topic>-value`` (TopicNameStrategy).

    A pure naming rule, so it also names the subjects of prefixed test copies
    of catalog topics (``t-abc-order.created-value``); it does not look the
    topic up.
    """
    if not name:
        raise ValueError("a subject needs a topic name")
    return f"{name}-value"


def record_key(name: str, event: Mapping[str, Any]) -> str:
    """The Kafka record key of ``event`` on topic ``name``.

    The first of the topic's key fields that is set (not None, not empty) in
    the event; e.g. a ``payment.completed`` is keyed by its ``order_id`` and,
    for a payment outside any order, by its ``payment_intent_id``.  Every
    producer keys through here, so all events of one aggregate land on one
    partition.  Raises ``ValueError`` naming the topic and the fields when
    none of them is set: an unkeyed event would be spread over partitions and
    break per-aggregate ordering, so it is refused rather than sent.
    """
    spec = topic_spec(name)
    for field in spec.key_fields:
        value = event.get(field)
        if value is not None and value != "":
            return str(value)
    raise ValueError(
        f"{name}: event has no record key: none of the key fields "
        f"{', '.join(spec.key_fields)} is set"
    )


def topic_settings(
    partitions_override: int | None = None,
    name_prefix: str = "",
    *,
    replication_factor: int = DEV_REPLICATION_FACTOR,
) -> list[TopicSettings]:
    """Creation settings of every catalog topic, for :func:`streams.admin.ensure_topics`.

    ``name_prefix`` and ``partitions_override`` let tests create private,
    smaller copies of the whole catalog on the shared broker.
    """
    return [
        spec.settings(
            partitions_override=partitions_override,
            name_prefix=name_prefix,
            replication_factor=replication_factor,
        )
        for spec in CATALOG.values()
    ]


def _key_text(spec: TopicSpec) -> str:
    return ", else ".join(spec.key_fields)


def render_markdown_table() -> str:
    """The README's topic table, generated so the README cannot drift from the catalog."""
    lines = [
        "| topic | key | partitions | producer | consumers | schema file |",
        "|---|---|---|---|---|---|",
    ]
    for spec in CATALOG.values():
        producer = f"{spec.producer} (external)" if spec.inbound else spec.producer
        lines.append(
            f"| `{spec.name}` | {_key_text(spec)} | {spec.partitions} | {producer} "
            f"| {', '.join(spec.consumers)} | [{spec.schema_file}]({spec.schema_file}) |"
        )
    return "\n".join(lines) + "\n"


def _plain_table() -> str:
    header = ("TOPIC", "KEY", "PARTS", "RETENTION", "PRODUCER", "CONSUMERS")
    rows = [header]
    for spec in CATALOG.values():
        retention = "forever" if spec.retention_ms == -1 else f"{spec.retention_ms // 3_600_000}h"
        producer = f"{spec.producer}*" if spec.inbound else spec.producer
        rows.append(
            (
                spec.name,
                _key_text(spec),
                str(spec.partitions),
                f"{spec.cleanup_policy}/{retention}",
                producer,
                ", ".join(spec.consumers),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  "
        + row[-1]
        for row in rows
    ]
    lines.append("* produced outside paystream (inbound)")
    return "\n".join(lines) + "\n"


def print_topics(markdown: bool) -> None:
    """Print the catalog (``paystream topics``): aligned text, or the README's Markdown table."""
    print(render_markdown_table() if markdown else _plain_table(), end="")
