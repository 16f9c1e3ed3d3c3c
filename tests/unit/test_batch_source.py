"""streams.batch_source on a real (not started) Faust app: what a batch takes, tracks and acks."""

from __future__ import annotations

import faust
import pytest
from faust.types import TP, ConsumerMessage

from streams import faust_patches
from streams.batch_source import BatchSource


@pytest.fixture
def app(tmp_path: object) -> faust.App:
    faust_patches.apply()
    app = faust.App("t-batch-source", broker="kafka://localhost:1", store="memory://",
                    datadir=str(tmp_path), web_enabled=False)
    app.topics._acking_topics.add("t-source")
    app.flow_control.resume()
    app.consumer_generation_id = 4
    app.consumer._committed_offset[TP("t-source", 0)] = 0
    return app


def source_of(app: faust.App) -> BatchSource:
    topic = app.topic("t-source", key_type=bytes, key_serializer="raw", value_serializer="raw", acks=True)
    stream = app.stream(topic)
    return BatchSource(stream)


def put(app: faust.App, source: BatchSource, offset: int, generation_id: int = 4) -> faust.types.EventT:
    message = ConsumerMessage("t-source", 0, offset, 0.0, 0, [], b"k", b"v", None,
                              generation_id=generation_id)
    message.incref(1)
    event = app.create_event(message.key, message.value, message.headers, message)
    source.queue.put_nowait(event)
    return event


def test_the_channel_of_a_raw_topic_is_marked_for_direct_delivery(app: faust.App) -> None:
    source = source_of(app)
    assert getattr(source.channel, faust_patches.BATCH_CHANNEL) is True
    assert source.channel in app.topics._topics  # subscribed, as a stream's iteration would


async def test_a_batch_is_what_the_queue_holds_up_to_the_maximum(app: faust.App) -> None:
    source = source_of(app)
    events = [put(app, source, offset) for offset in range(5)]
    assert await source.take(3) == events[:3]
    assert await source.take(10) == events[3:]


async def test_taken_records_are_tracked_until_acknowledged(app: faust.App) -> None:
    source = source_of(app)
    events = [put(app, source, offset) for offset in (1, 2)]
    taken = await source.take(10)
    unacked = app.consumer._unacked_messages
    assert all(event.message in unacked and event.message.tracked for event in taken)
    source.ack(taken)
    assert not any(event.message in unacked for event in events)
    assert list(app.consumer._acked[TP("t-source", 0)]) == [1, 2]  # committable


async def test_records_of_an_older_generation_are_not_processed_nor_committable(app: faust.App) -> None:
    source = source_of(app)
    stale = put(app, source, 1, generation_id=3)
    current = put(app, source, 2)
    assert await source.take(10) == [current]
    assert stale.message.acked  # nothing waits for it
    assert 1 not in app.consumer._acked[TP("t-source", 0)]  # read again in the new generation


async def test_nothing_is_processed_while_flow_is_suspended(app: faust.App) -> None:
    source = source_of(app)
    put(app, source, 1)
    app.flow_control.suspend()
    assert await source.take(10) == []
    assert not app.consumer._acked[TP("t-source", 0)]


async def test_the_partitions_stream_time_is_kept_for_fausts_idle_check(app: faust.App) -> None:
    source = source_of(app)
    put(app, source, 1)
    await source.take(10)
    assert TP("t-source", 0) in app.monitor.stream_inbound_time
