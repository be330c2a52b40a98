# SPDX-License-Identifier: GPL-3.0-or-later
"""A client's life: enabled until it expires, kept alive by checkers, gated by approvals.

This follows upstream Mandos 1.8's server (its ``Client`` class):

* an enabled client runs its checker every ``interval`` (the first one after a random delay in
  ``[0, interval]`` at start-up, so that many clients do not all check at once), one at a time;
  unlike upstream, a checker still running at its next turn is stopped and a fresh one started;
* a successful checker sets ``expires = now + timeout``; handing out the secret sets
  ``expires = now + extended_timeout``; reaching ``expires`` disables the client, and a disabled
  client stays disabled until an administrator enables it;
* with ``approval_delay > 0`` a request waits for :meth:`Client.approve` up to that delay, and
  ``approved_by_default`` decides if none comes; one approval holds for ``approval_duration``.

Timers run on the event loop's monotonic clock; the wall-clock datetimes (UTC) are only for
state and reporting.  :class:`Client` methods ``enable()``, ``disable()``, ``approve()``,
``checked_ok()``, ``start_checker()`` and ``stop_checker()`` are the internal API that the
admin plane (D-Bus) calls.  Every decision and change is published as a typed event
(:mod:`server.events`); the journal, D-Bus and the state file learn of it that way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from server import checker, events
from server.config import ClientConfig
from server.events import By

#: How long a checker runs at least before its next turn may stop it as hanging.
CHECKER_MIN_SECONDS = 1.0


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class ClientState:
    """What a client's life has been so far; the state file keeps this across restarts."""

    enabled: bool
    created: datetime.datetime
    last_enabled: datetime.datetime | None = None
    expires: datetime.datetime | None = None
    last_checked_ok: datetime.datetime | None = None
    last_checker_status: int = -2  # -2: no checker finished yet; -1: killed by a signal
    last_approval_request: datetime.datetime | None = None
    last_secret_sent: datetime.datetime | None = None


