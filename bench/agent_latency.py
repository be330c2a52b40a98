# SPDX-License-Identifier: GPL-3.0-or-later
"""Agent latency: from a password request appearing to the password arriving, ours vs upstream,
each agent run the way it is deployed in the initramfs.

One run: a :class:`~peers.ask.FakeRequester` writes ``ask.*`` into a private agent
directory and binds its reply socket (what ``systemd-ask-password`` does); the clock runs from
just before the file is written until the reply datagram (``+password``) arrives, and the
reply is checked.  Three agents, each a row of the table:

- **ours, --watch, warm**: ``/usr/bin/python3 -S -m password_agent --watch`` with
  ``PYTHONPATH`` set to this tree and the venv's site-packages, as the dracut unit runs it from
  ``/usr/lib/mandos-password-agent``.  It is started before the request, with
  ``NOTIFY_SOCKET`` naming a datagram socket bound here, and the request is written only once
  ``READY=1`` arrived: what every request after the first costs in the initramfs (the first
  one started the agent).  After the reply it gets SIGTERM and must exit 0 (a fresh agent per
  run: each remembers the Ids it answered).
- **ours, on demand**: the same command without ``--watch``, started when the request is
  written, as a ``.path`` unit starts it: the booted-system units do so, and the initramfs's
  first request costs about as much (its agent, started by that request, answers it first).
- **upstream**: Debian's ``password-agent`` running ``mandos-client``, started when the
  request is written, as its dracut module's ``.path`` unit does.

All use the same key set (upstream's ``mandos-keygen``, RSA-4096) and the same server, one at
a time; one untimed round first (caches), then the runs alternate, and the medians and the
ratios ours/upstream are reported.

Then where the on-demand agent's time goes: each phase alone, in a fresh interpreter run as
the agent is (:data:`PHASE_PROBE`), medians over the same number of runs: the interpreter's
start (spawn to its first line), the imports of ``password_agent.cli``, the TLS key and
priority, the GnuPG home (python-gnupg's probe, both keys imported, gpg-agent started), the
fetch and the decryption.  The agent overlaps the GnuPG home with the rest, so the phases add
up to more than its ask-to-reply time.  The report goes to ``bench/results/``.

    python -m bench.agent_latency [--runs N] [--server ours|upstream]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import our_server
from peers.ask import FakeRequester
from peers.upstream import (
    MANDOS_CLIENT,
    KeySet,
    UpstreamServer,
    kill_process_group,
    make_upstream_keys,
    upstream_section,
)
from peers.vm.images import python_search_path

RESULTS = Path(__file__).resolve().parent / "results"
#: The interpreter the initramfs runs (never the venv's, whose site processing costs ~15 ms).
PYTHON = "/usr/bin/python3"
#: Upstream's agent ships in the dracut module of Debian's mandos-client package.
UPSTREAM_AGENT = Path("/usr/lib/dracut/modules.d/90mandos/password-agent")
PASSWORD = b"agent latency password"
REPLY_TIMEOUT = 30.0
#: How long a resident agent may take to say READY=1, and any agent to exit afterwards.
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0
#: The unprivileged user and group upstream's agent runs mandos-client as (its default).
NOBODY = 65534


@dataclass
class AgentTimes:
    """Seconds from request to reply, per run, for one agent."""

    agent: str
    seconds: list[float] = field(default_factory=list)
    failures: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def our_environment() -> dict[str, str]:
    """Our agent's environment as in the initramfs: the packages from PYTHONPATH (there one
    private directory; here this tree, then the venv's site-packages), no site module."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(python_search_path())}


def our_agent_argv(keys: KeySet, connect: str, agent_directory: Path, work: Path) -> list[str]:
    """Our agent, started on demand, answering the requests in ``agent_directory`` from the
    server at ``connect``; ``work`` holds its run directory (fresh per run: it remembers
    answers)."""
    return [PYTHON, "-S", "-m", "password_agent", "--keydir", str(keys.directory),
            "--run-directory", str(work / "run"), "--kernel-cmdline", "/dev/null",
            "--timeout", str(REPLY_TIMEOUT), "--connect", connect,
            "--agent-directory", str(agent_directory)]


