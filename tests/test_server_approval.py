"""``approval_command``: run when a request needs approval, with the client's name, key id
and peer in its environment and never a secret; answered by ``mandos-ctl --approve`` (ours and
Debian's upstream one); a hanging command is killed at its timeout while the server serves on."""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import select
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.config import ConfigError, load_clients
from tests.conftest import Keys
from tests.peers.dbus import PrivateSystemBus
from tests.peers.ours import OurServer, clients_conf, fetch, set_options
from tests.peers.upstream import MANDOS_CTL, section_secret
from tests.test_ctl_interop import OURS
from tests.test_dbus_api import ctl, start_server

pytestmark = pytest.mark.interop


@contextlib.contextmanager
def fetching(keys_of: Callable[[], bytes]) -> Iterator[list[bytes]]:
    """``keys_of()`` (a fetch) in a thread; its result in the list once the block ends."""
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(keys_of()))
    thread.start()
    try:
        yield got
    finally:
        thread.join()


def test_the_setting_per_client_or_in_default(tmp_path: Path) -> None:
    """``approval_command`` in [DEFAULT] holds for every client that sets none; a bad % in it
    is refused without quoting the value (it may hold a webhook's token)."""
    conf = tmp_path / "clients.conf"
    section = "key_id = {}\nsecret = AAAA\n"
    conf.write_text("[DEFAULT]\napproval_command = notify-all\n"
                    f"[foo]\n{section.format('AB' * 32)}"
                    f"[bar]\n{section.format('CD' * 32)}approval_command = notify-bar\n")
    clients = load_clients(conf)
    assert clients["foo"].approval_command == "notify-all"
    assert clients["bar"].approval_command == "notify-bar"
    conf.write_text(f"[foo]\n{section.format('AB' * 32)}"
                    "approval_command = curl -d x https://hooks.example/t0ken%2F\n")
    with pytest.raises(ConfigError) as refused:
        load_clients(conf)
    assert "t0ken" not in str(refused.value) and "approval_command" in str(refused.value)
    conf.write_text(f"[foo]\n{section.format('AB' * 32)}")
    assert load_clients(conf)["foo"].approval_command == ""


def parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.mark.timeout(120)
def test_command_tells_and_mandos_ctl_approves(keys: Keys, private_bus: PrivateSystemBus,
                                               tmp_path: Path) -> None:
    """Each request waiting for approval runs the command, whose environment names the
    client, its key id and the peer and holds no secret; ``--approve`` from our mandos-ctl
    (for foo) and from upstream's (for bar) lets each request through."""
    script = tmp_path / "notify"
    script.write_text('#!/bin/sh\nenv > "$0.$MANDOS_CLIENT"\n')
    script.chmod(0o700)
    approval = {"approval_delay": "PT30S", "approved_by_default": "False"}
    conf = clients_conf(set_options(keys.foo_section, **approval),
                        set_options(keys.bar_section, **approval),
                        defaults=f"checker = /bin/true\ninterval = PT1H\n"
                                 f"approval_command = {script}\n")
    server = start_server(private_bus.address, conf)
    try:
        assert server.journal is not None
        for name, key_set, section, program in (
                ("foo", keys.foo, keys.foo_section, OURS),
                ("bar", keys.bar, keys.bar_section, (MANDOS_CTL,))):
            with fetching(functools.partial(fetch, key_set, "127.0.0.1", server.port,
                                            timeout=30)) as got:
                server.journal.wait_for("approval-command-succeeded", MANDOS_CLIENT=name)
                env = parse_env((tmp_path / f"notify.{name}").read_text())
                ctl(private_bus, "--approve", name, program=program)
            assert got == [section_secret(section)], name
            assert env["MANDOS_CLIENT"] == name
            assert env["MANDOS_KEY_ID"] == key_set.key_id
            assert env["MANDOS_PEER"] == "127.0.0.1"
            assert env["MANDOS_APPROVAL_DELAY"] == "30"
            assert env["MANDOS_APPROVED_BY_DEFAULT"] == "0"
            text = (tmp_path / f"notify.{name}").read_text()
            assert base64.b64encode(section_secret(section)).decode()[:24] not in text
            started = server.journal.find("approval-command-started", MANDOS_CLIENT=name)
            assert len(started) == 1 and started[0]["MANDOS_PEER"] == "127.0.0.1"
            assert str(script) not in started[0]["MESSAGE"]  # the command is never logged
    finally:
        server.close()


@pytest.mark.timeout(120)
def test_hanging_command_is_killed_and_the_server_serves_on(keys: Keys,
                                                            tmp_path: Path) -> None:
    """A command that hangs is killed when the request's approval delay runs out, and
    another client is served meanwhile."""
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    hang = f'echo $$ > {fifo}; exec sleep 600'
    conf = clients_conf(
        keys.foo_section,
        set_options(keys.bar_section, approval_delay="PT3S", approved_by_default="False",
                    approval_command=hang),
        defaults="checker = /bin/true\ninterval = PT1H\n")
    pid = 0
    try:
        with OurServer(conf) as server:
            assert server.journal is not None
            with fetching(lambda: fetch(keys.bar, "127.0.0.1", server.port,
                                        timeout=30)) as got:
                ready, _, _ = select.select([reader], [], [], 30)
                assert ready, "the approval command did not start"
                pid = int(os.read(reader, 64).split()[0])  # it sleeps now, a child of ours
                assert fetch(keys.foo, "127.0.0.1", server.port) == \
                    section_secret(keys.foo_section)
            assert got == [b""]
            server.journal.wait_for("approval-timed-out", MANDOS_CLIENT="bar")
            failed = server.journal.wait_for("approval-command-failed", MANDOS_CLIENT="bar")
            assert "timed out and was killed" in failed[0]["MESSAGE"]
            assert "sleep" not in failed[0]["MESSAGE"]
            assert_exits(pid)
            pid = 0
            assert fetch(keys.foo, "127.0.0.1", server.port) == section_secret(keys.foo_section)
    finally:
        os.close(reader)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def assert_exits(pid: int) -> None:
    """Wait (on a pidfd) for ``pid`` to end: the kill reached the command's process group."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], 30)
        assert ready, f"the approval command (pid {pid}) still runs"
    finally:
        os.close(pidfd)
