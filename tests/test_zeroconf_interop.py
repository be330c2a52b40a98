# SPDX-License-Identifier: GPL-3.0-or-later
"""Zeroconf against the real upstream peers, across a veth pair between two network namespaces.

* our :class:`~server.announce.Announcer` is found by Debian's ``mandos-client`` (no
  ``--connect``), which then gets its password over IPv6 link-local;
* a name already taken on the link makes ours "Mandos #2", as upstream renames;
* our :func:`~password_agent.browse.browse` finds our announcement and upstream's own (the real
  ``mandos`` with zeroconf on, through an avahi-daemon in the server's namespace), and the blob
  fetched from the browsed address is the section's secret.

Our ends run as programs in the namespaces (:mod:`peers.zeroconf_peer`).  An
announcement is found about 0.1 s after a browser starts, once the first second after
registration (probing, one announcement per second) is over.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from peers.dbus import PrivateSystemBus
from peers.netns import VethPair
from peers.upstream import UpstreamServer, run_upstream_client
from peers.zeroconf import (
    PORT,
    Announcement,
    Announcing,
    AvahiDaemon,
    BackgroundProgram,
    OurServerInNamespace,
    names_seen,
    peer_argv,
    run_peer,
)
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.interop


def _secret_file(directory: Path, client: UpstreamClient) -> Path:
    path = directory / "secret"
    path.write_bytes(client.secret)
    path.chmod(0o600)
    return path


def _upstream_client_finds(announcing: Announcing, pair: VethPair,
                           client: UpstreamClient) -> str:
    """Upstream's client in B, without ``--connect``, must find ``announcing`` in A under its
    host name and get the password; returns the client's debug output."""
    result = run_upstream_client(client.keys, None, 20, interface=pair.b.interface,
                                 netns=pair.b.netns, extra_args=["--debug"])
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr + announcing.output()
    assert result.stdout == client.password
    assert f'Mandos server "Mandos" found on {announcing.hostname}.local (' in stderr
    return stderr


def _connected_to_a(pair: VethPair, stderr: str) -> bool:
    """Whether the client connected to A's link-local address (scoped to B's interface) or
    to A's IPv4 address: with both announced, it takes whichever transport resolves first."""
    return (f"Connection to: {pair.a.link_local}%{pair.b.interface}, port {PORT}" in stderr
            or f"Connection to: {pair.a.ipv4}, port {PORT}" in stderr)


def test_upstream_client_finds_announcer_and_gets_password(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_private: Path) -> None:
    serve = (upstream_client.keys.key_id, _secret_file(tmp_private, upstream_client))
    with Announcement(veth_pair.a, PORT, serve=serve) as announcement:
        assert announcement.name == "Mandos"
        stderr = _upstream_client_finds(announcement, veth_pair, upstream_client)
    assert _connected_to_a(veth_pair, stderr), stderr


def test_upstream_client_gets_password_over_ipv6_link_local(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_private: Path) -> None:
    """With no IPv4 on the server's side only the link-local announcement remains, and the
    client must connect to it, scoped to its own interface."""
    subprocess.run(["ip", "-n", veth_pair.a.netns, "addr", "del", f"{veth_pair.a.ipv4}/24",
                    "dev", veth_pair.a.interface], check=True, timeout=10)
    serve = (upstream_client.keys.key_id, _secret_file(tmp_private, upstream_client))
    with Announcement(veth_pair.a, PORT, serve=serve) as announcement:
        stderr = _upstream_client_finds(announcement, veth_pair, upstream_client)
    assert (f"Connection to: {veth_pair.a.link_local}%{veth_pair.b.interface}, port {PORT}"
            in stderr), stderr


def test_our_server_found_by_upstream_client_and_by_browse(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_private: Path) -> None:
    """Our real server (``--interface``, Zeroconf on) is found by upstream's client and by our
    browse(), and the browsed address serves the section's blob."""
    with OurServerInNamespace(veth_pair.a, upstream_client.section, tmp_private) as server:
        stderr = _upstream_client_finds(server, veth_pair, upstream_client)
        assert _connected_to_a(veth_pair, stderr), stderr
        found = json.loads(run_peer(veth_pair.b, ["browse", "10", "--interface",
                                                   veth_pair.b.interface], timeout=30))
        assert found[0] == [f"{veth_pair.a.link_local}%{veth_pair.b.ifindex}", PORT]
        blob = tmp_private / "blob"
        keydir = str(upstream_client.keys.directory)
        run_peer(veth_pair.b, ["fetch", found[0][0], str(PORT), keydir, str(blob)], timeout=30)
    assert blob.read_bytes() == upstream_client.secret


def test_upstream_client_gets_password_from_our_server_over_ipv6_link_local(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_private: Path) -> None:
    """Our real server with only IPv6 link-local on its link, as on a network without DHCP:
    upstream's client finds it by Zeroconf and connects over link-local, scoped to its own
    interface."""
    subprocess.run(["ip", "-n", veth_pair.a.netns, "addr", "del", f"{veth_pair.a.ipv4}/24",
                    "dev", veth_pair.a.interface], check=True, timeout=10)
    with OurServerInNamespace(veth_pair.a, upstream_client.section, tmp_private) as server:
        stderr = _upstream_client_finds(server, veth_pair, upstream_client)
    assert (f"Connection to: {veth_pair.a.link_local}%{veth_pair.b.interface}, port {PORT}"
            in stderr), stderr