def our_resident_argv(keys: KeySet, connect: str, agent_directory: Path,
                      work: Path) -> list[str]:
    """Our agent with ``--watch`` (no ``--timeout``: the two exclude each other)."""
    argv = our_agent_argv(keys, connect, agent_directory, work)
    position = argv.index("--timeout")
    return [*argv[:position], *argv[position + 2:], "--watch"]


def upstream_agent_argv(keys: KeySet, connect: str, agent_directory: Path,
                        work: Path) -> list[str]:
    """Upstream's ``password-agent`` running upstream's ``mandos-client``, with no network
    hooks.  The agent runs the client as an unprivileged user and refuses uid 0, so the
    client gets a copy of the keys in a 0700 directory of that user's own."""
    hooks = work / "hooks"
    hooks.mkdir(exist_ok=True)
    work.chmod(0o711)  # traversable, so that the client reaches its own directory below
    private = work / "keys"
    private.mkdir(mode=0o700)
    os.chown(private, NOBODY, NOBODY)
    copies = []
    for source in (keys.pubkey, keys.seckey, keys.tls_pubkey, keys.tls_privkey):
        target = private / source.name
        shutil.copyfile(source, target)
        os.chmod(target, 0o600)
        os.chown(target, NOBODY, NOBODY)
        copies.append(target)
    pubkey, seckey, tls_pubkey, tls_privkey = copies
    return [str(UPSTREAM_AGENT), f"--agent-directory={agent_directory}",
            f"--helper-directory={hooks}", f"--user={NOBODY}", f"--group={NOBODY}", "--",
            MANDOS_CLIENT, f"--connect={connect}", "--interface=none",
            f"--network-hook-dir={hooks}", f"--pubkey={pubkey}", f"--seckey={seckey}",
            f"--tls-pubkey={tls_pubkey}", f"--tls-privkey={tls_privkey}"]


AgentArgv = Callable[[KeySet, str, Path, Path], list[str]]


@dataclass(frozen=True)
class Agent:
    """One row of the table: how to start the agent, and whether it is started (and has
    said READY=1) before the request is written."""

    label: str
    argv: AgentArgv
    environment: Callable[[], dict[str, str]] = lambda: dict(os.environ)
    resident: bool = False


AGENTS = (
    Agent("ours, --watch, warm (later requests in the initramfs)", our_resident_argv,
          our_environment, resident=True),
    Agent("ours, on demand", our_agent_argv, our_environment),
    Agent("upstream (password-agent + mandos-client), on demand", upstream_agent_argv),
)


def _wait_ready(notify: socket.socket, process: subprocess.Popen[bytes]) -> bool:
    """Whether ``process`` sent ``READY=1`` to ``notify`` before exiting or the timeout."""
    deadline = time.monotonic() + READY_TIMEOUT
    while (left := deadline - time.monotonic()) > 0 and process.poll() is None:
        if (select.select([notify], [], [], min(left, 0.1))[0]
                and b"READY=1" in notify.recv(4096).split(b"\n")):
            return True
    return False


def _stop(process: subprocess.Popen[bytes], resident: bool) -> bool:
    """End one agent: a resident one by SIGTERM, which it must answer by exiting 0; one
    started on demand exits by itself once its request is gone.  Whatever is left of its
    process group is killed.  Whether it ended as it should."""
    if resident:
        process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        status = None
    kill_process_group(process, graceful=False, timeout=1.0)
    return status == 0 or not resident


