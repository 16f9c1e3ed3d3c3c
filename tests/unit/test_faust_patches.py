"""streams.faust_patches on a real (not started) Faust app: the fetch wait and stale acks."""

from __future__ import annotations

import asyncio
import types
from typing import Any

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


# --------------------------------------------------------------------------
# 3. Cheap delivery into the kernel's channels

#: sha256 of the faust-streaming 0.15.3 sources the third patch copies or mirrors:
#: ``Consumer._drain_messages`` (copied into ``faust_patches._drain_messages``) and
#: ``ConductorCompiler.build`` (whose handler ``deliver_now`` does for one raw channel).
#: A new Faust release that changes either fails here: re-read it, re-copy, re-pin.
FAUST_DRAIN_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"
FAUST_BUILD_SHA256 = "837cf521368c1ee4b22c235a2b137f665eca03d0e3e01b5ddedb65232ee73bf2"


def _sha256(function: object) -> str:
    import hashlib
    import inspect

    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()  # type: ignore[arg-type]


def test_the_faust_code_the_delivery_patch_mirrors_is_the_pinned_one(app: faust.App) -> None:
    from faust.transport import conductor

    assert faust_patches.FAUST_DRAIN_MESSAGES is not None
    assert _sha256(faust_patches.FAUST_DRAIN_MESSAGES) == FAUST_DRAIN_SHA256
    assert _sha256(conductor.ConductorCompiler.build) == FAUST_BUILD_SHA256


def test_the_consumer_runs_the_patched_fetch_loop(app: faust.App) -> None:
    from faust.transport import consumer as faust_consumer

    assert faust_consumer.Consumer._drain_messages is faust_patches._drain_messages


@pytest.fixture
def raw_channel(app: faust.App) -> object:
    topic = app.topic("t-raw", key_type=bytes, key_serializer="raw", value_serializer="raw", acks=True)
    channel = topic.clone(is_iterator=True)
    setattr(channel, faust_patches.BATCH_CHANNEL, True)
    return channel


def _delivery(app: faust.App, channels: set[object]) -> faust_patches._Delivery:
    tp = TP("t-raw", 0)
    app.topics._build_handler(tp, channels)
    return app.topics.__dict__["_paystream_deliveries"][tp]


def raw_message(offset: int) -> Message:
    return Message("t-raw", 0, offset, 1.5, 0, [("h", b"1")], b"key", b"\x00value", None, generation_id=3)


async def test_a_record_is_delivered_as_the_event_fausts_raw_decoder_makes(app: faust.App,
                                                                        raw_channel: object) -> None:
    app.flow_control.resume()
    delivery = _delivery(app, {raw_channel})
    message = raw_message(5)
    assert faust_patches.deliver_now(delivery, message) is True
    delivered = raw_channel.queue.get_nowait()  # type: ignore[attr-defined]
    decoded = await raw_channel.decode(raw_message(5), propagate=True)  # type: ignore[attr-defined]
    assert (delivered.key, delivered.value, delivered.headers) == \
        (decoded.key, decoded.value, decoded.headers)
    assert type(delivered) is type(decoded) and delivered.message is message
    assert message.refcount == 1  # one subscriber holds it until it acknowledges


async def test_delivery_goes_fausts_way_whenever_it_would_have_to_wait(app: faust.App,
                                                                      raw_channel: object) -> None:
    message = raw_message(6)
    app.flow_control.suspend()  # a rebalance: Faust's handler waits for the flow
    assert faust_patches.deliver_now(_delivery(app, {raw_channel}), message) is False
    app.flow_control.resume()
    other = app.topic("t-raw", value_serializer="raw").clone(is_iterator=True)  # a second subscriber
    assert faust_patches.deliver_now(_delivery(app, {raw_channel, other}), message) is False
    unmarked = app.topic("t-raw", key_serializer="raw", value_serializer="raw").clone(is_iterator=True)
    assert faust_patches.deliver_now(_delivery(app, {unmarked}), message) is False
    pending = app.producer.buffer.pending  # the producer's buffer over its limit: Faust waits
    for _ in range(app.producer.buffer.max_messages + 1):
        pending.put_nowait(object())
    assert faust_patches._buffered(app.producer.buffer, False) == app.producer.buffer.size
    assert faust_patches.deliver_now(_delivery(app, {raw_channel}), message) is False
    while not pending.empty():
        pending.get_nowait()
    queue = raw_channel.queue  # type: ignore[attr-defined]
    for _ in range(queue.maxsize):
        queue.force_put_nowait(object())
    assert queue.full()
    assert faust_patches.deliver_now(_delivery(app, {raw_channel}), message) is False
    assert message.refcount == 0  # nothing was counted for the records not delivered


