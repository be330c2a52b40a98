# SPDX-License-Identifier: GPL-3.0-or-later
"""Zeroconf rules that need no network: the rename after a name collision (avahi's, which
upstream's server gets) and which browsed addresses the agent can connect to."""

from __future__ import annotations

from pathlib import Path

import pytest

from password_agent.browse import _ipv6_ready, _usable
from server.announce import alternative_service_name


@pytest.mark.parametrize(("name", "expected"), [
    ("Mandos", "Mandos #2"),
    ("Mandos #2", "Mandos #3"),
    ("Mandos #9", "Mandos #10"),
    ("My server #x", "My server #x #2"),
    ("Mandos#2", "Mandos#2 #2"),
    ("Mandos #02", "Mandos #02 #2"),
    ("Mandos #0", "Mandos #0 #2"),
    ("a #2 b #7", "a #2 b #8"),
    ("x" * 63, "x" * 60 + " #2"),
    ("x" * 58 + " #99", "x" * 58 + " #100"),
    ("ä" * 31, "ä" * 30 + " #2"),
])
def test_alternative_service_name_as_avahi(name: str, expected: str) -> None:
    assert alternative_service_name(name) == expected


@pytest.mark.parametrize(("host", "scope", "expected"), [
    ("10.0.0.1", None, "10.0.0.1"),
    ("169.254.1.1", 3, "169.254.1.1"),
    ("2001:db8::1", 3, "2001:db8::1"),
    ("fe80::1%3", None, "fe80::1%3"),
    ("fe80::1%3", 3, "fe80::1%3"),
    ("fe80::1%4", 3, None),  # heard on another link than the one asked for
    ("fe80::1", 3, "fe80::1%3"),
    ("fe80::1", None, None),  # no scope known: cannot be connected to
])
def test_browsed_link_local_addresses_need_a_scope(host: str, scope: int | None,
                                                   expected: str | None) -> None:
    assert _usable(host, scope) == expected


def test_ipv6_is_ready_on_an_interface_once_an_address_left_duplicate_detection(
        tmp_path: Path) -> None:
    """/proc/net/if_inet6's flags: tentative (0x40) and DAD-failed (0x08) addresses do not
    count; a permanent one (0x80) does."""
    table = tmp_path / "if_inet6"
    table.write_text("fe800000000000005054fffe12345601 04 40 20 c0     eth0\n"
                     "fe800000000000005054fffe12345602 05 40 20 80     eth1\n"
                     "fe800000000000005054fffe12345603 06 40 20 88     eth2\n"
                     "00000000000000000000000000000001 01 80 10 80       lo\n")
    assert _ipv6_ready(table) == {"eth1", "lo"}
    assert _ipv6_ready(tmp_path / "missing") == set()
