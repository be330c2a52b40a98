"""Zeroconf against the real upstream peers, across a veth pair between two network namespaces.

* our :class:`~server.announce.Announcer` is found by Debian's ``mandos-client`` (no
  ``--connect``), which then gets its password over IPv6 link-local;
* a name already taken on the link makes ours "Mandos #2", as upstream renames;
* our :func:`~password_agent.browse.browse` finds our announcement and upstream's own (the real
  ``mandos`` with zeroconf on, through an avahi-daemon in the server's namespace), and the blob
  fetched from the browsed address is the section's secret.

Our ends run as programs in the namespaces (:mod:`tests.zeroconf_peer`); recipes and timings are
in /work/shared/reference/zeroconf.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from tests.conftest import UpstreamClient
from tests.peers.dbus import PrivateSystemBus
from tests.peers.netns import Side, VethPair
from tests.peers.upstream import UpstreamServer, kill_process_group, run_upstream_client

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

ROOT = Path(__file__).resolve().parent.parent
PORT = 49901
_READY_TIMEOUT = 15.0


def _peer_argv(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "tests.zeroconf_peer", *arguments]


def _run_peer(side: Side, arguments: Sequence[str], timeout: float) -> str:
    """Run a one-shot :mod:`tests.zeroconf_peer` command in ``side``'s namespace; its stdout."""
    result = subprocess.run(VethPair.wrap(side, _peer_argv(*arguments)), cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _names_seen(side: Side, wanted: set[str]) -> dict[str, Any]:
    """Browse from ``side`` (one second at a time: a responder may hold back an answer for a
    second after announcing) until every name in ``wanted`` is seen; the last view, which
    fails the caller's checks if something never appeared."""
    deadline = time.monotonic() + _READY_TIMEOUT
    while True:
        seen: dict[str, Any] = json.loads(_run_peer(side, ["names", "1"], timeout=20))
        if wanted <= seen.keys() or time.monotonic() > deadline:
            return seen


class Announcing:
    """One of our announcing programs in ``side``'s namespace, in its own process group, with
    its output in a file; ``with`` waits until ``ready`` is in the output (``failed`` in it, or
    the program's exit, fails the test).

    It runs in a UTS namespace of its own with the host name :attr:`hostname` (``zc-<netns>``):
    the namespaces share the host's name otherwise, and two announcers on one link would then
    answer for the same ``<hostname>.local.``, mixing their addresses.
    """

    def __init__(self, side: Side, argv: Sequence[str], ready: str, failed: str,
                 env: dict[str, str] | None = None) -> None:
        self.hostname = f"zc-{side.netns}"
        self.argv = VethPair.wrap(side, ["unshare", "--uts", "sh", "-c",
                                         'hostname "$0" && exec "$@"', self.hostname, *argv])
        self.ready = ready
        self.failed = failed
        self.env = env
        self.directory = Path(tempfile.mkdtemp(prefix="mandos-test-zeroconf-"))
        self.output_path = self.directory / "output"
        self._process: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        try:
            with open(self.output_path, "wb") as output:
                self._process = subprocess.Popen(
                    self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=output,
                    stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
            deadline = time.monotonic() + _READY_TIMEOUT
            while self.ready not in (text := self.output()):
                if self.failed in text or self._process.poll() is not None:
                    raise AssertionError(f"announcing failed:\n{text}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"announcing took too long:\n{text}")
                time.sleep(0.02)
        except BaseException:
            self._stop()
            raise
        return self

    def _stop(self) -> None:
        if self._process is not None:
            kill_process_group(self._process)
            self._process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop()


class Announcement(Announcing):
    """``tests.zeroconf_peer announce``: our Announcer (plus, with ``serve``, the library's
    server role handing the blob in ``serve[1]`` to key id ``serve[0]``); :attr:`name` is the
    name it registered."""

    def __init__(self, side: Side, port: int, *, name: str = "Mandos",
                 serve: tuple[str, Path] | None = None) -> None:
        arguments = ["announce", str(port), "--name", name, "--interface", side.interface]
        if serve is not None:
            arguments += ["--key-id", serve[0], "--secret-file", str(serve[1])]
        super().__init__(side, _peer_argv(*arguments), ready="REGISTERED ", failed="FAILED")

    @property
    def name(self) -> str:
        (line,) = (line for line in self.output().splitlines() if line.startswith("REGISTERED "))
        return line.removeprefix("REGISTERED ")


class OurServerInNamespace(Announcing):
    """Our real server (``python -m server``) in ``side``'s namespace with Zeroconf on, bound to
    the veth interface; its journal events go to its output (the journal socket given does not
    exist)."""

    def __init__(self, side: Side, clients: str, directory: Path) -> None:
        configdir, statedir = directory / "conf", directory / "state"
        configdir.mkdir()
        statedir.mkdir(mode=0o700)
        (configdir / "mandos.conf").write_text("[DEFAULT]\n")
        (configdir / "clients.conf").write_text(f"[DEFAULT]\nchecker = /bin/true\n\n{clients}")
        argv = [sys.executable, "-m", "server", f"--configdir={configdir}",
                f"--statedir={statedir}", f"--interface={side.interface}", f"--port={PORT}",
                "--no-dbus", "--no-restore", "--debug"]
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "MANDOS_JOURNAL_SOCKET": str(directory / "no-journal")}
        super().__init__(side, argv, ready="established on port", failed="Zeroconf regis",
                         env=env)


_AVAHI_CONFIG = """[server]
host-name=mandos-avahi
domain-name=local
use-ipv4=yes
use-ipv6=yes
allow-interfaces={interface}
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
[reflector]
enable-reflector=no
[rlimits]
"""


class AvahiDaemon:
    """avahi-daemon in ``side``'s namespace on a private system bus, with a private tmpfs on
    ``/run`` (in a mount namespace of its own, gone with the daemon) so that its pid file and
    socket stay off the host."""

    _START_TIMEOUT = 10.0

    def __init__(self, side: Side, bus: PrivateSystemBus) -> None:
        self.side = side
        self.bus = bus
        self.directory = Path(tempfile.mkdtemp(prefix="mandos-test-avahi-"))
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AvahiDaemon:
        config = self.directory / "avahi-daemon.conf"
        config.write_text(_AVAHI_CONFIG.format(interface=self.side.interface))
        log_path = self.directory / "avahi.log"
        script = ('mount -t tmpfs tmpfs /run && exec avahi-daemon -f "$1" --no-drop-root '
                  "--no-chroot --no-rlimits --no-proc-title")
        try:
            with open(log_path, "wb") as log:
                self._process = subprocess.Popen(
                    VethPair.wrap(self.side, ["unshare", "-m", "--propagation", "private",
                                              "sh", "-c", script, "sh", str(config)]),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self.bus.environment(), start_new_session=True,
                )
            deadline = time.monotonic() + self._START_TIMEOUT
            while b"Server startup complete" not in log_path.read_bytes():
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("avahi-daemon did not start:\n"
                                       + log_path.read_text(errors="replace"))
                time.sleep(0.05)
        except BaseException:
            self._stop()
            raise
        return self

    def _stop(self) -> None:
        if self._process is not None:
            kill_process_group(self._process)
            self._process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop()


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
        found = json.loads(_run_peer(veth_pair.b, ["browse", "10", "--interface",
                                                   veth_pair.b.interface], timeout=30))
        assert found[0] == [f"{veth_pair.a.link_local}%{veth_pair.b.ifindex}", PORT]
        blob = tmp_private / "blob"
        keydir = str(upstream_client.keys.directory)
        _run_peer(veth_pair.b, ["fetch", found[0][0], str(PORT), keydir, str(blob)], timeout=30)
    assert blob.read_bytes() == upstream_client.secret


def test_name_collision_renames_to_mandos_2(veth_pair: VethPair) -> None:
    with Announcement(veth_pair.b, PORT + 1) as first:
        assert first.name == "Mandos"
        with Announcement(veth_pair.a, PORT) as second:
            assert second.name == "Mandos #2"
            assert "collision" in second.output(), second.output()
            seen = _names_seen(veth_pair.b, {"Mandos", "Mandos #2"})
    assert seen.keys() == {"Mandos", "Mandos #2"}, seen
    assert seen["Mandos"][1] == PORT + 1
    addresses, port = seen["Mandos #2"]
    # python-zeroconf scopes a link-local address only if its AAAA came in over IPv6.
    assert ({address.partition("%")[0] for address in addresses}, port) == (
        {veth_pair.a.link_local, veth_pair.a.ipv4}, PORT)


def test_name_collision_with_upstream_avahi_renames_to_mandos_2(
        veth_pair: VethPair, private_bus: PrivateSystemBus,
        upstream_client: UpstreamClient) -> None:
    """Upstream (through avahi-daemon) holds "Mandos" in B; ours in A must notice while
    probing and take the name upstream would take next, and upstream must not be disturbed."""
    with AvahiDaemon(veth_pair.b, private_bus), UpstreamServer(
            upstream_client.section, address=None, zeroconf=True,
            interface=veth_pair.b.interface, netns=veth_pair.b.netns, bus=private_bus,
            debug=True) as server:
        seen = _names_seen(veth_pair.a, {"Mandos"})
        assert seen.get("Mandos", [None, None])[1] == server.port, server.log_text()
        with Announcement(veth_pair.a, PORT) as ours:
            assert ours.name == "Mandos #2", ours.output()
            seen = _names_seen(veth_pair.a, {"Mandos", "Mandos #2"})
        log = server.log_text()
        assert "Zeroconf service established" in log and "collision" not in log, log
    assert seen.keys() == {"Mandos", "Mandos #2"}, seen
    assert seen["Mandos"][1] == server.port
    assert seen["Mandos #2"][1] == PORT


def test_browse_finds_announcer_link_local_first(veth_pair: VethPair) -> None:
    with Announcement(veth_pair.a, PORT):
        started = time.monotonic()
        found = json.loads(_run_peer(veth_pair.b, ["browse", "10", "--interface",
                                                   veth_pair.b.interface], timeout=30))
        elapsed = time.monotonic() - started
    assert found == [[f"{veth_pair.a.link_local}%{veth_pair.b.ifindex}", PORT],
                     [veth_pair.a.ipv4, PORT]]
    assert elapsed < 5, "browse() should return soon after the first server resolves"


def test_browse_returns_empty_list_after_timeout(veth_pair: VethPair) -> None:
    started = time.monotonic()
    assert json.loads(_run_peer(veth_pair.b, ["browse", "1.5"], timeout=20)) == []
    assert 1.5 <= time.monotonic() - started < 6


def test_browse_finds_upstream_avahi_announcement_and_fetches_secret(
        veth_pair: VethPair, private_bus: PrivateSystemBus, upstream_client: UpstreamClient,
        tmp_private: Path) -> None:
    with AvahiDaemon(veth_pair.a, private_bus), UpstreamServer(
            upstream_client.section, address=None, zeroconf=True,
            interface=veth_pair.a.interface, netns=veth_pair.a.netns,
            bus=private_bus) as server:
        found = json.loads(_run_peer(veth_pair.b, ["browse", "10", "--interface",
                                                   veth_pair.b.interface], timeout=30))
        assert found, "upstream's announcement was not found:\n" + server.log_text()
        host, port = found[0]
        assert (host, port) == (f"{veth_pair.a.link_local}%{veth_pair.b.ifindex}", server.port)
        blob = tmp_private / "blob"
        _run_peer(veth_pair.b, ["fetch", host, str(port), str(upstream_client.keys.directory),
                                str(blob)], timeout=30)
    assert blob.read_bytes() == upstream_client.secret
