"""dockd.units: sizes, durations and rates as written in the configuration."""

from __future__ import annotations

import math

import pytest

from dockd.units import format_size, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0B", 0),
        ("512B", 512),
        ("1KiB", 1024),
        ("8MiB", 8 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1TiB", 1024**4),
        ("1KB", 1000),
        ("40MB", 40 * 1000**2),
        ("3GB", 3 * 1000**3),
        ("1TB", 1000**4),
        ("1.5KiB", 1536),
        ("2 GB", 2 * 1000**3),
        ("  8 MiB  ", 8 * 1024**2),
        ("8mib", 8 * 1024**2),
        ("4096", 4096),
    ],
)
def test_size_in_every_unit_is_parsed_to_bytes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_size_given_as_a_bare_integer_is_bytes() -> None:
    assert parse_size(4096) == 4096


def test_huge_size_is_parsed_exactly_without_float_rounding() -> None:
    assert parse_size("9007199254740993B") == 9007199254740993
    assert parse_size("1" * 400 + "B") == int("1" * 400)


@pytest.mark.parametrize(
    "text", ["", "MiB", "8 parsecs", "8M", "8 MiBs", "-1MiB", "1e3B", "8 Mi B", "٨MiB"]
)
def test_size_that_is_not_a_size_is_refused_with_a_unit_hint(text: str) -> None:
    with pytest.raises(ValueError, match="B/KiB/MiB/GiB/KB/MB/GB"):
        parse_size(text)


def test_negative_integer_size_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)


def test_boolean_is_not_a_size() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", 0.25),
        ("1s", 1.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        (" 10 m ", 600.0),
        ("0s", 0.0),
    ],
)
def test_duration_in_every_unit_is_parsed_to_seconds(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


def test_duration_given_as_a_bare_number_is_seconds() -> None:
    assert parse_duration(30) == 30.0
    assert parse_duration(0.5) == 0.5


@pytest.mark.parametrize("text", ["", "10", "10 minutes", "10M", "1w", "-5s", "s", "10 fortnights"])
def test_duration_that_is_not_a_duration_is_refused_with_a_unit_hint(text: str) -> None:
    with pytest.raises(ValueError, match="ms/s/m/h/d"):
        parse_duration(text)


def test_negative_number_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-1)


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, 10**400, "9" * 400 + "s", "36501d"],
    ids=["nan", "inf", "10**400", "400-nines-s", "36501d"],
)
def test_non_finite_or_absurdly_long_duration_is_refused(value: float | int | str) -> None:
    with pytest.raises(ValueError, match="finite duration"):
        parse_duration(value)


def test_boolean_is_not_a_duration() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("40MB/s", 40 * 1000**2),
        ("5MiB/s", 5 * 1024**2),
        ("100 KiB / s", 100 * 1024),
        ("1GB/s", 1000**3),
        ("1000/s", 1000),
    ],
)
def test_rate_is_parsed_to_bytes_per_second(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_rate_means_unlimited(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize("text", ["40MB", "fast", "40MB/h", "40 parsecs/s", "/s", "40MB/ms"])
def test_rate_that_is_not_a_rate_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a rate \(use e\.g\. 40MB/s"):
        parse_rate(text)


def test_zero_rate_is_refused_pointing_at_empty_for_unlimited() -> None:
    with pytest.raises(ValueError, match="above 0"):
        parse_rate("0MB/s")


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (8 * 1024**2, "8.0 MiB"),
        (2 * 1024**3, "2.0 GiB"),
        (3 * 1024**4, "3.0 TiB"),
        (5000 * 1024**4, "5000.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size_uses_binary_units(n: int, expected: str) -> None:
    assert format_size(n) == expected


def test_format_size_round_trips_through_parse_size_for_whole_units() -> None:
    assert parse_size(format_size(8 * 1024**2).replace(".0 ", "")) == 8 * 1024**2
