# SPDX-License-Identifier: GPL-3.0-or-later
"""Abuse of the password agent: 10 hostile ask files (A1-A10) and 7 hostile Mandos servers
(B1-B7).

The agent runs as in :mod:`tests.test_agent_interop`: a child process with the upstream
client's keys and real gpg.  A1-A9 use our own ``mandos-server`` as the good server; the
other servers here speak real TLS through our GnuTLS binding in the Mandos server's role (the
TLS client, with no credentials) and then do as the test says.  In Mandos only the client
presents a key (its raw public key), so a rogue server cannot present a wrong one; the nearest
it can come is to negotiate X.509 certificates (B4), to hand out a blob encrypted to another
OpenPGP key (B5), or a wrong password encrypted to ours (B7: our public key is no secret).

A1-A9 put a hostile ask file beside a legitimate request, A10 a request whose requester exits
during the fetch; B1-B5 and B7 put a hostile server before a good one (two ``--connect``), B6
runs one alone.  In every case the agent must stay bounded in memory (its peak RSS,
``VmHWM``, under :data:`PEAK_RSS_LIMIT_KIB`; reading the 100 MB ask file or the 100 MB blob
whole adds 100 MiB and more) and in time (at most the 10 s per server, or ``--timeout``),
answer the legitimate request with the good server's password, send nothing anywhere else,
and never crash.  Each case prints what it measured (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mandos_protocol.client import MAX_BLOB
from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Credentials, Priority, Session
from mandos_protocol.wire import DEFAULT_PRIORITY, key_id, resumable_send
from password_agent.fetch import FETCH_TIMEOUT
from peers import upstream
from peers.agent import AgentHarness, AgentRun
from peers.ask import FakeRequester
from peers.ours import OurServer, clients_conf
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.interop

#: The agent's peak RSS in every case stays below this (it peaks at about 25 MiB).
PEAK_RSS_LIMIT_KIB = 64 * 1024
#: What the flooding ask file and the flooding server offer.
FLOOD_BYTES = 100 * 1000 * 1000
#: The first value beyond 64 bits (unsigned).
BEYOND_64_BITS = 2**64


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of process ``pid`` so far (``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for process {pid}")


def reason_lines(agent: AgentRun, reason: str) -> list[str]:
    return [line for line in agent.log().splitlines() if reason in line]


@pytest.fixture(scope="module")
def good(upstream_client: UpstreamClient) -> Iterator[OurServer]:
    """Our server, handing out the upstream client's real blob."""
    with OurServer(clients_conf(upstream_client.section)) as server:
        yield server




# --- servers speaking real TLS, misbehaving or slow --------------------------------------

@dataclass
class Outcome:
    """What happened on one connection to a :class:`ScriptedServer`."""

    started: float = field(default_factory=time.monotonic)
    peer_key_id: str | None = None
    sent: int = 0
    error: str | None = None
    ended: float | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


#: ``serve(connection, stop, outcome)``: misbehave on one connection, after the protocol line.
Serve = Callable[[socket.socket, threading.Event, Outcome], None]


@contextlib.contextmanager
def mandos_tls(connection: socket.socket, outcome: Outcome,
               priority_text: str = DEFAULT_PRIORITY) -> Iterator[Session]:
    """The TLS handshake a Mandos server makes: TLS client, no credentials, the peer's raw
    public key read afterwards (recorded as its key id)."""
    with Credentials() as credentials, Priority(priority_text) as priority, \
            Session.for_mandos_server(connection.fileno(), credentials, priority,
                                      timeout=FETCH_TIMEOUT + 5) as session:
        session.handshake()
        outcome.peer_key_id = key_id(session.peer_public_key())
        yield session


