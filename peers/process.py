# SPDX-License-Identifier: GPL-3.0-or-later
"""Ending a peer's child process: one way for every peer, so that none is left running or
unreaped when a test ends (a zombie or a leftover daemon would spoil the next test)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_process(process: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """SIGTERM ``process`` if it still runs, give it ``timeout`` seconds to exit, then SIGKILL
    it; it is reaped either way.  Its exit status, or None when it had to be killed."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None