def one_run(agent: Agent, keys: KeySet, connect: str) -> float | None:
    """Seconds from the request appearing to the right reply arriving, or None."""
    work = Path(tempfile.mkdtemp(prefix="mpa-bench-"))  # short: gpg-agent sockets live here
    process: subprocess.Popen[bytes] | None = None
    try:
        requests = work / "ask"
        requests.mkdir()
        command = agent.argv(keys, connect, requests, work)
        environment = agent.environment()
        with contextlib.ExitStack() as stack, open(work / "agent.log", "wb") as log:
            def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
                return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=log, start_new_session=True)

            if agent.resident:
                notify = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
                notify.bind(str(work / "notify"))
                process = start(env={**environment, "NOTIFY_SOCKET": str(work / "notify")})
                if not _wait_ready(notify, process):
                    _failed(agent, work, "no READY=1")
                    return None
            started = time.perf_counter()
            with FakeRequester(requests, {"Id": "cryptsetup:/dev/bench"}) as request:
                if process is None:
                    process = start(environment)
                reply = request.receive(REPLY_TIMEOUT)
                elapsed = time.perf_counter() - started
                request.remove_ask_file()
            ended_well = _stop(process, agent.resident)
        # Upstream's agent sends a C string (with its NUL); the requester ignores the NUL.
        if reply is None or reply.removesuffix(b"\0") != b"+" + PASSWORD:
            _failed(agent, work, "no reply, or a wrong one")
            return None
        if not ended_well:
            _failed(agent, work, "it did not exit 0 on SIGTERM")
            return None
        return elapsed
    finally:
        if process is not None and process.returncode is None:
            kill_process_group(process, graceful=False, timeout=1.0)
        shutil.rmtree(work, ignore_errors=True)


def _failed(agent: Agent, work: Path, what: str) -> None:
    log = (work / "agent.log").read_text(errors="replace") if (work / "agent.log").exists() else ""
    print(f"{agent.label}: {what}; its log:\n{log[-2000:]}", file=sys.stderr)


@contextlib.contextmanager
def key_set() -> Iterator[tuple[KeySet, str]]:
    """A key set from upstream's keygen and its clients.conf section with :data:`PASSWORD`."""
    directory = Path(tempfile.mkdtemp(prefix="mandos-bench-keys-"))
    try:
        directory.chmod(0o700)
        keys = make_upstream_keys(directory / "keys", "bench")
        yield keys, upstream_section(keys, "bench", PASSWORD)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def server(kind: str, section: str) -> Iterator[str]:
    """The server all agents ask, yielding its ``address:port``."""
    if kind == "upstream":
        with UpstreamServer(section) as upstream:
            yield upstream.connect
        return
    with our_server("[DEFAULT]\nchecker = /bin/true\n\n" + section) as (_pid, port):
        yield f"127.0.0.1:{port}"


def measure(runs: int, server_kind: str = "ours") -> list[AgentTimes]:
    """``runs`` runs of each agent, alternating, against one server, after one untimed
    round; upstream last."""
    results = [AgentTimes(agent.label) for agent in AGENTS]
    with key_set() as (keys, section), server(server_kind, section) as connect:
        for agent in AGENTS:
            one_run(agent, keys, connect)  # byte-code and page caches, the server's state
        for _ in range(runs):
            for times, agent in zip(results, AGENTS, strict=True):
                seconds = one_run(agent, keys, connect)
                if seconds is None:
                    times.failures += 1
                else:
                    times.seconds.append(seconds)
    return results


def format_table(results: list[AgentTimes], server_kind: str) -> str:
    """A Markdown table of the medians, and the ratio of each of ours to upstream (the last
    row)."""
    lines = [f"Agent ask-to-reply latency against {server_kind} server (request appears → "
             "reply arrives; on demand includes the agent's start-up):", "",
             "| agent | runs | failures | median ms | min ms | max ms |", "|" + "---|" * 6]
    for times in results:
        lines.append(f"| {times.agent} | {len(times.seconds)} | {times.failures} "
                     f"| {1000 * times.median:.0f} "
                     f"| {1000 * min(times.seconds, default=float('nan')):.0f} "
                     f"| {1000 * max(times.seconds, default=float('nan')):.0f} |")
    *ours, upstream = results
    lines.append("")
    lines += [f"Ratio {times.agent} / upstream (medians): {times.median / upstream.median:.2f}"
              for times in ours]
    return "\n".join(lines)


