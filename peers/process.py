# SPDX-License-Identifier: GPL-3.0-or-later
"""Ending a peer's child process: one way for every peer, so that none is left running or
unreaped when a test ends (a zombie or a leftover daemon would spoil the next test)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any, Self


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


class StartStop:
    """A peer run for a ``with`` block: :meth:`start` on entry (it returns the peer, ready),
    :meth:`stop` on exit, also when the block failed."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
