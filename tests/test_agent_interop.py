# SPDX-License-Identifier: GPL-3.0-or-later
"""The password agent against real peers: Debian's upstream ``mandos`` server hands out the
blob, the real ``systemd-ask-password`` (in a private mount namespace) or a fake requester
(a raw ask file and a bound datagram socket) asks, and real gpg decrypts.

Every test checks on the way out that the agent left no GnuPG home behind and that the password
appears in none of its log output.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.agent import AgentHarness
from peers.ask import AskNamespace, AskPassword, FakeRequester, monotonic_usec
from peers.upstream import UpstreamServer, free_port
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def server(upstream_client: UpstreamClient) -> Iterator[UpstreamServer]:
    with UpstreamServer(upstream_client.section) as upstream:
        yield upstream





def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# --- the real requester ---------------------------------------------------------------------

def test_real_requester_gets_the_password_from_upstream(
        server: UpstreamServer, agents: AgentHarness, ask_namespace: AskNamespace,
        password: bytes) -> None:
    with AskPassword.start(ask_namespace, id="cryptsetup:test") as ask:
        ask.wait_ask_file()
        agent = agents.start("--timeout", "20", connect=[server.connect],
                             wrap=ask_namespace.wrap)
        assert ask.wait() == (0, password + b"\n"), ask.stderr
        assert agent.wait() == 0, agent.log()
    assert "answered" in agent.log()
    assert password not in ask.stderr


def test_agent_started_first_answers_a_later_request_with_a_broken_message(
        server: UpstreamServer, agents: AgentHarness, ask_namespace: AskNamespace,
        password: bytes) -> None:
    """A request that appears while the agent runs (IN_MOVED_TO) is answered; its multi-line
    Message= does not matter.  The agent lingers while an unanswerable request is present."""
    with FakeRequester(ask_namespace.directory, {"Id": "other:keeps-agent-alive"}) as other:
        agent = agents.start("--timeout", "20", connect=[server.connect],
                             wrap=ask_namespace.wrap)
        agent.wait_log("ignoring")
        with AskPassword.start(ask_namespace, "Line one\nline two", id="cryptsetup:late") as ask:
            assert ask.wait() == (0, password + b"\n"), ask.stderr
        assert agent.process.poll() is None  # the other request is still there
        other.remove_ask_file()
        assert agent.wait() == 0, agent.log()


def test_two_concurrent_requests_are_both_answered(
        server: UpstreamServer, agents: AgentHarness, ask_namespace: AskNamespace,
        password: bytes) -> None:
    with AskPassword.start(ask_namespace, id="cryptsetup:/dev/one") as one, \
            AskPassword.start(ask_namespace, id="cryptsetup:/dev/two") as two:
        one.wait_ask_file()
        two.wait_ask_file()
        agent = agents.start("--timeout", "20", connect=[server.connect],
                             wrap=ask_namespace.wrap)
        assert one.wait() == (0, password + b"\n"), one.stderr
        assert two.wait() == (0, password + b"\n"), two.stderr
        assert agent.wait() == 0, agent.log()
    assert agent.log().count("answered ask.") == 2


def test_ipv6_server(upstream_client: UpstreamClient, agents: AgentHarness,
                     ask_namespace: AskNamespace, password: bytes) -> None:
    with UpstreamServer(upstream_client.section, address="::1") as server6, \
            AskPassword.start(ask_namespace, id="cryptsetup:v6") as ask:
        agent = agents.start("--timeout", "20", connect=[f"[::1]:{server6.port}"],
                             wrap=ask_namespace.wrap)
        assert ask.wait() == (0, password + b"\n"), ask.stderr
        assert agent.wait() == 0, agent.log()


def test_outside_the_namespace_a_socket_path_elsewhere_is_ignored(
        server: UpstreamServer, agents: AgentHarness, ask_namespace: AskNamespace) -> None:
    """Seen from outside the namespace, the real request's Socket= names the host's
    directory, not the agent directory: the agent must not follow it."""
    with AskPassword.start(ask_namespace, id="cryptsetup:outside", timeout=3) as ask:
        ask.wait_ask_file()
        agent = agents.start("--timeout", "20", connect=[server.connect],
                             agent_directory=ask_namespace.directory)
        agent.wait_log("is not inside")
        assert ask.wait()[0] == 1  # timed out: nobody answered
        assert agent.wait() == 0, agent.log()
    assert "answered" not in agent.log()


# --- fake requesters: what is answered, what is not -----------------------------------------

def test_fake_request_is_answered(server: UpstreamServer, agents: AgentHarness,
                                  requests: Path, password: bytes) -> None:
    with FakeRequester(requests) as fake:
        agent = agents.start("--timeout", "20", connect=[server.connect],
                             agent_directory=requests)
        assert fake.receive(10) == b"+" + password
        fake.remove_ask_file()
        assert agent.wait() == 0, agent.log()


@pytest.mark.parametrize(("fields", "reason"), [
    ({"PID": "dead"}, "is not running"),
    ({"NotAfter": "past"}, "NotAfter has passed"),
    ({"Socket": "outside"}, "is not inside"),
    ({"Socket": "symlink"}, "is a symbolic link"),
    ({"Id": "luks-elsewhere:/dev/sda2"}, "is not a disk unlock"),
    ({"Message": "hi\nId=cryptsetup:forged"}, "more than one Id="),
])
def test_unanswerable_requests_are_ignored_with_a_reason(
        server: UpstreamServer, agents: AgentHarness, requests: Path, tmp_path: Path,
        fields: dict[str, str], reason: str, password: bytes) -> None:
    """Each gets one log line saying why and no datagram; the agent exits once it is gone.
    A valid request next to it is answered, so the agent did try."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with FakeRequester(elsewhere) as outside:
        values: dict[str, str | int | None] = dict(fields)
        if fields.get("PID") == "dead":
            values["PID"] = _dead_pid()
        if fields.get("NotAfter") == "past":
            values["NotAfter"] = monotonic_usec(-0.5)
        if fields.get("Socket") == "outside":
            values["Socket"] = str(outside.socket_path)
        if fields.get("Socket") == "symlink":
            link = requests / "sck.symlink"
            link.symlink_to(outside.socket_path)
            values["Socket"] = str(link)
        with FakeRequester(requests, values) as bad, \
                FakeRequester(requests, {"Id": "cryptsetup:/dev/good"}) as good:
            agent = agents.start("--timeout", "20", connect=[server.connect],
                                 agent_directory=requests)
            assert good.receive(10) == b"+" + password
            good.remove_ask_file()
            agent.wait_log("answered")
            agent.wait_idle()  # not exited: waiting for the ignored request to go away
            assert bad.receive(0) is None
            assert outside.receive(0) is None
            bad.remove_ask_file()
            assert agent.wait() == 0, agent.log()
    lines = [line for line in agent.log().splitlines() if reason in line]
    assert len(lines) == 1, agent.log()


