# SPDX-License-Identifier: GPL-3.0-or-later
"""Durations as Mandos configuration files write them.

Upstream accepts an RFC 3339 duration (``PT5M``, ``P1W``, ``P1DT2H``, ``P1Y2M3DT4H5M6S``) and,
as a fallback, a space-separated list of ``<integer><unit>`` tokens with the units s, m, h, d, w
(``"5m 30s"``).  We accept exactly what upstream accepts, quirks included, so that a
``clients.conf`` moves between the two unchanged: a year is 52 weeks and a month 4 weeks, letters
are case-sensitive, and an empty value is a duration of zero.

One difference: a duration longer than :data:`MAX_DURATION` (100 years) is refused.  Upstream
takes ``P9000Y``, and then the expiry arithmetic (now + timeout) overflows on every checker
result, so the client expires for good; nothing needs a timeout beyond a lifetime.
"""

from __future__ import annotations

import datetime
import re

from mandos_protocol.errors import ProtocolError

#: Upstream's RFC 3339 grammar is a chain: after ``P`` a token may only be followed by the tokens
#: listed here ("" is the end).  So ``P1DT3M20S`` is valid but ``PT1H1S`` (H then S) and
#: ``P1Y1D`` (Y then D) are not, and ``T`` must be followed by a time unit.
_FOLLOWERS = {
    "P": ("Y", "M", "D", "T", "W"), "Y": ("M", ""), "M": ("D", ""), "D": ("T", ""),
    "T": ("H", "TM", "S"), "H": ("TM", ""), "TM": ("S", ""), "S": ("",), "W": ("",),
}
_TOKEN = re.compile(r"(\d+)([YMDWHS])|T")
_RFC3339_UNIT = {
    "Y": datetime.timedelta(weeks=52), "M": datetime.timedelta(weeks=4),
    "D": datetime.timedelta(days=1), "W": datetime.timedelta(weeks=1),
    "H": datetime.timedelta(hours=1), "TM": datetime.timedelta(minutes=1),
    "S": datetime.timedelta(seconds=1),
}
_UNIT = {
    "s": datetime.timedelta(seconds=1),
    "m": datetime.timedelta(minutes=1),
    "h": datetime.timedelta(hours=1),
    "d": datetime.timedelta(days=1),
    "w": datetime.timedelta(weeks=1),
}


#: The longest duration accepted anywhere (files, mandos-ctl, D-Bus): 100 years.
MAX_DURATION = datetime.timedelta(days=36525)


def _parse_rfc3339(text: str) -> datetime.timedelta | None:
    """Upstream's ``rfc3339_duration_to_delta``, or None where it raises ValueError."""
    if not text.startswith("P"):
        return None
    state, position, total = "P", 1, datetime.timedelta()
    while text[position:] not in ("", "\n"):  # upstream's end token is r"$"
        match = _TOKEN.match(text, position)
        if match is None:
            return None
        token = "T" if match[0] == "T" else match[2]
        if token == "M" and state in ("T", "H"):
            token = "TM"
        if token not in _FOLLOWERS[state]:
            return None
        if match[1] is not None:
            try:
                total += int(match[1]) * _RFC3339_UNIT[token]
            except OverflowError:  # upstream crashes; we refuse below
                return None
            except ValueError:  # over Python's 4300 digits: upstream raises ValueError too
                return None
        state, position = token, match.end()
    return total if "" in _FOLLOWERS[state] else None


def check_duration(delta: datetime.timedelta, text: str) -> datetime.timedelta:
    """``delta`` if it is at most :data:`MAX_DURATION`, else :class:`ProtocolError`."""
    if delta > MAX_DURATION:
        raise ProtocolError(f"duration {text!r} is longer than 100 years")
    return delta


def parse_duration(text: str) -> datetime.timedelta:
    """Parse a duration in either of upstream's forms, or raise :class:`ProtocolError`."""
    delta = _parse_rfc3339(text)
    if delta is not None:
        return check_duration(delta, text)
    total = datetime.timedelta()
    for token in text.split():
        number, unit = token[:-1], token[-1]
        try:
            total += int(number) * _UNIT[unit]
        except (KeyError, ValueError, OverflowError):
            raise ProtocolError(
                f"invalid duration {text!r}: write it as RFC 3339 (PT5M, P1DT2H, P1W) "
                "or as a list like '5m 30s' (units s m h d w)"
            ) from None
    return check_duration(total, text)
