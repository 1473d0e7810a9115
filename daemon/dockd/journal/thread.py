"""The journal's own thread: every journal call from the event loop runs here, one at a time.

A commit with synchronous=FULL waits for the disk; on the loop that would stall every camera.
One thread also keeps the single sqlite3 connection used by one thread at a time.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from dockd.journal import Journal

P = ParamSpec("P")
T = TypeVar("T")


class JournalThread:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.journal.close()
