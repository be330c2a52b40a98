# SPDX-License-Identifier: GPL-3.0-or-later
"""In-process tests of the client state machine (approvals, enable/disable), the state file
merge rules, the journal's wire encoding, and the listener's handling of bad peers."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from mandos_protocol.gnutls import Priority
from peers.ours import JournalSink, parse_native
from server import events
from server.clients import Client, ClientState, ClientTable, utcnow
from server.config import ClientConfig, ConfigError
from server.journal import Event, Journal, encode_entry, journalled_publisher
from server.listener import Listener, bind_socket
from server.statefile import StateFile, fresh_state

SECRET = b"\x85\x02 an OpenPGP blob"


def config(**changes: object) -> ClientConfig:
    values: dict[str, object] = dict(
        name="foo", key_id="AB" * 32, fingerprint="", secret=SECRET, host="foo",
        timeout=datetime.timedelta(minutes=5), extended_timeout=datetime.timedelta(minutes=15),
        interval=datetime.timedelta(minutes=2), checker="/bin/true", approved_by_default=True,
        approval_delay=datetime.timedelta(0), approval_duration=datetime.timedelta(seconds=1),
        enabled=True,
    )
    values.update(changes)
    return ClientConfig(**values)  # type: ignore[arg-type]


def make_client(**changes: object) -> tuple[Client, io.StringIO]:
    log = io.StringIO()
    journal = Journal(Path("/nonexistent/socket"), stream=log)
    settings = config(**changes)
    return Client(settings, fresh_state(settings, utcnow()), journalled_publisher(journal)), log


def test_approval_within_delay() -> None:
    async def scenario() -> None:
        client, _ = make_client(approval_delay=datetime.timedelta(seconds=30),
                                approved_by_default=False)
        client.start()
        first = asyncio.create_task(client.authorize("peer"))
        await asyncio.sleep(0.05)
        assert client.approval_pending
        assert client.state.last_approval_request is not None
        client.approve(True)
        assert await asyncio.wait_for(first, 1) == SECRET
        # One approval covers a request arriving within approval_duration.
        assert await asyncio.wait_for(client.authorize("peer"), 1) == SECRET
        assert not client.approval_pending
        client.close()

    asyncio.run(scenario())


def test_denial_and_expiry_of_approval() -> None:
    async def scenario() -> None:
        client, log = make_client(approval_delay=datetime.timedelta(seconds=30),
                                  approval_duration=datetime.timedelta(seconds=0.2))
        client.start()
        waiting = asyncio.create_task(client.authorize("peer"))
        await asyncio.sleep(0.05)
        client.approve(False)
        assert await asyncio.wait_for(waiting, 1) is None
        assert "refused-denied" in log.getvalue()
        await asyncio.sleep(0.3)  # the denial has lapsed: the next request waits again
        assert client.approved is None
        waiting = asyncio.create_task(client.authorize("peer"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        client.disable()
        assert await asyncio.wait_for(waiting, 1) is None
        assert "refused-disabled" in log.getvalue()
        client.close()

    asyncio.run(scenario())


def test_enable_disable_and_checked_ok() -> None:
    async def scenario() -> None:
        client, log = make_client(enabled=False)
        client.start()
        assert await client.authorize("peer") is None
        client.enable()
        assert client.enabled and client.state.last_enabled is not None
        expires = client.expires
        assert expires is not None
        client.checked_ok()
        assert client.state.last_checker_status == 0
        assert client.expires is not None and client.expires >= expires
        assert await client.authorize("peer") == SECRET
        client.secret_sent("peer")
        assert client.expires is not None
        assert client.expires > utcnow() + datetime.timedelta(minutes=14)
        client.disable()
        assert client.expires is None and not client.enabled
        assert "client-enabled" in log.getvalue() and "client-disabled" in log.getvalue()
        assert repr(SECRET) not in log.getvalue()
        client.close()

    asyncio.run(scenario())


def test_start_and_stop_checker() -> None:
    async def scenario() -> None:
        client, _ = make_client(checker="sleep 30")
        client.start_checker()
        assert client.checker_running
        client.start_checker()  # one at a time
        client.stop_checker()
        assert not client.checker_running
        client.close()

    asyncio.run(scenario())


def test_table_lookup() -> None:
    async def scenario() -> None:
        table = ClientTable()
        a, _ = make_client()
        b, _ = make_client(name="bar", key_id="", fingerprint="CD" * 32)
        table.add(a)
        table.add(b)
        assert table.lookup("AB" * 32) is a
        assert table.lookup("CD" * 32) is b
        assert table.lookup("EF" * 32) is None
        table.remove("foo")
        assert table.lookup("AB" * 32) is None
        # A client of the same name replaces the old one and its key id.
        c, _ = make_client(name="bar", key_id="EF" * 32)
        table.add(c)
        assert table.lookup("CD" * 32) is None and table.lookup("EF" * 32) is c
        assert list(table) == [c]

    asyncio.run(scenario())


def saved_client(tmp_path: Path, settings: ClientConfig, state: ClientState,
                 old_config: ClientConfig) -> StateFile:
    """A state file holding one client saved with ``old_config`` in the file."""
    async def save() -> None:
        journal = Journal(Path("/nonexistent"), stream=io.StringIO())
        statefile.save([Client(settings, state, journalled_publisher(journal))],
                       {settings.name: old_config})

    statefile = StateFile(tmp_path, lambda message: None)
    asyncio.run(save())
    return statefile


def test_state_merge_rules(tmp_path: Path) -> None:
    now = utcnow()
    old = config()
    runtime = config(host="changed-at-runtime", interval=datetime.timedelta(seconds=7))
    state = ClientState(enabled=False, created=now - datetime.timedelta(days=1))
    statefile = saved_client(tmp_path, runtime, state, old)
    assert (tmp_path / "clients.json").stat().st_mode & 0o777 == 0o600

    new = config(interval=datetime.timedelta(seconds=9))  # changed in the file since
    restored = statefile.restore({"foo": new, "baz": config(name="baz")}, statefile.load(), now)
    foo = restored["foo"]
    assert foo.settings.host == "changed-at-runtime"  # unchanged in the file: saved wins
    assert foo.settings.interval == datetime.timedelta(seconds=9)  # changed in the file
    assert foo.settings.secret == SECRET
    assert foo.state.enabled is False and foo.state.created == state.created
    assert restored["baz"].state.enabled is True


@pytest.mark.parametrize(("checked_ok", "status", "stays"), [
    (True, 0, True), (True, 1, False), (False, -2, False),
])
def test_expired_client_restore(tmp_path: Path, checked_ok: bool, status: int,
                                stays: bool) -> None:
    now = utcnow()
    past = now - datetime.timedelta(hours=1)
    state = ClientState(enabled=True, created=past, expires=past,
                        last_checked_ok=past if checked_ok else None, last_checker_status=status)
    statefile = saved_client(tmp_path, config(), state, config())
    restored = statefile.restore({"foo": config()}, statefile.load(), now)["foo"]
    assert restored.state.enabled is stays
    if stays:
        assert restored.state.expires == now + config().timeout


def test_damaged_state_moved_aside_and_every_client_disabled(tmp_path: Path) -> None:
    (tmp_path / "clients.json").write_text(json.dumps({"format": 1, "clients": {"x": {}}}))
    statefile = StateFile(tmp_path, lambda message: None)
    assert statefile.load() == {}
    assert not (tmp_path / "clients.json").exists()
    assert len(list(tmp_path.glob("clients.json.damaged-*"))) == 1
    assert statefile.damage is not None and "damaged" in statefile.damage
    now = utcnow()
    restored = statefile.restore({"foo": config()}, {}, now)["foo"]
    assert config().enabled and not restored.state.enabled and restored.state.expires is None


def test_a_missing_state_file_is_no_damage(tmp_path: Path) -> None:
    statefile = StateFile(tmp_path, lambda message: None)
    assert statefile.load() == {} and statefile.damage is None
    assert statefile.restore({"foo": config()}, {}, utcnow())["foo"].state.enabled


@pytest.mark.peers  # chattr +i needs root
def test_a_damaged_state_file_that_cannot_be_moved_aside_stops_the_start(
        tmp_path: Path) -> None:
    (tmp_path / "clients.json").write_text("{not json")
    tmp_path.chmod(0o500)  # as root, rename still works unless the directory is immutable
    subprocess.run(["chattr", "+i", str(tmp_path)], check=True)
    try:
        with pytest.raises(ConfigError, match="cannot be moved aside"):
            StateFile(tmp_path, lambda message: None).load()
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path)], check=True)
        tmp_path.chmod(0o700)
    assert (tmp_path / "clients.json").read_text() == "{not json"


def test_journal_native_encoding(tmp_path: Path) -> None:
    data = encode_entry({"MESSAGE": "two\nlines", "MANDOS_CLIENT": "foo"})
    assert data.startswith(b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n")
    assert parse_native(data) == {"MESSAGE": "two\nlines", "MANDOS_CLIENT": "foo"}
    sink = JournalSink(tmp_path)
    try:
        journal = Journal(sink.path)
        journal.event(Event.CLIENT_NOT_FOUND, "not found\nat all", key_id="AB", peer="::1")
        entry = sink.wait_for("client-not-found")[0]
        assert entry["MESSAGE"] == "not found\nat all"
        assert entry["MESSAGE_ID"] == Event.CLIENT_NOT_FOUND.message_id
        assert entry["PRIORITY"] == "5" and entry["SYSLOG_IDENTIFIER"] == "mandos"
        assert entry["MANDOS_KEY_ID"] == "AB" and entry["MANDOS_PEER"] == "::1"
        journal.close()
    finally:
        sink.close()


def test_subscribers_see_every_event_and_cannot_break_it() -> None:
    """Subscribers see events below --debuglevel too, only the kinds they asked for; one that
    raises is reported in the journal and the next subscriber still runs."""
    log = io.StringIO()
    journal = Journal(Path("/nonexistent"), stream=log, max_priority=4)  # warnings and up
    publisher = journalled_publisher(journal)
    seen: list[events.ServerEvent] = []
    started: list[events.ServerEvent] = []

    def broken(event: events.ServerEvent) -> None:
        raise RuntimeError("bus gone")

    publisher.subscribe(broken)
    stop = publisher.subscribe(seen.append)
    publisher.subscribe(started.append, events.ServerStarted)
    sent = events.SecretSent(client="foo", key_id="AB", peer="::1", at=utcnow())
    publisher.publish(sent)  # INFO: not written
    assert seen == [sent] and started == []
    assert "INFO secret-sent" not in log.getvalue()
    assert "cannot pass on SecretSent: bus gone" in log.getvalue()
    stop()
    publisher.unsubscribe(broken)
    publisher.publish(events.ServerStarted(addresses=("[::]:1",)))
    assert seen == [sent] and len(started) == 1
    assert log.getvalue().count("cannot pass on") == 1


def test_client_events_are_typed_and_journalled() -> None:
    """What a client's life publishes: typed fields for subscribers, and the journal's entries
    with their MANDOS_EVENT labels as before."""
    async def scenario() -> None:
        client, log = make_client(enabled=False, approval_delay=datetime.timedelta(seconds=30),
                                  approved_by_default=False)
        seen: list[events.ServerEvent] = []
        client.events.subscribe(seen.append)
        client.start()
        client.enable(events.By.FLEET)
        waiting = asyncio.create_task(client.authorize("192.0.2.1"))
        await asyncio.sleep(0.05)
        client.approve(False)
        assert await asyncio.wait_for(waiting, 1) is None
        client.disable(events.By.ADMIN, "Client foo disabled: stolen")
        client.remove(events.By.CONFIG)
        kinds = [type(event).__name__ for event in seen]
        assert kinds == ["ClientEnabled", "ExpiryChanged", "NeedsApproval", "Approved",
                         "RequestRefused", "ClientDisabled", "ClientRemoved"], kinds
        enabled, _, needs, approved, refused, disabled, removed = seen
        assert isinstance(enabled, events.ClientEnabled) and enabled.by is events.By.FLEET
        assert enabled.client == "foo" and enabled.key_id == "AB" * 32
        assert isinstance(needs, events.NeedsApproval) and needs.peer == "192.0.2.1"
        assert needs.approval_delay == datetime.timedelta(seconds=30)
        assert not needs.approved_by_default
        assert isinstance(approved, events.Approved) and approved.approved is False
        assert isinstance(refused, events.RequestRefused)
        assert refused.reason is events.Refusal.DENIED and refused.client == "foo"
        assert isinstance(disabled, events.ClientDisabled) and disabled.by is events.By.ADMIN
        assert isinstance(removed, events.ClientRemoved) and removed.by is events.By.CONFIG
        text = log.getvalue()
        for label in ("client-enabled", "needs-approval", "refused-denied", "client-disabled"):
            assert f" {label}: " in text, label
        assert "Client foo disabled: stolen" in text
        assert "needs approval within 30 s (default: deny)" in text

    asyncio.run(scenario())


def test_checker_events() -> None:
    """A failing, a succeeding and a signalled checker: typed status for subscribers, the
    journal's entries and fields as before."""
    async def scenario() -> None:
        client, log = make_client()
        finished: list[events.CheckerFinished] = []
        done = asyncio.Event()

        def on_finished(event: events.ServerEvent) -> None:
            assert isinstance(event, events.CheckerFinished)
            finished.append(event)
            done.set()

        client.events.subscribe(on_finished, events.CheckerFinished)
        for command in ("exit 3", "true", "kill -TERM $$"):
            client.change_settings(checker=command)
            done.clear()
            client.start_checker()
            await done.wait()
        assert [(e.command, e.status, e.signal, e.succeeded) for e in finished] == [
            ("exit 3", 3, None, False), ("true", 0, None, True),
            ("kill -TERM $$", -1, 15, False)]
        assert client.state.last_checker_status == -1
        text = log.getvalue()
        assert "failed with status 3 [client=foo key_id=" in text
        assert "checker-succeeded: Checker for foo succeeded" in text
        assert "killed by signal 15" in text and "status=-1 signal=15" in text
        client.close()

    asyncio.run(scenario())


