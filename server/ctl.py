# SPDX-License-Identifier: GPL-3.0-or-later
"""``mandos-ctl``: list and control the clients of a running Mandos server over D-Bus.

The options, their conflicts and the output (the table, ``--verbose``, ``--dump-json``) are
upstream's ``mandos-ctl`` 1.8's, so that scripts written for it keep working against this server
and upstream's, plus one addition: ``--json``, machine-readable output (see ``--help``).  It talks
to the system bus with dbus-fast (``DBUS_SYSTEM_BUS_ADDRESS`` if set), using only the documented
D-Bus API (``GetManagedObjects``, ``Properties.Set``, ``Approve``, ``RemoveClient``).

Times are given as upstream takes them: an RFC 3339 duration (``PT5M``, ``P1DT2H``), or the old
``5m 30s`` form (``s m h d w``; a bare number is milliseconds, as upstream's old form).  Errors
are one line on stderr with exit status 1; a bad command line exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mandos_protocol.durations import parse_duration
from mandos_protocol.errors import ProtocolError
from mandos_protocol.version import version_line
from server.dbus_names import (
    BUS_NAME,
    CLIENT_INTERFACE,
    CLIENT_PROPERTIES,
    OBJECT_MANAGER,
    PROPERTIES,
    SERVER_INTERFACE,
    SERVER_PATH,
)

#: The properties shown by ``--verbose`` and ``--dump-json``, in upstream's order, with the
#: table headers.
HEADERS: Mapping[str, str] = {name: prop.header for name, prop in CLIENT_PROPERTIES.items()
                              if prop.header}
DEFAULT_KEYS = ("Name", "Enabled", "Timeout", "LastCheckedOK")
MILLISECOND_KEYS = frozenset(
    ("Timeout", "Interval", "ApprovalDelay", "ApprovalDuration", "ExtendedTimeout"))


class CtlError(Exception):
    """An expected failure (no server, unknown client, refused call): one line for the user."""


@dataclass(frozen=True)
class Action:
    """One thing to do to each selected client: set a property (``prop``, D-Bus
    ``signature``, ``value``), or call a client method (``method``), or remove it, or test
    whether it is enabled.  ``option`` is how the user asked for it (for --debug and
    errors)."""

    option: str
    prop: str = ""
    signature: str = ""
    value: Any = None
    method: str = ""

    @property
    def kind(self) -> str:
        return self.option.lstrip("-")


REMOVE = Action("--remove")
IS_ENABLED = Action("--is-enabled")
DENY = Action("--deny", method="Approve", signature="b", value=False)


def parse_time(text: str) -> datetime.timedelta:
    """A duration as upstream's mandos-ctl takes it."""
    try:
        return parse_duration(text)
    except ProtocolError as error:
        # Upstream's pre-1.6.1 form also allows "5m30s" and bare milliseconds.
        if not re.fullmatch(r"\s*(\d+[dsmhw]?\s*)+", text):
            raise argparse.ArgumentTypeError(str(error)) from None
    units = {"d": "days", "s": "seconds", "m": "minutes", "h": "hours", "w": "weeks",
             "": "milliseconds"}
    total = datetime.timedelta()
    for number, unit in re.findall(r"(\d+)([dsmhw]?)", text):
        total += datetime.timedelta(**{units[unit]: int(number)})
    return total


def milliseconds_to_string(ms: int) -> str:
    """A duration as upstream's table shows it: ``[<days>T]HH:MM:SS``."""
    delta = datetime.timedelta(milliseconds=ms)
    days = f"{delta.days}T" if delta.days else ""
    seconds = delta.seconds
    return f"{days}{seconds // 3600:02}:{seconds % 3600 // 60:02}:{seconds % 60:02}"


