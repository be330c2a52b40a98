# SPDX-License-Identifier: GPL-3.0-or-later
"""Upstream's ``mandos-monitor`` (an urwid TUI, unchanged) on our server's D-Bus API: it lists our
clients and its keys act on them.  It runs in a tmux on a private socket; the test reads the
screen with ``capture-pane`` and types with ``send-keys``."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peers.dbus import PrivateSystemBus
from peers.ours import OurServer, clients_conf, fetch
from tests.conftest import Keys
from tests.test_dbus_api import ctl, start_server

pytestmark = pytest.mark.interop

MANDOS_MONITOR = "/usr/sbin/mandos-monitor"


class Terminal:
    """A program in a detached tmux session of its own (private server socket)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mandos-test-tmux-"))
        self.socket = self.directory / "tmux.sock"
        settings = [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]
        self.tmux(["new-session", "-d", "-x", "160", "-y", "40", *settings, *argv])

    def tmux(self, arguments: list[str]) -> str:
        return subprocess.run(["tmux", "-S", str(self.socket), *arguments], check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def screen(self) -> str:
        return self.tmux(["capture-pane", "-p"])

    def wait_for(self, found: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while not found(text := self.screen()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed it:\n{text}")
            time.sleep(0.1)
        return text

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True,
                       timeout=10, check=False)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def server(keys: Keys, private_bus: PrivateSystemBus) -> Iterator[OurServer]:
    conf = clients_conf(keys.foo_section, defaults="checker = /bin/true\ninterval = PT1H\n")
    ours = start_server(private_bus.address, conf)
    try:
        yield ours
    finally:
        ours.close()


def test_upstream_monitor_lists_and_disables_our_client(
        server: OurServer, private_bus: PrivateSystemBus, keys: Keys) -> None:
    terminal = Terminal([MANDOS_MONITOR],
                        {"DBUS_SYSTEM_BUS_ADDRESS": private_bus.address, "TERM": "xterm"})
    try:
        # No checker has run yet: upstream's monitor shows that as "A checker has failed!",
        # with the time until the client expires.
        terminal.wait_for(lambda text: "foo: A checker has failed! Time until client gets "
                          "disabled: 1:" in text)
        terminal.tmux(["send-keys", "-"])  # the selected (only) client: disable
        terminal.wait_for(lambda text: "foo: DISABLED" in text)
        assert ctl(private_bus, "-V", "foo", check=False).returncode == 1
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""
        terminal.tmux(["send-keys", "+"])  # and enable again
        terminal.wait_for(lambda text: "foo:" in text and "foo: DISABLED" not in text)
        assert ctl(private_bus, "-V", "foo", check=False).returncode == 0
        terminal.tmux(["send-keys", "q"])
    finally:
        terminal.close()
