"""Durations as Mandos configuration files write them.

Upstream accepts an RFC 3339 duration (``PT5M``, ``P1W``, ``P1DT2H``, ``P1Y2M3DT4H5M6S``) and,
as a fallback, a space-separated list of ``<integer><unit>`` tokens with the units s, m, h, d, w
(``"5m 30s"``).  We accept exactly what upstream accepts, quirks included, so that a
``clients.conf`` moves between the two unchanged: a year is 52 weeks and a month 4 weeks, letters
are case-sensitive, and an empty value is a duration of zero.
"""

from __future__ import annotations

import datetime
import re

from mandos_protocol.errors import ProtocolError

_RFC3339 = re.compile(
    r"""P(?:(?P<weeks>\d+)W
        |(?=\d|T\d)(?:(?P<years>\d+)Y)?(?:(?P<months>\d+)M)?(?:(?P<days>\d+)D)?
         (?:T(?=\d)(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?)""",
    re.VERBOSE,
)
_UNIT = {
    "s": datetime.timedelta(seconds=1),
    "m": datetime.timedelta(minutes=1),
    "h": datetime.timedelta(hours=1),
    "d": datetime.timedelta(days=1),
    "w": datetime.timedelta(weeks=1),
}


def parse_duration(text: str) -> datetime.timedelta:
    """Parse a duration in either of upstream's forms, or raise :class:`ProtocolError`."""
    match = _RFC3339.fullmatch(text)
    if match:
        p = {k: int(v) for k, v in match.groupdict().items() if v is not None}
        return datetime.timedelta(
            weeks=p.get("weeks", 0) + 52 * p.get("years", 0) + 4 * p.get("months", 0),
            days=p.get("days", 0),
            hours=p.get("hours", 0),
            minutes=p.get("minutes", 0),
            seconds=p.get("seconds", 0),
        )
    total = datetime.timedelta()
    for token in text.split():
        number, unit = token[:-1], token[-1]
        if unit not in _UNIT or not number.isascii() or not number.lstrip("+-").isdigit():
            raise ProtocolError(
                f"invalid duration {text!r}: write it as RFC 3339 (PT5M, P1DT2H, P1W) "
                "or as a list like '5m 30s' (units s m h d w)"
            )
        total += int(number) * _UNIT[unit]
    return total


def format_rfc3339(delta: datetime.timedelta) -> str:
    """Format a non-negative duration as RFC 3339 (``P1DT2H3M4S``), whole seconds."""
    seconds = int(delta.total_seconds())
    if seconds < 0:
        raise ProtocolError(f"negative duration {delta}")
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    date = f"{days}D" if days else ""
    time = "".join(f"{v}{u}" for v, u in ((hours, "H"), (minutes, "M"), (seconds, "S")) if v)
    if not date and not time:
        return "PT0S"
    return "P" + date + ("T" + time if time else "")