class ScriptedServer:
    """A Mandos server on 127.0.0.1 that reads the protocol line and then does what ``serve``
    says (misbehave, or hand out the real blob when the test lets it), one thread per
    connection; :attr:`outcomes` records each connection."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.connect = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            connection.settimeout(None)  # blocking: GnuTLS's own timeouts apply
            outcome = Outcome()
            self.outcomes.append(outcome)
            self._open.append(connection)
            thread = threading.Thread(target=self._serve, args=(connection, outcome),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket, outcome: Outcome) -> None:
        try:
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                received = connection.recv(1)
                if not received:
                    raise ProtocolError("closed before the protocol line")
                line += received
            self.serve(connection, self.stop, outcome)
        except (ProtocolError, OSError) as error:
            outcome.error = str(error)
        finally:
            outcome.ended = time.monotonic()
            connection.close()

    def wait_handshake(self, timeout: float = 15.0) -> None:
        """Wait until an agent finished a handshake with this server."""
        deadline = time.monotonic() + timeout
        while not any(outcome.peer_key_id for outcome in self.outcomes):
            assert time.monotonic() < deadline, f"no handshake: {self.outcomes}"
            time.sleep(0.02)

    def finished(self, settle: float = 0.0) -> bool:
        """Whether every connection so far (at least one) ended ``settle`` seconds ago."""
        ends = [outcome.ended for outcome in self.outcomes]
        return bool(ends) and None not in ends and \
            time.monotonic() - max(end for end in ends if end is not None) >= settle

    def close(self) -> None:
        self.stop.set()
        self._accepting.join()
        self.listener.close()
        for connection in self._open:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
            assert not thread.is_alive(), "a rogue connection did not end"

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def holds_back(blob: bytes, until: Callable[[], bool]) -> Serve:
    """A server that hands out ``blob`` once ``until()`` is true."""
    def serve(connection: socket.socket, stop: threading.Event, outcome: Outcome) -> None:
        with mandos_tls(connection, outcome) as session:
            while not until():
                if stop.wait(0.05):
                    return
            resumable_send(session.send, blob)()
            outcome.sent = len(blob)
            session.bye(wait_for_peer=False)
    return serve


def sends(blob: bytes) -> Serve:
    """A server that hands out ``blob`` at once (B3, B5)."""
    return holds_back(blob, lambda: True)


# --- A: hostile ask files ------------------------------------------------------------------

@dataclass
class Planted:
    """A hostile ask file (or several files), the reason the agent must log for it, and
    checks of the places a password must never reach (each returns what arrived, or None)."""

    reason: str
    silent: list[Callable[[], bytes | None]] = field(default_factory=list)
    files: int = 1  # how many hostile ask files log the reason


class Plant:
    """Makes the hostile files of one case in the agent directory; removes them at the end."""

    def __init__(self, requests: Path, elsewhere: Path, stack: contextlib.ExitStack) -> None:
        self.requests = requests
        self.elsewhere = elsewhere
        self.stack = stack

    def decoy(self, directory: Path) -> FakeRequester:
        """A real, bound datagram socket in ``directory`` whose request file is gone: a
        password sent to it is one sent where nobody asked."""
        fake = self.stack.enter_context(FakeRequester(directory, {"Id": "cryptsetup:decoy"}))
        fake.remove_ask_file()
        return fake

    def request(self, **fields: str | int) -> FakeRequester:
        """A request with the given fields; its own socket must receive nothing."""
        return self.stack.enter_context(
            FakeRequester(self.requests, {"Id": "cryptsetup:/dev/hostile", **fields}))

    def raw(self, name: str, data: bytes) -> Path:
        path = self.requests / name
        path.write_bytes(data)
        self.stack.callback(path.unlink, missing_ok=True)
        return path

    def fifo(self, name: str) -> Path:
        path = self.requests / name
        os.mkfifo(path, 0o600)
        self.stack.callback(path.unlink, missing_ok=True)
        return path

    def header(self, socket_path: Path | str, **extra: str | int) -> bytes:
        values: dict[str, str | int] = {"PID": os.getpid(), "Socket": str(socket_path),
                                        "NotAfter": 0, "Id": "cryptsetup:/dev/hostile",
                                        **extra}
        return ("[Ask]\n" + "".join(f"{k}={v}\n" for k, v in values.items())).encode()


def _fifo_reader(plant: Plant, path: Path) -> Callable[[], bytes | None]:
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    plant.stack.callback(os.close, descriptor)

    def read() -> bytes | None:
        try:
            return os.read(descriptor, 65536) or None
        except BlockingIOError:
            return None
    return read


def a1_socket_is_a_symlink(plant: Plant) -> Planted:
    """Socket= is a symbolic link to a real socket, itself in the agent directory."""
    target = plant.decoy(plant.requests)
    link = plant.requests / "sck.link"
    link.symlink_to(target.socket_path)
    plant.stack.callback(link.unlink, missing_ok=True)
    hostile = plant.request(Socket=str(link))
    return Planted("is a symbolic link", [lambda: target.receive(0), lambda: hostile.receive(0)])


def a2_socket_outside_through_dotdot(plant: Plant) -> Planted:
    """Socket= starts with the agent directory but leaves it through ``..``, to a real
    socket."""
    outside = plant.decoy(plant.elsewhere)
    sneaky = f"{plant.requests}/../{plant.elsewhere.name}/{outside.socket_path.name}"
    assert os.path.exists(sneaky)
    hostile = plant.request(Socket=sneaky)
    return Planted("is not a plain absolute path",
                   [lambda: outside.receive(0), lambda: hostile.receive(0)])


def a3_socket_is_a_fifo(plant: Plant) -> Planted:
    fifo = plant.fifo("sck.fifo")
    read = _fifo_reader(plant, fifo)
    hostile = plant.request(Socket=str(fifo))
    return Planted("is not a socket", [read, lambda: hostile.receive(0)])


def a4_ask_file_is_a_fifo(plant: Plant) -> Planted:
    """The ask file itself is a FIFO (opening it for reading must not block the agent)."""
    plant.fifo("ask.fifo")
    return Planted("is not a regular file")


def a5_binary_junk(plant: Plant) -> Planted:
    """64 KiB of random bytes: NULs, invalid UTF-8, stray ``=`` and ``[``."""
    plant.raw("ask.junk", random.Random(5).randbytes(64 * 1024))
    return Planted("its PID= None is missing")


def a6_nul_in_the_socket_path(plant: Plant) -> Planted:
    """Socket= names a real socket in the agent directory, then a NUL byte and more."""
    target = plant.decoy(plant.requests)
    plant.raw("ask.nul", plant.header(f"{target.socket_path}\0junk"))
    return Planted("is not a plain absolute path", [lambda: target.receive(0)])


def a7_100_mb_ask_file(plant: Plant) -> Planted:
    """A valid request for a real socket, followed by 100 MB (sparse: reading it costs the
    same): the agent must not read it whole, nor answer what its start says."""
    target = plant.decoy(plant.requests)
    path = plant.raw("ask.huge", plant.header(target.socket_path))
    os.truncate(path, FLOOD_BYTES)
    return Planted("is larger than", [lambda: target.receive(0)])


def a8_not_after_beyond_64_bits(plant: Plant) -> Planted:
    """NotAfter= 2**64, and 10**400 (more than a float holds): neither is a CLOCK_MONOTONIC
    time that systemd can write."""
    beyond = plant.request(NotAfter=BEYOND_64_BITS)
    far_beyond = plant.request(NotAfter=10**400)
    return Planted("is not a time", [lambda: beyond.receive(0), lambda: far_beyond.receive(0)],
                   files=2)


def a9_pid_beyond_64_bits(plant: Plant) -> Planted:
    hostile = plant.request(PID=BEYOND_64_BITS)
    return Planted("is missing or not a process id", [lambda: hostile.receive(0)])


ASK_FILE_CASES = [a1_socket_is_a_symlink, a2_socket_outside_through_dotdot, a3_socket_is_a_fifo,
                  a4_ask_file_is_a_fifo, a5_binary_junk, a6_nul_in_the_socket_path,
                  a7_100_mb_ask_file, a8_not_after_beyond_64_bits, a9_pid_beyond_64_bits]


def _case_id(case: Callable[[Plant], Planted]) -> str:
    number, _, name = case.__name__.partition("_")
    return f"{number.upper()}-{name.replace('_', '-')}"


@pytest.mark.parametrize("case", ASK_FILE_CASES, ids=_case_id)
def test_hostile_ask_file_is_ignored_beside_a_legitimate_one(
        case: Callable[[Plant], Planted], good: OurServer, agents: AgentHarness,
        requests: Path, tmp_path: Path, password: bytes) -> None:
    """A1-A9 (A10 below): the hostile file is ignored with one log line saying why, no
    password reaches any socket it names, the legitimate request beside it is answered, the
    agent neither crashes nor grows, and it exits once the hostile file is gone."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with contextlib.ExitStack() as stack:
        planted = case(Plant(requests, elsewhere, stack))
        with FakeRequester(requests, {"Id": "cryptsetup:/dev/good"}) as legitimate:
            started = time.monotonic()
            agent = agents.start("--timeout", "20", connect=[good.connect],
                                 agent_directory=requests)
            assert legitimate.receive(15) == b"+" + password, agent.log()
            answered = time.monotonic() - started
            agent.wait_log("answered")
            time.sleep(0.2)
            assert agent.process.poll() is None, f"exited with the file present:\n{agent.log()}"
            peak = peak_rss_kib(agent.process.pid)
            assert [check() for check in planted.silent] == [None] * len(planted.silent)
            legitimate.remove_ask_file()
        stack.close()  # the hostile files go: the agent has nothing left
        assert agent.wait() == 0, agent.log()
    lines = reason_lines(agent, planted.reason)
    print(f"{_case_id(case)}: legitimate request answered in {answered:.2f} s; peak RSS "
          f"{peak / 1024:.1f} MiB; {lines}")
    assert len(lines) == planted.files, agent.log()
    assert peak < PEAK_RSS_LIMIT_KIB
    assert "Traceback" not in agent.log()


def test_a10_a_requester_that_exits_during_the_fetch_is_not_answered(
        agents: AgentHarness, requests: Path, password: bytes,
        upstream_client: UpstreamClient) -> None:
    """A10: two requests pending; the server (real TLS, the real blob) holds the blob back
    until the requester of one of them has exited.  The design ignores a request whose PID
    is dead (DESIGN.md, *How the agent runs*) and the agent checks again just before it
    answers: that request gets nothing, the other one the password."""
    release = threading.Event()
    requester = subprocess.Popen(["sleep", "60"])
    try:
        with ScriptedServer(holds_back(upstream_client.secret, release.is_set)) as slow, \
                FakeRequester(requests, {"Id": "cryptsetup:/dev/good"}) as legitimate, \
                FakeRequester(requests, {"PID": requester.pid,
                                         "Id": "cryptsetup:/dev/exits"}) as exiting:
            agent = agents.start("--timeout", "20", connect=[slow.connect],
                                 agent_directory=requests)
            slow.wait_handshake()
            requester.kill()
            requester.wait()
            release.set()
            assert legitimate.receive(10) == b"+" + password, agent.log()
            agent.wait_log("answered")
            assert exiting.receive(0.2) is None, agent.log()
            legitimate.remove_ask_file()
            exiting.remove_ask_file()
            assert agent.wait() == 0, agent.log()
    finally:
        requester.kill()
        requester.wait()
    lines = reason_lines(agent, f"(PID {requester.pid}) is not running")
    print(f"A10: {lines}")
    assert len(lines) == 1, agent.log()


# --- B: hostile servers speaking real TLS ----------------------------------------------------

def flood(connection: socket.socket, stop: threading.Event, outcome: Outcome) -> None:
    """B1: sends 100 MB of application data."""
    chunk = bytes(16 * 1024)
    with mandos_tls(connection, outcome) as session:
        while outcome.sent < FLOOD_BYTES and not stop.is_set():
            outcome.sent += session.send(chunk)
        session.bye(wait_for_peer=False)


def trickle(connection: socket.socket, stop: threading.Event, outcome: Outcome) -> None:
    """B2: one byte a second, until the agent closes the connection (at most a minute)."""
    with mandos_tls(connection, outcome) as session:
        while outcome.sent < 60:
            outcome.sent += session.send(b"\x85")
            if select.select([connection], [], [], 1.0)[0] or stop.is_set():
                return  # the agent closed the connection (or the test is over)


def x509_only(connection: socket.socket, stop: threading.Event, outcome: Outcome) -> None:
    """B4: offers X.509 certificates only (and TLS 1.2 beside 1.3)."""
    with mandos_tls(connection, outcome, "NORMAL:-CTYPE-ALL:+CTYPE-X.509"):
        raise AssertionError("the agent accepted a handshake without raw public keys")


@pytest.fixture(scope="module")
def other_clients_blob(upstream_key_factory: Callable[[str], upstream.KeySet]) -> bytes:
    """A real blob from upstream's keygen, for another client's OpenPGP key (the key set
    ``bar`` of the conftest's ``keys``)."""
    other = upstream_key_factory("bar")
    return upstream.section_secret(upstream.upstream_section(other, "bar", b"not for you"))


@dataclass(frozen=True)
class ServerCase:
    serve: Callable[[bytes], Serve]  # given another client's blob
    #: What the agent logs about the hostile server, if it has to deal with it (the good
    #: server then holds the real blob back until the agent is done with the hostile one).
    agent_says: str | None
    rogue_error: str | None = None  # what the hostile server's own TLS reports, if it fails


SERVER_CASES = {
    "B1-sends-100-MB": ServerCase(lambda _: flood, f"more than {MAX_BLOB} bytes"),
    # The agent asks the good server 0.25 s later and takes its blob; the trickle's 10 s
    # deadline is B6's.
    "B2-one-byte-a-second": ServerCase(lambda _: trickle, None),
    "B3-garbage-not-OpenPGP": ServerCase(
        lambda _: sends(random.Random(3).randbytes(4096)), "refusing the server's blob"),
    "B4-negotiates-X.509": ServerCase(lambda _: x509_only, "failed", "TLS handshake"),
    "B5-blob-for-another-key": ServerCase(sends, "refusing the server's blob"),
}


@pytest.mark.parametrize("name", SERVER_CASES)
def test_hostile_server_before_a_good_one(
        name: str, agents: AgentHarness, requests: Path, password: bytes,
        upstream_client: UpstreamClient, other_clients_blob: bytes) -> None:
    """B1-B5: the hostile server is the first --connect, a good one the second.  Where the
    agent must deal with the hostile one (all but B2), the good one hands out the real blob
    only once the agent is done with the hostile one, so that an agent asking both at once
    cannot skip it.  The good one delivers, the request gets its password and nothing else,
    within the 10 s per server, and the agent's memory stays small."""
    case = SERVER_CASES[name]
    with ScriptedServer(case.serve(other_clients_blob)) as rogue, \
            ScriptedServer(holds_back(
                upstream_client.secret,
                lambda: case.agent_says is None or rogue.finished(settle=0.2))) as good, \
            FakeRequester(requests) as fake:
        started = time.monotonic()
        agent = agents.start("--timeout", "30", connect=[rogue.connect, good.connect],
                             agent_directory=requests)
        assert fake.receive(FETCH_TIMEOUT + 10) == b"+" + password, agent.log()
        answered = time.monotonic() - started
        agent.wait_log("answered")
        peak = peak_rss_kib(agent.process.pid)
        assert fake.receive(0.2) is None  # one answer, only the good server's
        fake.remove_ask_file()
        assert agent.wait() == 0, agent.log()
    [outcome] = rogue.outcomes  # tried once: the good server delivered in the same round
    said = [line for line in agent.log().splitlines() if rogue.connect in line]
    print(f"{name}: answered after {answered:.2f} s; the hostile connection lasted "
          f"{outcome.seconds:.2f} s, {outcome.sent} bytes sent, its end {outcome.error!r};"
          f" agent peak RSS {peak / 1024:.1f} MiB; agent: {said}")
    if case.agent_says is not None:
        assert any(case.agent_says in line for line in said), agent.log()
    assert peak < PEAK_RSS_LIMIT_KIB
    assert outcome.seconds < FETCH_TIMEOUT + 2 and answered < FETCH_TIMEOUT + 5
    if case.rogue_error is None:
        assert outcome.peer_key_id == upstream_client.keys.key_id  # real TLS with our key
    else:
        assert outcome.peer_key_id is None and case.rogue_error in str(outcome.error)
    assert "Traceback" not in agent.log()


def test_b6_a_byte_a_second_alone_is_given_up_after_10_s_and_at_the_timeout(
        agents: AgentHarness, requests: Path) -> None:
    """B6: with only the trickling server and ``--timeout 12``, the agent gives up on the
    server after its 10 s (not the minute the server would trickle), tries it again, and
    ends at the 12 s of ``--timeout``, answering nothing."""
    with ScriptedServer(trickle) as rogue, FakeRequester(requests) as fake:
        started = time.monotonic()
        agent = agents.start("--timeout", "12", connect=[rogue.connect],
                             agent_directory=requests)
        agent.wait_log(f"took longer than {FETCH_TIMEOUT:g} s", timeout=FETCH_TIMEOUT + 5)
        given_up = time.monotonic() - started
        assert agent.wait(10) == 1, agent.log()
        ended = time.monotonic() - started
        assert fake.receive(0) is None
    sent = [outcome.sent for outcome in rogue.outcomes]
    print(f"B6: gave up on the server after {given_up:.2f} s, exited 1 after {ended:.2f} s; "
          f"the server sent {sent} bytes on {len(sent)} connections")
    assert FETCH_TIMEOUT <= given_up < FETCH_TIMEOUT + 2, agent.log()
    assert 12 <= ended < 14, agent.log()
    assert len(reason_lines(agent, "--timeout of 12 s reached")) == 1, agent.log()


#: B7's wrong password: nothing that a log line would say in words (the secret scan looks for
#: it everywhere).
WRONG_PASSWORD = b"b7-hostile-guess-51c2"


def test_b7_a_wrong_password_for_our_key_does_not_shut_out_the_right_one(
        agents: AgentHarness, requests: Path, password: bytes,
        upstream_client: UpstreamClient) -> None:
    """B7: a hostile server that knows our OpenPGP public key (no secret: ``pubkey.txt``)
    hands out a wrong password encrypted to it, always first.  Nothing tells the agent that
    it is wrong, so it goes out once (one of cryptsetup's tries).  When cryptsetup asks again
    with the same Id, the agent must neither send it again nor give up: the good server's
    password goes out."""
    wrong = upstream.section_secret(
        upstream.upstream_section(upstream_client.keys, "hostile", WRONG_PASSWORD))
    with ScriptedServer(sends(wrong)) as rogue, \
            ScriptedServer(holds_back(upstream_client.secret,
                                      lambda: rogue.finished(settle=0.2))) as good:
        with FakeRequester(requests, {"Id": "cryptsetup:/dev/b7"}) as first:
            agent = agents.start("--timeout", "30", connect=[rogue.connect, good.connect],
                                 agent_directory=requests)
            assert first.receive(10) == b"+" + WRONG_PASSWORD, agent.log()
            agent.wait_log("answered")
            asked_again = time.monotonic()
            again = FakeRequester(requests, {"Id": "cryptsetup:/dev/b7"})
        with again:
            assert again.receive(FETCH_TIMEOUT + 5) == b"+" + password, agent.log()
            answered = time.monotonic() - asked_again
            assert again.receive(0.2) is None
            again.remove_ask_file()
            assert agent.wait() == 0, agent.log()
    print(f"B7: the wrong password went out once; asked again, the right one after "
          f"{answered:.2f} s; the hostile server was asked {len(rogue.outcomes)} times")
    assert len(reason_lines(agent, "already sent")) == 1, agent.log()
