"""The closed-loop order driver: plays the order API and the payment service.

It runs in a process of its own (:func:`driver_main`, spawned by the bench),
never inside the process it measures.  Per order lifecycle it sends three
inputs and waits for each one's output before sending the next:

1. a ``create`` command (JSON) on ``paystream.order-commands`` -> order.created;
2. then ``payment.intent.created`` (Confluent Avro) -> order.payment_pending;
3. then ``payment.completed`` (Confluent Avro) -> order.completed: done.

``concurrency`` lifecycles are in flight at any time.  The clock starts at
the first completed lifecycle; after ``warmup`` seconds the measured window
of ``duration`` seconds begins: every output seen in it counts as one input
processed, and every lifecycle completed in it gives one latency.  Then no
new lifecycle starts and the ones in flight are drained.

The same driver, with the same inputs, drives our worker and both raw loops:
only the topic prefix differs.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
import uuid
from typing import Any

from streams import catalog
from streams.devtools.bench.common import (
    AMOUNT,
    CURRENCY,
    Stalled,
    assigned_consumer,
    create_command,
    produce,
    producer,
)
from streams.settings import Settings

INPUTS_PER_LIFECYCLE = 3


@dataclasses.dataclass(frozen=True)
class DriverSpec:
    settings: Settings  # topic prefix and registry of the side under test
    concurrency: int
    warmup: float
    duration: float
    start_timeout: float = 180.0
    stall_after: float = 60.0
    drain_timeout: float = 60.0

    def topic(self, name: str) -> str:
        return self.settings.topic(name)


def driver_main(spec: DriverSpec, conn: Any) -> None:
    """Child-process entry: run the driver, send its result (or its error) back."""
    try:
        conn.send(drive(spec))
    except BaseException as exc:  # report, never leave the parent waiting
        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


class _PaymentEvents:
    """payment.intent.created and payment.completed as payment_service writes them."""

    def __init__(self, spec: DriverSpec) -> None:
        from schemas import contracts
        from streams.codec import SchemaCache

        self.intents = spec.topic("payment.intent.created")
        self.payments = spec.topic("payment.completed")
        ids = SchemaCache(spec.settings.schema_registry_url).resolve(
            {self.intents: "payment.intent.created", self.payments: "payment.completed"})
        self._schemas = {
            self.intents: (contracts.parsed_schema("payment.intent.created"), ids[self.intents]),
            self.payments: (contracts.parsed_schema("payment.completed"), ids[self.payments]),
        }

    def encode(self, topic: str, order_id: str, user_id: str, correlation_id: str) -> bytes:
        from streams.codec import encode

        schema, schema_id = self._schemas[topic]
        return encode(schema, schema_id, {
            "event_id": str(uuid.uuid4()), "event_type": _event_type(topic),
            "occurred_at": time.time_ns() // 1_000_000, "producer": catalog.PAYMENT_SERVICE,
            "correlation_id": correlation_id, "causation_id": None, "schema_version": 1,
            "payment_intent_id": f"pi_{order_id}", "order_id": order_id, "user_id": user_id,
            "amount": AMOUNT, "currency": CURRENCY,
        })


def _event_type(topic: str) -> str:
    for name in ("payment.intent.created", "payment.completed"):
        if topic.endswith(name):
            return name
    raise ValueError(topic)


def drive(spec: DriverSpec) -> dict[str, Any]:
    commands = spec.topic(catalog.ORDER_COMMANDS)
    created_topic = spec.topic("order.created")
    pending_topic = spec.topic("order.payment_pending")
    completed_topic = spec.topic("order.completed")
    payments = _PaymentEvents(spec)
    consumer = assigned_consumer(spec.settings, [created_topic, pending_topic, completed_topic])
    client = producer(spec.settings, "bench-driver")
    run = uuid.uuid4().hex[:8]
    sent = {commands: 0, payments.intents: 0, payments.payments: 0}
    # order id -> [stage, create sent, created seen, pending seen, user id, correlation id]
    flight: dict[str, list[Any]] = {}
    index = 0
    began = time.perf_counter()
    first_done: float | None = None
    window_start = window_end = float("inf")
    outputs_in_window = lifecycles_in_window = duplicates = 0
    end_to_end: list[float] = []
    hops: dict[str, list[float]] = {"create": [], "intent": [], "payment": []}
    last_output = time.perf_counter()
    cpu = time.process_time()
    try:
        while True:
            now = time.perf_counter()
            issuing = now < window_end
            while issuing and len(flight) < spec.concurrency:
                order_id = f"o-{run}-{index:08d}"
                user_id = f"u-{run}-{index}"
                correlation = str(uuid.uuid4())
                produce(client, commands, order_id.encode(), create_command(order_id, user_id))
                flight[order_id] = [0, time.perf_counter(), 0.0, 0.0, user_id, correlation]
                sent[commands] += 1
                index += 1
            client.poll(0)
            if not issuing and not flight:
                break
            messages = consumer.consume(1000, 0.005)
            now = time.perf_counter()
            counting = window_start <= now < window_end
            for message in messages:
                if message.error() is not None or message.key() is None:
                    continue
                state = flight.get(message.key().decode())
                topic = message.topic()
                if state is None:
                    duplicates += 1
                    continue
                order_id = message.key().decode()
                if topic == created_topic and state[0] == 0:
                    state[0], state[2] = 1, now
                    produce(client, payments.intents, message.key(),
                            payments.encode(payments.intents, order_id, state[4], state[5]))
                    sent[payments.intents] += 1
                    if counting:
                        hops["create"].append(now - state[1])
                elif topic == pending_topic and state[0] == 1:
                    state[0], state[3] = 2, now
                    produce(client, payments.payments, message.key(),
                            payments.encode(payments.payments, order_id, state[4], state[5]))
                    sent[payments.payments] += 1
                    if counting:
                        hops["intent"].append(now - state[2])
                elif topic == completed_topic and state[0] == 2:
                    del flight[order_id]
                    if counting:
                        hops["payment"].append(now - state[3])
                        end_to_end.append(now - state[1])
                        lifecycles_in_window += 1
                    if first_done is None:
                        first_done = now
                        window_start = now + spec.warmup
                        window_end = window_start + spec.duration
                else:
                    duplicates += 1
                    continue
                last_output = now
                if counting:
                    outputs_in_window += 1
            if first_done is None and now - began > spec.start_timeout:
                raise Stalled(f"no lifecycle completed within {spec.start_timeout:.0f} s "
                              f"({_stages(flight)})")
            if now - last_output > spec.stall_after and first_done is not None:
                raise Stalled(f"no output for {spec.stall_after:.0f} s ({_stages(flight)})")
            if now > window_end + spec.drain_timeout:
                raise Stalled(f"{len(flight)} lifecycles still in flight {spec.drain_timeout:.0f} s "
                              f"after the window ({_stages(flight)})")
        client.flush(30)
    finally:
        consumer.close()
    ms = [1000.0 * s for s in end_to_end]
    return {
        "inputs_per_s": outputs_in_window / spec.duration,
        "lifecycles_per_s": lifecycles_in_window / spec.duration,
        "outputs_in_window": outputs_in_window,
        "lifecycles_in_window": lifecycles_in_window,
        "duration": spec.duration,
        "warmup": spec.warmup,
        "waited_for_first": (first_done or now) - began,
        "end_to_end_ms": ms,
        "hops_ms": {name: [1000.0 * s for s in values] for name, values in hops.items()},
        "sent": sent,
        "inputs_total": sum(sent.values()),
        "lifecycles_total": index,
        "duplicates": duplicates,
        "cpu_s": time.process_time() - cpu,
    }


def _stages(flight: dict[str, list[Any]]) -> str:
    counts = [0, 0, 0]
    for state in flight.values():
        counts[state[0]] += 1
    return (f"{counts[0]} await order.created, {counts[1]} await order.payment_pending, "
            f"{counts[2]} await order.completed")
