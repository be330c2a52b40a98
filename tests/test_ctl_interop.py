# SPDX-License-Identifier: GPL-3.0-or-later
"""Our mandos-ctl against our server and against upstream's, beside upstream's mandos-ctl: the
same output for the same state, and actions that take effect on the wire."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.dbus import PrivateSystemBus
from peers.ours import OurServer, clients_conf, fetch, set_options
from peers.upstream import UpstreamServer, section_secret
from tests.conftest import Keys
from tests.test_dbus_api import ctl, start_server

pytestmark = pytest.mark.interop

OURS = (sys.executable, "-m", "server.ctl")
LISTINGS: tuple[list[str], ...] = ([], ["-v"], ["-j"], ["bar"], ["-v", "foo"], ["-j", "bar", "foo"])


def assert_same_output(bus: PrivateSystemBus) -> None:
    """Each listing by our ctl equals upstream's, taken just before and just after it; a
    server's checker may change the state between two listings (a new "Last Successful
    Check"), so a comparison across such a change is taken again."""
    for args in LISTINGS:
        for _ in range(5):
            before = ctl(bus, *args).stdout
            ours = ctl(bus, *args, program=OURS).stdout
            if ctl(bus, *args).stdout == before:
                break
        else:
            raise AssertionError(f"the state kept changing during {args}")
        assert ours == before, args


@pytest.fixture
def ours(keys: Keys, private_bus: PrivateSystemBus) -> Iterator[OurServer]:
    conf = clients_conf(
        keys.foo_section,
        set_options(keys.bar_section, approval_delay="PT30S", approved_by_default="False"),
        defaults="checker = /bin/true\ninterval = PT1H\n")
    server = start_server(private_bus.address, conf)
    try:
        yield server
    finally:
        server.close()


def test_same_output_as_upstream_ctl_on_our_server(ours: OurServer,
                                                   private_bus: PrivateSystemBus) -> None:
    assert_same_output(private_bus)
    ctl(private_bus, "-d", "-t", "P2DT3H", "--approval-duration", "PT90S", "bar", program=OURS)
    ctl(private_bus, "-b", "foo", program=OURS)
    assert_same_output(private_bus)


def test_our_ctl_actions_on_our_server(ours: OurServer, private_bus: PrivateSystemBus,
                                       keys: Keys, tmp_path: Path) -> None:
    foo_secret = section_secret(keys.foo_section)
    ctl(private_bus, "--disable", "foo", program=OURS)
    assert fetch(keys.foo, "127.0.0.1", ours.port) == b""
    assert ctl(private_bus, "-V", "foo", program=OURS, check=False).returncode == 1
    ctl(private_bus, "-e", "foo", program=OURS)
    assert ctl(private_bus, "-V", "foo", program=OURS).returncode == 0
    assert fetch(keys.foo, "127.0.0.1", ours.port) == foo_secret
    # Approval: a request of bar waits; --approve lets it through.
    got: list[bytes] = []
    waiting = threading.Thread(
        target=lambda: got.append(fetch(keys.bar, "127.0.0.1", ours.port, timeout=30)))
    waiting.start()
    try:
        assert ours.journal is not None
        ours.journal.wait_for("needs-approval", MANDOS_CLIENT="bar")
        ctl(private_bus, "-A", "bar", program=OURS)
    finally:
        waiting.join()
    assert got == [section_secret(keys.bar_section)]
    # --json: the properties after the actions.
    after = json.loads(ctl(private_bus, "--json", "-i", "PT5M", "--deny-by-default", "-a",
                           program=OURS).stdout)
    assert list(after) == ["foo", "bar"]
    assert all(c["Interval"] == 300000 and c["ApprovedByDefault"] is False
               for c in after.values())
    blob = tmp_path / "blob"
    blob.write_bytes(b"another blob")
    ctl(private_bus, "--secret", str(blob), "foo", program=OURS)
    assert fetch(keys.foo, "127.0.0.1", ours.port) == b"another blob"
    ctl(private_bus, "-r", "foo", program=OURS)
    assert list(json.loads(ctl(private_bus, "--json", program=OURS).stdout)) == ["bar"]
    unknown = ctl(private_bus, "foo", program=OURS, check=False)
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1


def test_our_ctl_on_upstream_server(keys: Keys, private_bus: PrivateSystemBus) -> None:
    conf = keys.foo_section + "\n" + set_options(keys.bar_section, approval_delay="PT30S")
    with UpstreamServer(conf, use_dbus=True, bus=private_bus):
        assert_same_output(private_bus)
        ctl(private_bus, "-d", "-t", "PT1H", "--extended-timeout", "P1DT2H", "bar",
            program=OURS)
        bar = json.loads(ctl(private_bus, "-j", "bar").stdout)["bar"]
        assert (bar["Enabled"], bar["Timeout"], bar["ExtendedTimeout"]) == (
            False, 3600000, 93600000)
        assert ctl(private_bus, "-V", "bar", program=OURS, check=False).returncode == 1
        ctl(private_bus, "-e", "-H", "bar.example", "bar", program=OURS)
        assert_same_output(private_bus)
        assert json.loads(ctl(private_bus, "-j", "bar").stdout)["bar"]["Host"] == "bar.example"
