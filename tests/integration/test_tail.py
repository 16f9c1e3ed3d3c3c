"""``paystream tail`` on the real broker and registry: decoded JSON lines, start, key, count, follow.

Events are written the way another service would (confluent-kafka's
``AvroSerializer`` through the registry), plus a JSON command and bytes
that are neither, on the test's own prefixed topics.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from streams import catalog
from streams.admin import ensure_topics
from streams.cli import main
from streams.ops.records import OpsError
from streams.ops.tail import tail
from streams.settings import Settings
from tests.integration.payment_support import drop_topics
from tests.integration.pipeline_support import RecordingWriter

pytestmark = pytest.mark.integration

TOPIC = "wallet.credits_added"


@pytest.fixture
def deployment(kafka_bootstrap: str, registry_url: str) -> Iterator[Settings]:
    prefix = f"t-tail-{uuid.uuid4().hex[:8]}."
    settings = Settings.from_env(kafka_bootstrap_servers=kafka_bootstrap, schema_registry_url=registry_url,
                                 topic_prefix=prefix)
    ensure_topics(kafka_bootstrap, [catalog.CATALOG[TOPIC].settings(name_prefix=prefix),
                                    catalog.INTERNAL_TOPICS[catalog.ORDER_COMMANDS].settings(
                                        name_prefix=prefix)])
    yield settings
    drop_topics(settings)


def credit(writer: RecordingWriter, user: str, amount: int) -> dict[str, Any]:
    return writer.send(TOPIC, {"user_id": user, "wallet_id": f"w-{user}", "amount": amount,
                               "currency": "EUR", "balance_amount": amount})


def test_records_come_decoded_with_where_and_when(deployment: Settings) -> None:
    writer = RecordingWriter(deployment)
    alice, bob = f"u-a-{uuid.uuid4().hex[:6]}", f"u-b-{uuid.uuid4().hex[:6]}"
    events = [credit(writer, alice, 100), credit(writer, bob, 200), credit(writer, alice, 300)]
    sent = writer.sent[:]
    writer.send_raw(deployment.topic(TOPIC), alice, b"\xde\xad", [("trace-id", b"t-1")])

    everything = list(tail(deployment, TOPIC, from_beginning=True, follow=False))
    assert len(everything) == 4
    by_offset = {(r["partition"], r["offset"]): r for r in everything}
    first = by_offset[sent[0].partition, sent[0].offset]
    assert first["topic"] == deployment.topic(TOPIC) and first["key"] == alice
    assert first["format"] == "avro" and first["schema"] == "io.paystream.events.WalletCreditsAddedEvent"
    assert first["value"]["event_id"] == events[0]["event_id"] and first["value"]["amount"] == 100
    assert isinstance(first["timestamp"], int) and abs(first["timestamp"] / 1000 - time.time()) < 300
    assert first["headers"] == {}
    garbage = [r for r in everything if r["format"] == "hex"]
    assert garbage and garbage[0]["value"] == "dead" and garbage[0]["headers"] == {"trace-id": "t-1"}

    only_alice = list(tail(deployment, TOPIC, from_beginning=True, key=alice, follow=False))
    assert [r["key"] for r in only_alice] == [alice] * 3
    assert [r["value"]["amount"] for r in only_alice if r["format"] == "avro"] == [100, 300]
    assert len(list(tail(deployment, TOPIC, from_beginning=True, count=2, follow=False))) == 2
    # From the end: -n gives the newest N (here of one key, which is in order on its partition).
    last = list(tail(deployment, TOPIC, key=alice, count=2, follow=False))
    assert [r["offset"] for r in last] == [r["offset"] for r in only_alice[-2:]]
    assert list(tail(deployment, TOPIC, follow=False)) == []

    commands = deployment.topic(catalog.ORDER_COMMANDS)
    writer.send_raw(commands, "o-1", b'{"command":"cancel","order_id":"o-1"}')
    [command] = list(tail(deployment, catalog.ORDER_COMMANDS, from_beginning=True, follow=False))
    assert command["topic"] == commands and command["format"] == "json"
    assert command["value"] == {"command": "cancel", "order_id": "o-1"}


def test_follow_prints_what_arrives_after_the_start(deployment: Settings) -> None:
    writer = RecordingWriter(deployment)
    user = f"u-{uuid.uuid4().hex[:6]}"
    credit(writer, user, 1)  # before the tail starts: not shown without --from-beginning
    seen: list[dict[str, Any]] = []
    done = threading.Event()

    def follow() -> None:
        for record in tail(deployment, TOPIC, key=user, stop=done.is_set, poll_seconds=0.2):
            seen.append(record)
            if len(seen) == 2:
                done.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    time.sleep(2.0)  # the tail has taken the end offsets and is waiting
    credit(writer, user, 2)
    credit(writer, f"other-{user}", 5)
    credit(writer, user, 3)
    reader.join(timeout=30)
    done.set()
    assert not reader.is_alive()
    assert [r["value"]["amount"] for r in seen] == [2, 3]


def test_the_command_line(deployment: Settings, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in (("KAFKA_BOOTSTRAP_SERVERS", deployment.kafka_bootstrap_servers),
                        ("SCHEMA_REGISTRY_URL", deployment.schema_registry_url),
                        ("PAYSTREAM_TOPIC_PREFIX", deployment.topic_prefix)):
        monkeypatch.setenv(name, value)
    writer = RecordingWriter(deployment)
    user = f"u-{uuid.uuid4().hex[:6]}"
    event = credit(writer, user, 42)
    assert main(["tail", TOPIC, "--from-beginning", "--key", user, "-n", "1", "--no-follow"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["key"] == user and record["value"]["event_id"] == event["event_id"]
    assert set(record) >= {"topic", "partition", "offset", "timestamp", "key", "headers", "format",
                           "value", "schema_id", "schema"}
    assert main(["tail", "no.such-topic", "--no-follow"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(OpsError, match="does not exist"):
        list(tail(deployment, "order.created", follow=False))  # in the catalog, not created here
