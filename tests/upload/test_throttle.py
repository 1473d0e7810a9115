"""The upload bandwidth bucket, on a fake clock: what it makes callers wait is computed, not
timed, so these checks are exact and take no time."""

from __future__ import annotations

import threading

import pytest

from dockd.config import parse_config
from dockd.store import build_store
from dockd.store.filesystem import FilesystemStore
from dockd.upload.throttle import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_burst_goes_at_once_then_bytes_wait_their_turn() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    assert bucket.take(500) == 0  # the bucket starts full
    assert bucket.take(250) == pytest.approx(0.25)
    assert bucket.take(1000) == pytest.approx(1.0)
    # 1750 bytes in 1.25 s: the burst of 500, then exactly 1000 B/s
    assert clock.now - 100.0 == pytest.approx(1.25)


def test_an_idle_bucket_refills_only_up_to_its_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    bucket.take(500)
    clock.now += 60  # a minute idle earns no more than the burst
    assert bucket.take(500) == 0
    assert bucket.take(100) == pytest.approx(0.1)


def test_a_chunk_larger_than_the_burst_waits_for_all_of_it() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, burst=64 * 1024, clock=clock, sleep=clock.sleep)
    waited = bucket.take(4 * 1024 * 1024)  # one 4 MiB chunk of the filesystem write loop
    assert waited == pytest.approx((4 * 1024 * 1024 - 64 * 1024) / 1_000_000)


def test_workers_share_one_bucket_and_no_byte_is_lost_between_threads() -> None:
    """The clock stands still, so every byte taken must show up as debt: 8 threads x 500
    takes, and the last one waits for all of them, exactly."""
    clock = FakeClock()
    waits: list[float] = []
    bucket = TokenBucket(10_000, burst=1000, clock=clock, sleep=waits.append)

    def worker() -> None:
        for _ in range(500):
            bucket.take(100)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(waits) == 8 * 500 - 10  # the first 1000 bytes were the burst
    assert max(waits) == pytest.approx((8 * 500 * 100 - 1000) / 10_000)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_build_store_gives_the_backend_one_bucket_from_the_config() -> None:
    config = parse_config(
        {
            "store": {"path": "/srv/evidence"},
            "upload": {"bandwidth_limit": "40MB/s"},
            "mqtt": {"enabled": False},
        }
    )
    store = build_store(config)
    assert isinstance(store, FilesystemStore)
    assert store.throttle is not None and store.throttle.rate == 40_000_000
    unlimited = build_store(parse_config({"store": {"path": "/srv/evidence"}}))
    assert isinstance(unlimited, FilesystemStore) and unlimited.throttle is None