def test_all_requests_answers_other_ids(server: UpstreamServer, agents: AgentHarness,
                                        requests: Path, password: bytes) -> None:
    with FakeRequester(requests, {"Id": None}) as fake:
        agent = agents.start("--timeout", "20", "--all-requests", connect=[server.connect],
                             agent_directory=requests)
        assert fake.receive(10) == b"+" + password
        fake.remove_ask_file()
        assert agent.wait() == 0, agent.log()


def test_request_deleted_during_the_fetch_is_not_answered(
        upstream_client: UpstreamClient, agents: AgentHarness, requests: Path) -> None:
    """The server takes 5 s to hand out the blob (approval_delay); the request goes away
    meanwhile: the agent, still watching the requests while it fetches, abandons the fetch at
    once and exits, long before the server would have sent anything."""
    slow = (upstream_client.section.rstrip("\n")
            + "\napproval_delay = PT5S\napproved_by_default = True\n")
    with UpstreamServer(slow) as server, FakeRequester(requests) as fake:
        agent = agents.start("--timeout", "20", connect=[server.connect],
                             agent_directory=requests)
        agent.wait_log("pending")
        time.sleep(0.5)
        removed = time.monotonic()
        fake.remove_ask_file()
        assert agent.wait() == 0, agent.log()
        assert time.monotonic() - removed < 3.0, agent.log()
        assert fake.receive(0) is None
    log = agent.log()
    assert "fetch abandoned" in log, log
    assert "bytes" not in log and "answered" not in log, log


