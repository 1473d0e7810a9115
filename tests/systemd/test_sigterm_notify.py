"""SIGTERM (what `systemctl stop` sends) in the middle of an offload: STOPPING=1 goes out, the
daemon exits 0 within the unit's TimeoutStopSec=, and the next start says READY=1 again and
resumes the session. (tests/scenarios covers interruptions at large; this is the notify side.)

The daemon is held in the middle of the offload by a fanotify permission gate on one camera file
(FAN_OPEN_PERM): its open(2) of that file waits for the test's answer, whatever flags it opens
with, so SIGTERM lands at a known point. Nothing about the daemon is patched.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from systemd_support import WAIT_S, Dock, DockdProcess, NotifyListener

UNIT = Path(__file__).parents[2] / "systemd" / "dockd.service"

FAN_CLASS_CONTENT = 0x04
FAN_CLOEXEC = 0x01
FAN_MARK_ADD = 0x01
FAN_OPEN_PERM = 0x10000
FAN_ALLOW = 0x01
AT_FDCWD = -100
_EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata
_RESPONSE = struct.Struct("iI")  # struct fanotify_response


class OpenGate:
    """Another process's open(2) of `path` waits until `release()` (fanotify FAN_OPEN_PERM)."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self._fd: int | None = libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY)
        if self._fd < 0:
            self._fd = None
            pytest.skip(f"fanotify unavailable ({os.strerror(ctypes.get_errno())}; needs root)")
        if libc.fanotify_mark(self._fd, FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD, bytes(path)) < 0:
            err = ctypes.get_errno()
            self.release()
            pytest.skip(f"fanotify permission events unavailable ({os.strerror(err)})")
        self._held: list[int] = []

    def wait_opened(self) -> int:
        """Until someone opens the file; returns the opener's pid. The open stays held."""
        assert self._fd is not None
        ready, _, _ = select.select([self._fd], [], [], WAIT_S)
        assert ready, "nobody opened the gated file"
        data = os.read(self._fd, 4096)
        _, _, _, _, _, event_fd, pid = _EVENT.unpack_from(data)
        self._held.append(event_fd)
        return int(pid)

    def release(self) -> None:
        """Let every held open go on; later opens are not gated."""
        if self._fd is None:
            return
        for event_fd in self._held:
            os.write(self._fd, _RESPONSE.pack(event_fd, FAN_ALLOW))
            os.close(event_fd)
        self._held.clear()
        os.close(self._fd)  # removes the mark
        self._fd = None


@pytest.fixture
def open_gate() -> Iterator[Callable[[Path], OpenGate]]:
    made: list[OpenGate] = []

    def make(path: Path) -> OpenGate:
        made.append(OpenGate(path))
        return made[-1]

    yield make
    for g in made:
        g.release()


def _timeout_stop_s() -> float:
    m = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.M)
    assert m, "the unit has no TimeoutStopSec=<n>s"
    return float(m.group(1))


def test_sigterm_mid_offload_says_stopping_exits_0_and_the_next_start_resumes(
    dock: Dock,
    notify_socket: NotifyListener,
    start_dockd: Callable[..., DockdProcess],
    open_gate: Callable[[Path], OpenGate],
) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "1000000"}
    files = dock.camera(
        "X6SIGTERM",
        {"DCIM/0001.MP4": 150_000, "DCIM/0002.MP4": 400_000, "DCIM/0003.MP4": 20_000},
    )
    d = start_dockd(dock.config_file, **env)
    notify_socket.wait_line("READY=1")

    gate = open_gate(dock.aside / "X6SIGTERM" / "DCIM" / "0002.MP4")
    dock.dock_camera("X6SIGTERM")
    assert gate.wait_opened() == d.proc.pid  # the daemon is opening 0002: mid-offload

    mark = notify_socket.mark()
    stopped_at = time.monotonic()
    d.signal(signal.SIGTERM)
    stopping = notify_socket.wait_line("STOPPING=1", after=mark)
    assert stopping.status is not None and stopping.status.startswith("stopping")
    gate.release()
    assert d.proc.wait(WAIT_S) == 0
    took = time.monotonic() - stopped_at
    assert took < _timeout_stop_s(), f"stopping took {took:.1f} s"
    assert d.logged("session_parked")

    # parked: the session stays offloading, with 0002 (held at its open) still to copy
    (session_id,) = [r[0] for r in dock.query("SELECT id FROM sessions WHERE state = 'offloading'")]
    states = dict(dock.query("SELECT path, state FROM files WHERE session_id = ?", session_id))
    assert states["DCIM/0002.MP4"] == "pending"
    assert not list((dock.state / "staging" / session_id).glob("*.partial"))

    mark = notify_socket.mark()
    again = start_dockd(dock.config_file, **env)
    notify_socket.wait_line("READY=1", after=mark)
    opened = again.wait_log("session_opened", lambda e: e["camera"] == "X6SIGTERM")
    assert opened["resumed"] is True and opened["session_id"] == session_id
    again.wait_log("session_uploaded", lambda e: e["session_id"] == session_id)
    stored = dock.evidence / "X6SIGTERM" / session_id / "files"
    assert {p: (stored / p).read_bytes() for p in files} == files
    again.signal(signal.SIGTERM)
    assert again.proc.wait(WAIT_S) == 0
    notify_socket.wait_line("STOPPING=1", after=mark)
