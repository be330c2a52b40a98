"""Agent latency: from a password request appearing to the password arriving, ours vs upstream.

At boot, systemd starts a password agent when an ``ask.*`` file appears (a path unit), so the
time that counts is from the request to the reply, agent start-up included.  One run here:

1. a :class:`~tests.peers.ask.FakeRequester` writes ``ask.*`` into a private agent directory
   and binds its reply socket (what ``systemd-ask-password`` does);
2. the agent is started on that directory: ours (``python -m password_agent``) or upstream's
   ``password-agent`` running upstream's ``mandos-client``;
3. the clock stops when the reply datagram (``+password``) arrives; it is checked.

Both agents use the same key set (made by upstream's ``mandos-keygen``) and the same server,
one at a time; several runs each, alternating, and the median is reported.

    python -m bench.agent_latency [--runs N] [--server ours|upstream]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import our_server
from tests.peers.ask import FakeRequester
from tests.peers.upstream import (
    MANDOS_CLIENT,
    KeySet,
    UpstreamServer,
    make_upstream_keys,
    upstream_section,
)

#: Upstream's agent ships in the dracut module of Debian's mandos-client package.
UPSTREAM_AGENT = Path("/usr/lib/dracut/modules.d/90mandos/password-agent")
PASSWORD = b"agent latency password"
REPLY_TIMEOUT = 30.0
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


def our_agent_argv(keys: KeySet, connect: str, agent_directory: Path, work: Path) -> list[str]:
    """Our agent, answering the requests in ``agent_directory`` from the server at
    ``connect``; ``work`` holds its run directory (fresh per run: it remembers answers)."""
    return [sys.executable, "-m", "password_agent", "--keydir", str(keys.directory),
            "--run-directory", str(work / "run"), "--kernel-cmdline", "/dev/null",
            "--timeout", str(REPLY_TIMEOUT), "--connect", connect,
            "--agent-directory", str(agent_directory)]


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


def one_run(argv: AgentArgv, keys: KeySet, connect: str) -> float | None:
    """Seconds from the request appearing to the right reply arriving, or None."""
    work = Path(tempfile.mkdtemp(prefix="mpa-bench-"))  # short: gpg-agent sockets live here
    process: subprocess.Popen[bytes] | None = None
    try:
        requests = work / "ask"
        requests.mkdir()
        command = argv(keys, connect, requests, work)
        started = time.perf_counter()
        with FakeRequester(requests, {"Id": "cryptsetup:/dev/bench"}) as request:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
            reply = request.receive(REPLY_TIMEOUT)
            elapsed = time.perf_counter() - started
            request.remove_ask_file()
        # Upstream's agent sends a C string (with its NUL); the requester ignores the NUL.
        ok = reply is not None and reply.removesuffix(b"\0") == b"+" + PASSWORD
        return elapsed if ok else None
    finally:
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)


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
    """The server both agents ask, yielding its ``address:port``."""
    if kind == "upstream":
        with UpstreamServer(section) as upstream:
            yield upstream.connect
        return
    with our_server("[DEFAULT]\nchecker = /bin/true\n\n" + section) as (_pid, port):
        yield f"127.0.0.1:{port}"


def measure(runs: int, server_kind: str = "ours") -> list[AgentTimes]:
    """``runs`` runs of each agent, alternating, against one server."""
    agents: list[tuple[AgentTimes, AgentArgv]] = [
        (AgentTimes("ours (mandos-password-agent)"), our_agent_argv),
        (AgentTimes("upstream (password-agent + mandos-client)"), upstream_agent_argv),
    ]
    with key_set() as (keys, section), server(server_kind, section) as connect:
        for _ in range(runs):
            for times, argv in agents:
                seconds = one_run(argv, keys, connect)
                if seconds is None:
                    times.failures += 1
                else:
                    times.seconds.append(seconds)
    return [times for times, _ in agents]


def format_table(results: list[AgentTimes], server_kind: str) -> str:
    """A Markdown table of the medians, and the ratio ours/upstream."""
    lines = [f"Agent ask-to-reply latency against {server_kind} server "
             "(request appears, agent starts, reply arrives):", "",
             "| agent | runs | failures | median ms | min ms | max ms |", "|" + "---|" * 6]
    for times in results:
        lines.append(f"| {times.agent} | {len(times.seconds)} | {times.failures} "
                     f"| {1000 * times.median:.0f} "
                     f"| {1000 * min(times.seconds, default=float('nan')):.0f} "
                     f"| {1000 * max(times.seconds, default=float('nan')):.0f} |")
    ours, upstream = results
    lines += ["", f"Ratio ours/upstream (medians): {ours.median / upstream.median:.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per agent (7)")
    parser.add_argument("--server", choices=("ours", "upstream"), default="ours",
                        help="which server both agents ask (ours)")
    options = parser.parse_args(argv)
    print(format_table(measure(options.runs, options.server), options.server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
