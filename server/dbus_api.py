# SPDX-License-Identifier: GPL-3.0-or-later
# mypy: disable-error-code="no-redef"
"""The D-Bus admin API on the system bus, as upstream Mandos 1.8 offers it (bus name
``se.recompile.Mandos``; /usr/share/doc/mandos/DBUS-API), so that upstream's ``mandos-ctl`` and
``mandos-monitor`` work with this server unchanged.

* Object ``/``, interface ``se.recompile.Mandos``: ``RemoveClient``, the deprecated
  ``GetAllClients`` and ``GetAllClientsWithProperties``, the signals ``ClientNotFound``,
  ``ClientAdded`` and ``ClientRemoved``, and the ``org.freedesktop.DBus.ObjectManager``
  signals ``InterfacesAdded`` and ``InterfacesRemoved`` (dbus-fast answers
  ``GetManagedObjects``; its answer also lists ``/`` itself, which clients filter out).
* One object ``/clients/<name>`` per client (``.`` and ``-`` become ``_``), interface
  ``se.recompile.Mandos.Client``, with upstream's methods, signals and properties: times in
  milliseconds, dates as RFC 3339 strings in UTC without a zone (upstream's
  ``datetime.isoformat()`` of a naive UTC time) or "" when unset.

How the service learns what happens: every decision and state change of the server is a typed
event (:mod:`server.events`), and the service subscribes to them: it turns each event
into upstream's signals (``GotSecret``, ``Rejected``, ``NeedApproval``, ``CheckerStarted``,
``CheckerCompleted``, ``ClientNotFound``) and, at the end of that turn of the event loop,
compares the touched clients' properties with what it last announced, emitting the deprecated
``PropertyChanged`` and the standard ``PropertiesChanged`` for each difference.  Comparing
snapshots instead of hooking every assignment keeps the client state machine free of D-Bus.

The server runs without D-Bus when there is no system bus or the name is taken: a warning,
never a failure.  So it does when the bus goes away under it (upstream's server exits then):
one warning, and unlocks go on; the admin interface is back after a restart of the server.
(This module deliberately does not use ``from __future__ import annotations``: dbus-fast
reads the D-Bus signatures from the evaluated annotations.)
"""

import asyncio
import contextlib
import datetime
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from dbus_fast import BusType, DBusError, ErrorType, Message, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusInt16,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt64,
)
from dbus_fast.service import (
    PropertyAccess,
    ServiceInterface,
    dbus_method,
    dbus_property,
    dbus_signal,
)
from dbus_fast.validators import is_object_path_valid

from mandos_protocol.durations import check_duration
from mandos_protocol.errors import ProtocolError
from server import events
from server.checker import ExpansionError, refuse_quoted_expansion
from server.clients import Client, ClientTable
from server.dbus_names import (
    BUS_NAME,
    CLIENT_INTERFACE,
    CLIENT_PROPERTIES,
    OBJECT_MANAGER,
    SERVER_INTERFACE,
)
from server.events import By, Refusal
from server.journal import WARNING, Event, Journal

#: Seconds to wait for the system bus before going on without it.
CONNECT_TIMEOUT = 5.0

#: Readable client properties and their D-Bus signatures (``Secret`` is write-only).
SIGNATURES: Mapping[str, str] = {name: prop.signature for name, prop in CLIENT_PROPERTIES.items()}

#: A refusal of a known client -> upstream's ``Rejected`` reason.
_REJECTIONS: Mapping[Refusal, str] = {
    Refusal.DISABLED: "Disabled",
    Refusal.DENIED: "Denied",
    Refusal.APPROVAL_TIMED_OUT: "Approval timed out",
}


def object_path(name: str) -> str:
    """A client's object path, as upstream makes it."""
    return "/clients/" + name.translate({ord("."): "_", ord("-"): "_"})


def date_string(when: datetime.datetime | None) -> str:
    """A UTC time as upstream shows it: ``isoformat()`` of the naive UTC time, or ""."""
    if when is None:
        return ""
    return when.astimezone(datetime.UTC).replace(tzinfo=None).isoformat()


def milliseconds(delta: datetime.timedelta) -> int:
    """A duration in whole milliseconds, computed exactly: through float seconds (upstream's
    ``total_seconds() * 1000``) a Timeout set to 1001 read back as 1000."""
    return delta // datetime.timedelta(milliseconds=1)


