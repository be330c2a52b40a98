# SPDX-License-Identifier: GPL-3.0-or-later
"""``approval_command``: tell someone that a request waits for approval.

A client with ``approval_delay`` makes each request wait for ``mandos-ctl --approve NAME`` (or
``--deny``); nobody knows to answer unless told.  With ``approval_command`` in clients.conf
(per client or in ``[DEFAULT]``), the server runs that shell command when a request needs
approval, e.g. a webhook with ``curl``.  Its environment is the server's plus:

* ``MANDOS_CLIENT``: the client's name; ``MANDOS_KEY_ID``: its key id;
* ``MANDOS_PEER``: the address the request came from;
* ``MANDOS_APPROVAL_DELAY``: seconds left to answer; ``MANDOS_APPROVED_BY_DEFAULT``: ``1`` if
  the request is let through when nobody answers, ``0`` if it is refused.

Never a secret.  It runs as a checker does (``/bin/sh -c`` in ``/``, stdin and output on
``/dev/null`` unless ``--debug``, in its own process group) without blocking the server, and
is killed when the request's approval delay runs out or after :data:`TIMEOUT` seconds, if
sooner.  One runs per client at a time: more requests of a client while its command runs
start no other one.  Start, exit status and timeout are journalled (not the command: it may
hold a webhook's token).
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from server import checker, events
from server.clients import ClientTable

#: The longest an approval command may run (seconds).
TIMEOUT = 60.0


class ApprovalCommands:
    """Runs the approval commands; subscribed to :class:`events.NeedsApproval`."""

    def __init__(self, clients: ClientTable, publisher: events.Publisher, *,
                 show_output: bool = False, timeout: float = TIMEOUT) -> None:
        self.clients = clients
        self.events = publisher
        self.show_output = show_output
        self.timeout = timeout
        self._running: dict[str, asyncio.Task[None]] = {}
        self._unsubscribe = publisher.subscribe(self._needs_approval, events.NeedsApproval)

    def _needs_approval(self, event: events.ServerEvent) -> None:
        assert isinstance(event, events.NeedsApproval)
        client = self.clients.get(event.client)
        if client is None or not client.settings.approval_command:
            return
        if event.client in self._running:
            return
        task = asyncio.get_running_loop().create_task(
            self._run(event, client.settings.approval_command))
        self._running[event.client] = task
        task.add_done_callback(lambda _: self._running.pop(event.client, None))

    async def _run(self, event: events.NeedsApproval, command: str) -> None:
        timeout = min(self.timeout, event.remaining.total_seconds())
        env = {
            **os.environ,
            "MANDOS_CLIENT": event.client,
            "MANDOS_KEY_ID": event.key_id,
            "MANDOS_PEER": event.peer,
            "MANDOS_APPROVAL_DELAY": f"{event.remaining.total_seconds():g}",
            "MANDOS_APPROVED_BY_DEFAULT": "1" if event.approved_by_default else "0",
        }
        self.events.publish(events.ApprovalCommandStarted(
            client=event.client, key_id=event.key_id, peer=event.peer, timeout=timeout))
        try:
            async with asyncio.timeout(timeout):
                result = await checker.run(command, show_output=self.show_output, env=env)
        except TimeoutError:
            self._finished(event, status=-1, timed_out=True)
            return
        except (OSError, ValueError) as error:
            reason = (error.strerror if isinstance(error, OSError) else None) or str(error)
            self._finished(event, status=-1, error=reason)
            return
        self._finished(event, status=result.status, signal=result.signal)

    def _finished(self, event: events.NeedsApproval, *, status: int, signal: int | None = None,
                  timed_out: bool = False, error: str = "") -> None:
        self.events.publish(events.ApprovalCommandFinished(
            client=event.client, key_id=event.key_id, status=status, signal=signal,
            timed_out=timed_out, error=error))

    async def close(self) -> None:
        """Stop listening and kill the commands still running (server stop)."""
        self._unsubscribe()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
