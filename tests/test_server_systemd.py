# SPDX-License-Identifier: GPL-3.0-or-later
"""The server as a systemd service: socket activation (systemd-socket-activate), sd_notify
(READY=1, STATUS=, WATCHDOG=1, STOPPING=1 on a test-bound NOTIFY_SOCKET), the unit files
(systemd-analyze verify and security), and a real journald receiving the events."""

from __future__ import annotations

import base64
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.journald import PrivateJournal
from peers.ours import REPO, OurServer, clients_conf, fetch, set_options
from peers.upstream import (
    KeySet,
    free_port,
    kill_process_group,
    run_upstream_client,
    section_secret,
)
from server.journal import Event
from tests.conftest import Keys

UNITS = REPO / "units"


class NotifySocket:
    """A datagram socket standing in for the service manager's NOTIFY_SOCKET."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.socket"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.path))
        self.messages: list[str] = []

    def wait_for(self, assignment: str, timeout: float = 15.0, *, prefix: bool = False) -> str:
        """The first message (so far or arriving) with the line ``assignment`` (or a line
        starting with it, with ``prefix``)."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                for line in message.split("\n"):
                    if line == assignment or (prefix and line.startswith(assignment)):
                        return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {assignment!r} in {self.messages}")
            self.socket.settimeout(remaining)
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sink = NotifySocket(tmp_path)
    yield sink
    sink.close()


def test_socket_activation_and_notify(keys: Keys, tmp_path: Path,
                                      notify: NotifySocket) -> None:
    """The server serves on the socket systemd-socket-activate passes (sd_listen_fds through
    pystemd), notifies, and its checkers inherit neither LISTEN_* nor NOTIFY_SOCKET."""
    conf = tmp_path / "conf"
    state = tmp_path / "state"
    conf.mkdir()
    state.mkdir(mode=0o700)
    checker_env = tmp_path / "checker-env"
    os.mkfifo(checker_env)
    reader = os.open(checker_env, os.O_RDONLY | os.O_NONBLOCK)
    (conf / "clients.conf").write_text(clients_conf(
        keys.foo_section, defaults=f"checker = env > {checker_env}\ninterval = PT1S\n"))
    port = free_port()
    argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=mandos",
            "-E", f"NOTIFY_SOCKET={notify.path}", "-E", f"PYTHONPATH={REPO}",
            "-E", f"MANDOS_JOURNAL_SOCKET={tmp_path / 'no-journal'}",
            sys.executable, "-m", "server", f"--configdir={conf}", f"--statedir={state}",
            "--no-zeroconf"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        # No --port: the server can only serve through the inherited socket.
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
                time.sleep(0.05)
        result = run_upstream_client(keys.foo, f"127.0.0.1:{port}", 20)
        assert result.stdout == keys.password, result.stderr.decode(errors="replace")
        ready = notify.wait_for("READY=1")
        assert any(line.startswith("STATUS=1 clients, 1 enabled") for line in ready.split("\n"))
        notify.wait_for("STATUS=1 clients, 1 enabled; last secret sent to foo at ", prefix=True)
        ready_to_read, _, _ = select.select([reader], [], [], 30)  # the first checker's env
        assert ready_to_read, "no checker ran"
        inherited = os.read(reader, 1 << 16).decode()
        assert "PYTHONPATH=" in inherited
        assert "LISTEN_" not in inherited and "NOTIFY_SOCKET" not in inherited, inherited
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        notify.wait_for("STOPPING=1")
    finally:
        os.close(reader)
        kill_process_group(process)
        if process.stderr is not None:
            process.stderr.close()


def test_socket_option_uses_inherited_socket(keys: Keys, tmp_path: Path) -> None:
    """``--socket FD``: the server serves on a socket it inherited, binding nothing itself."""
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    fd = listening.fileno()
    server = OurServer(clients_conf(keys.foo_section), directory=tmp_path, port=port)
    server.extra_args.append(f"--socket={fd}")
    try:
        server.start(wait=False, pass_fds=(fd,))
        listening.close()  # only the server holds it now
        server.wait_listening()
        assert fetch(keys.foo, "127.0.0.1", port) == section_secret(keys.foo_section)
    finally:
        listening.close()
        server.close()