def _delta(value: int) -> datetime.timedelta:
    """A duration property's new value, checked before anything is assigned: a huge one
    would make every later expiry computation overflow."""
    try:
        delta = datetime.timedelta(milliseconds=value)
    except OverflowError:
        delta = datetime.timedelta.max
    try:
        return check_duration(delta, f"{value} ms")
    except ProtocolError as error:
        raise DBusError(ErrorType.INVALID_ARGS, str(error)) from None


#: D-Bus integer types: a client may send any of them where a property is ``t`` or ``n``.
_INTEGERS = frozenset("ynqiuxt")
_INTEGER_RANGES: Mapping[str, range] = {"t": range(0, 1 << 64), "n": range(-(1 << 15), 1 << 15)}


class AdminBus(MessageBus):
    """The system bus connection, setting integer properties as upstream's server does: from
    whatever integer type the caller sends (dbus-python, which upstream's mandos-ctl uses,
    sends a Python int as ``i``; dbus-fast alone would insist on the exact signature)."""

    def _default_properties_handler(self, msg: Message, send_reply: Any) -> None:
        if (msg.member == "Set" and msg.signature == "ssv" and msg.body[0] == CLIENT_INTERFACE
                and isinstance(msg.body[2], Variant)):
            wanted = SIGNATURES.get(msg.body[1], "")
            value = msg.body[2]
            if (wanted in _INTEGER_RANGES and value.signature in _INTEGERS
                    and value.signature != wanted):
                if value.value not in _INTEGER_RANGES[wanted]:
                    raise DBusError(ErrorType.INVALID_ARGS,
                                    f"{msg.body[1]}: {value.value} is out of range")
                msg.body[2] = Variant(wanted, value.value)
        super()._default_properties_handler(msg, send_reply)