# --------------------------------------------------------------------------
# A released record holds its partition's commit back, and is read again


TP0 = TP("t-patched", 0)


def test_a_record_released_at_the_head_of_a_never_committed_partition_is_not_committed_past(
    app: faust.App,
) -> None:
    """Faust skips its head check when nothing was committed yet; the hold does not."""
    app.consumer_generation_id = 2
    consumer = app.consumer
    consumer._committed_offset[TP0] = None
    consumer.ack(message(0, generation_id=1))  # fetched before the assignment: released
    for offset in (1, 2, 3):
        assert consumer.ack(message(offset, generation_id=2))
    assert consumer._new_offset(TP0) is None  # committing 4 would skip offset 0
    assert consumer.ack(message(0, generation_id=2))  # read again, and done
    assert consumer._new_offset(TP0) == 4
    assert not faust_patches.held(consumer).get(TP0)


def test_a_hold_below_what_was_committed_elsewhere_is_dropped(app: faust.App) -> None:
    app.consumer_generation_id = 2
    consumer = app.consumer
    consumer._committed_offset[TP0] = None
    consumer.ack(message(5, generation_id=1))
    consumer._committed_offset[TP0] = 9  # another owner went past it meanwhile
    assert consumer.ack(message(9, generation_id=2))
    assert consumer._new_offset(TP0) == 10
    assert not faust_patches.held(consumer).get(TP0)


async def _rewound(app: faust.App, monkeypatch: pytest.MonkeyPatch, *, position: int,
                   flow_active: bool = True) -> list[tuple[TP, int]]:

    app.consumer_generation_id = 2
    consumer = app.consumer
    consumer._set_active_tps({TP0})  # assigned, not paused
    consumer.flow_active = flow_active
    if flow_active:
        consumer.can_resume_flow.set()
    else:
        consumer.can_resume_flow.clear()
    seeks: list[tuple[TP, int]] = []

    async def seek_wait(partitions: dict[TP, int]) -> None:
        seeks.extend(partitions.items())

    async def at(tp: TP) -> int:
        return position

    async def seek_to_committed() -> dict[TP, int | None]:
        return {TP0: None}  # nothing committed: aiokafka leaves the partition where it is

    async def earliest_offsets(*tps: TP) -> dict[TP, int]:
        return {tp: 0 for tp in tps}

    monkeypatch.setattr(consumer, "seek_wait", seek_wait)
    monkeypatch.setattr(consumer, "position", at)
    monkeypatch.setattr(consumer, "seek_to_committed", seek_to_committed)
    monkeypatch.setattr(consumer, "assignment", lambda: {TP0})
    monkeypatch.setattr(consumer, "earliest_offsets", earliest_offsets)
    consumer.ack(message(7, generation_id=1))
    consumer.ack(message(8, generation_id=1))  # a later one: the first rewind covers it
    await faust_patches.seek_back(consumer)  # what the fetch loop does before its next fetch
    if not flow_active:
        assert seeks == []  # a rebalance is under way: wait for it
        await consumer.perform_seek()  # its end: Faust's seek to committed offsets (here: none)
        consumer.flow_active = True
        consumer.can_resume_flow.set()
        await faust_patches.seek_back(consumer)
    await faust_patches.seek_back(consumer)  # done once: not sought again
    assert {7, 8} <= faust_patches.held(consumer)[TP0]  # until read again
    return seeks


