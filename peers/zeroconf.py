# SPDX-License-Identifier: GPL-3.0-or-later
"""Zeroconf peers for tests: our announcing programs (:mod:`peers.zeroconf_peer`) run in a
network namespace, a private avahi-daemon for upstream's own announcement, and a browser that
waits for names to appear.  avahi-daemon runs with a private tmpfs on /run (its pid file and
socket stay off the host) and its startup takes about a second."""

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

from peers.dbus import PrivateSystemBus
from peers.netns import Side, VethPair
from peers.upstream import kill_process_group

ROOT = Path(__file__).resolve().parent.parent
PORT = 49901
_READY_TIMEOUT = 15.0


def peer_argv(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "peers.zeroconf_peer", *arguments]


def run_peer(side: Side, arguments: Sequence[str], timeout: float) -> str:
    """Run a one-shot :mod:`peers.zeroconf_peer` command in ``side``'s namespace; its
    stdout."""
    result = subprocess.run(VethPair.wrap(side, peer_argv(*arguments)), cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def names_seen(side: Side, wanted: set[str]) -> dict[str, Any]:
    """Browse from ``side`` (one second at a time: a responder may hold back an answer for a
    second after announcing) until every name in ``wanted`` is seen; the last view, which
    fails the caller's checks if something never appeared."""
    deadline = time.monotonic() + _READY_TIMEOUT
    while True:
        seen: dict[str, Any] = json.loads(run_peer(side, ["names", "1"], timeout=20))
        if wanted <= seen.keys() or time.monotonic() > deadline:
            return seen


class BackgroundProgram:
    """A program in its own process group, with its output in a file; ``with`` waits until
    ``ready`` is in the output (``failed`` in it, or the program's exit, fails the test) and
    kills the group at the end."""

    def __init__(self, argv: Sequence[str], ready: str, failed: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
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
                if ((self.failed is not None and self.failed in text)
                        or self._process.poll() is not None):
                    raise AssertionError(f"{self.argv[-1]} failed:\n{text}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.argv[-1]} took too long:\n{text}")
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


class Announcing(BackgroundProgram):
    """One of our announcing programs in ``side``'s namespace.

    It runs in a UTS namespace of its own with the host name :attr:`hostname` (``zc-<netns>``):
    the namespaces share the host's name otherwise, and two announcers on one link would then
    answer for the same ``<hostname>.local.``, mixing their addresses.
    """

    def __init__(self, side: Side, argv: Sequence[str], ready: str, failed: str,
                 env: dict[str, str] | None = None) -> None:
        self.hostname = f"zc-{side.netns}"
        super().__init__(VethPair.wrap(side, ["unshare", "--uts", "sh", "-c",
                                              'hostname "$0" && exec "$@"', self.hostname,
                                              *argv]), ready, failed, env)


class Announcement(Announcing):
    """``peers.zeroconf_peer announce``: our Announcer (plus, with ``serve``, the library's
    server role handing the blob in ``serve[1]`` to key id ``serve[0]``); :attr:`name` is the
    name it registered."""

    def __init__(self, side: Side, port: int, *, name: str = "Mandos",
                 serve: tuple[str, Path] | None = None) -> None:
        arguments = ["announce", str(port), "--name", name, "--interface", side.interface]
        if serve is not None:
            arguments += ["--key-id", serve[0], "--secret-file", str(serve[1])]
        super().__init__(side, peer_argv(*arguments), ready="REGISTERED ", failed="FAILED")

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


class AvahiDaemon(BackgroundProgram):
    """avahi-daemon in ``side``'s namespace on a private system bus, with a private tmpfs on
    ``/run`` (in a mount namespace of its own, gone with the daemon) so that its pid file and
    socket stay off the host."""

    def __init__(self, side: Side, bus: PrivateSystemBus) -> None:
        script = ('mount -t tmpfs tmpfs /run && exec avahi-daemon -f "$1" --no-drop-root '
                  "--no-chroot --no-rlimits --no-proc-title")
        super().__init__([], ready="Server startup complete", env=bus.environment())
        config = self.directory / "avahi-daemon.conf"
        config.write_text(_AVAHI_CONFIG.format(interface=side.interface))
        self.argv = VethPair.wrap(side, ["unshare", "-m", "--propagation", "private", "sh",
                                         "-c", script, "avahi-daemon", str(config)])


