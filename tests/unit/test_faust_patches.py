"""streams.faust_patches on a real (not started) Faust app: the fetch wait and stale acks."""

from __future__ import annotations

import faust
import pytest
from faust.types import TP, Message

from streams import faust_patches


@pytest.fixture
def app(tmp_path: object) -> faust.App:
    faust_patches.apply()
    app = faust.App("t-faust-patches", broker="kafka://localhost:1", store="memory://",
                    datadir=str(tmp_path), web_enabled=False)
    app.topic("t-patched", acks=True)  # a topic whose records are acknowledged
    app.topics._acking_topics.add("t-patched")
    return app


def message(offset: int, generation_id: int) -> Message:
    return Message("t-patched", 0, offset, 0.0, 0, {}, b"k", b"v", None, generation_id=generation_id)


async def test_consumers_faust_creates_wait_at_most_the_short_fetch_time(app: faust.App) -> None:
    consumer = app.consumer
    client = consumer._thread._create_worker_consumer(consumer.transport)
    assert client._fetch_max_wait_ms == faust_patches.FETCH_MAX_WAIT_MS


def test_a_record_of_the_current_generation_is_acknowledged(app: faust.App) -> None:
    app.consumer_generation_id = 7
    consumer = app.consumer
    consumer._committed_offset[TP("t-patched", 0)] = 0
    assert consumer.ack(message(3, generation_id=7)) is True
    assert 3 in consumer._acked[TP("t-patched", 0)]


def test_a_record_of_an_older_generation_is_done_but_not_committable(app: faust.App) -> None:
    app.consumer_generation_id = 8
    consumer = app.consumer
    consumer._committed_offset[TP("t-patched", 0)] = 0
    old = message(4, generation_id=7)
    consumer._unacked_messages.add(old)
    assert consumer.ack(old) is False
    assert old.acked and old not in consumer._unacked_messages  # nothing waits for it
    assert 4 not in consumer._acked[TP("t-patched", 0)]  # its offset will be read again


def test_applying_twice_wraps_once() -> None:
    from faust.transport import consumer as faust_consumer

    faust_patches.apply()
    first = faust_consumer.Consumer.ack
    faust_patches.apply()
    assert faust_consumer.Consumer.ack is first
