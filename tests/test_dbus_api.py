# SPDX-License-Identifier: GPL-3.0-or-later
"""Our server's D-Bus admin API, driven by upstream's own ``mandos-ctl`` (unchanged) on a
private system bus, with the effects checked on the wire (a fetch gets the blob or nothing)
and the signals heard with dbus-fast."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from peers.dbus import PrivateSystemBus
from peers.ours import OurServer, clients_conf, fetch, set_options
from peers.upstream import BUS_NAME, MANDOS_CTL, section_secret
from tests.conftest import Keys

pytestmark = pytest.mark.interop

CLIENT_INTERFACE = "se.recompile.Mandos.Client"


def ctl(bus: PrivateSystemBus, *args: str, program: tuple[str, ...] = (MANDOS_CTL,),
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a mandos-ctl (upstream's by default) on the private bus."""
    result = subprocess.run([*program, *args], env=bus.environment(), capture_output=True,
                            text=True, timeout=30, cwd=Path(__file__).parent.parent)
    if check and result.returncode != 0:
        raise AssertionError(f"{program[-1]} {args} -> {result.returncode}: {result.stderr}")
    return result


def dump(bus: PrivateSystemBus, *args: str) -> dict[str, dict[str, Any]]:
    return dict(json.loads(ctl(bus, "-j", *args).stdout))


def name_has_owner(bus: PrivateSystemBus) -> bool:
    result = subprocess.run(
        ["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner", f"string:{BUS_NAME}"],
        env=bus.environment(), capture_output=True, text=True, timeout=10)
    return "boolean true" in result.stdout


@dataclass
class Signals:
    """Signals on the private bus, heard by a dbus-fast connection of the test."""

    bus: MessageBus
    received: list[Message] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def handle(self, message: Message) -> None:
        if message.message_type == MessageType.SIGNAL and message.path != "/org/freedesktop/DBus":
            self.received.append(message)
            self.arrived.set()

    def named(self, member: str) -> list[Message]:
        return [m for m in self.received if m.member == member]

    async def wait_for(self, member: str, timeout: float = 10.0) -> Message:
        async with asyncio.timeout(timeout):
            while not self.named(member):
                self.arrived.clear()
                await self.arrived.wait()
        return self.named(member)[0]


async def listen(bus: PrivateSystemBus) -> Signals:
    connection = await MessageBus(bus_address=bus.address).connect()
    signals = Signals(connection)
    connection.add_message_handler(signals.handle)
    await connection.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=["type='signal'"]))
    return signals


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


@dataclass
class Setup:
    bus: PrivateSystemBus
    server: OurServer
    keys: Keys

    def fetch_foo(self) -> bytes:
        return fetch(self.keys.foo, "127.0.0.1", self.server.port)

    def fetch_bar(self) -> bytes:
        return fetch(self.keys.bar, "127.0.0.1", self.server.port, timeout=30)


def start_server(address: str, conf: str) -> OurServer:
    """Our server with D-Bus on, its system bus at ``address``."""
    server = OurServer(conf, use_dbus=True)
    try:
        server.start(env={"DBUS_SYSTEM_BUS_ADDRESS": address})
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture
def setup(keys: Keys, private_bus: PrivateSystemBus) -> Iterator[Setup]:
    """Our server with D-Bus on: ``foo`` (no approval) and ``bar`` (approval needed within
    30 s, denied by default), checkers that never run during a test."""
    conf = clients_conf(
        set_options(re.sub(r"(?m)^host\s*=.*\n", "", keys.foo_section), host="foo.example"),
        set_options(keys.bar_section, approval_delay="PT30S", approved_by_default="False"),
        defaults="checker = /bin/true\ninterval = PT1H\n")
    server = start_server(private_bus.address, conf)
    try:
        yield Setup(private_bus, server, keys)
    finally:
        server.close()


def test_upstream_ctl_lists_our_clients(setup: Setup) -> None:
    listing = ctl(setup.bus).stdout.splitlines()
    assert listing[0].split() == ["Name", "Enabled", "Timeout", "Last", "Successful", "Check"]
    assert [line.split()[:3] for line in listing[1:]] == [["foo", "Yes", "00:05:00"],
                                                          ["bar", "Yes", "00:05:00"]]
    data = dump(setup.bus)
    assert list(data) == ["foo", "bar"]
    foo, bar = data["foo"], data["bar"]
    assert foo["KeyID"] == setup.keys.foo.key_id
    assert foo["Host"] == "foo.example"
    assert (foo["Timeout"], foo["ExtendedTimeout"], foo["Interval"]) == (300000, 900000, 3600000)
    assert foo["Enabled"] is True and foo["ApprovedByDefault"] is True
    assert (bar["ApprovalDelay"], bar["ApprovedByDefault"]) == (30000, False)
    assert foo["LastCheckerStatus"] == -2 and foo["LastCheckedOK"] == ""
    assert foo["Checker"] == "/bin/true" and foo["CheckerRunning"] is False
    assert foo["Expires"] > foo["Created"] and "+" not in foo["Created"]
    verbose = ctl(setup.bus, "-v", "bar").stdout.splitlines()
    assert "Approval Is Pending" in verbose[0] and "00:00:30" in verbose[1]


