# SPDX-License-Identifier: GPL-3.0-or-later
"""The resident agent (``--watch``, as the initramfs runs it) against real peers: our server,
the real ``systemd-ask-password`` in a private mount namespace, real gpg and gpg-agent, and a
datagram socket standing in for systemd's ``NOTIFY_SOCKET``.

It must say ``READY=1`` only once warm (the GnuPG home made, both keys imported, gpg-agent
running), answer request after request with that same home without exiting, contact no server
before a request is pending, and on SIGTERM exit 0 leaving no GnuPG home and no gpg-agent.
"""

from __future__ import annotations

import select
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peers.agent import AgentHarness, AgentRun, processes_left, processes_mentioning
from peers.ask import AskNamespace, AskPassword, FakeRequester
from peers.ours import OurServer, clients_conf
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.interop

READY_TIMEOUT = 30.0


class NotifySocket:
    """A bound ``AF_UNIX`` datagram socket in the role of systemd's notification socket; it
    keeps every message the agent sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.messages: list[str] = []

    def received(self, assignment: str, wait: float = 0.0) -> bool:
        """Whether a message so far held the line ``assignment`` (e.g. ``READY=1``), reading
        what arrives within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while not any(assignment in message.split("\n") for message in self.messages):
            left = max(0.0, deadline - time.monotonic())
            if not select.select([self.socket], [], [], min(left, 0.1))[0]:
                if left == 0:
                    return False
                continue
            self.messages.append(self.socket.recv(4096).decode())
        return True

    def wait_for(self, assignment: str, agent: AgentRun, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``assignment`` arrived, failing early if the agent exits."""
        deadline = time.monotonic() + timeout
        while not self.received(assignment, wait=0.1):
            if time.monotonic() > deadline or agent.process.poll() is not None:
                self.received(assignment)  # what the agent sent before it exited
                raise AssertionError(f"no {assignment} (got {self.messages}):\n{agent.log()}")

    def wrap(self, inner: Callable[[list[str]], list[str]] | None = None
             ) -> Callable[[list[str]], list[str]]:
        """An argv wrapper that sets ``NOTIFY_SOCKET`` (``env`` execs: the pid stays the
        agent's), inside ``inner`` (e.g. the ask namespace's) if given."""
        def wrap(argv: list[str]) -> list[str]:
            command = ["env", f"NOTIFY_SOCKET={self.path}", *argv]
            return inner(command) if inner is not None else command
        return wrap

    def close(self) -> None:
        self.socket.close()


class RecordingListener:
    """A TCP listener on 127.0.0.1 that counts the connections made to it and closes each at
    once (what a Mandos server would see of an agent), or with ``hold`` keeps each open and
    says nothing: a server that stalls every fetch."""

    def __init__(self, *, hold: bool = False) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.connections = 0
        self._hold = hold
        self._held: list[socket.socket] = []
        self._running = True
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def connect(self) -> str:
        return f"127.0.0.1:{self.socket.getsockname()[1]}"

    def _accept(self) -> None:
        while self._running:
            try:
                connection, _ = self.socket.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            if self._hold:
                self._held.append(connection)
            else:
                connection.close()

    def close(self) -> None:
        self._running = False
        self._thread.join()
        for connection in self._held:
            connection.close()
        self.socket.close()


@pytest.fixture
def notify(agents: AgentHarness) -> Iterator[NotifySocket]:
    notify_socket = NotifySocket(agents.work / "notify")
    try:
        yield notify_socket
    finally:
        notify_socket.close()


@pytest.fixture
def server(upstream_client: UpstreamClient) -> Iterator[OurServer]:
    with OurServer(clients_conf(upstream_client.section)) as running:
        yield running


def _homes(agents: AgentHarness) -> list[Path]:
    return sorted(agents.run_directory.glob("gnupg.*"))


def test_watch_is_warm_when_ready_answers_requests_in_turn_and_cleans_up_on_sigterm(
        server: OurServer, agents: AgentHarness, notify: NotifySocket,
        ask_namespace: AskNamespace, upstream_client: UpstreamClient) -> None:
    password = upstream_client.password
    agent = agents.start("--watch", connect=[server.connect],
                         wrap=notify.wrap(ask_namespace.wrap))
    notify.wait_for("READY=1", agent)
    # Warm when READY=1 arrives: the home is there with the secret key, and its agent runs.
    homes = _homes(agents)
    assert len(homes) == 1, agent.log()
    assert any((homes[0] / "private-keys-v1.d").iterdir()), "no secret key imported"
    assert [command for command in processes_mentioning(str(homes[0]))
            if command.startswith("gpg-agent")], "no gpg-agent running for the home"
    assert server.journal is not None
    assert server.journal.find("secret-sent") == []

    with AskPassword.start(ask_namespace, id="cryptsetup:/dev/first") as ask:
        assert ask.wait() == (0, password + b"\n"), ask.stderr
    # Guards: a resident agent stays once nothing is pending (it does not exit as a
    # non-resident one does); its idle wait is the event that says so.
    agent.wait_idle()
    with AskPassword.start(ask_namespace, id="cryptsetup:/dev/second") as ask:
        assert ask.wait() == (0, password + b"\n"), ask.stderr
    agent.wait_log("answered ask.", count=2)  # logged after the answer is sent
    assert agent.log().count("answered ask.") == 2
    assert len(server.journal.wait_for("secret-sent", count=2)) == 2  # logged after the send
    assert _homes(agents) == homes  # the same warm home served both

    # systemd-cryptsetup asking again after a wrong password: left to the human.
    with AskPassword.start(ask_namespace, id="cryptsetup:/dev/first", timeout=3) as ask:
        agent.wait_log("already sent")
        assert ask.wait()[0] == 1  # timed out: nobody answered
    assert agent.process.poll() is None, agent.log()

    agent.process.send_signal(signal.SIGTERM)
    assert agent.wait(10) == 0, agent.log()  # and no process mentions the run directory
    assert _homes(agents) == []
    assert processes_left(str(homes[0])) == []
    assert notify.received("STOPPING=1")
    assert "terminated" in agent.log()


def test_watch_started_by_a_request_answers_it_first_then_stays(
        server: OurServer, agents: AgentHarness, notify: NotifySocket,
        ask_namespace: AskNamespace, upstream_client: UpstreamClient) -> None:
    """As the initramfs's .path unit starts it: a request is already pending, so the agent
    answers it without warming up first (the GnuPG home is prepared during the fetch), says
    READY=1, and stays resident for the next request."""
    password = upstream_client.password
    with AskPassword.start(ask_namespace, id="cryptsetup:/dev/first") as ask:
        ask.wait_ask_file()
        agent = agents.start("--watch", connect=[server.connect],
                             wrap=notify.wrap(ask_namespace.wrap))
        assert ask.wait() == (0, password + b"\n"), ask.stderr
    notify.wait_for("READY=1", agent)
    log = agent.log()
    assert "a request is pending; answering it" in log, log
    assert "warm (GnuPG home ready)" not in log.split("answered ask.")[0], log
    agent.wait_idle()
    with AskPassword.start(ask_namespace, id="cryptsetup:/dev/second") as ask:
        assert ask.wait() == (0, password + b"\n"), ask.stderr
    assert agent.process.poll() is None, agent.log()
    agent.process.send_signal(signal.SIGTERM)
    assert agent.wait(10) == 0, agent.log()
    assert _homes(agents) == []


def test_watch_contacts_no_server_before_a_request(agents: AgentHarness, notify: NotifySocket,
                                                   tmp_path: Path) -> None:
    """Warm and idle, it connects nowhere; the first request makes it connect at once."""
    requests = tmp_path / "ask-password"  # missing: the resident agent makes it
    listener = RecordingListener()
    try:
        agent = agents.start("--watch", connect=[listener.connect], agent_directory=requests,
                             wrap=notify.wrap())
        notify.wait_for("READY=1", agent)
        agent.wait_idle()  # a connection made before a request would have come before this
        assert listener.connections == 0, agent.log()
        with FakeRequester(requests):
            deadline = time.monotonic() + 10
            while listener.connections == 0:
                assert time.monotonic() < deadline, f"never connected:\n{agent.log()}"
                time.sleep(0.02)
        agent.wait_log("went away")
        # The request is gone: no more attempts.  Guards against retrying on: between two
        # attempts the agent waits a few seconds at most, never its 60 s idle wait.
        agent.wait_idle()
        agent.process.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0, agent.log()
    finally:
        listener.close()
    assert _homes(agents) == []


def test_watch_with_unusable_keys_fails_before_ready(agents: AgentHarness,
                                                     notify: NotifySocket, tmp_path: Path,
                                                     upstream_client: UpstreamClient) -> None:
    """A key problem ends a resident agent at start (exit 1, one line), before READY=1, so
    that systemd marks the unit failed instead of waiting for it."""
    keydir = tmp_path / "keys"
    shutil.copytree(upstream_client.keys.directory, keydir)
    (keydir / "seckey.txt").write_text("not an OpenPGP key\n")
    requests = tmp_path / "ask-password"
    agent = agents.start("--watch", connect=["127.0.0.1:9"], agent_directory=requests,
                         keydir=keydir, wrap=notify.wrap())
    assert agent.wait(30) == 1, agent.log()
    errors = [line for line in agent.log().splitlines() if "error:" in line]
    assert len(errors) == 1 and "secret key" in errors[0], agent.log()
    assert not notify.received("READY=1")
    assert _homes(agents) == []


def test_a_home_left_by_a_killed_agent_is_removed_but_never_a_live_agents(
        agents: AgentHarness, notify: NotifySocket, tmp_path: Path) -> None:
    """An agent killed with SIGKILL leaves its home (with the secret key) in /run, which the
    initramfs hands over to the booted system: the next agent removes it, while a second agent
    running beside a live one leaves the live one's home alone."""
    first = agents.start("--watch", connect=["127.0.0.1:9"],
                         agent_directory=tmp_path / "first", wrap=notify.wrap())
    notify.wait_for("READY=1", first)
    [live] = _homes(agents)
    first.process.kill()
    first.process.wait(10)
    assert _homes(agents) == [live]  # what SIGKILL leaves behind, its gpg-agent still running

    second_notify = NotifySocket(tmp_path / "notify-2")
    third_notify = NotifySocket(tmp_path / "notify-3")
    try:
        second = agents.start("--watch", connect=["127.0.0.1:9"],
                              agent_directory=tmp_path / "second", wrap=second_notify.wrap())
        second_notify.wait_for("READY=1", second)
        [second_home] = _homes(agents)
        assert second_home != live and not live.exists()
        assert "left by an agent that was killed" in second.log()
        assert processes_left(str(live)) == []  # its gpg-agent was stopped too

        third = agents.start("--watch", connect=["127.0.0.1:9"],
                             agent_directory=tmp_path / "third", wrap=third_notify.wrap())
        third_notify.wait_for("READY=1", third)
        assert second_home in _homes(agents) and len(_homes(agents)) == 2
        for agent in (second, third):
            agent.process.send_signal(signal.SIGTERM)
        assert [agent.process.wait(10) for agent in (second, third)] == [0, 0]
        assert processes_left(str(agents.run_directory)) == []
    finally:
        second_notify.close()
        third_notify.close()
    assert _homes(agents) == []
