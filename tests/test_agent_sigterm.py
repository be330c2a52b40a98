# SPDX-License-Identifier: GPL-3.0-or-later
"""SIGTERM at random moments in a resident agent's life, 200 times: it must always end.

The agent used to raise an exception from its SIGTERM handler; one that landed inside
sdnotify's ``notify()`` (a bare ``except:``) right after ``READY=1`` was swallowed, and the
agent ran on (23 of 30 runs), keeping its GnuPG home with the secret key in ``/run``.  Here
each of 200 ``--watch`` agents (real gpg and gpg-agent, our server or a server that stalls)
gets SIGTERM at a random moment of one of four phases: before ``READY=1``, right after it,
during a fetch, and during the decryption; half of them while CPU hogs compete for the cores.
A miss is an agent still running 5 s after the signal; leftovers are GnuPG homes or
gpg-agents that outlived their agent.  Both must be zero.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.agent import AgentHarness, processes_left
from peers.ask import FakeRequester
from peers.ours import OurServer, clients_conf
from tests.conftest import UpstreamClient
from tests.test_agent_watch import NotifySocket, RecordingListener

pytestmark = [pytest.mark.interop, pytest.mark.slow]

RUNS = 200
PHASES = ("before-ready", "after-ready", "during-fetch", "during-decryption")
CONCURRENT = 6
#: How long an agent may take to end after SIGTERM before it counts as a miss.
GRACE = 5.0


class CpuHogs:
    """Busy loops, one per core, as child processes of the test."""

    def __init__(self, count: int = 2) -> None:
        self.processes = [subprocess.Popen(["/bin/sh", "-c", "while :; do :; done"])
                          for _ in range(count)]

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


@dataclass
class Outcome:
    phase: str
    hogs: bool
    missed: bool
    status: int | None
    log: str


def _wait_for_log(agent_log: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in agent_log.read_text(errors="replace"):
            return True
        time.sleep(0.002)
    return False


def _one_run(index: int, phase: str, hogs: bool, agents: AgentHarness, server: OurServer,
             stalling: RecordingListener, rng: random.Random) -> Outcome:
    directory = agents.work / f"asks{index}"
    directory.mkdir()
    notify = NotifySocket(agents.work / f"notify{index}")
    requester: FakeRequester | None = None
    try:
        target = stalling.connect if phase == "during-fetch" else server.connect
        agent = agents.start("--watch", connect=[target], agent_directory=directory,
                             wrap=notify.wrap())
        if phase == "before-ready":
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            notify.wait_for("READY=1", agent)
            if phase == "during-fetch":
                requester = FakeRequester(directory)
                agent.wait_log("pending")
                time.sleep(rng.uniform(0.0, 0.3))
            elif phase == "during-decryption":
                requester = FakeRequester(directory)
                _wait_for_log(agent.log_path, " bytes", 10.0)
                time.sleep(rng.uniform(0.0, 0.03))
        agent.process.send_signal(signal.SIGTERM)
        try:
            status: int | None = agent.process.wait(GRACE)
        except subprocess.TimeoutExpired:
            status = None
        return Outcome(phase, hogs, status is None, status, agent.log())
    finally:
        if requester is not None:
            requester.close()
        notify.close()


@pytest.fixture
def servers(upstream_client: UpstreamClient) -> Iterator[tuple[OurServer, RecordingListener]]:
    stalling = RecordingListener(hold=True)  # a fetch from it never ends by itself
    try:
        with OurServer(clients_conf(upstream_client.section)) as server:
            yield server, stalling
    finally:
        stalling.close()


def test_200_sigterms_at_random_moments_none_missed(
        agents: AgentHarness, servers: tuple[OurServer, RecordingListener]) -> None:
    server, stalling = servers
    rng = random.Random(20261202)
    plan = [(index, PHASES[index % len(PHASES)], index >= RUNS // 2) for index in range(RUNS)]
    outcomes: list[Outcome] = []
    for with_hogs in (False, True):
        hogs = CpuHogs() if with_hogs else None
        try:
            with ThreadPoolExecutor(CONCURRENT) as pool:
                outcomes += pool.map(
                    lambda step: _one_run(step[0], step[1], step[2], agents, server, stalling,
                                          random.Random(rng.random())),
                    [step for step in plan if step[2] is with_hogs])
        finally:
            if hogs is not None:
                hogs.close()
    missed = [outcome for outcome in outcomes if outcome.missed]
    bad_status = [outcome for outcome in outcomes
                  if not outcome.missed and outcome.status not in (0, -signal.SIGTERM)]
    leftovers = processes_left(str(agents.run_directory))
    homes = sorted(path.name for path in agents.run_directory.glob("gnupg.*"))
    counts = {phase: sum(outcome.phase == phase for outcome in outcomes) for phase in PHASES}
    print(f"{len(outcomes)} SIGTERMs ({counts}; {sum(o.hogs for o in outcomes)} under CPU "
          f"hogs): {len(missed)} missed, {len(bad_status)} bad exits, {len(leftovers)} "
          f"gpg-agents and {len(homes)} GnuPG homes left")
    assert len(outcomes) == RUNS
    assert stalling.connections > 0  # the during-fetch runs did reach the stalling server
    assert server.journal is not None and server.journal.find("secret-sent")
    assert missed == [], "\n\n".join(f"{o.phase} hogs={o.hogs}:\n{o.log}" for o in missed[:3])
    assert bad_status == [], [(o.phase, o.status, o.log) for o in bad_status[:3]]
    assert leftovers == [] and homes == []
