"""`upload.bandwidth_limit`: one token bucket shared by every upload worker.

One instance is made in `store.build_store` and handed to the backend, whose write loop calls
`take(n)` before it sends (or writes) `n` bytes; the limit is therefore for the dock as a whole,
whatever `upload.concurrency` is. A caller that takes more than the bucket holds goes into debt
and sleeps it off; the next caller sees the debt and waits behind it, so concurrent workers are
served in the order they asked and the long-run rate never exceeds the limit. Blocking by
design: it runs in the upload worker threads, like the store calls it paces.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# The bucket holds at most this much time's worth of bytes, so an idle dock may send a short
# burst (a small manifest goes out at once) but never a second's worth above the limit.
BURST_S = 0.25
MIN_BURST = 64 * 1024


class TokenBucket:
    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate {rate}: must be above 0 bytes/s")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate * BURST_S, MIN_BURST)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()

    def take(self, n: int) -> float:
        """Pay for `n` bytes about to go out; sleeps until they may. Returns the seconds slept."""
        if n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        # slept outside the lock: other workers book their bytes behind this debt meanwhile
        if wait > 0:
            self._sleep(wait)
        return wait

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate:.0f} B/s, burst={self.burst:.0f} B)"