#: One on-demand agent's work, phase by phase, each timed alone: run as
#: ``python3 -S -c PHASE_PROBE KEYDIR ADDRESS:PORT RUNDIR SPAWNED`` (SPAWNED: the parent's
#: CLOCK_MONOTONIC just before the spawn); prints the phases' seconds as JSON.
PHASE_PROBE = """
import time
first = time.monotonic()
import json, sys
import password_agent.cli
imported = time.monotonic()
import select
from pathlib import Path
from mandos_protocol.gnutls import Credentials, Priority
from password_agent.decrypt import Decryptor
from password_agent.fetch import fetch_blob
from password_agent.keyfiles import KeyFiles
from password_agent.servers import parse_connect
keys = KeyFiles.in_directory(Path(sys.argv[1]))
started = time.monotonic()
priority = Priority()
credentials = Credentials.raw_public_key_files(keys.tls_pubkey, keys.tls_privkey)
loaded = time.monotonic()
decryptor = Decryptor(keys.pubkey, keys.seckey, Path(sys.argv[3]))
decryptor.wait_ready()
home = time.monotonic()
def wait(fd, write, seconds):
    select.select([] if write else [fd], [fd] if write else [], [], seconds)
blob = fetch_blob(parse_connect(sys.argv[2]), credentials, priority, wait)
fetched = time.monotonic()
password = decryptor.decrypt(blob)
decrypted = time.monotonic()
password[:] = bytes(len(password))
decryptor.close()
print(json.dumps({"interpreter start": first - float(sys.argv[4]),
                  "imports": imported - first, "TLS key and priority": loaded - started,
                  "GnuPG home": home - loaded, "fetch": fetched - home,
                  "decryption": decrypted - fetched}))
"""


def phases(runs: int, server_kind: str = "ours") -> dict[str, float]:
    """Median seconds of each phase of :data:`PHASE_PROBE` over ``runs`` runs (after one
    untimed run)."""
    samples: dict[str, list[float]] = {}
    with key_set() as (keys, section), server(server_kind, section) as connect:
        for run in range(runs + 1):
            work = Path(tempfile.mkdtemp(prefix="mpa-phase-"))
            try:
                (work / "run").mkdir(mode=0o700)
                spawned = time.monotonic()
                output = subprocess.run(
                    [PYTHON, "-S", "-c", PHASE_PROBE, str(keys.directory), connect,
                     str(work / "run"), repr(spawned)], env=our_environment(),
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True,
                    timeout=REPLY_TIMEOUT).stdout
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if run:
                for phase, seconds in json.loads(output).items():
                    samples.setdefault(phase, []).append(seconds)
    return {phase: statistics.median(values) for phase, values in samples.items()}


def format_phases(medians: dict[str, float]) -> str:
    lines = ["Where the on-demand agent's time goes (each phase alone, medians):", "",
             "| phase | ms |", "|---|---|"]
    lines += [f"| {phase} | {1000 * seconds:.1f} |" for phase, seconds in medians.items()]
    lines.append(f"| sum | {1000 * sum(medians.values()):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per agent (7)")
    parser.add_argument("--server", choices=("ours", "upstream"), default="ours",
                        help="which server all agents ask (ours)")
    options = parser.parse_args(argv)
    report = (format_table(measure(options.runs, options.server), options.server) + "\n\n"
              + format_phases(phases(options.runs, options.server)) + "\n")
    now = datetime.datetime.now(datetime.UTC)
    path = RESULTS / f"agent-latency-{now:%Y%m%dT%H%M%S}.md"
    path.write_text(f"Agent latency, {now:%Y-%m-%d %H:%M} UTC, --runs {options.runs}, load "
                    f"average {os.getloadavg()[0]:.1f}\n\n" + report)
    print(report + f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