def test_not_after_passing_while_pending_drops_the_request(
        agents: AgentHarness, requests: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with FakeRequester(requests, {"NotAfter": monotonic_usec(1.5)}) as fake:
        agent = agents.start("--timeout", "20", connect=[closed], agent_directory=requests)
        agent.wait_log("dropping", timeout=5)
        assert "NotAfter has passed" in agent.log()
        fake.remove_ask_file()
        assert agent.wait() == 0, agent.log()


def test_same_id_after_a_wrong_password_is_not_answered_again(
        server: UpstreamServer, agents: AgentHarness, requests: Path, password: bytes) -> None:
    """The first request is answered; systemd-cryptsetup, told the password was wrong, asks
    again with the same Id; the restarted agent (as its .path unit does) leaves that to the
    human, while another Id still gets the password."""
    with FakeRequester(requests, {"Id": "cryptsetup:/dev/wrong"}) as first:
        agent = agents.start("--timeout", "20", connect=[server.connect],
                             agent_directory=requests)
        assert first.receive(10) == b"+" + password
        first.remove_ask_file()
        assert agent.wait() == 0, agent.log()
    with FakeRequester(requests, {"Id": "cryptsetup:/dev/wrong"}) as again, \
            FakeRequester(requests, {"Id": "cryptsetup:/dev/other"}) as other:
        agent = agents.start("--timeout", "20", connect=[server.connect],
                             agent_directory=requests)
        assert other.receive(10) == b"+" + password
        agent.wait_log("already sent")
        assert again.receive(0.5) is None
        assert agent.process.poll() is None  # it waits for the human's answer
        again.remove_ask_file()
        other.remove_ask_file()
        assert agent.wait() == 0, agent.log()


# --- unreachable and refusing servers, timeouts, signals ------------------------------------

@pytest.mark.slow
def test_unreachable_server_retries_cheaply_and_stops_when_the_request_goes(
        agents: AgentHarness, requests: Path) -> None:
    """Guards three things, each with a bound that load can only make easier to meet:
    the agent backs off between rounds instead of spinning (the pauses after rounds 1 to 4
    are 0.5, 1, 2 and 4 s: a lower bound on the time to round 5), retrying costs little CPU
    (CPU time, which load does not inflate), and a request that goes away ends the 8 s pause
    after round 5 at once (inotify), well before that pause would end."""
    closed = f"127.0.0.1:{free_port()}"
    with FakeRequester(requests) as fake:
        agent = agents.start("--retry", "60", connect=[closed], agent_directory=requests)
        agent.wait_log("cannot connect")
        first = time.monotonic()
        agent.wait_log("cannot connect", count=5, timeout=60)
        assert time.monotonic() - first >= 7.0, agent.log()  # 7.5 s of pauses, less polling
        cpu = agent.cpu_seconds()
        assert cpu < 1.0, f"{cpu} s of CPU for five rounds of retrying"
        fake.remove_ask_file()
        removed = time.monotonic()
        assert agent.wait(15) == 0, agent.log()
        assert time.monotonic() - removed < 4.0, agent.log()  # not the 8 s pause
        assert agent.log().count("cannot connect") == 5, agent.log()
        assert fake.receive(0) is None


def test_refusing_server_is_skipped_for_the_next(
        server: UpstreamServer, agents: AgentHarness, requests: Path, password: bytes) -> None:
    """A server that does not know our key sends nothing; the agent goes on to the next."""
    stranger = ("[stranger]\nkey_id = " + "AB" * 32 + "\nfingerprint = " + "CD" * 20
                + "\nsecret = AAAA\n")
    with UpstreamServer(stranger) as refusing, FakeRequester(requests) as fake:
        agent = agents.start("--timeout", "20", connect=[refusing.connect, server.connect],
                             agent_directory=requests)
        assert fake.receive(10) == b"+" + password
        fake.remove_ask_file()
        assert agent.wait() == 0, agent.log()
    assert f"{refusing.connect} refused" in agent.log()


def test_timeout_with_a_request_pending_fails(agents: AgentHarness, requests: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with FakeRequester(requests):
        agent = agents.start("--timeout", "1.5", connect=[closed], agent_directory=requests)
        assert agent.wait(10) == 1
    errors = [line for line in agent.log().splitlines() if "error:" in line]
    assert len(errors) == 1 and "--timeout" in errors[0], agent.log()


def test_sigterm_exits_cleanly(agents: AgentHarness, requests: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with FakeRequester(requests):
        agent = agents.start(connect=[closed], agent_directory=requests)
        agent.wait_log("cannot connect")
        agent.process.send_signal(signal.SIGTERM)
        assert agent.wait(5) == 0, agent.log()
    assert "terminated" in agent.log()


def test_no_request_exits_at_once(agents: AgentHarness, requests: Path) -> None:
    agent = agents.start(connect=["127.0.0.1:9"], agent_directory=requests)
    assert agent.wait(10) == 0, agent.log()
    assert not agents.run_directory.exists()  # nothing was even prepared


def test_missing_keys_are_reported_on_one_line(agents: AgentHarness, requests: Path,
                                               tmp_path: Path) -> None:
    with FakeRequester(requests):
        agent = agents.start(connect=["127.0.0.1:9"], agent_directory=requests,
                             keydir=tmp_path / "nokeys")
        assert agent.wait(10) == 1
    errors = [line for line in agent.log().splitlines() if "error:" in line]
    assert len(errors) == 1 and "--keydir" in errors[0], agent.log()
