# SPDX-License-Identifier: GPL-3.0-or-later
"""What happens in the server, as typed events, and the one publisher that hands them out.

The client table, the listener and the daemon publish an event (a frozen dataclass below) for
every decision and state change; the journal, the D-Bus service, the state file (through the
daemon) and the approval command subscribe.  Each subscriber reads typed fields, never log
text, so renaming a journal field cannot silently break D-Bus, and a new subscriber (metrics,
fleet sync) needs no change to the code that publishes.

How to subscribe::

    from server import events

    def on_secret(event: events.ServerEvent) -> None:
        assert isinstance(event, events.SecretSent)
        counter.labels(event.client).inc()

    stop = daemon.events.subscribe(on_secret, events.SecretSent)  # only these kinds
    everything = daemon.events.subscribe(handler)                  # every kind
    stop()  # or daemon.events.unsubscribe(on_secret)

A handler runs on the event loop, synchronously, right after the change it reports has been
made (so ``client.state`` already says it), in the order of subscription.  It must be quick
and never block: start a task (``asyncio.get_running_loop().create_task``) for slow work.
An exception in a handler is reported (the daemon's publisher logs it in the journal) and
never breaks the request or the other handlers.  No event ever carries a secret.

Gauges are read, not counted from events: the number of connections open and of handshakes in
progress from :class:`server.listener.Listener` (``open_connections``,
``handshakes_in_progress``), the clients by state from :class:`server.clients.ClientTable`
(iterate it: ``enabled``, ``approval_pending``, ``checker_running``, ``state``).

A decision made elsewhere (another server of a fleet) is applied through the client's admin
API with ``by=By.FLEET``, so that a fleet-sync subscriber can tell it from a local one and not
echo it back.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar


class By(enum.Enum):
    """Who or what enabled, disabled or removed a client."""

    ADMIN = "admin"  # over D-Bus (mandos-ctl, mandos-monitor)
    CONFIG = "config"  # clients.conf changed (reload)
    EXPIRY = "expiry"  # no successful checker within the client's timeout
    FLEET = "fleet"  # another server of the fleet decided (applied by fleet sync)


class Refusal(enum.Enum):
    """Why a request got no secret (each one is 0 bytes on the wire)."""

    UNKNOWN_KEY = "unknown key"
    DISABLED = "disabled"
    DENIED = "denied"
    APPROVAL_TIMED_OUT = "approval timed out"
    PROTOCOL_ERROR = "protocol error"
    TLS_FAILURE = "TLS failure"


class Stage(enum.Enum):
    """Where a connection failed; the value is how the journal says it."""

    PROTOCOL_LINE = "before TLS"
    HANDSHAKE = "in the TLS handshake"
    SENDING = "while sending"
    EVICTED = "evicted before TLS"


@dataclass(frozen=True, kw_only=True)
class ServerEvent:
    """Every event.  ``saves_state``: whether it reports a change that the state file keeps."""

    saves_state: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True)
class ClientEvent(ServerEvent):
    """An event of one configured client: its name and key id (or, for a legacy section
    without ``key_id``, its ``fingerprint``)."""

    client: str
    key_id: str


# -- requests -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SecretSent(ClientEvent):
    """The secret went out to ``peer``; ``client.state.expires`` is extended."""

    peer: str
    at: datetime.datetime
    saves_state: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class RequestRefused(ServerEvent):
    """A request with a proven key got nothing; ``client`` is None for an unknown key."""

    peer: str
    key_id: str
    client: str | None
    reason: Refusal


@dataclass(frozen=True, kw_only=True)
class NeedsApproval(ClientEvent):
    """A request waits for ``Approve``: up to ``remaining`` (of ``approval_delay``), then
    ``approved_by_default`` decides."""

    peer: str
    approval_delay: datetime.timedelta
    remaining: datetime.timedelta
    approved_by_default: bool
    saves_state: ClassVar[bool] = True  # last_approval_request


@dataclass(frozen=True, kw_only=True)
class Approved(ClientEvent):
    """An administrator approved (or denied, ``approved`` false) the requests waiting now and
    those arriving within ``duration``."""

    approved: bool
    duration: datetime.timedelta


@dataclass(frozen=True, kw_only=True)
class ConnectionFailed(ServerEvent):
    """A connection ended without a decision (the peer or the network failed); ``key_id`` is
    set when the handshake had proven one."""

    peer: str
    stage: Stage
    error: str
    key_id: str | None = None

    @property
    def refusal(self) -> Refusal | None:
        """The refusal this failure counts as, if any (a failure while sending is not one)."""
        return {Stage.PROTOCOL_LINE: Refusal.PROTOCOL_ERROR, Stage.EVICTED:
                Refusal.PROTOCOL_ERROR, Stage.HANDSHAKE: Refusal.TLS_FAILURE}.get(self.stage)


# -- a client's life ------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ClientEnabled(ClientEvent):
    by: By
    saves_state: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class ClientDisabled(ClientEvent):
    """``reason`` is a sentence for people (the journal's message)."""

    by: By
    reason: str
    saves_state: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class ClientRemoved(ClientEvent):
    """The client is gone from the table (reload without its section, or ``RemoveClient``);
    requests waiting for it are refused."""

    by: By
    saves_state: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class ExpiryChanged(ClientEvent):
    """``expires`` moved (a checker succeeded, the secret was sent, a timeout changed)."""

    expires: datetime.datetime
    saves_state: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class CheckedOK(ClientEvent):
    """The client is known alive: a checker succeeded, or an admin said so (``CheckedOK``)."""

    at: datetime.datetime
    saves_state: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class SettingsChanged(ClientEvent):
    """Settings (``ClientConfig`` field names) changed, at run time or by a reload."""

    names: tuple[str, ...]
    saves_state: ClassVar[bool] = True


# -- checkers -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CheckerStarted(ClientEvent):
    command: str


@dataclass(frozen=True, kw_only=True)
class CheckerFinished(ClientEvent):
    """A checker ended by itself: ``status`` 0 is success; -1 with ``signal`` if a signal
    killed it (upstream's ``LastCheckerStatus``)."""

    command: str
    status: int
    signal: int | None = None
    saves_state: ClassVar[bool] = True  # last_checker_status

    @property
    def succeeded(self) -> bool:
        return self.status == 0


@dataclass(frozen=True, kw_only=True)
class CheckerStopped(ClientEvent):
    """A running checker was stopped (it hung until its next turn, or the client was
    disabled) after ``elapsed`` seconds: a failure, with no status."""

    command: str
    elapsed: float


@dataclass(frozen=True, kw_only=True)
class CheckerNotStarted(ClientEvent):
    """The checker command cannot be expanded (``error`` says why): a failure."""

    error: str


# -- approval commands (server.approval_command) -------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ApprovalCommandStarted(ClientEvent):
    """The client's ``approval_command`` runs for a request from ``peer``; it has until
    ``timeout`` seconds to finish."""

    peer: str
    timeout: float


@dataclass(frozen=True, kw_only=True)
class ApprovalCommandFinished(ClientEvent):
    """The approval command ended: ``status`` 0 is success; -1 with ``signal`` if a signal
    killed it; ``timed_out`` if it was killed at its timeout; ``error`` if it could not be
    started at all (status -1)."""

    status: int
    signal: int | None = None
    timed_out: bool = False
    error: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == 0 and not self.timed_out


# -- the server -----------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ConfigLoaded(ServerEvent):
    """The client files were read: clients.conf (``path``) and the files of clients.d
    (``directory``) at start-up (``reloaded`` false) or on SIGHUP, or only clients.d after a
    change there (``changed``).  ``files`` are the files of clients.d in force, ``clients``
    the names in clients.conf and those files, in reading order; the client table holds them
    now (but for clients removed over D-Bus, on a reload for a change)."""

    path: str
    clients: tuple[str, ...]
    reloaded: bool
    directory: str = ""
    files: tuple[str, ...] = ()
    changed: bool = False
    saves_state: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class ConfigReloadFailed(ServerEvent):
    """A reload refused a file (``path``): ``error`` names it and the line, says what is
    wrong and what stays in force instead (its previous contents, if they still fit); the
    other files' changes apply."""

    path: str
    error: str


@dataclass(frozen=True, kw_only=True)
class StateWriteFailed(ServerEvent):
    """Writing the state file failed (published once per distinct ``reason``, not at each
    retry); the next try is ``retry`` seconds later at the latest."""

    path: str
    reason: str
    retry: float


@dataclass(frozen=True, kw_only=True)
class StateWriteRecovered(ServerEvent):
    """The state file was written again after :class:`StateWriteFailed`."""

    path: str


@dataclass(frozen=True, kw_only=True)
class ServerStarted(ServerEvent):
    addresses: tuple[str, ...]
    #: Where /metrics and /healthz are served (``--metrics``), as HOST:PORT, else None.
    metrics: str | None = None


@dataclass(frozen=True, kw_only=True)
class ServerStopping(ServerEvent):
    pass


Handler = Callable[[ServerEvent], None]


class Publisher:
    """Hands each published event to the handlers subscribed to its kind.

    ``report`` is told about a handler that raised (the event and the exception); whatever it
    does, publishing goes on."""

    def __init__(self, report: Callable[[ServerEvent, Exception], None]) -> None:
        self._report = report
        self._handlers: list[tuple[Handler, tuple[type[ServerEvent], ...]]] = []

    def subscribe(self, handler: Handler, *kinds: type[ServerEvent]) -> Callable[[], None]:
        """Call ``handler`` with every event of ``kinds`` (subclasses included; all events if
        none given) from now on; returns the function that unsubscribes it."""
        self._handlers.append((handler, kinds or (ServerEvent,)))
        return lambda: self.unsubscribe(handler)

    def unsubscribe(self, handler: Handler) -> None:
        self._handlers = [entry for entry in self._handlers if entry[0] != handler]

    def publish(self, event: ServerEvent) -> None:
        for handler, kinds in list(self._handlers):
            if not isinstance(event, kinds):
                continue
            try:
                handler(event)
            except Exception as error:  # a subscriber's trouble never breaks a request
                with contextlib.suppress(Exception):  # nowhere left to say it; serve on
                    self._report(event, error)