class ClientObject(ServiceInterface):
    """``/clients/<name>``: one client, interface ``se.recompile.Mandos.Client``."""

    def __init__(self, client: Client, path: str, changed: Callable[[str], None]) -> None:
        super().__init__(CLIENT_INTERFACE)
        self.client = client
        self.path = path
        self.changed = changed
        self.announced: dict[str, Any] = {}

    def snapshot(self) -> dict[str, Any]:
        """Every readable property's current value."""
        return {name: getattr(self, name) for name in SIGNATURES}

    def _changed(self) -> None:
        self.changed(self.client.name)

    # -- signals ----------------------------------------------------------------------------

    @dbus_signal()
    def CheckerCompleted(self, exitcode: int, waitstatus: int, command: str
                         ) -> Annotated[list[Any], DBusSignature("nxs")]:
        return [exitcode, waitstatus, command]

    @dbus_signal()
    def CheckerStarted(self, command: str) -> DBusStr:
        return command

    @dbus_signal()
    def GotSecret(self) -> None:
        return None

    @dbus_signal()
    def NeedApproval(self, timeout: int, default: bool
                     ) -> Annotated[list[Any], DBusSignature("tb")]:
        return [timeout, default]

    @dbus_signal()
    def Rejected(self, reason: str) -> DBusStr:
        return reason

    @dbus_signal()
    def PropertyChanged(self, name: str, value: Variant
                        ) -> Annotated[list[Any], DBusSignature("sv")]:
        return [name, value]

    # -- methods ----------------------------------------------------------------------------

    @dbus_method()
    def Approve(self, value: DBusBool) -> None:
        self.client.approve(bool(value))
        self._changed()

    @dbus_method()
    def CheckedOK(self) -> None:
        self.client.checked_ok()
        self._changed()

    @dbus_method()
    def Enable(self) -> None:
        self.client.enable()
        self._changed()

    @dbus_method()
    def Disable(self) -> None:
        self.client.disable()
        self._changed()

    @dbus_method()
    def StartChecker(self) -> None:
        self.client.start_checker()
        self._changed()

    @dbus_method()
    def StopChecker(self) -> None:
        self.client.stop_checker()
        self._changed()

    # -- properties -------------------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        self.client.change_settings(**changes)
        self._changed()

    @dbus_property()
    def ApprovalDelay(self) -> DBusUInt64:
        return milliseconds(self.client.settings.approval_delay)

    @ApprovalDelay.setter
    def ApprovalDelay(self, value: DBusUInt64) -> None:
        self._set(approval_delay=_delta(value))

    @dbus_property()
    def ApprovalDuration(self) -> DBusUInt64:
        return milliseconds(self.client.settings.approval_duration)

    @ApprovalDuration.setter
    def ApprovalDuration(self, value: DBusUInt64) -> None:
        self._set(approval_duration=_delta(value))

    @dbus_property(access=PropertyAccess.READ)
    def ApprovalPending(self) -> DBusBool:
        return self.client.approval_pending

    @dbus_property()
    def ApprovedByDefault(self) -> DBusBool:
        return self.client.settings.approved_by_default

    @ApprovedByDefault.setter
    def ApprovedByDefault(self, value: DBusBool) -> None:
        self._set(approved_by_default=bool(value))

    @dbus_property()
    def Checker(self) -> DBusStr:
        return self.client.settings.checker

    @Checker.setter
    def Checker(self, value: DBusStr) -> None:
        try:
            refuse_quoted_expansion(str(value))
        except ExpansionError as error:
            raise DBusError(ErrorType.INVALID_ARGS, f"checker: {error}") from None
        self._set(checker=str(value))

    @dbus_property()
    def CheckerRunning(self) -> DBusBool:
        return self.client.checker_running

    @CheckerRunning.setter
    def CheckerRunning(self, value: DBusBool) -> None:
        if value:
            self.client.start_checker()
        else:
            self.client.stop_checker()
        self._changed()

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> DBusStr:
        return date_string(self.client.state.created)

    @dbus_property()
    def Enabled(self) -> DBusBool:
        return self.client.enabled

    @Enabled.setter
    def Enabled(self, value: DBusBool) -> None:
        if value:
            self.client.enable()
        else:
            self.client.disable()
        self._changed()

    @dbus_property(access=PropertyAccess.READ)
    def Expires(self) -> DBusStr:
        return date_string(self.client.state.expires)

    @dbus_property()
    def ExtendedTimeout(self) -> DBusUInt64:
        return milliseconds(self.client.settings.extended_timeout)

    @ExtendedTimeout.setter
    def ExtendedTimeout(self, value: DBusUInt64) -> None:
        self._set(extended_timeout=_delta(value))

    @dbus_property(access=PropertyAccess.READ)
    def Fingerprint(self) -> DBusStr:
        return self.client.settings.fingerprint

    @dbus_property()
    def Host(self) -> DBusStr:
        return self.client.settings.host

    @Host.setter
    def Host(self, value: DBusStr) -> None:
        self._set(host=str(value))

    @dbus_property()
    def Interval(self) -> DBusUInt64:
        return milliseconds(self.client.settings.interval)

    @Interval.setter
    def Interval(self, value: DBusUInt64) -> None:
        self._set(interval=_delta(value))

    @dbus_property(access=PropertyAccess.READ)
    def KeyID(self) -> DBusStr:
        return self.client.settings.key_id

    @dbus_property(access=PropertyAccess.READ)
    def LastApprovalRequest(self) -> DBusStr:
        return date_string(self.client.state.last_approval_request)

    @dbus_property()
    def LastCheckedOK(self) -> DBusStr:
        return date_string(self.client.state.last_checked_ok)

    @LastCheckedOK.setter
    def LastCheckedOK(self, value: DBusStr) -> None:
        """Any value (use "") means: checked OK now, as ``CheckedOK()``."""
        self.client.checked_ok()
        self._changed()

    @dbus_property(access=PropertyAccess.READ)
    def LastCheckerStatus(self) -> DBusInt16:
        return self.client.state.last_checker_status

    @dbus_property(access=PropertyAccess.READ)
    def LastEnabled(self) -> DBusStr:
        return date_string(self.client.state.last_enabled)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return self.client.name

    @dbus_property(access=PropertyAccess.READ)
    def ObjectPath(self) -> DBusObjectPath:
        return self.path

    @dbus_property(access=PropertyAccess.WRITE)
    def Secret(self) -> DBusBytes:
        return b""  # write-only: never read

    @Secret.setter
    def Secret(self, value: DBusBytes) -> None:
        """A new blob; only its invalidation is announced, never the value."""
        secret = bytes(value)
        if secret != self.client.settings.secret:
            self.client.change_settings(secret=secret)
            self.emit_properties_changed({}, ["Secret"])

    @dbus_property()
    def Timeout(self) -> DBusUInt64:
        return milliseconds(self.client.settings.timeout)

    @Timeout.setter
    def Timeout(self, value: DBusUInt64) -> None:
        self._set(timeout=_delta(value))


