# SPDX-License-Identifier: GPL-3.0-or-later
"""One journal entry per decision and state change, with structured fields.

Entries go to journald over its native protocol (one AF_UNIX datagram of ``KEY=VALUE`` lines;
values containing a newline use the binary-safe ``KEY\\n<le64 length><bytes>\\n`` form) when its
socket exists, else to stderr as one readable line (not ``pystemd.journal.sendv``: see
:mod:`server.systemd` for why).  Every kind of event has a fixed
``MESSAGE_ID``, explained in ``units/mandos-catalog.catalog``, so that an administrator can
``journalctl MESSAGE_ID=...`` or ``journalctl MANDOS_EVENT=secret-sent``.

The secret is never passed here, so it cannot end up in the journal.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from server import events

DEFAULT_SOCKET = Path("/run/systemd/journal/socket")

# syslog priorities
EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)
LEVELS: Mapping[str, int] = {
    "CRITICAL": CRIT, "ERROR": ERR, "WARNING": WARNING, "INFO": INFO, "DEBUG": DEBUG,
}
_LEVEL_NAMES = ("EMERG", "ALERT", "CRIT", "ERR", "WARNING", "NOTICE", "INFO", "DEBUG")


class Event(enum.Enum):
    """Every kind of entry: (MANDOS_EVENT name, MESSAGE_ID, priority)."""

    SECRET_SENT = ("secret-sent", "8fee6315349d49baab2153af0460b8fc", INFO)
    CLIENT_NOT_FOUND = ("client-not-found", "50d582cd85be4fcfa74afbe65adb8fa8", NOTICE)
    REFUSED_DISABLED = ("refused-disabled", "9f3b2c7fbbe748b1acf82865056983eb", NOTICE)
    REFUSED_DENIED = ("refused-denied", "2f6a3aa44c4b4ab7a4d31c1ee1d54b36", WARNING)
    APPROVAL_TIMED_OUT = ("approval-timed-out", "269c2ace7a7e40799e7c19184f49e9a4", WARNING)
    NEEDS_APPROVAL = ("needs-approval", "2be50666ac8b4c92b6700c0698da90ba", NOTICE)
    APPROVAL_COMMAND_STARTED = ("approval-command-started", "c3da830eb4114f0983d378ed15d86c30",
                                INFO)
    APPROVAL_COMMAND_SUCCEEDED = ("approval-command-succeeded",
                                  "705f6952153d46119f0f36a368a0be63", INFO)
    APPROVAL_COMMAND_FAILED = ("approval-command-failed", "27c45677588a440495af7330276b39ed",
                               WARNING)
    CONNECTION_FAILED = ("connection-failed", "32021c68407c47bd8421190dd0c153bb", INFO)
    CONNECTION_FLOOD = ("connection-flood", "3bfd992aba0e4141b0c58feab0f14f61", WARNING)
    CLIENT_ENABLED = ("client-enabled", "ee6d22a96f7848cc8d086bddff059889", INFO)
    CLIENT_DISABLED = ("client-disabled", "10e6c91d472a4b248e6c881ca4dc8209", NOTICE)
    CLIENT_EXPIRED = ("client-expired", "87ef8b10854346cea9e8b6a222aaf83c", WARNING)
    CHECKER_STARTED = ("checker-started", "1974b7aae8194021bbdd867c326d7ce6", DEBUG)
    CHECKER_SUCCEEDED = ("checker-succeeded", "b501d1e406584fe3a11ebc3c5c78a739", INFO)
    CHECKER_FAILED = ("checker-failed", "075de7665b714030a23ba5d298c20629", NOTICE)
    CONFIG_LOADED = ("config-loaded", "e5d139f1db6b400cb1cc0484597d5b04", INFO)
    CONFIG_RELOAD_FAILED = ("config-reload-failed", "adcbafd03e2c480787db604861bb5ada", ERR)
    STATE_PROBLEM = ("state-problem", "89c11f387c664a06823afca8fd2b86ca", WARNING)
    SERVER_STARTED = ("server-started", "8bced96ede7648dba3830a08ccb4b926", INFO)
    SERVER_STOPPING = ("server-stopping", "88c915dcadec4397a8e46a6dc4844024", INFO)
    ZEROCONF = ("zeroconf", "2a481bb2fcae40b2ade7a8d8905f1182", INFO)
    SERVER_ERROR = ("server-error", "e8af17faa061477bb2ced5398b03ab93", ERR)
    FLEET = ("fleet", "7715bc8ea4c14693af44c3f0a2e8a4c3", NOTICE)

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def message_id(self) -> str:
        return self.value[1]

    @property
    def priority(self) -> int:
        return self.value[2]


def encode_entry(fields: Mapping[str, str]) -> bytes:
    """The native journal protocol encoding of one entry."""
    parts: list[bytes] = []
    for key, value in fields.items():
        data = value.encode("utf-8", errors="replace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class Journal:
    """Writes events; ``max_priority`` drops less important ones (``--debuglevel``); ``echo``
    also prints every written entry on stderr (``--debug``).  :meth:`record` writes the entry
    of a typed server event (:mod:`server.events`); :func:`journalled_publisher` subscribes
    it."""

    def __init__(self, socket_path: Path = DEFAULT_SOCKET, *, max_priority: int = INFO,
                 echo: bool = False, identifier: str = "mandos",
                 stream: TextIO | None = None) -> None:
        self.socket_path = socket_path
        self.max_priority = max_priority
        self.echo = echo
        self.identifier = identifier
        self._stream = stream
        self._socket: socket.socket | None = None
        if socket_path.exists():
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def event(self, event: Event, message: str, *, client: str | None = None,
              key_id: str | None = None, peer: str | None = None,
              priority: int | None = None, **extra: str) -> None:
        """Write one entry for ``event``; ``extra`` become ``MANDOS_<NAME>`` fields."""
        self._write(event, message, client, key_id, peer, priority, extra)

    def record(self, happened: events.ServerEvent) -> None:
        """Write the entry of a server event (a subscriber of :class:`events.Publisher`)."""
        entry = _entry(happened)
        if entry is not None:
            self.event(entry.kind, entry.message, client=entry.client, key_id=entry.key_id,
                       peer=entry.peer, priority=entry.priority, **entry.fields)

    def _write(self, event: Event, message: str, client: str | None, key_id: str | None,
               peer: str | None, priority: int | None, extra: Mapping[str, str]) -> None:
        level = event.priority if priority is None else priority
        if level > self.max_priority:
            return
        fields = {
            "MESSAGE": message,
            "PRIORITY": str(level),
            "SYSLOG_IDENTIFIER": self.identifier,
            "MESSAGE_ID": event.message_id,
            "MANDOS_EVENT": event.label,
        }
        for name, value in (("MANDOS_CLIENT", client), ("MANDOS_KEY_ID", key_id),
                            ("MANDOS_PEER", peer)):
            if value:
                fields[name] = value
        for name, value in extra.items():
            fields[f"MANDOS_{name.upper()}"] = value
        sent = self._send(fields)
        if self.echo or not sent:
            self._print(level, event, message, fields)

    @property
    def connected(self) -> bool:
        """Whether entries go to journald (rather than to stderr)."""
        return self._socket is not None

    def _send(self, fields: Mapping[str, str]) -> bool:
        if self._socket is None:
            return False
        try:
            self._socket.sendto(encode_entry(fields), str(self.socket_path))
        except OSError:
            return False
        return True

    def _print(self, level: int, event: Event, message: str, fields: Mapping[str, str]) -> None:
        details = " ".join(
            f"{key[7:].lower()}={value}" for key, value in fields.items()
            if key.startswith("MANDOS_") and key != "MANDOS_EVENT"
        )
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        line = (f"{stamp} {self.identifier}[{os.getpid()}] {_LEVEL_NAMES[level]} "
                f"{event.label}: {' '.join(message.split())}")
        if details:
            line += f" [{details}]"
        stream = self._stream if self._stream is not None else sys.stderr
        with contextlib.suppress(OSError, ValueError):
            stream.write(line + "\n")  # one write per entry, not print()'s two
            stream.flush()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def journalled_publisher(journal: Journal) -> events.Publisher:
    """The server's publisher: the journal is its first subscriber, and a subscriber that
    raises is reported there."""

    def report(happened: events.ServerEvent, error: Exception) -> None:
        journal.event(Event.SERVER_ERROR, f"cannot pass on {type(happened).__name__}: "
                      f"{error or type(error).__name__}",
                      client=getattr(happened, "client", None), priority=WARNING)

    publisher = events.Publisher(report)
    publisher.subscribe(journal.record)
    return publisher


@dataclass(frozen=True)
class _Entry:
    kind: Event
    message: str
    client: str | None = None
    key_id: str | None = None
    peer: str | None = None
    priority: int | None = None
    fields: Mapping[str, str] = field(default_factory=dict)


_REFUSALS: Mapping[events.Refusal, tuple[Event, str]] = {
    events.Refusal.DISABLED: (Event.REFUSED_DISABLED, "Client {} is disabled"),
    events.Refusal.DENIED: (Event.REFUSED_DENIED, "Client {} was not approved"),
    events.Refusal.APPROVAL_TIMED_OUT: (Event.APPROVAL_TIMED_OUT,
                                        "Client {} timed out while waiting for approval"),
}


def _approval_command_entry(happened: events.ApprovalCommandFinished) -> _Entry:
    """The command itself is not logged: it may hold a webhook's token."""
    client, key_id = happened.client, happened.key_id
    status = {"status": str(happened.status)}
    if happened.succeeded:
        return _Entry(Event.APPROVAL_COMMAND_SUCCEEDED, f"The approval command of {client} "
                      "succeeded", client, key_id, fields=status)
    if happened.timed_out:
        why = "timed out and was killed"
    elif happened.error:
        why = f"could not be started: {happened.error}"
    elif happened.signal is not None:
        why = f"was killed by signal {happened.signal}"
        status["signal"] = str(happened.signal)
    else:
        why = f"failed with status {happened.status}"
    return _Entry(Event.APPROVAL_COMMAND_FAILED, f"The approval command of {client} {why}",
                  client, key_id, fields=status)


