# SPDX-License-Identifier: GPL-3.0-or-later
"""Our mandos-ctl's pure parts and its command line, the latter beside upstream's."""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys

import pytest

from peers.upstream import MANDOS_CTL
from server import ctl

OURS = (sys.executable, "-m", "server.ctl")


@pytest.mark.parametrize(("text", "wanted"), [
    ("PT5M30S", datetime.timedelta(seconds=330)),
    ("P1DT3M20S", datetime.timedelta(days=1, seconds=200)),
    ("P1W", datetime.timedelta(weeks=1)),
    ("5m 30s", datetime.timedelta(seconds=330)),
    ("5m30s", datetime.timedelta(seconds=330)),
    ("1500", datetime.timedelta(milliseconds=1500)),
])
def test_parse_time(text: str, wanted: datetime.timedelta) -> None:
    assert ctl.parse_time(text) == wanted


@pytest.mark.parametrize("text", ["PT1S2M", "soon", "5x"])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="duration"):
        ctl.parse_time(text)


@pytest.mark.parametrize(("ms", "wanted"), [
    (0, "00:00:00"), (300000, "00:05:00"), (93784000, "1T02:03:04"),
    (86400000 * 12 + 1999, "12T00:00:01"),
])
def test_milliseconds_to_string(ms: int, wanted: str) -> None:
    assert ctl.milliseconds_to_string(ms) == wanted


def test_table_without_clients_is_the_header() -> None:
    assert ctl.table([], ctl.DEFAULT_KEYS) == "Name Enabled Timeout Last Successful Check"


def test_self_check() -> None:
    result = subprocess.run([*OURS, "--check"], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "self-test: OK\n")


@pytest.mark.interop
@pytest.mark.parametrize("args", [
    ["-e"], ["-a"], ["-v", "-e", "foo"], ["-j", "-e", "foo"], ["-j", "-v"],
    ["-V", "foo", "bar"], ["-r", "-e", "foo"], ["-e", "-d", "foo"], ["-A", "-D", "foo"],
    ["--start-checker", "--stop-checker", "foo"],
    ["--approve-by-default", "--deny-by-default", "foo"],
])
def test_conflicts_rejected_as_upstream(args: list[str]) -> None:
    """Both refuse the same command lines, before touching any bus (exit status 2)."""
    for program in (OURS, (MANDOS_CTL,)):
        result = subprocess.run([*program, *args], capture_output=True, text=True,
                                env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent",
                                     "PATH": "/usr/bin:/bin"}, timeout=30)
        assert result.returncode == 2, (program, result.stderr)
        assert "error:" in result.stderr


@pytest.mark.parametrize("args", [["--json", "-v"], ["--json", "-j"]])
def test_json_conflicts(args: list[str]) -> None:
    result = subprocess.run([*OURS, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--json" in result.stderr


def test_deny_goes_before_remove() -> None:
    options = ctl.build_parser().parse_args(["-r", "-D", "foo"])
    assert [a.kind for a in ctl.ordered(options.actions)] == ["deny", "remove"]


def test_no_bus_is_one_line_error() -> None:
    result = subprocess.run([*OURS], capture_output=True, text=True, timeout=30,
                            env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"})
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("mandos-ctl: ")