class ServerObject(ServiceInterface):
    """``/``: the server, interface ``se.recompile.Mandos``."""

    def __init__(self, service: "AdminService") -> None:
        super().__init__(SERVER_INTERFACE)
        self.service = service

    @dbus_signal()
    def ClientAdded(self, path: str) -> DBusObjectPath:
        return path

    @dbus_signal()
    def ClientNotFound(self, key_id: str, address: str
                       ) -> Annotated[list[str], DBusSignature("ss")]:
        return [key_id, address]

    @dbus_signal()
    def ClientRemoved(self, path: str, name: str
                      ) -> Annotated[list[str], DBusSignature("os")]:
        return [path, name]

    @dbus_method()
    def GetAllClients(self) -> Annotated[list[str], DBusSignature("ao")]:
        return [obj.path for obj in self.service.objects.values()]

    @dbus_method()
    def GetAllClientsWithProperties(
            self) -> Annotated[dict[str, dict[str, Variant]], DBusSignature("a{oa{sv}}")]:
        return {obj.path: variants(obj.snapshot()) for obj in self.service.objects.values()}

    @dbus_method()
    def RemoveClient(self, path: DBusObjectPath) -> None:
        self.service.remove_client(path)


def variants(values: Mapping[str, Any]) -> dict[str, Variant]:
    return {name: Variant(SIGNATURES[name], value) for name, value in values.items()}


