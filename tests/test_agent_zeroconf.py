# SPDX-License-Identifier: GPL-3.0-or-later
"""The password agent without ``--connect``: it browses with Zeroconf (lazily importing
:mod:`password_agent.browse`) and asks what it finds, here our announcer in the other network
namespace of a veth pair serving the upstream-made blob, our real server announcing itself,
and upstream's real server announced by a real avahi-daemon.  Also: what the agent imports when it
does not browse (the initramfs has no room for more)."""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from peers.agent import AgentRun
from peers.ask import FakeRequester
from peers.dbus import PrivateSystemBus
from peers.netns import VethPair
from peers.upstream import UpstreamServer
from peers.zeroconf import PORT, Announcement, AvahiDaemon, OurServerInNamespace
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.interop

#: Third-party top-level modules the agent may load when given --connect.
ALLOWED = {"password_agent", "mandos_protocol", "inotify_simple", "gnupg"}


def test_agent_imports_only_what_the_initramfs_has() -> None:
    code = ("import sys; before = set(sys.modules); import password_agent.cli; "
            "print(' '.join({name.split('.')[0] for name in set(sys.modules) - before}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=30)
    loaded = set(result.stdout.split())
    foreign = loaded - set(sys.stdlib_module_names) - ALLOWED
    assert foreign == set(), foreign
    assert "zeroconf" not in loaded and "cryptography" not in loaded


def _agent_answers_by_zeroconf(veth_pair: VethPair, client: UpstreamClient,
                               tmp_path: Path, interface: str | None = None) -> str:
    """Run the agent without --connect in side B while a Mandos server is announced in side A;
    the request must get the password.  ``interface``: the agent's ``--interface`` (default:
    side B's interface).  Returns the agent's log."""
    requests = tmp_path / "ask-password"
    requests.mkdir()
    work = Path(tempfile.mkdtemp(prefix="mpa-"))
    agent: AgentRun | None = None
    try:
        with FakeRequester(requests) as fake:
            agent = AgentRun(
                ["--keydir", str(client.keys.directory), "--run-directory",
                 str(work / "run"), "--kernel-cmdline", "/dev/null", "--timeout", "30",
                 "--agent-directory", str(requests),
                 f"--interface={interface or veth_pair.b.interface}"],
                work / "agent.log", functools.partial(VethPair.wrap, veth_pair.b))
            assert fake.receive(25) == b"+" + client.password, agent.log()
            fake.remove_ask_file()
            assert agent.wait() == 0, agent.log()
        log = agent.log()
        assert "Zeroconf found" in log
        assert client.password.decode() not in log
        assert [path.name for path in (work / "run").iterdir()] == ["answered"]
        return log
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)


def _fetched_over_link_local(log: str, veth_pair: VethPair, port: int) -> bool:
    """Whether the agent got its blob from side A's link-local address, scoped to side B."""
    return (f"[{veth_pair.a.link_local}%{veth_pair.b.ifindex}]:{port} sent" in log
            or f"[{veth_pair.a.link_local}%{veth_pair.b.interface}]:{port} sent" in log)


def test_agent_finds_the_announcer_with_zeroconf(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_private: Path,
        tmp_path: Path) -> None:
    secret = tmp_private / "secret"
    secret.write_bytes(upstream_client.secret)
    with Announcement(veth_pair.a, PORT, serve=(upstream_client.keys.key_id, secret)):
        _agent_answers_by_zeroconf(veth_pair, upstream_client, tmp_path)


def test_agent_with_an_interface_list_browses_every_interface(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_private: Path,
        tmp_path: Path) -> None:
    """Upstream's comma-separated ``--interface``: more than one name means that browsing is
    not confined to one interface (upstream's ``mandos-client`` browses on all of them)."""
    secret = tmp_private / "secret"
    secret.write_bytes(upstream_client.secret)
    with Announcement(veth_pair.a, PORT, serve=(upstream_client.keys.key_id, secret)):
        log = _agent_answers_by_zeroconf(veth_pair, upstream_client, tmp_path,
                                         interface=f"{veth_pair.b.interface},lo")
    assert "trying anyway" not in log  # both interfaces were up


