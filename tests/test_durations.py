# SPDX-License-Identifier: GPL-3.0-or-later
"""Durations: our parser against upstream's own (its functions, taken from /usr/sbin/mandos),
so that a clients.conf means the same to both servers, and what we write upstream can read."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mandos_protocol.durations import parse_duration
from mandos_protocol.errors import ProtocolError
from peers.upstream import upstream_functions

pytestmark = pytest.mark.interop

timedelta = datetime.timedelta

_UPSTREAM = upstream_functions("string_to_delta", "rfc3339_duration_to_delta")
upstream_string_to_delta: Callable[[str], timedelta] = _UPSTREAM["string_to_delta"]


def upstream_parse(text: str) -> timedelta | None:
    """Upstream's value for ``text``, or None where upstream refuses it."""
    try:
        return upstream_string_to_delta(text)
    except ValueError:
        return None


def ours(text: str) -> timedelta | None:
    try:
        return parse_duration(text)
    except ProtocolError:
        return None


#: The examples of upstream's doctests (rfc3339_duration_to_delta and string_to_delta).
UPSTREAM_DOCTESTS = [
    ("P7D", timedelta(7)), ("PT60S", timedelta(0, 60)), ("PT60M", timedelta(0, 3600)),
    ("PT24H", timedelta(1)), ("P1W", timedelta(7)), ("PT5M30S", timedelta(0, 330)),
    ("P1DT3M20S", timedelta(1, 200)),
    ("7d", timedelta(7)), ("60s", timedelta(0, 60)), ("60m", timedelta(0, 3600)),
    ("24h", timedelta(1)), ("1w", timedelta(7)), ("5m 30s", timedelta(0, 330)),
]


@pytest.mark.parametrize(("text", "expected"), UPSTREAM_DOCTESTS)
def test_upstream_doctest_examples(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert upstream_string_to_delta(text) == expected  # the extraction of upstream works


@pytest.mark.parametrize(("text", "expected"), [
    ("P1Y2M3DT4H5M6S", timedelta(weeks=52 + 8, days=3, hours=4, minutes=5, seconds=6)),
    ("P1Y", timedelta(weeks=52)), ("P1M", timedelta(weeks=4)), ("PT0S", timedelta()),
    ("", timedelta()), ("   ", timedelta()), ("1d 1d", timedelta(2)), ("-5m", timedelta(0, -300)),
    ("PT1H2M", timedelta(hours=1, minutes=2)), ("P2M3D", timedelta(weeks=8, days=3)),
])
def test_more_accepted_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert upstream_parse(text) == expected


@pytest.mark.parametrize("text", [
    "P", "PT", "P1DT", "P1W2D", "PT1W", "5", "s", "5x", "5m30s", "1.5m", "PT1.5S", "p1d",
    "abc", "5 m", "P-1D", "+-5m", "--5m", "²s",
])
def test_invalid_durations_raise_protocol_error(text: str) -> None:
    assert upstream_parse(text) is None
    with pytest.raises(ProtocolError) as error:
        parse_duration(text)
    assert repr(text) in str(error.value)


@pytest.mark.parametrize("text", [
    # Upstream's RFC 3339 grammar is a chain: Y->M->D->T->H->M->S, where a unit may only be
    # followed by the next one (H then S needs an M between them).
    "PT1H1S", "P1Y1D", "P1YT1H", "P1MT1H", "P1DT2H4S",
])
def test_upstream_chain_quirks_are_refused(text: str) -> None:
    assert upstream_parse(text) is None
    assert ours(text) is None


_TOKENS = st.sampled_from(
    ["P", "T", "Y", "M", "W", "D", "H", "S", "s", "m", "h", "d", "w", " ", "-", "+", "0", "1",
     "7", "42", "x", "\n"]
)


@given(st.lists(_TOKENS, max_size=10).map("".join))
@example("PT1H1S")
@example("+-5m")
@example("P1D\n")  # upstream's end token r"$" also matches before a final newline
def test_same_verdict_and_value_as_upstream(text: str) -> None:
    assert ours(text) == upstream_parse(text)


_DURATIONS = st.integers(min_value=0, max_value=10 * 366 * 86400).map(
    lambda seconds: timedelta(seconds=seconds)
)


@given(_DURATIONS)
@example(timedelta(days=1, hours=2, seconds=4))
@example(timedelta(hours=1, seconds=1))
@example(timedelta())
def test_full_rfc3339_form_reads_the_same_in_both_parsers(delta: timedelta) -> None:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    text = f"P{days}DT{rest // 3600}H{rest // 60 % 60}M{rest % 60}S"
    assert parse_duration(text) == upstream_string_to_delta(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["P99999999999999D", "99999999999999d", "1h 99999999999999w"])
def test_overflow_is_a_protocol_error(text: str) -> None:
    """Upstream crashes with OverflowError here; we refuse with a message instead."""
    with pytest.raises(OverflowError):
        upstream_string_to_delta(text)
    with pytest.raises(ProtocolError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["P9000Y", "P101Y", "5300w", "P5300W"])
def test_durations_beyond_100_years_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError, match="longer than 100 years"):
        parse_duration(text)


def test_100_years_is_accepted() -> None:
    assert parse_duration("P100Y") == datetime.timedelta(weeks=5200)
