"""SHA256SUMS in coreutils format, so `sha256sum -c` checks a downloaded session anywhere.

Paths are relative to the session's `files/`. A name holding a backslash, newline or carriage
return is written the way coreutils does: the line starts with a backslash and those characters
are escaped.
"""

from __future__ import annotations

from collections.abc import Iterable


def sums_line(sha256: str, path: str) -> str:
    if any(c in path for c in "\\\n\r"):
        escaped = path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{sha256}  {escaped}\n"
    return f"{sha256}  {path}\n"


def render(entries: Iterable[tuple[str, str]]) -> bytes:
    """(sha256, path) pairs, in path order, as the file's bytes."""
    return "".join(sums_line(h, p) for h, p in sorted(entries, key=lambda e: e[1])).encode()