class Client:
    """One configured client at run time.

    ``settings`` are the values in force (from clients.conf, possibly changed at run time);
    ``state`` is what the state file saves.  Every change is published on ``events``.
    """

    def __init__(self, settings: ClientConfig, state: ClientState,
                 publisher: events.Publisher, *, show_checker_output: bool = False,
                 checks_here: Callable[[str], bool] = lambda _name: True) -> None:
        self.settings = settings
        #: Whether this server runs the client's periodic checker (in a fleet, one does).
        self.checks_here = checks_here
        self.state = state
        self.events = publisher
        self.show_checker_output = show_checker_output
        self.approved: bool | None = None
        self.approvals_pending = 0
        self._checker_task: asyncio.Task[None] | None = None
        self._checker_command = ""
        self._checker_started = 0.0  # loop time
        self._checker_timer: asyncio.TimerHandle | None = None
        self._disable_timer: asyncio.TimerHandle | None = None
        self._approval_reset: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()

    # -- properties -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    @property
    def expires(self) -> datetime.datetime | None:
        return self.state.expires

    @property
    def checker_running(self) -> bool:
        return self._checker_task is not None and not self._checker_task.done()

    @property
    def approval_pending(self) -> bool:
        return self.approvals_pending > 0

    @property
    def key_id(self) -> str:
        """The key id, or for a legacy section without one, its ``fingerprint``."""
        return self.settings.key_id or self.settings.fingerprint

    def _publish(self, kind: type[events.ClientEvent], **fields: Any) -> None:
        self.events.publish(kind(client=self.name, key_id=self.key_id, **fields))

    def _notify_waiters(self) -> None:
        """Wake every request waiting for approval to look at the client again."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- timers -----------------------------------------------------------------------------

    def _later(self, delay: datetime.timedelta,
               callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, delay.total_seconds()), callback)

    @staticmethod
    def _cancel(handle: asyncio.TimerHandle | None) -> None:
        if handle is not None:
            handle.cancel()

    def init_checker(self, *, randomize_start: bool = False) -> None:
        """Schedule the checkers and the expiry of an enabled client, as upstream: the first
        checker after ``interval`` (or a random part of it), expiry one interval after that.

        A restored expiry later than that (an extended timeout still running) is kept."""
        interval = self.settings.interval
        if randomize_start:
            delay = datetime.timedelta(
                milliseconds=random.randrange(int(interval.total_seconds() * 1000) + 1))
        else:
            delay = interval
        self._schedule_checker(delay)
        expires = utcnow() + delay + interval
        if self.state.expires is not None and self.state.expires > expires and randomize_start:
            expires = self.state.expires
        self._set_expiry(expires)

    def _schedule_checker(self, delay: datetime.timedelta | None = None) -> None:
        """The next checker turn ``delay`` (default: ``interval``) from now, replacing the one
        scheduled."""
        self._cancel(self._checker_timer)
        self._checker_timer = self._later(self.settings.interval if delay is None else delay,
                                          self._periodic_checker)

    def _periodic_checker(self) -> None:
        """A checker's turn: one still running from the last turn, for at least
        :data:`CHECKER_MIN_SECONDS`, hangs, so it is stopped (and logged) and a fresh one
        started.  Upstream lets it run on until the client expires, so one transient hang
        (an ssh stuck on a network glitch) disables a client that the next checker would have
        found alive.  The floor keeps a tiny ``interval`` from stopping every checker before
        its shell has even started."""
        self._schedule_checker()
        if not self.checks_here(self.name):
            return  # another server of the fleet checks it, and shares the result
        if (self.checker_running and asyncio.get_running_loop().time() - self._checker_started
                >= CHECKER_MIN_SECONDS):
            self.stop_checker()
        self.start_checker()

    def _set_expiry(self, when: datetime.datetime) -> None:
        self._cancel(self._disable_timer)
        self.state.expires = when
        self._disable_timer = self._later(when - utcnow(), self._expire)
        self._publish(events.ExpiryChanged, expires=when)

    def _expire(self) -> None:
        self._disable_timer = None
        self.disable(By.EXPIRY, f"Client {self.name} expired: no successful checker within "
                     "its timeout; it stays disabled until an administrator enables it")

    def bump_timeout(self, timeout: datetime.timedelta | None = None) -> None:
        """Keep an enabled client enabled for ``timeout`` (default: its ``timeout``) from now."""
        if not self.state.enabled:
            return
        self._set_expiry(utcnow() + (self.settings.timeout if timeout is None else timeout))

    # -- the admin API ----------------------------------------------------------------------

    def enable(self, by: By = By.ADMIN) -> None:
        """Enable the client and start its checkers (no random start delay)."""
        if self.state.enabled:
            return
        self.state.enabled = True
        self.state.last_enabled = utcnow()
        self._publish(events.ClientEnabled, by=by)
        self.init_checker()
        self._notify_waiters()

    def disable(self, by: By = By.ADMIN, reason: str = "") -> None:
        """Disable the client: no more secrets, checkers or expiry until it is enabled.
        ``reason`` is a sentence for the journal (default: "Client NAME disabled")."""
        if not self.state.enabled:
            return
        self._stop_timers()
        self.state.enabled = False
        self.state.expires = None
        self._publish(events.ClientDisabled, by=by,
                      reason=reason or f"Client {self.name} disabled")
        self._notify_waiters()

    def _stop_timers(self) -> None:
        self._cancel(self._disable_timer)
        self._cancel(self._checker_timer)
        self._disable_timer = self._checker_timer = None
        self.stop_checker()

    def checked_ok(self) -> None:
        """Record that the client is alive and well (a checker succeeded, or an admin says
        so)."""
        self.state.last_checked_ok = utcnow()
        self.state.last_checker_status = 0
        self._publish(events.CheckedOK, at=self.state.last_checked_ok)
        self.bump_timeout()

    def approve(self, value: bool = True) -> None:
        """Approve (or deny) requests waiting now and arriving within ``approval_duration``."""
        self.approved = value
        self._publish(events.Approved, approved=value, duration=self.settings.approval_duration)
        self._notify_waiters()
        self._cancel(self._approval_reset)
        self._approval_reset = self._later(self.settings.approval_duration, self._reset_approval)

    def _reset_approval(self) -> None:
        self._approval_reset = None
        self.approved = None

    def change_settings(self, **changes: Any) -> None:
        """Change settings at run time (``ClientConfig`` field names), as upstream's D-Bus
        properties do: a new ``timeout`` moves the expiry by the difference (disabling the
        client at once if that has passed); a new ``interval`` reschedules the checkers and
        starts one now."""
        old, self.settings = self.settings, dataclasses.replace(self.settings, **changes)
        self._publish(events.SettingsChanged, names=tuple(changes))
        if self.state.enabled and "timeout" in changes and self.state.expires is not None:
            expires = self.state.expires + (self.settings.timeout - old.timeout)
            if expires <= utcnow():
                self.disable()
            else:
                self._set_expiry(expires)
        if self.state.enabled and "interval" in changes and self._checker_timer is not None:
            self._schedule_checker()
            self.start_checker()

    def start_checker(self) -> None:
        """Start a checker unless one is running (on schedule, :meth:`_periodic_checker` has
        stopped a hanging one first: a checker has until its next turn to finish)."""
        if self.checker_running:
            return
        attributes = {name: getattr(self.settings, name, None) for name in
                      ("approval_delay", "approval_duration", "key_id", "fingerprint",
                       "host", "interval", "name", "timeout")}
        attributes.update(dataclasses.asdict(self.state))
        try:
            command = checker.expand(self.settings.checker, attributes)
        except checker.ExpansionError as error:
            self._publish(events.CheckerNotStarted, error=str(error))
            return
        self._publish(events.CheckerStarted, command=command)
        loop = asyncio.get_running_loop()
        self._checker_command, self._checker_started = command, loop.time()
        self._checker_task = loop.create_task(self._run_checker(command))

    async def _run_checker(self, command: str) -> None:
        result = await checker.run(command, show_output=self.show_checker_output)
        if not result.succeeded:
            self.state.last_checker_status = result.status
        self._publish(events.CheckerFinished, command=command, status=result.status,
                      signal=result.signal)
        if result.succeeded:
            self.checked_ok()

    def stop_checker(self) -> None:
        """Stop a running checker, if any (a hanging one at its next turn or when the client
        expires), saying so: no status is recorded, as upstream, since the checker did not
        finish."""
        if self._checker_task is not None:
            if not self._checker_task.done():
                elapsed = asyncio.get_running_loop().time() - self._checker_started
                self._publish(events.CheckerStopped, command=self._checker_command,
                              elapsed=elapsed)
            self._checker_task.cancel()
            self._checker_task = None

    # -- requests ---------------------------------------------------------------------------

    async def authorize(self, peer: str) -> bytes | None:
        """Decide one request, waiting for approval if needed: the secret, or None (refused;
        the refusal is logged)."""
        loop = asyncio.get_running_loop()
        delay = self.settings.approval_delay.total_seconds()
        approval_required = delay > 0
        if approval_required:
            self.approvals_pending += 1
        try:
            while True:
                if not self.state.enabled:
                    self._refuse(peer, events.Refusal.DISABLED)
                    return None
                if self.approved or not approval_required:
                    return self.settings.secret
                if self.approved is None:
                    self.state.last_approval_request = utcnow()
                    self._publish(events.NeedsApproval, peer=peer,
                                  approval_delay=self.settings.approval_delay,
                                  remaining=datetime.timedelta(seconds=delay),
                                  approved_by_default=self.settings.approved_by_default)
                else:
                    self._refuse(peer, events.Refusal.DENIED)
                    return None
                started = loop.time()
                try:
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
                except TimeoutError:
                    pass
                elapsed = loop.time() - started
                if elapsed >= delay:
                    if not self.settings.approved_by_default:
                        self._refuse(peer, events.Refusal.APPROVAL_TIMED_OUT)
                        return None
                    return self.settings.secret
                delay -= elapsed
        finally:
            if approval_required:
                self.approvals_pending -= 1

    def _refuse(self, peer: str, reason: events.Refusal) -> None:
        self.events.publish(events.RequestRefused(peer=peer, key_id=self.key_id,
                                                  client=self.name, reason=reason))

    def secret_sent(self, peer: str) -> None:
        """The secret went out: say so and keep the client enabled through the boot."""
        self.state.last_secret_sent = utcnow()
        self._publish(events.SecretSent, peer=peer, at=self.state.last_secret_sent)
        self.bump_timeout(self.settings.extended_timeout)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the timers of a client just created at server start-up."""
        if self.state.enabled:
            self.init_checker(randomize_start=True)

    def apply_settings(self, new: ClientConfig, old: ClientConfig) -> None:
        """Apply a reloaded config section (see :func:`settings_in_force`)."""
        self.settings, changed = settings_in_force(self.settings, old, new)
        if changed:
            self._publish(events.SettingsChanged, names=changed)
        if new.enabled != old.enabled:
            if new.enabled:
                self.enable(By.CONFIG)
            else:
                self.disable(By.CONFIG)
        elif "interval" in changed and self.state.enabled:
            self._schedule_checker()

    def close(self) -> None:
        """Stop every timer and checker, and refuse waiting requests (server stop, or the
        client was removed from the configuration).  The state is left as it is."""
        self._stop_timers()
        self._cancel(self._approval_reset)
        self._approval_reset = None
        self._notify_waiters()

    def remove(self, by: By) -> None:
        """The client is gone from the table: disable it (without a journal entry: it is no
        longer configured), stop everything, refuse waiting requests, and say so."""
        if self.state.enabled:
            self.state.enabled, self.state.expires = False, None
        self.close()
        self._publish(events.ClientRemoved, by=by)


