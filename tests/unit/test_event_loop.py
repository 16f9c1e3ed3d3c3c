"""streams.event_loop: the loop kind a process runs on, from PAYSTREAM_EVENT_LOOP."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import uvloop

from streams.event_loop import install_event_loop
from streams.settings import Settings


@pytest.fixture
def restored_policy() -> Iterator[None]:
    policy = asyncio.get_event_loop_policy()
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(policy)


def _loop_kind_in_a_thread() -> type:
    """What ``asyncio.new_event_loop()`` makes in another thread (as Faust's consumer thread does)."""
    kinds: list[type] = []

    def make() -> None:
        loop = asyncio.new_event_loop()
        kinds.append(type(loop))
        loop.close()

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    return kinds[0]


def test_uvloop_is_the_default_and_every_new_loop_is_one(restored_policy: None) -> None:
    settings = Settings.from_env(env={})
    assert settings.event_loop == "uvloop"
    install_event_loop(settings)
    loop = asyncio.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert issubclass(_loop_kind_in_a_thread(), uvloop.Loop)


def test_asyncio_keeps_the_standard_librarys_loop(restored_policy: None) -> None:
    install_event_loop(Settings.from_env(env={}))
    install_event_loop(Settings.from_env(env={"PAYSTREAM_EVENT_LOOP": "asyncio"}))
    loop = asyncio.new_event_loop()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()
