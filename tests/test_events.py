"""The status bus: observers are fed, never able to slow the data path."""

from __future__ import annotations

import asyncio

from dockd.events import CameraStatus, EventBus, Notice, Progress


def _progress(camera: str, done: int) -> Progress:
    return Progress(camera, "s1", "offload", 10, done, 1000, done * 100)


def test_progress_is_coalesced_per_camera_keeping_only_the_latest() -> None:
    bus = EventBus()
    sub = bus.subscribe("slow")
    for n in range(1000):
        bus.publish(_progress("A", n))
        bus.publish(_progress("B", n))
    events = sub.drain()
    assert [(e.camera, e.files_done) for e in events if isinstance(e, Progress)] == [
        ("A", 999),
        ("B", 999),
    ]


def test_state_change_supersedes_pending_progress_of_that_camera() -> None:
    bus = EventBus()
    sub = bus.subscribe("slow")
    bus.publish(_progress("A", 5))
    bus.publish(CameraStatus("A", "offloaded", "s1", safe_to_undock=True))
    events = sub.drain()
    assert len(events) == 1
    assert isinstance(events[0], CameraStatus)
    assert events[0].safe_to_undock


def test_notices_beyond_the_bound_drop_the_oldest_and_are_counted() -> None:
    bus = EventBus()
    sub = bus.subscribe("away", maxsize=10)
    for n in range(25):
        bus.publish(Notice("file_verified", "A", "s1", {"n": n}))
    events = sub.drain()
    assert [e.details["n"] for e in events if isinstance(e, Notice)] == list(range(15, 25))
    assert sub.dropped == 15


def test_publish_without_subscribers_and_after_unsubscribe_is_harmless() -> None:
    bus = EventBus()
    bus.publish(Notice("x"))
    sub = bus.subscribe("a")
    bus.unsubscribe(sub)
    bus.publish(Notice("y"))
    assert sub.drain() == []


async def test_subscriber_iterates_in_order_and_ends_when_closed() -> None:
    bus = EventBus()
    sub = bus.subscribe("reader")
    seen: list[str] = []

    async def read() -> None:
        async for event in sub:
            assert isinstance(event, Notice)
            seen.append(event.event)

    reader = asyncio.create_task(read())
    bus.publish(Notice("one"))
    bus.publish(Notice("two"))
    await asyncio.sleep(0)  # let the reader take the first batch
    bus.publish(Notice("three"))
    bus.close()
    await asyncio.wait_for(reader, 5)
    assert seen == ["one", "two", "three"]