def value_to_string(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    if key in MILLISECOND_KEYS:
        return milliseconds_to_string(int(value))
    return str(value)


def table(clients: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """Upstream's table: one column per key, as wide as its widest cell, left-aligned."""
    widths = {key: max([len(HEADERS[key])]
                       + [len(value_to_string(key, client[key])) for client in clients])
              for key in keys}
    def row(cells: Mapping[str, Any]) -> str:
        return " ".join(format(cells[key], f"{widths[key]}") for key in keys)

    lines = [row(HEADERS)]
    lines += [row({key: value_to_string(key, client[key]) for key in keys})
              for client in clients]
    return "\n".join(lines)


def dump_json(clients: Sequence[Mapping[str, Any]]) -> str:
    """Upstream's ``--dump-json``: the 20 properties of each client, by client name."""
    data = {client["Name"]: {key: client[key] for key in HEADERS} for client in clients}
    return json.dumps(data, indent=4, separators=(",", ": "))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mandos-ctl",
        description="List or change the clients of a running Mandos server over D-Bus.",
        epilog="--json is our addition: without an action it prints what --dump-json prints; "
        "with actions it prints, after all of them succeeded, the selected clients' properties "
        "as --dump-json shows them, read again from the server (removed clients are left "
        "out). TIME is an RFC 3339 duration (PT5M, P1DT2H) or like '5m 30s'.")
    add = parser.add_argument
    commands: dict[str, Any] = {"dest": "actions", "default": []}

    def const(*flags: str, action: Action, help: str,
              group: argparse._MutuallyExclusiveGroup | None = None) -> None:
        (group or parser).add_argument(*flags, action="append_const", const=action, help=help,
                                       **commands)

    def setter(*flags: str, prop: str, signature: str, kind: Any, metavar: str,
               help: str) -> None:
        def convert(text: str) -> Action:
            value = kind(text)
            if isinstance(value, datetime.timedelta):
                value = round(value.total_seconds() * 1000)
            return Action(flags[-1], prop=prop, signature=signature, value=value)

        convert.__name__ = metavar  # argparse names the type in its error messages
        add(*flags, action="append", type=convert, metavar=metavar, help=help, **commands)

    add("--version", action="version", version=version_line("mandos-ctl"),
        help="show version number and exit")
    add("-a", "--all", action="store_true", help="Select all clients")
    add("-v", "--verbose", action="store_true", help="Print all fields")
    const("-j", "--dump-json", action=Action("--dump-json"),
          help="Dump client data in JSON format")
    add("--json", action="store_true",
        help="machine-readable output (JSON; see below)")
    enable_disable = parser.add_mutually_exclusive_group()
    const("-e", "--enable", action=Action("--enable", prop="Enabled", signature="b",
                                          value=True), help="Enable client",
          group=enable_disable)
    const("-d", "--disable", action=Action("--disable", prop="Enabled", signature="b",
                                           value=False), help="disable client",
          group=enable_disable)
    const("-b", "--bump-timeout", action=Action("--bump-timeout", prop="LastCheckedOK",
                                                signature="s", value=""),
          help="Bump timeout for client")
    start_stop = parser.add_mutually_exclusive_group()
    const("--start-checker", action=Action("--start-checker", prop="CheckerRunning",
                                           signature="b", value=True),
          help="Start checker for client", group=start_stop)
    const("--stop-checker", action=Action("--stop-checker", prop="CheckerRunning",
                                          signature="b", value=False),
          help="Stop checker for client", group=start_stop)
    const("-V", "--is-enabled", action=IS_ENABLED, help="Check if client is enabled")
    const("-r", "--remove", action=REMOVE, help="Remove client")
    setter("-c", "--checker", prop="Checker", signature="s", kind=str, metavar="COMMAND",
           help="Set checker command for client")
    setter("-t", "--timeout", prop="Timeout", signature="t", kind=parse_time, metavar="TIME",
           help="Set timeout for client")
    setter("--extended-timeout", prop="ExtendedTimeout", signature="t", kind=parse_time,
           metavar="TIME", help="Set extended timeout for client")
    setter("-i", "--interval", prop="Interval", signature="t", kind=parse_time,
           metavar="TIME", help="Set checker interval for client")
    by_default = parser.add_mutually_exclusive_group()
    const("--approve-by-default", action=Action("--approve-by-default",
                                                prop="ApprovedByDefault", signature="b",
                                                value=True),
          help="Set client to be approved by default", group=by_default)
    const("--deny-by-default", action=Action("--deny-by-default", prop="ApprovedByDefault",
                                             signature="b", value=False),
          help="Set client to be denied by default", group=by_default)
    setter("--approval-delay", prop="ApprovalDelay", signature="t", kind=parse_time,
           metavar="TIME", help="Set delay before client approve/deny")
    setter("--approval-duration", prop="ApprovalDuration", signature="t", kind=parse_time,
           metavar="TIME", help="Set duration of one client approval")
    setter("-H", "--host", prop="Host", signature="s", kind=str, metavar="STRING",
           help="Set host for client")
    setter("-s", "--secret", prop="Secret", signature="ay", kind=Path, metavar="FILENAME",
           help="Set password blob (file) for client")
    approve_deny = parser.add_mutually_exclusive_group()
    const("-A", "--approve", action=Action("--approve", method="Approve", signature="b",
                                           value=True),
          help="Approve any current client request", group=approve_deny)
    const("-D", "--deny", action=DENY, help="Deny any current client request",
          group=approve_deny)
    add("--debug", action="store_true", help="Debug mode (show D-Bus commands)")
    add("--check", action="store_true", help="Run self-test")
    add("client", nargs="*", help="Client name")
    return parser


def check_options(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    """Upstream's rules, which argparse cannot express (and ours for --json)."""
    actions: list[Action] = options.actions
    changes = [a for a in actions if a.kind != "dump-json"]
    dump = len(changes) != len(actions)
    if changes and not (options.client or options.all):
        parser.error("Options require clients names or --all.")
    if options.verbose and changes:
        parser.error("--verbose can only be used alone.")
    if dump and (options.verbose or len(actions) > 1):
        parser.error("--dump-json can only be used alone.")
    if options.all and not changes:
        parser.error("--all requires an action.")
    if IS_ENABLED in actions and len(options.client) > 1:
        parser.error("--is-enabled requires exactly one client")
    if len(actions) > 1 and REMOVE in actions and DENY not in actions:
        parser.error("--remove can only be combined with --deny")
    if options.json and (options.verbose or dump):
        parser.error("--json can not be combined with --verbose or --dump-json.")


def ordered(actions: Sequence[Action]) -> list[Action]:
    """The actions in command-line order, except that --deny goes before --remove (as
    upstream: deny the waiting request, then remove the client)."""
    if REMOVE not in actions:
        return list(actions)
    before = list(actions[:actions.index(REMOVE)])
    after = list(actions[actions.index(REMOVE):])
    return before + [a for a in after if a is DENY] + [a for a in after if a is not DENY]


def self_check() -> int:
    """``--check``: check the pure parts (time parsing and formatting) against upstream's
    documented examples."""
    cases = [
        (parse_time("PT5M30S"), datetime.timedelta(seconds=330)),
        (parse_time("P1DT3M20S"), datetime.timedelta(days=1, seconds=200)),
        (parse_time("5m 30s"), datetime.timedelta(seconds=330)),
        (parse_time("5m30s"), datetime.timedelta(seconds=330)),
        (parse_time("1w"), datetime.timedelta(days=7)),
        (milliseconds_to_string(93784000), "1T02:03:04"),
        (milliseconds_to_string(300000), "00:05:00"),
        (value_to_string("Enabled", True), "Yes"),
    ]
    failed = [(got, wanted) for got, wanted in cases if got != wanted]
    for got, wanted in failed:
        print(f"mandos-ctl: self-test: got {got!r}, wanted {wanted!r}", file=sys.stderr)
    print("self-test:", "FAILED" if failed else "OK")
    return 1 if failed else 0


class Server:
    """The Mandos server's D-Bus API, from the caller's side."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug
        self.bus: Any = None

    def _log(self, text: str) -> None:
        if self.debug:
            print(f"D-Bus: {text}", file=sys.stderr)

    async def connect(self) -> None:
        from dbus_fast import BusType
        from dbus_fast.aio import MessageBus

        self._log("connect to the system bus")
        try:
            self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        except Exception as error:  # dbus-fast raises several kinds; all mean the same
            raise CtlError(f"Could not connect to the system bus: {error}") from None

    def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: Sequence[Any] = ()) -> list[Any]:
        from dbus_fast import Message, MessageType

        self._log(f"{BUS_NAME}:{path}:{interface}.{member}"
                  f"({', '.join(repr(a) for a in body)})")
        reply = await self.bus.call(Message(destination=BUS_NAME, path=path,
                                            interface=interface, member=member,
                                            signature=signature, body=list(body)))
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            if reply.error_name == "org.freedesktop.DBus.Error.ServiceUnknown":
                raise CtlError("Could not connect to Mandos server: no server owns "
                               f"{BUS_NAME} on the system bus")
            raise CtlError(f"Failed to access Mandos server through D-Bus: "
                           f"{reply.error_name}: {detail}")
        return list(reply.body)

    async def clients(self) -> dict[str, dict[str, Any]]:
        """Every client's properties (plain Python values) by object path, in the server's
        order."""
        (objects,) = await self.call(SERVER_PATH, OBJECT_MANAGER, "GetManagedObjects")
        return {path: {key: variant.value for key, variant in interfaces[CLIENT_INTERFACE].items()}
                for path, interfaces in objects.items() if CLIENT_INTERFACE in interfaces}

    async def perform(self, action: Action, path: str) -> None:
        from dbus_fast import Variant

        if action is REMOVE:
            await self.call(SERVER_PATH, SERVER_INTERFACE, "RemoveClient", "o", [path])
        elif action.method:
            await self.call(path, CLIENT_INTERFACE, action.method, action.signature,
                            [action.value])
        else:
            value = action.value
            if action.prop == "Secret":
                try:
                    value = Path(value).read_bytes()
                except OSError as error:
                    raise CtlError(f"--secret: cannot read {value}: {error.strerror}") from None
            await self.call(path, PROPERTIES, "Set", "ssv",
                            [CLIENT_INTERFACE, action.prop, Variant(action.signature, value)])


async def run(options: argparse.Namespace) -> int:
    server = Server(options.debug)
    await server.connect()
    try:
        every = await server.clients()
        if options.client:
            by_name = {props["Name"]: path for path, props in every.items()}
            missing = [name for name in options.client if name not in by_name]
            if missing:
                raise CtlError(f"Client not found on server: {missing[0]!r}")
            selected = {by_name[name]: every[by_name[name]] for name in options.client}
        else:
            selected = every
        actions = [a for a in ordered(options.actions) if a.kind != "dump-json"]
        dump = len(actions) != len(options.actions)
        if not actions:
            clients = list(selected.values())
            if dump or options.json:
                print(dump_json(clients))
            else:
                print(table(clients, list(HEADERS) if options.verbose else DEFAULT_KEYS))
            return 0
        status = 0
        for action in actions:
            if action is IS_ENABLED:
                status = 0 if next(iter(selected.values()))["Enabled"] else 1
                if not options.json:
                    return status
                continue
            for path in selected:
                await server.perform(action, path)
        if options.json:
            now = await server.clients()
            print(dump_json([now[path] for path in selected if path in now]))
        return status
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.check:
        return self_check()
    check_options(parser, options)
    try:
        return asyncio.run(run(options))
    except CtlError as error:
        print(f"mandos-ctl: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