def _entry(happened: events.ServerEvent) -> _Entry | None:
    """The journal entry of an event (None: an event the journal does not show)."""
    client = key_id = None
    if isinstance(happened, events.ClientEvent):
        client, key_id = happened.client, happened.key_id
    match happened:
        case events.SecretSent():
            return _Entry(Event.SECRET_SENT, f"Sent secret to client {client}", client, key_id,
                          happened.peer)
        case events.RequestRefused(reason=events.Refusal.UNKNOWN_KEY):
            return _Entry(Event.CLIENT_NOT_FOUND, f"Client not found for key ID "
                          f"{happened.key_id}", key_id=happened.key_id, peer=happened.peer)
        case events.RequestRefused():
            kind, text = _REFUSALS[happened.reason]
            return _Entry(kind, text.format(happened.client), happened.client, happened.key_id,
                          happened.peer)
        case events.NeedsApproval():
            default = "approve" if happened.approved_by_default else "deny"
            return _Entry(Event.NEEDS_APPROVAL, f"Client {client} needs approval within "
                          f"{happened.remaining.total_seconds():g} s (default: {default})",
                          client, key_id, happened.peer)
        case events.ConnectionFailed(stage=events.Stage.EVICTED):
            return _Entry(Event.CONNECTION_FAILED, f"Connection from {happened.peer} evicted "
                          f"before TLS: {happened.error}", peer=happened.peer, priority=DEBUG)
        case events.ConnectionFailed():
            early = happened.stage is not events.Stage.SENDING  # anyone can: no key proven
            return _Entry(Event.CONNECTION_FAILED, f"Connection from {happened.peer} failed "
                          f"{happened.stage.value}: {happened.error}", key_id=happened.key_id,
                          peer=happened.peer, priority=DEBUG if early else None)
        case events.ClientEnabled():
            return _Entry(Event.CLIENT_ENABLED, f"Client {client} enabled", client, key_id)
        case events.ClientDisabled():
            kind = Event.CLIENT_EXPIRED if happened.by is events.By.EXPIRY else \
                Event.CLIENT_DISABLED
            return _Entry(kind, happened.reason, client, key_id)
        case events.CheckerStarted():
            return _Entry(Event.CHECKER_STARTED, f"Starting checker {happened.command!r} for "
                          f"{client}", client, key_id, fields={"command": happened.command})
        case events.CheckerFinished(status=0):
            return _Entry(Event.CHECKER_SUCCEEDED, f"Checker for {client} succeeded", client,
                          key_id, fields={"command": happened.command, "status": "0"})
        case events.CheckerFinished(signal=int(signum)):
            return _Entry(Event.CHECKER_FAILED, f"Checker for {client} was killed by signal "
                          f"{signum}", client, key_id, fields={
                              "command": happened.command, "status": str(happened.status),
                              "signal": str(signum)})
        case events.CheckerFinished():
            return _Entry(Event.CHECKER_FAILED, f"Checker for {client} failed with status "
                          f"{happened.status}", client, key_id,
                          fields={"command": happened.command, "status": str(happened.status)})
        case events.CheckerStopped():
            return _Entry(Event.CHECKER_FAILED, f"Stopped checker {happened.command!r} for "
                          f"{client}: still running after {happened.elapsed:.1f} s", client,
                          key_id, fields={"command": happened.command})
        case events.CheckerNotStarted():
            return _Entry(Event.CHECKER_FAILED, f"Checker for {client} not started: "
                          f"{happened.error}", client, key_id, priority=ERR)
        case events.ApprovalCommandStarted():
            return _Entry(Event.APPROVAL_COMMAND_STARTED, f"Running the approval command of "
                          f"{client} (killed after {happened.timeout:g} s)", client, key_id,
                          happened.peer)
        case events.ApprovalCommandFinished():
            return _approval_command_entry(happened)
        case events.ConfigLoaded():
            names = ", ".join(happened.clients) or "none"
            files = len(happened.files)
            if happened.changed:
                read = f"Reloaded {happened.directory} ({files} files) after a change"
            else:
                read = "Reloaded" if happened.reloaded else "Loaded"
                read += f" {happened.path}"
                if files:
                    read += f" and {files} files in {happened.directory}"
            return _Entry(Event.CONFIG_LOADED,
                          f"{read}: {len(happened.clients)} clients ({names})")
        case events.ConfigReloadFailed():
            return _Entry(Event.CONFIG_RELOAD_FAILED, happened.error)
        case events.StateWriteFailed():
            return _Entry(Event.STATE_PROBLEM, f"Cannot save the state in {happened.path}: "
                          f"{happened.reason}; the file keeps the state last saved, and a "
                          "restart before a write succeeds loses the changes since; serving "
                          f"on, trying again every {happened.retry:g} s", priority=ERR)
        case events.StateWriteRecovered():
            return _Entry(Event.STATE_PROBLEM, f"Saved the state in {happened.path} again",
                          priority=NOTICE)
        case events.ServerStarted():
            metrics = (f"; metrics and health at http://{happened.metrics}/"
                       if happened.metrics else "")
            return _Entry(Event.SERVER_STARTED, "Mandos server listening on "
                          f"{', '.join(happened.addresses)}{metrics}")
        case events.ServerStopping():
            return _Entry(Event.SERVER_STOPPING, "Mandos server stopping")
    return None