def test_name_collision_renames_to_mandos_2(veth_pair: VethPair) -> None:
    with Announcement(veth_pair.b, PORT + 1) as first:
        assert first.name == "Mandos"
        with Announcement(veth_pair.a, PORT) as second:
            assert second.name == "Mandos #2"
            assert "collision" in second.output(), second.output()
            seen = names_seen(veth_pair.b, {"Mandos", "Mandos #2"})
    assert seen.keys() == {"Mandos", "Mandos #2"}, seen
    assert seen["Mandos"][1] == PORT + 1
    addresses, port = seen["Mandos #2"]
    # python-zeroconf scopes a link-local address only if its AAAA came in over IPv6.
    assert ({address.partition("%")[0] for address in addresses}, port) == (
        {veth_pair.a.link_local, veth_pair.a.ipv4}, PORT)


def test_a_late_conflict_renames_our_server_to_mandos_2(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_private: Path) -> None:
    """Our server holds "Mandos"; then a host that did not probe announces "Mandos" too (say,
    its link was down while it probed).  Ours must give the name up and take "Mandos #2", as
    avahi does for upstream, and stay reachable under it."""
    with OurServerInNamespace(veth_pair.a, upstream_client.section, tmp_private) as server:
        assert names_seen(veth_pair.b, {"Mandos"}).get("Mandos", [None, None])[1] == PORT
        with BackgroundProgram(VethPair.wrap(veth_pair.b, peer_argv(
                "squat", str(PORT + 1), veth_pair.b.ipv4)), ready="REGISTERED "):
            seen = names_seen(veth_pair.b, {"Mandos", "Mandos #2"})
            log = server.output()
    assert "changing Zeroconf service name to 'Mandos #2'" in log, log
    assert seen.keys() == {"Mandos", "Mandos #2"}, seen
    assert seen["Mandos"][1] == PORT + 1  # the squatter's
    assert seen["Mandos #2"][1] == PORT  # ours, under its new name


def test_name_collision_with_upstream_avahi_renames_to_mandos_2(
        veth_pair: VethPair, private_bus: PrivateSystemBus,
        upstream_client: UpstreamClient) -> None:
    """Upstream (through avahi-daemon) holds "Mandos" in B; ours in A must notice while
    probing and take the name upstream would take next, and upstream must not be disturbed."""
    with AvahiDaemon(veth_pair.b, private_bus), UpstreamServer(
            upstream_client.section, address=None, zeroconf=True,
            interface=veth_pair.b.interface, netns=veth_pair.b.netns, bus=private_bus,
            debug=True) as server:
        seen = names_seen(veth_pair.a, {"Mandos"})
        assert seen.get("Mandos", [None, None])[1] == server.port, server.log_text()
        with Announcement(veth_pair.a, PORT) as ours:
            assert ours.name == "Mandos #2", ours.output()
            seen = names_seen(veth_pair.a, {"Mandos", "Mandos #2"})
        log = server.log_text()
        assert "Zeroconf service established" in log and "collision" not in log, log
    assert seen.keys() == {"Mandos", "Mandos #2"}, seen
    assert seen["Mandos"][1] == server.port
    assert seen["Mandos #2"][1] == PORT


def test_browse_finds_announcer_link_local_first(veth_pair: VethPair) -> None:
    with Announcement(veth_pair.a, PORT):
        started = time.monotonic()
        found = json.loads(run_peer(veth_pair.b, ["browse", "10", "--interface",
                                                   veth_pair.b.interface], timeout=30))
        elapsed = time.monotonic() - started
    assert found == [[f"{veth_pair.a.link_local}%{veth_pair.b.ifindex}", PORT],
                     [veth_pair.a.ipv4, PORT]]
    assert elapsed < 5, "browse() should return soon after the first server resolves"


def test_browse_returns_empty_list_after_timeout(veth_pair: VethPair) -> None:
    started = time.monotonic()
    assert json.loads(run_peer(veth_pair.b, ["browse", "1.5"], timeout=20)) == []
    assert 1.5 <= time.monotonic() - started < 6


def test_browse_finds_upstream_avahi_announcement_and_fetches_secret(
        veth_pair: VethPair, private_bus: PrivateSystemBus, upstream_client: UpstreamClient,
        tmp_private: Path) -> None:
    with AvahiDaemon(veth_pair.a, private_bus), UpstreamServer(
            upstream_client.section, address=None, zeroconf=True,
            interface=veth_pair.a.interface, netns=veth_pair.a.netns,
            bus=private_bus) as server:
        found = json.loads(run_peer(veth_pair.b, ["browse", "10", "--interface",
                                                   veth_pair.b.interface], timeout=30))
        assert found, "upstream's announcement was not found:\n" + server.log_text()
        host, port = found[0]
        assert (host, port) == (f"{veth_pair.a.link_local}%{veth_pair.b.ifindex}", server.port)
        blob = tmp_private / "blob"
        run_peer(veth_pair.b, ["fetch", host, str(port), str(upstream_client.keys.directory),
                                str(blob)], timeout=30)
    assert blob.read_bytes() == upstream_client.secret
