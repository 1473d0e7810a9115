"""Sizes ("8MiB") and durations ("10m") as written in the configuration."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$", re.ASCII)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$", re.ASCII)
_RATE_RE = re.compile(r"^\s*(.+?)\s*/\s*s\s*$")

_MAX_SECONDS = 100 * 365 * 86400.0

SIZE_HINT = "use B/KiB/MiB/GiB/KB/MB/GB"
DURATION_HINT = "use ms/s/m/h/d, e.g. 10m"


def parse_size(text: str | int) -> int:
    """Bytes in `text` ("8MiB", "2 GB", 4096). Raises ValueError with a hint."""
    if isinstance(text, bool):
        raise ValueError(f"is not a size ({SIZE_HINT})")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("must not be negative")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"is not a size ({SIZE_HINT})")
    number, unit = m.groups()
    factor = _SIZE_UNITS.get(unit.upper() if unit else "B")
    if factor is None:
        raise ValueError(f"is not a size ({SIZE_HINT})")
    # exact arithmetic: float() would lose bytes on large sizes and overflow on absurd ones
    return int(Fraction(number) * factor)


def parse_duration(text: str | int | float) -> float:
    """Seconds in `text` ("1s", "10m", "250ms"). A bare number is seconds."""
    if isinstance(text, bool):
        raise ValueError(f"is not a duration ({DURATION_HINT})")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError("must not be negative")
        seconds = float(text) if abs(text) <= _MAX_SECONDS else math.inf
    else:
        m = _DURATION_RE.match(text)
        if not m:
            raise ValueError(f"is not a duration ({DURATION_HINT})")
        number, unit = m.groups()
        seconds = float(number) * _DURATION_UNITS[unit]
    # TOML has nan and inf, and a long enough digit string is inf too: neither can be slept on
    if not math.isfinite(seconds) or seconds > _MAX_SECONDS:
        raise ValueError("is not a finite duration (at most 100 years)")
    return seconds


def parse_rate(text: str) -> int | None:
    """Bytes per second in "40MB/s"; None for "" (unlimited)."""
    if text.strip() == "":
        return None
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError("is not a rate (use e.g. 40MB/s, or empty for unlimited)")
    try:
        rate = parse_size(m.group(1))
    except ValueError:
        raise ValueError("is not a rate (use e.g. 40MB/s, or empty for unlimited)") from None
    if rate <= 0:
        raise ValueError("must be above 0 (or empty for unlimited)")
    return rate


def format_size(n: float) -> str:
    """Human-readable size, binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
