# SPDX-License-Identifier: GPL-3.0-or-later
"""Several of our servers sharing their clients' state through a real 3-member etcd cluster
(TLS with a client certificate), each with its own private system bus so that Debian's
``mandos-ctl`` can talk to each one; requests by Debian's ``mandos-client``."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from peers.dbus import PrivateSystemBus
from peers.etcd import EtcdCluster
from peers.ours import JournalSink, OurServer, clients_conf, fetch, set_options
from peers.upstream import run_upstream_client, section_secret
from tests.conftest import Keys
from tests.test_dbus_api import ctl, dump
from tests.test_server_systemd import NotifySocket

pytestmark = pytest.mark.interop


@dataclass
class Member:
    """One server of the fleet and the bus its D-Bus API is on."""

    bus: PrivateSystemBus
    server: OurServer
    notify: NotifySocket | None  # read it: a full socket blocks the server
    def ctl(self, *args: str) -> None:
        ctl(self.bus, *args)

    @property
    def journal(self) -> JournalSink:
        assert self.server.journal is not None
        return self.server.journal


@dataclass
class Fleet:
    etcd: EtcdCluster
    conf: str
    members: list[Member] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def add(self, *, notify: bool = False) -> Member:
        bus = self.stack.enter_context(PrivateSystemBus())
        server = OurServer(self.conf, use_dbus=True,
                           extra_args=self.etcd.server_options())
        self.stack.callback(server.close)
        env = {"DBUS_SYSTEM_BUS_ADDRESS": bus.address}
        sink = None
        if notify:
            sink = NotifySocket(server.directory)
            self.stack.callback(sink.close)
            env["NOTIFY_SOCKET"] = str(sink.path)
        server.start(env=env)
        member = Member(bus, server, sink)
        member.journal.wait_for("fleet")
        self.members.append(member)
        return member


def fleet_conf(keys: Keys, **options: str) -> str:
    return clients_conf(set_options(keys.foo_section, **options),
                        defaults="checker = /bin/true\ninterval = PT1H\n")


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    with EtcdCluster() as cluster:
        yield cluster


@pytest.fixture
def pair(etcd: EtcdCluster, keys: Keys) -> Iterator[Fleet]:
    fleet = Fleet(etcd, fleet_conf(keys))
    with fleet.stack:
        fleet.add()
        fleet.add()
        yield fleet


def test_a_disable_on_one_server_holds_on_the_other(pair: Fleet, keys: Keys) -> None:
    a, b = pair.members
    assert fetch(keys.foo, "127.0.0.1", b.server.port) == section_secret(keys.foo_section)
    a.ctl("--disable", "foo")
    b.journal.wait_for("client-disabled", MANDOS_CLIENT="foo")
    assert dump(b.bus)["foo"]["Enabled"] is False  # B's D-Bus object says so too
    refused = run_upstream_client(keys.foo, b.server.connect, timeout=3)
    assert refused.returncode == 124 and refused.stdout == b""
    b.journal.wait_for("refused-disabled", MANDOS_CLIENT="foo")
    record = pair.etcd.get("/mandos/clients/foo/enabled")
    assert record is not None and '"enabled":false' in record and "admin" in record

    b.ctl("--enable", "foo")
    a.journal.wait_for("client-enabled", MANDOS_CLIENT="foo")
    served = run_upstream_client(keys.foo, a.server.connect, timeout=20)
    assert served.returncode == 0, served.stderr
    assert served.stdout == keys.password


def test_an_approval_on_one_server_lets_a_request_on_another_through(
        etcd: EtcdCluster, keys: Keys) -> None:
    fleet = Fleet(etcd, fleet_conf(keys, approval_delay="PT60S",
                                   approved_by_default="False"))
    with fleet.stack:
        a, b = fleet.add(), fleet.add()
        got: list[bytes] = []
        waiting = threading.Thread(
            target=lambda: got.append(fetch(keys.foo, "127.0.0.1", b.server.port, timeout=60)))
        waiting.start()
        try:
            b.journal.wait_for("needs-approval", MANDOS_CLIENT="foo")
            a.ctl("--approve", "foo")
        finally:
            waiting.join()
        assert got == [section_secret(keys.foo_section)]
        b.journal.wait_for("secret-sent", MANDOS_CLIENT="foo")


def checker_conf(names: list[str]) -> str:
    """Clients that exist only for their checkers (no request ever comes)."""
    sections = [f"[{name}]\nkey_id = {index + 1:064X}\nsecret = AAAA\n"
                for index, name in enumerate(names)]
    return clients_conf(*sections, defaults="checker = /bin/true\ninterval = PT2S\n"
                                            "timeout = PT1H\n")


def checkers_run(member: Member, name: str, since: int) -> int:
    entries = member.journal.find("checker-started", MANDOS_CLIENT=name)
    return len(entries) - since


def test_each_checker_runs_on_one_server_and_moves_when_it_dies(etcd: EtcdCluster) -> None:
    names = [f"c{index}" for index in range(12)]  # all on one server: 3 in 531,441
    fleet = Fleet(etcd, checker_conf(names))
    with fleet.stack:
        members = [fleet.add() for _ in range(3)]
        for member in members:
            _wait(functools.partial(sees, member, 3))
        marks = {(id(m), n): len(m.journal.find("checker-started", MANDOS_CLIENT=n))
                 for m in members for n in names}

        def runners(name: str) -> list[Member]:
            return [m for m in members if checkers_run(m, name, marks[(id(m), name)]) > 0]

        def turns(among: list[Member], name: str) -> int:
            return sum(checkers_run(m, name, marks[(id(m), name)]) for m in among)

        for name in names:  # two turns of every client's checker, somewhere
            _wait(functools.partial(lambda n: turns(members, n) >= 2, name))
        owners = {name: runners(name) for name in names}
        assert all(len(found) == 1 for found in owners.values()), {
            n: [m.server.port for m in found] for n, found in owners.items()}
        assert len({id(found[0]) for found in owners.values()}) > 1  # spread over servers

        victim = owners["c0"][0]
        orphans = [n for n in names if owners[n][0] is victim]
        assert victim.server.process is not None
        victim.server.process.kill()
        victim.server.process.wait()
        survivors = [m for m in members if m is not victim]
        marks = {(id(m), n): len(m.journal.find("checker-started", MANDOS_CLIENT=n))
                 for m in survivors for n in names}
        for name in orphans:  # lease TTL (5 s) + one interval (2 s), with room to spare
            _wait(functools.partial(lambda n: turns(survivors, n) > 0, name), timeout=15)


def sees(member: Member, count: int) -> bool:
    """Whether the server has said that it sees ``count`` live servers."""
    return any(f" {count} live servers: " in entry.get("MESSAGE", "")
               for entry in member.journal.find("fleet"))


def _wait(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.05)


def fleet_said(member: Member, words: str) -> bool:
    return any(words in entry.get("MESSAGE", "") for entry in member.journal.find("fleet"))


def test_killing_the_etcd_leader_fails_no_unlock(pair: Fleet, keys: Keys) -> None:
    a, b = pair.members
    secret = section_secret(keys.foo_section)
    stop = threading.Event()
    results: list[bytes] = []

    def unlock(member: Member) -> None:
        while not stop.is_set():
            results.append(fetch(keys.foo, "127.0.0.1", member.server.port))

    workers = [threading.Thread(target=unlock, args=(m,)) for m in (a, b)]
    for worker in workers:
        worker.start()
    try:
        leader = pair.etcd.leader()
        pair.etcd.kill(leader)
        pair.etcd.wait_healthy([i for i in range(3) if i != leader])
        _wait(lambda: len(results) > 20)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert results and all(result == secret for result in results)
    a.ctl("--disable", "foo")  # and the fleet still works under the new leader
    b.journal.wait_for("client-disabled", MANDOS_CLIENT="foo")


def test_detached_servers_keep_every_disable_and_converge(etcd: EtcdCluster,
                                                          keys: Keys) -> None:
    foo, bar = section_secret(keys.foo_section), section_secret(keys.bar_section)
    fleet = Fleet(etcd, clients_conf(keys.foo_section, keys.bar_section,
                                     defaults="checker = /bin/true\ninterval = PT1H\n"))
    with fleet.stack:
        a, b = fleet.add(notify=True), fleet.add(notify=True)
        etcd.kill(0)
        etcd.kill(1)  # no quorum
        for member in (a, b):
            member.journal.wait_for("fleet", MESSAGE=_message(member, "running detached"))
            assert member.notify is not None
            member.notify.wait_for("STATUS=DETACHED from etcd", prefix=True)
        # foo: disabled on A; on B disabled and then enabled again (later) by its admin.
        a.ctl("--disable", "foo")
        b.ctl("--disable", "foo")
        b.ctl("--enable", "foo")
        # bar: disabled on B; A, cut off, goes on serving it.
        b.ctl("--disable", "bar")
        assert fetch(keys.foo, "127.0.0.1", a.server.port) == b""
        assert fetch(keys.foo, "127.0.0.1", b.server.port) == foo
        assert fetch(keys.bar, "127.0.0.1", a.server.port) == bar
        assert fetch(keys.bar, "127.0.0.1", b.server.port) == b""

        etcd.start_member(0, wait=False)
        etcd.start_member(1)
        for member in (a, b):
            _wait(functools.partial(fleet_said, member, "detached; "))
        b.journal.wait_for("client-disabled", count=2, MANDOS_CLIENT="foo")
        a.journal.wait_for("client-disabled", MANDOS_CLIENT="bar")
        for member in (a, b):
            assert fetch(keys.foo, "127.0.0.1", member.server.port) == b""
            assert fetch(keys.bar, "127.0.0.1", member.server.port) == b""
            assert member.notify is not None
            member.notify.messages.clear()
            member.notify.wait_for("STATUS=2 clients, 0 enabled", prefix=True)
        for name in ("foo", "bar"):
            record = etcd.get(f"/mandos/clients/{name}/enabled")
            assert record is not None and '"enabled":false' in record, record


def _message(member: Member, words: str) -> str:
    """The first fleet message with ``words``, waiting for it."""
    found: list[str] = []

    def seen() -> bool:
        found.extend(e["MESSAGE"] for e in member.journal.find("fleet")
                     if words in e.get("MESSAGE", ""))
        return bool(found)

    _wait(seen)
    return found[0]