def test_agent_finds_our_server_with_zeroconf_over_link_local(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="mandos-test-server-"))
    try:
        with OurServerInNamespace(veth_pair.a, upstream_client.section, directory):
            log = _agent_answers_by_zeroconf(veth_pair, upstream_client, tmp_path)
        assert _fetched_over_link_local(log, veth_pair, PORT), log
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_agent_finds_upstreams_own_announcement(
        veth_pair: VethPair, private_bus: PrivateSystemBus, upstream_client: UpstreamClient,
        tmp_path: Path) -> None:
    """The real ``mandos`` announcing through a real avahi-daemon (IPv6 only, as upstream
    publishes)."""
    with AvahiDaemon(veth_pair.a, private_bus), UpstreamServer(
            upstream_client.section, address=None, zeroconf=True,
            interface=veth_pair.a.interface, netns=veth_pair.a.netns,
            bus=private_bus) as server:
        log = _agent_answers_by_zeroconf(veth_pair, upstream_client, tmp_path)
    assert _fetched_over_link_local(log, veth_pair, server.port), log


def test_sigterm_ends_a_browse_at_once(veth_pair: VethPair, upstream_client: UpstreamClient,
                                       tmp_path: Path) -> None:
    """No server on the link: the agent browses in rounds of 2 s.  A SIGTERM in the middle of
    one (switch-root's) must end the agent within 1 s; it used to wait for the round's end."""
    requests = tmp_path / "ask-password"
    requests.mkdir()
    work = Path(tempfile.mkdtemp(prefix="mpa-"))
    agent: AgentRun | None = None
    try:
        with FakeRequester(requests):
            agent = AgentRun(
                ["--keydir", str(upstream_client.keys.directory), "--run-directory",
                 str(work / "run"),
                 "--kernel-cmdline", "/dev/null", "--timeout", "60", "--agent-directory",
                 str(requests), f"--interface={veth_pair.b.interface}"],
                work / "agent.log", functools.partial(VethPair.wrap, veth_pair.b))
            agent.wait_log("Zeroconf found no Mandos server", timeout=30)
            time.sleep(1.0)  # past the 0.5 s back-off: inside the next 2 s browse
            agent.process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            status = agent.wait(timeout=10)
            took = time.monotonic() - sent
        assert status == 0, agent.log()
        assert took < 1.0, f"{took:.2f} s after SIGTERM:\n{agent.log()}"
        assert [path.name for path in (work / "run").iterdir()] in ([], ["answered"])
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_a_network_not_usable_yet_is_browsed_as_soon_as_it_is(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_path: Path) -> None:
    """The agent's interface has no address at first (as in an initramfs before the link-local
    address is done with duplicate address detection): the agent says so, instead of "found
    no Mandos server", and tries again at the short network retry, so that it browses as soon
    as the address comes.  A boot bench found rounds that ended empty just before the address
    came, followed by the whole back-off."""
    side = veth_pair.b

    def sysctl(setting: str) -> None:
        subprocess.run(["ip", "netns", "exec", side.netns, "sysctl", "-q", "-w",
                        f"net.ipv6.conf.{side.interface}.{setting}"],
                       check=True, capture_output=True, timeout=10)

    subprocess.run(["ip", "-n", side.netns, "-4", "addr", "flush", "dev", side.interface],
                   check=True, capture_output=True, timeout=10)
    sysctl("accept_dad=0")
    sysctl("disable_ipv6=1")
    requests = tmp_path / "ask-password"
    requests.mkdir()
    work = Path(tempfile.mkdtemp(prefix="mpa-"))
    directory = Path(tempfile.mkdtemp(prefix="mandos-test-server-"))
    agent: AgentRun | None = None
    try:
        with OurServerInNamespace(veth_pair.a, upstream_client.section, directory), \
                FakeRequester(requests) as fake:
            agent = AgentRun(
                ["--keydir", str(upstream_client.keys.directory), "--run-directory",
                 str(work / "run"), "--kernel-cmdline", "/dev/null", "--timeout", "60",
                 "--agent-directory", str(requests), f"--interface={side.interface}"],
                work / "agent.log", functools.partial(VethPair.wrap, side))
            agent.wait_log("Zeroconf has no network to browse yet", timeout=30)
            sysctl("disable_ipv6=0")
            assert fake.receive(30) == b"+" + upstream_client.password, agent.log()
            fake.remove_ask_file()
            assert agent.wait() == 0, agent.log()
        log = agent.log()
        assert "Zeroconf found no Mandos server" not in log, log
        assert _fetched_over_link_local(log, veth_pair, PORT), log
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)