def test_watchdog_pings(keys: Keys, tmp_path: Path, notify: NotifySocket) -> None:
    server = OurServer(clients_conf(keys.foo_section), directory=tmp_path)
    try:
        server.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
        notify.wait_for("READY=1")
        started = time.monotonic()
        notify.messages.clear()
        count = 0
        while count < 3:
            notify.wait_for("WATCHDOG=1", timeout=2)
            notify.messages.clear()
            count += 1
        assert time.monotonic() - started < 2
    finally:
        server.close()


def _units_for_test(directory: Path) -> tuple[Path, Path]:
    """Copies of the units with ExecStart pointing at the venv's mandos-server."""
    binary = Path(sys.executable).parent / "mandos-server"
    assert binary.exists()
    socket_unit = directory / "mandos.socket"
    service_unit = directory / "mandos.service"
    shutil.copy(UNITS / "mandos.socket", socket_unit)
    service_unit.write_text((UNITS / "mandos.service").read_text()
                            .replace("/usr/bin/mandos-server", str(binary)))
    return socket_unit, service_unit


@pytest.mark.peers
def test_units_verify(tmp_path: Path, manpath: dict[str, str]) -> None:
    """The units verify, their Documentation= pages (ours) included."""
    socket_unit, service_unit = _units_for_test(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(socket_unit), str(service_unit)],
                            capture_output=True, text=True, timeout=60, env=manpath)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.peers
def test_units_security(tmp_path: Path) -> None:
    _, service_unit = _units_for_test(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                             str(service_unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    exposure = float(result.stdout.split("Overall exposure level for mandos.service:")[1]
                     .split()[0])
    assert exposure <= 2.0, result.stdout


@pytest.mark.peers
def test_catalog_is_valid(tmp_path: Path) -> None:
    """Every MESSAGE_ID the server uses is in the catalog, which journalctl accepts."""
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(UNITS / "mandos-catalog.catalog", catalog_dir / "mandos.catalog")
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True,
                   capture_output=True, timeout=30)
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"],
                            check=True, capture_output=True, text=True, timeout=30).stdout
    ids = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert {event.message_id for event in Event} <= ids


def test_real_journald_gets_events(keys: Keys, private_journal: PrivateJournal,
                                   upstream_keys: KeySet) -> None:
    """Decisions reach a real journald with their fields; the password and the blob never
    do.  ``upstream_keys`` (the conftest's key set) is a stranger to this server."""
    journal = private_journal
    conf = clients_conf(keys.foo_section, set_options(keys.bar_section, enabled="no"))
    server = OurServer(conf, extra_args=[f"--journal-socket={journal.socket_path}"])
    try:
        server.start()
        journal.wait_for(MANDOS_EVENT="server-started")
        password = run_upstream_client(keys.foo, server.connect, 20).stdout
        assert password == keys.password
        assert run_upstream_client(keys.bar, server.connect, 2).stdout == b""
        assert run_upstream_client(upstream_keys, server.connect, 2).stdout == b""
        server.stop()
        sent = journal.wait_for(MANDOS_EVENT="secret-sent")[0]
        assert sent["MANDOS_CLIENT"] == "foo"
        assert sent["MANDOS_KEY_ID"] == keys.foo.key_id
        assert sent["MANDOS_PEER"] == "127.0.0.1"
        assert sent["MESSAGE_ID"] == "8fee6315349d49baab2153af0460b8fc"
        assert sent["SYSLOG_IDENTIFIER"] == "mandos"
        assert sent["PRIORITY"] == "6"
        refused = journal.wait_for(MANDOS_EVENT="refused-disabled")[0]
        assert refused["MANDOS_CLIENT"] == "bar"
        assert refused["MANDOS_KEY_ID"] == keys.bar.key_id
        unknown = journal.wait_for(MANDOS_EVENT="client-not-found")[0]
        assert unknown["MANDOS_KEY_ID"] == upstream_keys.key_id
        assert unknown["MANDOS_PEER"] == "127.0.0.1"
        assert unknown["MESSAGE_ID"] == Event.CLIENT_NOT_FOUND.message_id
        assert "MANDOS_CLIENT" not in unknown
        journal.wait_for(MANDOS_EVENT="server-stopping")
        everything = subprocess.run(
            ["journalctl", f"--directory={journal.directory}", "-o", "export"],
            capture_output=True, timeout=30).stdout
        assert keys.password not in everything
        assert b"bar password" not in everything
        blob = section_secret(keys.foo_section)
        assert blob[:24] not in everything
        assert base64.b64encode(blob)[:24] not in everything
    finally:
        server.close()
