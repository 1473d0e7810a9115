"""What to copy: walk a camera root with include/exclude globs, never following a link.

Camera content is untrusted. Names are taken as bytes and kept: a name that is not UTF-8 gets a
percent-encoded form for keys and manifests, and its original bytes are recorded beside it.
Anything that is not a regular file or a directory (symlink, FIFO, socket, device node) is never
opened; it is reported as skipped, with the reason. Directories are pruned when they match an
exclude pattern (so ".*" keeps a camera's hidden folders out), and the walk is streamed: memory is
bounded by one directory listing, not by the camera's file count.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Found:
    """A regular file to offload."""

    rel: bytes  # path relative to the camera root, as the filesystem gave it
    path: str  # `rel` as UTF-8, bytes that were not UTF-8 as %XX
    raw_path: bytes | None  # `rel` when it was not UTF-8, else None
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    """An entry that is listed in the manifest but never read."""

    rel: bytes
    path: str
    raw_path: bytes | None
    reason: str


def encode_path(rel: bytes) -> tuple[str, bytes | None]:
    """(UTF-8 form with %XX for undecodable bytes, the raw bytes if any were undecodable)."""
    try:
        return rel.decode("utf-8"), None
    except UnicodeDecodeError:
        text = rel.decode("utf-8", errors="surrogateescape")
        out = "".join(f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)
        return out, rel


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a path glob: `**` spans directories, `*` and `?` stay within one name."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


class Filter:
    """include/exclude globs over paths relative to the camera root."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        self._include = [glob_regex(p) for p in include]
        self._exclude = [glob_regex(p) for p in exclude]

    def excluded(self, path: str) -> bool:
        return any(rx.match(path) for rx in self._exclude)

    def wanted(self, path: str) -> bool:
        return not self.excluded(path) and any(rx.match(path) for rx in self._include)


_SKIP_REASONS = (
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "device"),
    (stat.S_ISBLK, "device"),
)


def walk(root: bytes, filt: Filter) -> Iterator[Found | Skipped]:
    """Every wanted entry under `root`, depth first, names in byte order (stable across docks).

    An unreadable directory is reported as skipped ("unreadable_directory") and the walk goes on.
    """
    stack: list[bytes] = [b""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        try:
            with os.scandir(abs_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not rel_dir:
                raise
            path, raw = encode_path(rel_dir)
            yield Skipped(rel_dir, path, raw, f"unreadable_directory: {exc.strerror}")
            continue
        subdirs: list[bytes] = []
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            path, raw = encode_path(rel)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                if filt.wanted(path):
                    yield Skipped(rel, path, raw, f"unreadable: {exc.strerror}")
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                if not filt.excluded(path):
                    subdirs.append(rel)
                continue
            if not filt.wanted(path):
                continue
            if stat.S_ISREG(mode):
                yield Found(rel, path, raw, st.st_size, st.st_mtime_ns)
                continue
            reason = next((r for test, r in _SKIP_REASONS if test(mode)), "not_a_regular_file")
            yield Skipped(rel, path, raw, reason)
        stack.extend(reversed(subdirs))
