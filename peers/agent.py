# SPDX-License-Identifier: GPL-3.0-or-later
"""Our password agent as a child process, for the tests that run it against real peers.

:class:`AgentRun` is one ``python -m password_agent``; :class:`AgentHarness` starts runs with
common options and checks after a test that none is left running, that no GnuPG home is left
in the run directory and that the password is in no log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from password_agent import keyring
from password_agent.answered import key_description
from peers.leaks import WATCH
from peers.upstream import KeySet

#: poll(2) on x86_64.
_POLL = 7


class AgentRun:
    """``python -m password_agent`` as a child process (its argv optionally wrapped, e.g. by
    :meth:`AskNamespace.wrap` to run inside that namespace), its stderr captured in a file."""

    def __init__(self, arguments: Sequence[str], log_path: Path,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        argv = [sys.executable, "-m", "password_agent", *arguments]
        self.run_directory = (Path(arguments[arguments.index("--run-directory") + 1])
                              if "--run-directory" in arguments else None)
        if wrap is not None:
            argv = wrap(argv)  # nsenter and ip netns exec exec: the pid stays the agent's
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        """Wait until the log holds ``text`` ``count`` times, failing early if the agent
        exits first."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent never logged {text!r} {count} times:\n"
                                     f"{self.log()}")
            if self.process.poll() is not None and self.log().count(text) < count:
                raise AssertionError(f"agent exited ({self.process.returncode}) without "
                                     f"logging {text!r} {count} times:\n{self.log()}")
            time.sleep(0.02)

    def wait_idle(self, longer_than: float = 10.0, timeout: float = 10.0) -> None:
        """Wait until the agent sleeps in an idle wait: ``poll(2)`` (x86_64: system call 7)
        with a timeout over ``longer_than`` seconds, read from ``/proc/PID/syscall``.  Only an
        agent with nothing pending waits so long (the watcher's idle wake-up, 60 s, or what is
        left of ``--timeout``): while a request is pending, every wait (a back-off, a server's
        answer) wakes at least once a second to look at the requests, and an agent that exits
        does not wait.  This is the event that tells "it stays idle" without sleeping
        for a while and hoping."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                call = Path(f"/proc/{self.process.pid}/syscall").read_text().split()
            except OSError:
                call = []
            if (len(call) > 3 and call[0] == str(_POLL)
                    and int(call[3], 16) > longer_than * 1000):
                return
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited ({self.process.returncode}) instead of "
                                     f"waiting idle:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent never waited idle ({call}):\n{self.log()}")
            time.sleep(0.02)

    def wait(self, timeout: float = 15.0) -> int:
        """The exit status; checks at once that no gpg-agent of the agent's outlived it."""
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent still running after {timeout} s:\n{self.log()}"
                                 ) from None
        if self.run_directory is not None:
            left = processes_left(str(self.run_directory))
            assert left == [], f"left running: {left}"
        return status

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Kill the agent if it still runs, and drop its record's key from root's keyring,
        where it would otherwise stay for a day after the test."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.run_directory is not None:
            keyring.discard(key_description(self.run_directory / "answered"))


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (a gpg-agent names its home)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in command:
                found.append(command.replace(b"\0", b" ").decode(errors="replace"))
    return found


class AgentHarness:
    """Starts agents with common options, remembers them, and checks after the test that
    none is left running, that no GnuPG home is left in the run directory, and that the
    password is in no log."""

    def __init__(self, keys: KeySet, password: bytes, work: Path) -> None:
        self.keys = keys
        self.password = password
        self.work = work
        self.run_directory = work / "run"
        self.runs: list[AgentRun] = []

    def start(self, *arguments: str, connect: Sequence[str] = (),
              agent_directory: Path | None = None,
              wrap: Callable[[list[str]], list[str]] | None = None,
              keydir: Path | None = None) -> AgentRun:
        argv = ["--keydir", str(keydir or self.keys.directory),
                "--run-directory", str(self.run_directory), "--kernel-cmdline", "/dev/null",
                "--retry", "1", *arguments]
        for address in connect:
            argv += ["--connect", address]
        if agent_directory is not None:
            argv += ["--agent-directory", str(agent_directory)]
        run = AgentRun(argv, self.work / f"agent{len(self.runs)}.log", wrap)
        self.runs.append(run)
        return run

    def check_and_stop(self) -> None:
        for run in self.runs:
            run.stop()
        for run in self.runs:
            WATCH.scan_file("log", run.log_path)
            assert self.password not in run.log_path.read_bytes(), "the password is in the log"
        if self.run_directory.exists():
            leftovers = [path.name for path in self.run_directory.iterdir()
                         if path.name != "answered"]
            assert leftovers == [], f"left behind in the run directory: {leftovers}"
            answered = self.run_directory / "answered"
            WATCH.scan_file("state file", answered)
            if answered.exists():
                assert self.password not in answered.read_bytes()


def processes_left(text: str, grace: float = 5.0) -> list[str]:
    """:func:`processes_mentioning` ``text``, once they had ``grace`` seconds to exit: a
    gpg-agent told to stop by ``gpgconf --kill`` exits a moment after gpgconf returns."""
    deadline = time.monotonic() + grace
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left

