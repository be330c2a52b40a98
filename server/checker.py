# SPDX-License-Identifier: GPL-3.0-or-later
"""Checker commands: ``%(attr)s`` expansion and running one as a child process.

A checker is a shell command whose exit status 0 means "the client host is alive".  As upstream
does, the command is run with ``/bin/sh -c`` in ``/``, stdin from ``/dev/null`` and output to
``/dev/null`` unless debugging.  Unlike upstream, it runs in its own process group, so that
stopping it also stops whatever the shell started (an ``ssh`` or ``fping``), and what is left
of the group ``STOP_GRACE`` seconds after SIGTERM gets SIGKILL: a hanging checker that ignores
SIGTERM must not outlive its turn.  (At server stop the loop ends before that; systemd's stop
of the service's control group ends such a straggler then.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import Mapping
from dataclasses import dataclass

#: Seconds from SIGTERM to a stopped checker's process group to SIGKILL to what is left of it.
STOP_GRACE = 3.0

#: The client attributes a checker may use as ``%%(name)s`` in clients.conf.
RUNTIME_EXPANSIONS = (
    "approval_delay", "approval_duration", "created", "enabled", "expires", "key_id",
    "fingerprint", "host", "interval", "last_approval_request", "last_checked_ok",
    "last_enabled", "name", "timeout",
)


class ExpansionError(Exception):
    """The checker command has a ``%`` expansion that cannot be made; the message says why."""


def refuse_quoted_expansion(command: str) -> None:
    """:class:`ExpansionError` if a ``%(attr)s`` stands inside shell quotes in ``command``.

    Each value is substituted already quoted for the shell (``shlex.quote``); inside double
    quotes that quoting is undone (``"'$(touch /tmp/x)'"`` still runs the command substitution),
    and inside single quotes it ends them.  So a quoted expansion is refused, not run.
    """
    quote = ""
    index = 0
    while index < len(command):
        char = command[index]
        if char == "\\" and quote != "'":
            index += 2
            continue
        if quote and command.startswith("%(", index):
            end = command.find(")", index)
            inside = command[index:end + 2] if end >= 0 else command[index:]
            raise ExpansionError(f"{inside} stands inside quotes; write it without them (each "
                                 "value is quoted for the shell already, and quotes around "
                                 "it undo that)")
        if char in "'\"" and quote in ("", char):
            quote = "" if quote else char
        index += 1


def expand(command: str, attributes: Mapping[str, object]) -> str:
    """``command`` with ``%(attr)s`` replaced by the shell-quoted attribute values."""
    refuse_quoted_expansion(command)
    quoted = {name: shlex.quote(str(attributes[name])) for name in RUNTIME_EXPANSIONS
              if name in attributes}
    try:
        return command % quoted
    except KeyError as error:
        raise ExpansionError(f"unknown attribute {error.args[0]!r} in checker {command!r}") \
            from None
    except (TypeError, ValueError) as error:
        raise ExpansionError(f"bad % expansion in checker {command!r}: {error}") from None


@dataclass(frozen=True)
class CheckerResult:
    """How a checker ended: ``status`` is the exit code (0-255), or -1 if a signal killed it
    (``signal`` then says which), as upstream's ``last_checker_status``."""

    status: int
    signal: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == 0


async def run(command: str, *, show_output: bool = False,
              env: Mapping[str, str] | None = None) -> CheckerResult:
    """Run ``command`` to completion (``env``: its environment, default the server's).
    Cancelling this kills the command's process group.  The approval command runs so too."""
    output = None if show_output else asyncio.subprocess.DEVNULL
    process = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", command, stdin=asyncio.subprocess.DEVNULL, stdout=output,
        stderr=output, cwd="/", start_new_session=True, env=env,
    )
    try:
        code = await process.wait()
    except BaseException:
        _stop(process.pid)
        raise
    if code < 0:
        return CheckerResult(status=-1, signal=-code)
    return CheckerResult(status=code)


def _stop(group: int) -> None:
    """SIGTERM to the checker's process group now, SIGKILL to whatever is left of it after
    ``STOP_GRACE`` (the asyncio child watcher reaps the shell)."""

    def kill(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signum)

    kill(signal.SIGTERM)
    asyncio.get_running_loop().call_later(STOP_GRACE, kill, signal.SIGKILL)