def settings_in_force(running: ClientConfig, was: ClientConfig, now: ClientConfig
                      ) -> tuple[ClientConfig, tuple[str, ...]]:
    """The settings after the configuration changed from ``was`` to ``now``, and the names of
    those that changed in it: a value changed in the file wins; every other one keeps its value
    in force (``running``: perhaps changed at run time).  At a reload and at a restart alike
    (the state file saves the configuration as it was read)."""
    changed = {f.name: getattr(now, f.name) for f in dataclasses.fields(now)
               if getattr(now, f.name) != getattr(was, f.name)}
    return dataclasses.replace(running, **changed), tuple(changed)


class ClientTable:
    """All clients by name, and by key id for the lookup of each request."""

    def __init__(self) -> None:
        self._by_name: dict[str, Client] = {}
        self._by_key_id: dict[str, Client] = {}
        self._by_fingerprint: dict[str, Client] = {}

    def __iter__(self) -> Iterator[Client]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Client | None:
        return self._by_name.get(name)

    def add(self, client: Client) -> None:
        """Add ``client`` (replacing one of the same name), indexed at once: a start with
        10,000 clients must not rebuild the index 10,000 times."""
        old = self._by_name.get(client.name)
        if old is not None:
            self._unindex(old)
        self._by_name[client.name] = client
        self._index(client)

    def remove(self, name: str) -> Client | None:
        client = self._by_name.pop(name, None)
        if client is not None:
            self._unindex(client)
        return client

    def _index(self, client: Client) -> None:
        # A legacy section without key_id can only match if its ``fingerprint`` holds what
        # is really a key id; a true OpenPGP fingerprint (40 digits) never equals one (64).
        if client.settings.key_id:
            self._by_key_id[client.settings.key_id] = client
        elif client.settings.fingerprint:
            self._by_fingerprint[client.settings.fingerprint] = client

    def _unindex(self, client: Client) -> None:
        for index in (self._by_key_id, self._by_fingerprint):
            for key in (client.settings.key_id, client.settings.fingerprint):
                if key and index.get(key) is client:
                    del index[key]

    def reindex(self) -> None:
        """Rebuild the key id index (after a client's key id changed)."""
        self._by_key_id, self._by_fingerprint = {}, {}
        for client in self._by_name.values():
            self._index(client)

    def lookup(self, key_id: str) -> Client | None:
        """The client with this (normalized) key id, if any."""
        return self._by_key_id.get(key_id) or self._by_fingerprint.get(key_id)
