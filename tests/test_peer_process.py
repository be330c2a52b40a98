# SPDX-License-Identifier: GPL-3.0-or-later
"""peers/process.py: every peer ends its child with :func:`stop_process`, so a peer that
ignores SIGTERM must still end up killed and reaped, and one already gone must not be
signalled."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from peers.process import stop_process


@contextmanager
def shell(script: str) -> Iterator[subprocess.Popen[bytes]]:
    """``sh -c script`` with its stdout piped; killed and reaped whatever the test does."""
    process = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def test_a_child_that_obeys_sigterm_exits_by_it() -> None:
    with shell("echo ready; exec sleep 600") as process:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        assert stop_process(process, timeout=600) == -signal.SIGTERM


def test_a_child_that_ignores_sigterm_is_killed_and_reaped() -> None:
    with shell('trap "" TERM; echo ready; exec sleep 600') as process:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        assert stop_process(process, timeout=0.1) is None
        assert process.returncode == -signal.SIGKILL
        assert not os.path.exists(f"/proc/{process.pid}")  # reaped: no zombie left


def test_a_child_already_gone_gives_its_own_status() -> None:
    with shell("exit 3") as process:
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        assert stop_process(process) == 3