def test_disable_and_enable_change_what_a_client_gets(setup: Setup) -> None:
    async def scenario() -> None:
        signals = await listen(setup.bus)
        try:
            await in_thread(ctl, setup.bus, "-d", "foo")
            assert await in_thread(setup.fetch_foo) == b""
            rejected = await signals.wait_for("Rejected")
            assert (rejected.path, rejected.body) == ("/clients/foo", ["Disabled"])
            changed = [m for m in signals.named("PropertiesChanged")
                       if m.body[1].get("Enabled") is not None]
            assert changed and changed[0].body[1]["Enabled"].value is False
            await in_thread(ctl, setup.bus, "--enable", "foo")
            assert await in_thread(setup.fetch_foo) == section_secret(setup.keys.foo_section)
            got = await signals.wait_for("GotSecret")
            assert got.path == "/clients/foo"
        finally:
            signals.bus.disconnect()

    asyncio.run(scenario())
    assert dump(setup.bus, "foo")["foo"]["Enabled"] is True


def test_approval_by_upstream_ctl(setup: Setup) -> None:
    async def scenario() -> None:
        signals = await listen(setup.bus)
        try:
            waiting = asyncio.ensure_future(in_thread(setup.fetch_bar))
            need = await signals.wait_for("NeedApproval")
            assert (need.path, need.body) == ("/clients/bar", [30000, False])
            assert dump(setup.bus, "bar")["bar"]["ApprovalPending"] is True
            await in_thread(ctl, setup.bus, "--approve", "bar")
            assert await waiting == section_secret(setup.keys.bar_section)
            await signals.wait_for("GotSecret")
            # Upstream's -D denies the next request at once (within ApprovalDuration).
            await in_thread(ctl, setup.bus, "--approval-duration", "PT1M", "--deny", "bar")
            assert await in_thread(setup.fetch_bar) == b""
            rejected = await signals.wait_for("Rejected")
            assert rejected.body == ["Denied"]
        finally:
            signals.bus.disconnect()

    asyncio.run(scenario())
    bar = dump(setup.bus, "bar")["bar"]
    assert bar["ApprovalPending"] is False and bar["LastApprovalRequest"] != ""


def test_settings_by_upstream_ctl(setup: Setup, tmp_private: Path) -> None:
    secret = tmp_private / "blob"
    secret.write_bytes(b"new blob \x00\xff")
    ctl(setup.bus, "-t", "PT1H", "--extended-timeout", "P1D", "-i", "PT2M",
        "--approval-delay", "PT3S", "--approval-duration", "PT4S", "-H", "other.example",
        "-c", "/bin/false %(host)s", "--deny-by-default", "-s", str(secret), "foo")
    foo = dump(setup.bus, "foo")["foo"]
    assert (foo["Timeout"], foo["ExtendedTimeout"], foo["Interval"]) == (3600000, 86400000,
                                                                        120000)
    assert (foo["ApprovalDelay"], foo["ApprovalDuration"]) == (3000, 4000)
    assert foo["Host"] == "other.example" and foo["Checker"] == "/bin/false %(host)s"
    assert foo["ApprovedByDefault"] is False
    # A new interval starts a checker now, as upstream (the options apply in their order: the
    # checker was still /bin/true then); with PT1H nothing else would start one.
    assert setup.server.journal is not None
    setup.server.journal.wait_for("checker-succeeded", MANDOS_CLIENT="foo")
    ctl(setup.bus, "--approval-delay", "PT0S", "foo")
    assert setup.fetch_foo() == b"new blob \x00\xff"
    ctl(setup.bus, "--bump-timeout", "foo")
    assert dump(setup.bus, "foo")["foo"]["LastCheckedOK"] != ""
    # A timeout that has already passed disables the client at once.
    ctl(setup.bus, "-t", "PT0S", "foo")
    assert dump(setup.bus, "foo")["foo"]["Enabled"] is False


def test_a_huge_timeout_is_refused_before_it_is_assigned(setup: Setup) -> None:
    """P9000Y as milliseconds, set over D-Bus: assigning it would make every later checker
    result overflow the expiry, and the client would expire for good."""
    before = dump(setup.bus, "foo")["foo"]["Timeout"]
    nine_thousand_years = 9000 * 52 * 7 * 86400 * 1000  # as upstream's mandos-ctl counts
    result = subprocess.run(
        ["dbus-send", "--system", "--print-reply", f"--dest={BUS_NAME}", "/clients/foo",
         "org.freedesktop.DBus.Properties.Set", "string:se.recompile.Mandos.Client",
         "string:Timeout", f"variant:uint64:{nine_thousand_years}"],
        env=setup.bus.environment(), capture_output=True, text=True, timeout=10)
    assert result.returncode != 0 and "longer than 100 years" in result.stderr, result
    assert dump(setup.bus, "foo")["foo"]["Timeout"] == before
    ctl(setup.bus, "--bump-timeout", "foo")  # checked_ok still works
    assert dump(setup.bus, "foo")["foo"]["Enabled"] is True
    assert setup.fetch_foo() != b""


