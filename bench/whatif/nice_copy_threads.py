"""What-if (bays.py/files.py `--setup bench/whatif/nice_copy_threads.py:apply`): the daemon's copy
threads lower their own CPU priority to nice 10, so the event loop (nice 0) is scheduled first.

Tried for the event loop's lag with 8 cameras at once, and not adopted: in alternated runs the
loop was *later* with it (the README has the figures). A nice-10 copy thread that holds the GIL
when it is preempted keeps the loop waiting for the GIL until it runs again: priority inversion.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

NICE = 10


def _lower() -> None:
    tid = threading.get_native_id()
    if os.getpriority(os.PRIO_PROCESS, tid) < NICE:
        os.setpriority(os.PRIO_PROCESS, tid, NICE)  # this thread only (a Linux thread id)


class _Pool(ThreadPoolExecutor):
    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "", **kw: Any):
        if thread_name_prefix == "offload":
            kw["initializer"] = _lower
        super().__init__(max_workers, thread_name_prefix, **kw)


def apply() -> None:
    import dockd.daemon

    dockd.daemon.ThreadPoolExecutor = _Pool  # type: ignore[misc]
