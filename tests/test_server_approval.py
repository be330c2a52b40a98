# SPDX-License-Identifier: GPL-3.0-or-later
"""``approval_command``: run when a request needs approval, with the client's name, key id
and peer in its environment and never a secret; answered by ``mandos-ctl --approve`` (ours and
Debian's upstream one); a hanging command is killed at its timeout while the server serves on."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import io
import os
import select
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peers.dbus import PrivateSystemBus
from peers.ours import OurServer, clients_conf, fetch, set_options
from peers.upstream import MANDOS_CTL, section_secret
from server import events
from server.approval_command import ApprovalCommands
from server.clients import Client, ClientTable, utcnow
from server.config import ClientConfig, ConfigError, load_clients
from server.journal import Journal, journalled_publisher
from server.statefile import fresh_state
from tests.conftest import Keys
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


def test_one_command_per_client_and_its_failure_journalled(tmp_path: Path) -> None:
    """In-process: two requests waiting at once start one command; its exit status 3 is a
    typed event and an approval-command-failed entry; server stop kills nothing left."""
    async def scenario() -> None:
        log = io.StringIO()
        publisher = journalled_publisher(Journal(Path("/nonexistent"), stream=log))
        settings = ClientConfig(
            name="foo", key_id="AB" * 32, fingerprint="", secret=b"blob", host="",
            timeout=datetime.timedelta(minutes=5), extended_timeout=datetime.timedelta(0),
            interval=datetime.timedelta(hours=1), checker="true", approved_by_default=False,
            approval_delay=datetime.timedelta(seconds=30),
            approval_duration=datetime.timedelta(seconds=1), enabled=True,
            approval_command=f"echo ran >> {tmp_path / 'runs'}; exit 3")
        client = Client(settings, fresh_state(settings, utcnow()), publisher)
        table = ClientTable()
        table.add(client)
        commands = ApprovalCommands(table, publisher)
        finished: list[events.ServerEvent] = []
        done = asyncio.Event()

        def on_finished(event: events.ServerEvent) -> None:
            finished.append(event)
            done.set()

        publisher.subscribe(on_finished, events.ApprovalCommandFinished)
        requests = [asyncio.create_task(client.authorize(peer)) for peer in ("a", "b")]
        await done.wait()
        client.approve(False)
        assert await asyncio.gather(*requests) == [None, None]
        await commands.close()
        client.close()
        assert (tmp_path / "runs").read_text() == "ran\n"
        (event,) = finished
        assert isinstance(event, events.ApprovalCommandFinished)
        assert (event.client, event.status, event.succeeded) == ("foo", 3, False)
        assert "approval-command-failed: The approval command of foo failed with status 3" \
            in log.getvalue()
        assert log.getvalue().count("approval-command-started") == 1

    asyncio.run(scenario())


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