def test_a_quoted_checker_expansion_is_refused_and_never_run(setup: Setup,
                                                              tmp_path: Path) -> None:
    """shlex.quote inside double quotes is undone: with Host $(touch FILE), a checker
    "ping \"%(host)s\"" would run touch.  Refused by the setter, and never run."""
    marker = tmp_path / "injected"
    ctl(setup.bus, "-H", f"$(touch {marker})", "foo")
    refused = ctl(setup.bus, "-c", '/bin/true "%(host)s"', "foo", check=False)
    assert refused.returncode != 0 and "inside quotes" in refused.stderr
    assert dump(setup.bus, "foo")["foo"]["Checker"] != '/bin/true "%(host)s"'
    ctl(setup.bus, "-c", "/bin/true %(host)s", "-i", "PT0.1S", "foo")  # bare: safe
    assert setup.server.journal is not None
    setup.server.journal.wait_for("checker-succeeded", MANDOS_CLIENT="foo")
    assert not marker.exists()


def test_checker_signals_and_remove(setup: Setup) -> None:
    async def scenario() -> None:
        signals = await listen(setup.bus)
        try:
            await in_thread(ctl, setup.bus, "--start-checker", "foo")
            started = await signals.wait_for("CheckerStarted")
            completed = await signals.wait_for("CheckerCompleted")
            assert started.body == ["/bin/true"] and completed.body == [0, 0, "/bin/true"]
            await in_thread(ctl, setup.bus, "--remove", "foo")
            removed = await signals.wait_for("ClientRemoved")
            assert removed.body == ["/clients/foo", "foo"]
            await signals.wait_for("InterfacesRemoved")
            assert ["/", "/clients/foo", [CLIENT_INTERFACE]] in [
                [m.path, *m.body] for m in signals.named("InterfacesRemoved")]
            assert await in_thread(setup.fetch_foo) == b""
            not_found = await signals.wait_for("ClientNotFound")
            assert not_found.body == [setup.keys.foo.key_id, "127.0.0.1"]
        finally:
            signals.bus.disconnect()

    asyncio.run(scenario())
    assert list(dump(setup.bus)) == ["bar"]
    # A reload brings it back from clients.conf.
    setup.server.signal(1)
    assert setup.server.journal is not None
    setup.server.journal.wait_for("config-loaded", count=2)
    assert list(dump(setup.bus)) == ["bar", "foo"]


def test_server_runs_without_a_bus(keys: Keys, tmp_path: Path) -> None:
    server = start_server(f"unix:path={tmp_path / 'no-such-socket'}",
                          clients_conf(keys.foo_section))
    try:
        assert server.journal is not None
        warnings = server.journal.find("server-error")
        assert warnings and "D-Bus" in warnings[0]["MESSAGE"]
        assert fetch(keys.foo, "127.0.0.1", server.port) == section_secret(keys.foo_section)
    finally:
        server.close()


def test_server_survives_the_bus_going_away(keys: Keys) -> None:
    bus = PrivateSystemBus().start()
    try:
        server = start_server(bus.address, clients_conf(keys.foo_section))
    finally:
        bus.stop()
    try:
        assert fetch(keys.foo, "127.0.0.1", server.port) == section_secret(keys.foo_section)
        assert server.stop() == 0
    finally:
        server.close()


def test_no_dbus_takes_no_name(keys: Keys, private_bus: PrivateSystemBus) -> None:
    server = OurServer(clients_conf(keys.foo_section))  # --no-dbus
    try:
        server.start(env={"DBUS_SYSTEM_BUS_ADDRESS": private_bus.address})
        assert not name_has_owner(private_bus)
    finally:
        server.close()
    server = start_server(private_bus.address, clients_conf(keys.foo_section))
    try:
        assert name_has_owner(private_bus)
    finally:
        server.close()


def test_secret_is_write_only(setup: Setup) -> None:
    result = subprocess.run(
        ["dbus-send", "--system", "--print-reply", f"--dest={BUS_NAME}", "/clients/foo",
         "org.freedesktop.DBus.Properties.Get", "string:se.recompile.Mandos.Client",
         "string:Secret"], env=setup.bus.environment(), capture_output=True, text=True,
        timeout=10)
    assert result.returncode != 0
    assert base64.b64encode(section_secret(setup.keys.foo_section)).decode()[:20] not in (
        result.stdout + result.stderr)