def test_bad_peers_cost_nothing(tmp_path: Path) -> None:
    """Silent, garbage and oversized-line peers are dropped; none blocks another."""
    async def scenario() -> None:
        listening = bind_socket("127.0.0.1", 0, use_ipv6=False)
        port = listening.getsockname()[1]
        log = io.StringIO()
        journal = Journal(Path("/nonexistent"), stream=log, max_priority=7)
        failures: list[events.ServerEvent] = []
        publisher = journalled_publisher(journal)
        publisher.subscribe(failures.append, events.ConnectionFailed)
        listener = Listener([listening], ClientTable(), journal, publisher, Priority(),
                            max_connections=8)
        listener.start()
        loop = asyncio.get_running_loop()

        async def peer(data: bytes) -> bytes:
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            if data:
                await loop.sock_sendall(sock, data)
            received = b""
            try:
                async with asyncio.timeout(2):
                    while chunk := await loop.sock_recv(sock, 4096):
                        received += chunk
                    return received
            except ConnectionResetError:  # closed with our bytes unread: also a close
                return received
            finally:
                sock.close()

        silent = asyncio.create_task(peer(b""))
        results = await asyncio.gather(peer(b"2\r\n"), peer(b"garbage\n"), peer(b"x" * 200),
                                       peer(b"1\r\nnot TLS at all\r\n" * 3))
        assert results[:3] == [b"", b"", b""]
        assert results[3].startswith(b"\x16\x03")  # our ClientHello, then nothing but a close
        assert not silent.done()
        silent.cancel()
        await listener.stop()
        text = log.getvalue()
        assert "unknown protocol version 2" in text
        assert "protocol line too long" in text
        assert "in the TLS handshake" in text
        stages = {event.stage for event in failures if isinstance(event, events.ConnectionFailed)}
        assert stages == {events.Stage.PROTOCOL_LINE, events.Stage.HANDSHAKE}

    asyncio.run(scenario())