class AdminService:
    """The connection to the system bus, the exported objects, and the translation of the
    server's events into signals."""

    def __init__(self, bus: AdminBus, clients: ClientTable, journal: Journal,
                 publisher: events.Publisher) -> None:
        self.bus = bus
        self.clients = clients
        self.journal = journal
        self._unsubscribe = publisher.subscribe(self.on_event)
        self.root = ServerObject(self)
        self.objects: dict[str, ClientObject] = {}
        self._dirty: set[str] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._closing = False
        self._watch = asyncio.get_running_loop().create_task(self._watch_bus())
        bus.export("/", self.root)

    @classmethod
    async def connect(cls, clients: ClientTable, journal: Journal,
                      publisher: events.Publisher) -> "AdminService | None":
        """Connect to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` if set) and take the name;
        None, after a warning in the journal, when that is not possible."""
        bus = AdminBus(bus_type=BusType.SYSTEM)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await bus.connect()
                reply = await bus.request_name(BUS_NAME)
        except (OSError, TimeoutError, DBusError, EOFError, ValueError) as error:
            with contextlib.suppress(Exception):
                bus.disconnect()
            journal.event(Event.SERVER_ERROR, "No D-Bus admin interface: cannot use the system "
                          f"bus: {error or type(error).__name__}", priority=WARNING)
            return None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            bus.disconnect()
            journal.event(Event.SERVER_ERROR, f"No D-Bus admin interface: the name {BUS_NAME} "
                          "is taken (is another Mandos server running?)", priority=WARNING)
            return None
        return cls(bus, clients, journal, publisher)

    async def _watch_bus(self) -> None:
        """Say once, as a warning, that the bus went away (the server serves on)."""
        try:
            await self.bus.wait_for_disconnect()
            reason = "the connection was closed"
        except Exception as error:  # how dbus-fast reports a lost connection
            reason = " ".join(str(error).split()) or type(error).__name__
        if not self._closing:
            self.journal.event(Event.SERVER_ERROR,
                               f"Lost the D-Bus system bus ({reason}): no admin interface "
                               "(mandos-ctl, mandos-monitor) until the server is restarted; "
                               "serving on", priority=WARNING)

    # -- events -----------------------------------------------------------------------------

    def on_event(self, event: events.ServerEvent) -> None:
        """One server event: the signal it stands for, and a property check soon after."""
        if not self.bus.connected:
            return
        match event:
            case events.RequestRefused(reason=Refusal.UNKNOWN_KEY):
                self.root.ClientNotFound(event.key_id, event.peer)
            case events.RequestRefused(client=str(name)):
                if (obj := self.objects.get(name)) is not None:
                    obj.Rejected(_REJECTIONS[event.reason])
                    self._changed(name)
            case events.ConfigLoaded():
                self.sync_objects()
                self._changed(*self.objects)
            case events.ClientEvent():
                if (obj := self.objects.get(event.client)) is not None:
                    self._signal(obj, event)
                    self._changed(event.client)

    @staticmethod
    def _signal(obj: ClientObject, event: events.ClientEvent) -> None:
        """The signal of a client's event, if it has one."""
        match event:
            case events.SecretSent():
                obj.GotSecret()
            case events.NeedsApproval():
                obj.NeedApproval(milliseconds(event.approval_delay), event.approved_by_default)
            case events.CheckerStarted():
                obj.CheckerStarted(event.command)
            case events.CheckerFinished(signal=int(signum)):  # upstream's wait status
                obj.CheckerCompleted(-1, (-1 << 8) | signum, event.command)
            case events.CheckerFinished():
                obj.CheckerCompleted(event.status, event.status << 8, event.command)

    def _changed(self, *names: str) -> None:
        """Compare these clients' properties with the announced ones at the end of this turn
        of the loop (after the change that the event reports has been made)."""
        self._dirty.update(names)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        for name in dirty:
            obj = self.objects.get(name)
            if obj is None:
                continue
            current = obj.snapshot()
            changes = {key: value for key, value in current.items()
                       if obj.announced.get(key) != value}
            obj.announced = current
            if not changes:
                continue
            for key, value in changes.items():
                obj.PropertyChanged(key, Variant(SIGNATURES[key], value))
            obj.emit_properties_changed(changes)

    # -- objects ----------------------------------------------------------------------------

    def sync_objects(self) -> None:
        """Export an object for every client in the table, and drop those of clients that
        are gone (after start-up and after each reload)."""
        current = {client.name: client for client in self.clients}
        for name, obj in list(self.objects.items()):
            if current.get(name) is not obj.client:
                self._unexport(name)
        taken = {obj.path: name for name, obj in self.objects.items()}
        for name, client in current.items():
            if name in self.objects:
                continue
            path = object_path(name)
            problem = (f"its object path {path} is that of client {taken[path]}"
                       if path in taken else None if is_object_path_valid(path) else
                       "its name makes no valid object path (use only A-Z a-z 0-9 _ . -)")
            if problem is not None:
                self.journal.event(Event.SERVER_ERROR, f"Client {name} is not on D-Bus: "
                                   f"{problem}", client=name, priority=WARNING)
                continue
            self._export(client, path)
            taken[path] = name

    def _export(self, client: Client, path: str) -> None:
        obj = ClientObject(client, path, self._changed)
        obj.announced = obj.snapshot()
        self.objects[client.name] = obj
        self.bus.export(path, obj)
        self.bus.send(Message.new_signal(
            path="/", interface=OBJECT_MANAGER, member="InterfacesAdded",
            signature="oa{sa{sv}}", body=[path, {CLIENT_INTERFACE: variants(obj.announced)}]))
        self.root.ClientAdded(path)

    def _unexport(self, name: str) -> None:
        obj = self.objects.pop(name)
        self.bus.unexport(obj.path)
        self.bus.send(Message.new_signal(
            path="/", interface=OBJECT_MANAGER, member="InterfacesRemoved",
            signature="oas", body=[obj.path, [CLIENT_INTERFACE]]))
        self.root.ClientRemoved(obj.path, name)

    def remove_client(self, path: str) -> None:
        """``RemoveClient``: forget a client until the next reload or restart (it stays in
        clients.conf); requests waiting for its approval are refused."""
        names = [name for name, obj in self.objects.items() if obj.path == path]
        if not names:
            raise DBusError(ErrorType.UNKNOWN_OBJECT, f"no client at {path}")
        name = names[0]
        client = self.clients.remove(name)
        self._unexport(name)
        if client is not None:
            client.remove(By.ADMIN)

    def close(self) -> None:
        """Withdraw every object (as upstream does at exit) and leave the bus."""
        self._closing = True
        self._watch.cancel()
        self._unsubscribe()
        if self.bus.connected:
            for name in list(self.objects):
                self._unexport(name)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.bus.disconnect()