async def test_a_partition_fetched_past_a_released_record_is_rewound_to_it(
    app: faust.App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await _rewound(app, monkeypatch, position=12) == [(TP0, 7)]


async def test_a_partition_not_yet_fetched_past_it_is_never_sought_forward(
    app: faust.App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await _rewound(app, monkeypatch, position=5) == []


async def test_during_a_rebalance_the_rewind_waits_for_the_flow(
    app: faust.App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Faust's seek to committed offsets leaves a never-committed partition where it was: the rewind
    goes to its log start (0 here), the first record to hand over after the assignment."""
    assert await _rewound(app, monkeypatch, position=12, flow_active=False) == [(TP0, 0)]


async def test_the_fetch_loop_reads_a_held_record_again_after_records_fetched_before_the_rewind(
    app: faust.App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The seek back waits for the records already fetched: they must not move the read offset past it.

    Round one hands over 7, 8, 9; while 7 is delivered a stale copy of 7 is
    released.  Sought back to 7 before 8 and 9 were handed over (a task did
    the seek), the loop set its read offset to 9 again and dropped the
    re-read 7 and 8 as already read: the hold kept the commit before 7 for
    good.
    """
    import asyncio

    app.consumer_generation_id = 2
    consumer = app.consumer
    consumer._set_active_tps({TP0})
    consumer.flow_active = True
    consumer.can_resume_flow.set()
    consumer._committed_offset[TP0] = 7
    faust_patches.expected(consumer)[TP0] = 7  # as perform_seek sets it
    fetcher = type("Fetcher", (), {"_stopped": asyncio.Event()})()
    position = {"next": 10}  # the partition was fetched up to 9
    rounds: list[list[int]] = [[7, 8, 9]]
    delivered: list[int] = []

    async def seek_wait(partitions: dict[TP, int]) -> None:
        position["next"] = partitions[TP0]

    async def at(tp: TP) -> int:
        return position["next"]

    async def getmany(timeout: float):  # type: ignore[no-untyped-def]
        if rounds:
            offsets = rounds.pop(0)
        elif position["next"] < 10:  # sought back: fetched again from there
            offsets, position["next"] = list(range(position["next"], 10)), 10
        else:
            fetcher._stopped.set()
            return
        for offset in offsets:
            yield TP0, message(offset, generation_id=2)

    async def callback(received: Message) -> None:
        delivered.append(received.offset)
        if delivered == [7]:
            consumer.ack(message(7, generation_id=1))  # a copy fetched before the assignment
        for _ in range(5):
            await asyncio.sleep(0)
        if received.offset == 7 and delivered.count(7) == 2:
            consumer.ack(received)

    monkeypatch.setattr(consumer, "seek_wait", seek_wait)
    monkeypatch.setattr(consumer, "position", at)
    monkeypatch.setattr(consumer, "getmany", getmany)
    monkeypatch.setattr(consumer, "callback", callback)
    await asyncio.wait_for(faust_patches._drain_messages(consumer, fetcher), 5)
    assert delivered == [7, 8, 9, 7, 8, 9]
    assert not faust_patches.held(consumer).get(TP0)


async def test_a_position_asked_before_a_rebalance_began_is_not_sought_to(
    app: faust.App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rebalance's seek to committed offsets may have put it before the held record: no seek forward."""
    app.consumer_generation_id = 2
    consumer = app.consumer
    consumer.flow_active = True
    consumer.can_resume_flow.set()
    seeks: list[tuple[TP, int]] = []

    async def seek_wait(partitions: dict[TP, int]) -> None:
        seeks.extend(partitions.items())

    async def at(tp: TP) -> int:
        consumer.stop_flow()  # a rebalance begins while the position is asked
        app.consumer_generation_id = 3
        return 12

    monkeypatch.setattr(consumer, "seek_wait", seek_wait)
    monkeypatch.setattr(consumer, "position", at)
    consumer.ack(message(7, generation_id=1))
    await faust_patches.seek_back(consumer)
    assert seeks == []
    assert TP0 in faust_patches.rewinds_due(consumer)  # done once the flow runs again


# --------------------------------------------------------------------------
# 4. Every record between the committed offset and the commit is handed over


class FakeFetches:
    """aiokafka under Faust's real ``getmany`` and the patched fetch loop.

    Each partition has a log (the offsets it holds) and a fetch position.
    A fetch returns up to ``batch`` records of *every* assigned partition
    from its position and moves the position past them, whatever Faust has
    paused: aiokafka prefetches every assigned partition (Faust's pause is
    its own bookkeeping), which is what the worker's log showed at start-up.
    ``on_fetch[n]`` runs before the n-th fetch returns (a recovery ending).
    """

    def __init__(self, app: faust.App, logs: dict[TP, list[int]], committed: dict[TP, int | None],
                 *, batch: int = 3) -> None:
        self.app = app
        self.consumer = consumer = app.consumer
        self.logs = logs
        self.committed = committed
        self.batch = batch
        self.position = {tp: committed[tp] if committed[tp] is not None else offsets[0]
                         for tp, offsets in logs.items()}
        self.fetches = 0
        self.on_fetch: dict[int, Any] = {}
        self.delivered: list[int] = []
        self.fetcher = type("Fetcher", (), {"_stopped": asyncio.Event()})()
        app.consumer_generation_id = 1
        consumer.flow_active = True
        consumer.can_resume_flow.set()
        for tp, offset in committed.items():
            consumer._committed_offset[tp] = offset

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        consumer = self.consumer
        monkeypatch.setattr(consumer, "_getmany", self._getmany)
        monkeypatch.setattr(consumer, "seek_wait", self._seek_wait)
        monkeypatch.setattr(consumer, "position", self._position)
        monkeypatch.setattr(consumer, "seek_to_committed", self._seek_to_committed)
        monkeypatch.setattr(consumer, "earliest_offsets", self._earliest_offsets)
        monkeypatch.setattr(consumer, "assignment", lambda: set(self.logs))
        monkeypatch.setattr(consumer, "highwater", lambda tp: 0)
        monkeypatch.setattr(consumer, "callback", self._callback)

    async def run(self) -> list[int]:
        await asyncio.wait_for(faust_patches._drain_messages(self.consumer, self.fetcher), 5)
        return self.delivered

    async def _getmany(self, active_partitions: set[TP], timeout: float) -> dict[TP, list[Any]]:
        self.fetches += 1
        if self.fetches in self.on_fetch:
            await self.on_fetch[self.fetches]()
        records = {}
        for tp, offsets in self.logs.items():
            found = [o for o in offsets if o >= self.position[tp]][: self.batch]
            if found:
                records[tp] = [_record(tp, offset) for offset in found]
                self.position[tp] = found[-1] + 1
        done = not records and not faust_patches.rewinds_due(self.consumer)
        if done and self.fetches > max(self.on_fetch, default=0):
            self.fetcher._stopped.set()
        return records

    async def _seek_wait(self, partitions: dict[TP, int]) -> None:
        self.position.update(partitions)

    async def _position(self, tp: TP) -> int:
        return self.position[tp]

    async def _seek_to_committed(self) -> dict[TP, int | None]:
        for tp, offset in self.committed.items():
            if offset:
                self.position[tp] = offset
        return dict(self.committed)

    async def _earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return {tp: self.logs[tp][0] for tp in tps}

    async def _callback(self, message: Message) -> None:
        self.delivered.append(message.offset)
        await asyncio.sleep(0)
        self.consumer.ack(message)


def _record(tp: TP, offset: int) -> Any:
    return types.SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=offset, timestamp=1000,
                                 timestamp_type=0, headers=[], key=b"k", value=b"v", checksum=None,
                                 serialized_key_size=1, serialized_value_size=1)


async def test_records_fetched_while_a_partition_with_nothing_committed_is_paused_are_handed_over(
    app: faust.App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen in the payment kill -9 test's worker log: start-up recovery resumes the flow for the
    changelogs while the agents' partitions are paused in Faust's bookkeeping only; aiokafka
    fetched order.created[1] 0..2, Faust's getmany skipped them, the position stayed past them
    (Faust's seek to committed offsets leaves a partition with nothing committed alone), and the
    next record, 3, was handed over and committed past them."""
    fake = FakeFetches(app, {TP0: [0, 1, 2, 3, 4]}, {TP0: None})
    fake.install(monkeypatch)
    consumer = app.consumer
    consumer._set_active_tps({TP("t-changelog", 0)})  # recovery: only the changelogs are read
    consumer._paused_partitions.add(TP0)

    async def recovery_done() -> None:  # Faust's Recovery.on_recovery_completed
        consumer.resume_partitions({TP0})
        await consumer.perform_seek()

    fake.on_fetch[2] = recovery_done
    assert await fake.run() == [0, 1, 2, 3, 4]
    assert consumer._new_offset(TP0) == 5


async def test_a_record_fetched_past_the_expected_offset_is_not_handed_over_before_those_between(
    app: faust.App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Faust took the distance from its read offset (set by its seek to committed offsets) to such a
    record as a gap in the log and counted it done: the commit passed records no agent processed."""
    fake = FakeFetches(app, {TP0: list(range(10))}, {TP0: 4})
    fake.install(monkeypatch)
    consumer = app.consumer
    consumer._set_active_tps({TP0})

    async def fetched_past() -> None:  # the seek is done, but the fetch position went on to 6
        await consumer.perform_seek()
        fake.position[TP0] = 6

    fake.on_fetch[1] = fetched_past
    delivered = await fake.run()
    assert delivered[0] == 4 and sorted(set(delivered)) == list(range(4, 10))
    assert not consumer._gap.get(TP0)
    assert consumer._new_offset(TP0) == 10


async def test_offsets_really_missing_from_the_log_are_committed_past_after_reading_them_again(
    app: faust.App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A compacted or transactional topic has holes: the partition must not rewind forever."""
    fake = FakeFetches(app, {TP0: [1, 4, 5]}, {TP0: 1})
    fake.install(monkeypatch)
    consumer = app.consumer
    consumer._set_active_tps({TP0})
    fake.on_fetch[1] = consumer.perform_seek
    assert await fake.run() == [1, 4, 5]
    assert consumer._new_offset(TP0) == 6


def test_a_single_missing_head_record_is_not_committed_past(app: faust.App) -> None:
    """Faust's head check (``min(acked) - committed > 1``) let exactly one missing record pass."""
    app.consumer_generation_id = 1
    consumer = app.consumer
    consumer._committed_offset[TP0] = 4
    for offset in (5, 6):
        assert consumer.ack(message(offset, generation_id=1))
    assert consumer._new_offset(TP0) is None
    assert consumer.ack(message(4, generation_id=1))
    assert consumer._new_offset(TP0) == 7


async def test_the_head_of_a_partition_with_nothing_committed_is_its_log_start(
    app: faust.App, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Faust checks no head at all when nothing was committed (``if committed_offset:``)."""
    fake = FakeFetches(app, {TP0: [0, 1, 2, 3, 4]}, {TP0: None})
    fake.install(monkeypatch)
    consumer = app.consumer
    await consumer.perform_seek()  # after the assignment: the log start is looked up
    for offset in (3, 4):
        assert consumer.ack(message(offset, generation_id=1))
    assert consumer._new_offset(TP0) is None
    for offset in (0, 1, 2):
        assert consumer.ack(message(offset, generation_id=1))
    assert consumer._new_offset(TP0) == 5


async def test_records_a_flow_control_resume_clears_from_a_channel_are_read_again(
    app: faust.App, raw_channel: object,
) -> None:
    """Faust's recovery resumes flow control after its seek to committed offsets, which clears every
    channel queue: records the fetch loop had handed over since the partitions were resumed were
    dropped unprocessed, the fetch position past them."""
    tp = TP("t-raw", 0)
    app.topics._acking_topics.add("t-raw")
    app.consumer_generation_id = 3
    consumer = app.consumer
    consumer._committed_offset[tp] = 5
    app.flow_control.resume()
    delivery = _delivery(app, {raw_channel})
    for offset in (5, 6):
        assert faust_patches.deliver_now(delivery, raw_message(offset))
    app.flow_control.resume()  # Recovery.on_recovery_completed, after perform_seek
    assert raw_channel.queue.empty()  # type: ignore[attr-defined]
    assert faust_patches.held(consumer)[tp] == {5, 6}
    assert tp in faust_patches.rewinds_due(consumer)
    assert consumer.ack(raw_message(7))  # a later record, processed
    assert consumer._new_offset(tp) is None


# --------------------------------------------------------------------------
# 5. A full kernel channel does not stop the fetch loop


async def test_a_full_kernel_channel_hands_its_records_back_and_the_loop_goes_on(
    app: faust.App, raw_channel: object, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records for a full kernel channel are not waited on (Faust's put would stop every partition):
    held, read again from the first of them once the channel drained; another partition goes on."""
    import asyncio

    tp, other = TP("t-raw", 0), TP("t-other", 0)
    app.topics._acking_topics.update({"t-raw", "t-other"})
    app.consumer_generation_id = 3
    consumer = app.consumer
    consumer._set_active_tps({tp, other})
    consumer.flow_active = True
    consumer.can_resume_flow.set()
    app.flow_control.resume()
    consumer._committed_offset[tp] = 5
    faust_patches.expected(consumer).update({tp: 5, other: 0})
    delivery = _delivery(app, {raw_channel})
    queue = raw_channel.queue  # type: ignore[attr-defined]
    for _ in range(queue.maxsize):
        queue.force_put_nowait(object())  # the agent is stuck: its channel is full
    fetcher = type("Fetcher", (), {"_stopped": asyncio.Event()})()
    position = {tp: 8}
    other_delivered: list[int] = []
    rounds = 0

    async def seek_wait(partitions: dict[TP, int]) -> None:
        position.update(partitions)

    async def at(asked: TP) -> int:
        return position[asked]

    async def getmany(timeout: float):  # type: ignore[no-untyped-def]
        nonlocal rounds
        rounds += 1
        if rounds == 1:  # the full channel's partition, then another one's record
            for offset in (5, 6, 7):
                yield tp, Message("t-raw", 0, offset, 1.5, 0, [], b"key", b"v", None, generation_id=3)
            yield other, Message("t-other", 0, 0, 1.5, 0, [], b"k", b"v", None, generation_id=3)
        elif rounds == 2:  # the agent catches up: its queue drains, Faust fetches the partition again
            assert tp not in consumer._active_partitions  # not fetched while its channel is full
            assert faust_patches.held(consumer)[tp] == {5}
            assert position[tp] == 5  # sought back to the first record handed back
            while not queue.empty():
                queue.get_nowait()
            assert tp in consumer._active_partitions
        elif rounds == 3:
            for offset in range(position[tp], 8):
                yield tp, Message("t-raw", 0, offset, 1.5, 0, [], b"key", b"v", None, generation_id=3)
            position[tp] = 8
        else:
            fetcher._stopped.set()

    async def callback(received: Message) -> None:
        other_delivered.append(received.offset)

    monkeypatch.setattr(consumer, "seek_wait", seek_wait)
    monkeypatch.setattr(consumer, "position", at)
    monkeypatch.setattr(consumer, "getmany", getmany)
    monkeypatch.setattr(consumer, "callback", callback)
    await asyncio.wait_for(faust_patches._drain_messages(consumer, fetcher), 5)
    assert other_delivered == [0]  # the other partition was not held up
    assert delivery is app.topics.__dict__["_paystream_deliveries"][tp]
    taken = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [event.message.offset for event in taken] == [5, 6, 7]  # read again, in order, once
    assert consumer._new_offset(tp) is None  # held until they are processed
    for event in taken:
        consumer.ack(event.message)
    assert consumer._new_offset(tp) == 8


async def test_a_busy_kernel_channel_that_makes_room_within_the_wait_gets_the_record(
    app: faust.App, raw_channel: object, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backlog is not fetched twice: an agent that takes from its full channel within
    HAND_BACK_AFTER gets the record in order, nothing is held or sought."""
    import asyncio

    tp = TP("t-raw", 0)
    app.topics._acking_topics.add("t-raw")
    app.consumer_generation_id = 3
    consumer = app.consumer
    consumer._set_active_tps({tp})
    consumer.flow_active = True
    consumer.can_resume_flow.set()
    app.flow_control.resume()
    faust_patches.expected(consumer)[tp] = 5
    _delivery(app, {raw_channel})
    queue = raw_channel.queue  # type: ignore[attr-defined]
    for _ in range(queue.maxsize):
        queue.force_put_nowait(object())
    fetcher = type("Fetcher", (), {"_stopped": asyncio.Event()})()
    fetched = False

    async def getmany(timeout: float):  # type: ignore[no-untyped-def]
        nonlocal fetched
        if fetched:
            fetcher._stopped.set()
            return
        fetched = True
        yield tp, Message("t-raw", 0, 5, 1.5, 0, [], b"key", b"v", None, generation_id=3)

    async def agent() -> None:  # takes a batch a little later
        await asyncio.sleep(0.05)
        for _ in range(100):
            queue.get_nowait()

    monkeypatch.setattr(consumer, "getmany", getmany)
    taking = asyncio.ensure_future(agent())
    await asyncio.wait_for(faust_patches._drain_messages(consumer, fetcher), 5)
    await taking
    assert queue._queue[-1].message.offset == 5  # delivered after the room was made  # type: ignore[attr-defined]
    assert not faust_patches.held(consumer).get(tp)
    assert tp not in faust_patches.rewinds_due(consumer)
