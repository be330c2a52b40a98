# SPDX-License-Identifier: GPL-3.0-or-later
"""mandos.conf and clients.conf, read as upstream Mandos 1.8 reads them.

Both are ConfigParser files with ``[DEFAULT]``, ``%(key)s`` interpolation and indented
continuation lines.  ``mandos.conf`` uses only ``[DEFAULT]`` (command-line options override it);
``clients.conf`` has one section per client.  We accept every file upstream accepts, with one
deliberate difference: a section without ``fingerprint`` is fine here (upstream crashes with a
KeyError although its manual says ``key_id`` is enough).  Where upstream would crash or silently
misbehave on bad input (an unparseable duration, bad base64, no secret, two clients with the
same key id) we raise :class:`ConfigError` naming the file, the line, the section and the key.

``clients.d/*.conf`` (ours; upstream has no such directory) lets configuration management
drop one file per client: read after clients.conf in name order, same syntax, with
clients.conf's ``[DEFAULT]`` under each file's own.  See :func:`load_configuration` for what a
broken file or a clash between files does.

A relative ``secfile`` is taken relative to the configuration directory (upstream takes it
relative to its working directory, which is ``/`` for a daemon), in clients.d files too.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import dataclasses
import datetime
import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mandos_protocol.durations import parse_duration
from mandos_protocol.errors import ProtocolError
from mandos_protocol.wire import DEFAULT_PRIORITY, EMPTY_KEY_ID, normalize_key_id
from server.checker import ExpansionError, refuse_quoted_expansion

#: Upstream's defaults for every client section (``Client.client_defaults``).
CLIENT_DEFAULTS: Mapping[str, str] = {
    "timeout": "PT5M",
    "extended_timeout": "PT15M",
    "interval": "PT2M",
    "checker": "fping -q -- %%(host)s",
    "host": "",
    "approval_delay": "PT0S",
    "approval_duration": "PT1S",
    "approved_by_default": "True",
    "enabled": "True",
    "approval_command": "",
}

#: Upstream's defaults for mandos.conf (``server_defaults`` in ``main()``).
SERVER_DEFAULTS: Mapping[str, str] = {
    "interface": "",
    "address": "",
    "port": "",
    "debug": "False",
    "priority": DEFAULT_PRIORITY,
    "servicename": "Mandos",
    "use_dbus": "True",
    "use_ipv6": "True",
    "debuglevel": "",
    "restore": "True",
    "socket": "",
    "statedir": "/var/lib/mandos",
    "foreground": "False",
    "zeroconf": "True",
    "etcd": "",
    "etcd_prefix": "/mandos/",
    "etcd_cacert": "",
    "etcd_cert": "",
    "etcd_key": "",
    "metrics": "",
}

DEFAULT = configparser.DEFAULTSECT
#: The directory beside clients.conf whose ``*.conf`` files are read after it.
CLIENTS_D = "clients.d"

DEBUG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


class ConfigError(Exception):
    """An expected failure the administrator can fix: a bad configuration file or option, or a
    listening socket that cannot be set up.  The message names the file, section and key (or
    the option) and never contains secret data."""


@dataclass(frozen=True)
class ClientConfig:
    """One client section of clients.conf, parsed.  ``key_id`` and ``fingerprint`` are
    normalized (upper case, no spaces); ``checker`` still holds its ``%(attr)s`` run-time
    expansions."""

    name: str
    key_id: str
    fingerprint: str
    secret: bytes = field(repr=False)
    host: str
    timeout: datetime.timedelta
    extended_timeout: datetime.timedelta
    interval: datetime.timedelta
    checker: str
    approved_by_default: bool
    approval_delay: datetime.timedelta
    approval_duration: datetime.timedelta
    enabled: bool
    #: Ours: a shell command run when a request needs approval (server.approval_command).
    approval_command: str = ""


@dataclass(frozen=True)
class ServerSettings:
    """The server-wide settings: mandos.conf's ``[DEFAULT]`` overridden by the command line."""

    configdir: Path = Path("/etc/mandos")
    statedir: Path = Path("/var/lib/mandos")
    interface: str = ""
    address: str = ""
    port: int | None = None
    socket: int | None = None
    debug: bool = False
    debuglevel: str = ""
    priority: str = DEFAULT_PRIORITY
    servicename: str = "Mandos"
    use_dbus: bool = True
    use_ipv6: bool = True
    restore: bool = True
    zeroconf: bool = True
    #: Fleet state in etcd (docs/fleet.md): comma-separated URLs, or "" for none.
    etcd: str = ""
    etcd_prefix: str = "/mandos/"
    etcd_cacert: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    #: Where to serve /metrics and /healthz: "[ADDRESS:]PORT" (server.http_endpoint), or "".
    metrics: str = ""

    @property
    def clients_conf(self) -> Path:
        return self.configdir / "clients.conf"


@dataclass(frozen=True)
class _Source:
    """A configuration file being parsed, with the line of every section header and option in
    it, so that a message can say ``file:line``; ``parent`` is the file whose ``[DEFAULT]``
    this one inherits (clients.conf, for a file in clients.d)."""

    path: Path
    base: Path  # what a relative secfile is relative to: the configuration directory
    lines: Mapping[tuple[str, str], int]  # (section, option) -> line; (section, "") -> header
    parent: _Source | None = None

    def where(self, section: str, key: str) -> str:
        """``file:line: [section] key`` for a value of ``section``, with the line where the
        value is set: in the section, else in this file's ``[DEFAULT]``, else in the
        parent's, else the section header's."""
        name = _quoted(self.path)
        line = self.lines.get((section, key))
        if line is not None:
            return f"{name}:{line}: [{section}] {key}"
        line = self.lines.get((DEFAULT, key))
        if line is not None:
            return f"{name}:{line}: [{section}] {key} (set in [DEFAULT])"
        header = self.lines.get((section, ""))
        place = f"{name}:{header}" if header is not None else name
        line = self.parent.lines.get((DEFAULT, key)) if self.parent is not None else None
        if self.parent is not None and line is not None:
            return (f"{place}: [{section}] {key} (set in [DEFAULT] of "
                    f"{_quoted(self.parent.path)}:{line})")
        return f"{place}: [{section}] {key}"


def _lines(parser: configparser.ConfigParser, text: str) -> dict[tuple[str, str], int]:
    """Where each section header and option starts, found as configparser finds them (its
    own patterns; comment lines and indented continuation lines skipped)."""
    found: dict[tuple[str, str], int] = {}
    section: str | None = None
    in_option = False
    indent_level = 0
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):
        value = line.strip()
        if not value or value.startswith(("#", ";")):
            continue
        nonspace = parser.NONSPACECRE.search(line)
        indent = nonspace.start() if nonspace else 0
        if section is not None and in_option and indent > indent_level:
            continue
        indent_level = indent
        header = parser.SECTCRE.match(value)
        option = parser.OPTCRE.match(value)
        if header is not None:
            section, in_option = header.group("header"), False
            found.setdefault((section, ""), number)
        elif section is not None and option is not None:
            key = parser.optionxform(option.group("option").rstrip())
            found.setdefault((section, key), number)
            in_option = True
    return found


def _read(parser: configparser.ConfigParser, path: Path) -> str | None:
    """Read ``path`` into ``parser`` and return its text, or None if there is no such file
    (upstream ignores a missing file).  Errors name the file and the line, and never quote the
    line (it may hold part of a secret)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"{_quoted(path)}: cannot read: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{_quoted(path)}:{line}: not UTF-8 text") from None
    try:
        parser.read_file(io.StringIO(text, newline=None), source=str(path))
    except configparser.Error as error:
        raise ConfigError(f"{_quoted(path)}:{_syntax_error(error)}") from None
    return text


def _syntax_error(error: configparser.Error) -> str:
    """``line: what is wrong`` for an error of configparser's reading, without the text of the
    line."""
    if isinstance(error, configparser.MissingSectionHeaderError):
        return f"{error.lineno}: an option before the first [section] header"
    if isinstance(error, configparser.ParsingError):
        numbers = ",".join(str(number) for number, _line in error.errors)
        return (f"{numbers}: neither 'key = value', an indented continuation line nor a "
                "[section] header")
    if isinstance(error, configparser.DuplicateSectionError):
        return f"{error.lineno}: [{error.section}] again"
    if isinstance(error, configparser.DuplicateOptionError):
        return f"{error.lineno}: [{error.section}] {error.option} again"
    return f" {_one_line(error)}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _quoted(path: Path) -> str:
    """A file name for a one-line message: as it is, unless it holds a line break or other
    unprintable characters (a continuation line in the file can put one first)."""
    return str(path) if str(path).isprintable() else repr(str(path))


def _get(parser: configparser.ConfigParser, source: _Source, section: str, key: str) -> str:
    """An interpolated value, with interpolation errors named precisely (but never quoting
    the ``secret``: configparser's messages quote the raw value), and without NUL characters
    (no file name, host or command can hold one: open() and exec() raise ValueError)."""
    try:
        value = parser.get(section, key)
    except configparser.Error as error:
        detail = ("cannot expand a % in it (write %% for a literal %)"
                  if key in ("secret", "approval_command")  # a webhook's token, perhaps
                  else _one_line(error))
        raise ConfigError(f"{source.where(section, key)}: {detail}") from None
    if "\0" in value:
        raise ConfigError(f"{source.where(section, key)}: contains a NUL character")
    return value


def _boolean(parser: configparser.ConfigParser, source: _Source, section: str,
             key: str) -> bool:
    value = _get(parser, source, section, key)
    try:
        return parser.BOOLEAN_STATES[value.lower()]
    except KeyError:
        raise ConfigError(
            f"{source.where(section, key)}: {value!r} is not a boolean (use yes/no, "
            "true/false, on/off or 1/0)"
        ) from None


def _duration(parser: configparser.ConfigParser, source: _Source, section: str,
              key: str) -> datetime.timedelta:
    value = _get(parser, source, section, key)
    try:
        delta = parse_duration(value)
    except ProtocolError as error:
        raise ConfigError(f"{source.where(section, key)}: {error}") from None
    if delta < datetime.timedelta(0):
        raise ConfigError(f"{source.where(section, key)}: {value!r} is negative")
    return delta


def _checker(parser: configparser.ConfigParser, source: _Source, section: str) -> str:
    command = _get(parser, source, section, "checker")
    try:
        refuse_quoted_expansion(command)
    except ExpansionError as error:
        raise ConfigError(f"{source.where(section, 'checker')}: {error}") from None
    return command


def _secret(parser: configparser.ConfigParser, source: _Source, section: str) -> bytes:
    """The blob: base64 ``secret`` (may span indented lines) or the raw contents of
    ``secfile``."""
    if parser.has_option(section, "secret"):
        text = "".join(_get(parser, source, section, "secret").split())
        try:
            secret = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{source.where(section, 'secret')}: not valid base64") from None
        if not secret:
            raise ConfigError(f"{source.where(section, 'secret')}: empty")
        return secret
    if parser.has_option(section, "secfile"):
        name = os.path.expanduser(os.path.expandvars(_get(parser, source, section, "secfile")))
        secfile = source.base / name
        try:
            secret = secfile.read_bytes()
        except OSError as error:
            raise ConfigError(
                f"{source.where(section, 'secfile')}: cannot read {_quoted(secfile)}: "
                f"{error.strerror}"
            ) from None
        if not secret:
            raise ConfigError(f"{source.where(section, 'secfile')}: {_quoted(secfile)} is empty")
        return secret
    raise ConfigError(f"{source.where(section, 'secret')}: missing (give secret or secfile)")


def _hex_id(parser: configparser.ConfigParser, source: _Source, section: str, key: str) -> str:
    if not parser.has_option(section, key):
        return ""
    value = normalize_key_id(_get(parser, source, section, key))
    if value and any(c not in "0123456789ABCDEF" for c in value):
        raise ConfigError(f"{source.where(section, key)}: {value!r} is not hexadecimal")
    return value


def parse_client(parser: configparser.ConfigParser, source: _Source, name: str) -> ClientConfig:
    """One section as a :class:`ClientConfig`."""
    key_id = _hex_id(parser, source, name, "key_id")
    fingerprint = _hex_id(parser, source, name, "fingerprint")
    if key_id == EMPTY_KEY_ID:
        raise ConfigError(f"{source.where(name, 'key_id')}: this is the key id of an empty key")
    if not key_id and not fingerprint:
        raise ConfigError(f"{source.where(name, 'key_id')}: missing (give key_id or "
                          "fingerprint)")
    return ClientConfig(
        name=name,
        key_id=key_id,
        fingerprint=fingerprint,
        secret=_secret(parser, source, name),
        host=_get(parser, source, name, "host"),
        timeout=_duration(parser, source, name, "timeout"),
        extended_timeout=_duration(parser, source, name, "extended_timeout"),
        interval=_duration(parser, source, name, "interval"),
        checker=_checker(parser, source, name),
        approved_by_default=_boolean(parser, source, name, "approved_by_default"),
        approval_delay=_duration(parser, source, name, "approval_delay"),
        approval_duration=_duration(parser, source, name, "approval_duration"),
        enabled=_boolean(parser, source, name, "enabled"),
        approval_command=_get(parser, source, name, "approval_command"),
    )


def _identities(client: ClientConfig) -> Iterator[tuple[str, str]]:
    """What no two clients may share: (what, value) pairs.  A ``fingerprint`` only has to be
    unique among fingerprints (:class:`server.clients.ClientTable` looks it up separately)."""
    yield "name", client.name
    for key, value in (("key_id", client.key_id), ("fingerprint", client.fingerprint)):
        if value:
            yield key, value


@dataclass(frozen=True)
class ClientFile:
    """One file's clients, in file order: clients.conf or a file in clients.d/.  For
    clients.conf, ``defaults`` (its ``[DEFAULT]`` over upstream's, uninterpolated) and
    ``default_lines`` are what every file in clients.d inherits."""

    path: Path
    clients: Mapping[str, ClientConfig]
    defaults: Mapping[str, str] = field(default_factory=dict)
    default_lines: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: The file's :func:`_stamp` before it was read (files of clients.d only).
    stamp: tuple[int, ...] | None = None


def read_client_file(path: Path, base: Path, parent: ClientFile | None = None) -> ClientFile:
    """Parse one file of client sections; a missing file has none.  ``parent`` (clients.conf,
    for a file in clients.d) supplies the ``[DEFAULT]`` values that the file's own
    ``[DEFAULT]`` does not set; a relative secfile is relative to ``base``."""
    defaults = parent.defaults if parent is not None else CLIENT_DEFAULTS
    parser = configparser.ConfigParser(defaults=defaults)
    text = _read(parser, path)
    parent_source = (_Source(parent.path, base, parent.default_lines)
                     if parent is not None else None)
    source = _Source(path, base, _lines(parser, text or ""), parent_source)
    clients: dict[str, ClientConfig] = {}
    seen: dict[tuple[str, str], str] = {}
    for name in parser.sections():
        client = parse_client(parser, source, name)
        for what, value in _identities(client):
            other = seen.setdefault((what, value), name)
            if other != name:
                raise ConfigError(f"{source.where(name, what)}: the same as in [{other}]")
        clients[name] = client
    default_lines = {place: line for place, line in source.lines.items()
                     if place[0] == DEFAULT}
    return ClientFile(path, clients, dict(parser.defaults()), default_lines)


def load_clients(path: Path) -> dict[str, ClientConfig]:
    """Parse clients.conf into client configs by name, in file order.  A missing file means
    no clients, as upstream."""
    return dict(read_client_file(path, path.parent).clients)


@dataclass(frozen=True)
class RefusedFile:
    """A file that a reload could not use: ``message`` (one line) names it and the line, says
    what is wrong and what stays in force instead."""

    path: Path
    message: str


@dataclass(frozen=True)
class ClientsConfiguration:
    """The client files in force, in reading order (clients.conf, then clients.d/ by name),
    and the ``problems`` of the reload that made it: one line per refused file, saying what
    is wrong and what stays in force instead."""

    files: tuple[ClientFile, ...]
    problems: tuple[RefusedFile, ...] = ()
    #: The files of clients.d that could not be read or parsed, with their :func:`_stamp`.
    unusable: Mapping[Path, tuple[int, ...] | None] = field(default_factory=dict)

    @property
    def clients(self) -> dict[str, ClientConfig]:
        """Every client by name, in reading order."""
        return {name: client for file in self.files for name, client in file.clients.items()}


def is_client_file_name(name: str) -> bool:
    """Whether a file of this name in clients.d is read: ``*.conf`` but not ``.*`` (editors'
    lock and swap files; their backups and temporary files have other endings)."""
    return name.endswith(".conf") and not name.startswith(".")


def clients_d_files(directory: Path) -> list[Path]:
    """The files of ``directory`` (clients.d) that hold clients, in name order (code point
    order, as ``LC_ALL=C ls``): regular files, or links to one, whose names
    :func:`is_client_file_name` accepts.  An absent directory has none."""
    try:
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries
                           if is_client_file_name(entry.name) and entry.is_file())
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ConfigError(f"{_quoted(directory)}: cannot read: {error.strerror}") from None
    return [directory / name for name in names]


def load_configuration(configdir: Path, previous: ClientsConfiguration | None = None, *,
                       clients_conf: bool = True) -> ClientsConfiguration:
    """clients.conf, then the files of clients.d/ in name order, each with clients.conf's
    ``[DEFAULT]`` under its own.  No two clients may share a name, a key_id or a fingerprint:
    the later file is refused.

    At start-up (no ``previous``) every problem is a :class:`ConfigError`, as a broken
    clients.conf always was: starting without a file's clients would forget their saved
    state.  On a reload a refused file (unreadable, a syntax or value error, a clash with an
    earlier file) keeps its ``previous`` contents in force, if they do not clash in turn, and
    is one line in ``problems``; other files' changes apply.  A file gone from clients.d takes
    its clients with it; a clients.conf gone is refused (moved away to be edited, say).
    ``clients_conf=False`` keeps clients.conf as it was read last (a change in clients.d
    reloads only clients.d), and with it every file of clients.d that has not changed since
    (:func:`_stamp`): neither read again nor, if it was unusable, reported again.  So a
    change in one of many files costs the reading of that file."""
    kept = {file.path: file for file in previous.files} if previous is not None else {}
    unusable = dict(previous.unusable) if previous is not None and not clients_conf else {}
    problems: list[RefusedFile] = []

    def refuse(path: Path, error: ConfigError | str,
               instead: ClientFile | None) -> ClientFile | None:
        if previous is None:
            raise error if isinstance(error, ConfigError) else ConfigError(error)
        problems.append(RefusedFile(path, f"{error}; refused, " + (
            "keeping its previous contents" if instead is not None
            else "none of its clients are in force")))
        return instead

    conf_path = configdir / "clients.conf"
    conf = kept.get(conf_path)
    if clients_conf or conf is None:
        try:
            if previous is not None and not conf_path.exists():
                raise ConfigError(f"{conf_path} is missing (to remove every client in it, "
                                  "leave it empty)")
            conf = read_client_file(conf_path, configdir)
        except ConfigError as error:
            conf = refuse(conf_path, error, conf) or ClientFile(conf_path, {})
    directory = configdir / CLIENTS_D
    candidates = [conf]
    try:
        paths = clients_d_files(directory)
    except ConfigError as error:
        if previous is None:
            raise
        problems.append(RefusedFile(directory, f"{error}; keeping its files as they were"))
        paths = [path for path in kept if path.parent == directory]
    for path in paths:
        stamp, old = _stamp(path), kept.get(path)
        if not clients_conf and stamp is not None and old is not None and old.stamp == stamp:
            candidates.append(old)  # unchanged
            continue
        if not clients_conf and stamp is not None and unusable.get(path) == stamp:
            if old is not None:  # unusable, unchanged, and said so already
                candidates.append(old)
            continue
        unusable.pop(path, None)
        try:
            candidates.append(dataclasses.replace(read_client_file(path, configdir, conf),
                                                  stamp=stamp))
        except ConfigError as error:
            unusable[path] = stamp
            instead = refuse(path, error, old)
            if instead is not None:
                candidates.append(instead)
    files: list[ClientFile] = []
    owners: dict[tuple[str, str], tuple[Path, str]] = {}
    for candidate in candidates:
        clash = _clash(candidate, owners)
        if clash is not None:
            old = kept.get(candidate.path)
            if old is candidate or (old is not None and _clash(old, owners) is not None):
                old = None
            found = refuse(candidate.path, clash, old)
            if found is None:
                continue
            candidate = found
        files.append(candidate)
        for client in candidate.clients.values():
            for identity in _identities(client):
                owners[identity] = (candidate.path, client.name)
    present = set(paths)
    return ClientsConfiguration(tuple(files), tuple(problems),
                                {path: stamp for path, stamp in unusable.items()
                                 if path in present})


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What changes when a file is written, renamed over or touched (through a link: the
    file it points to), to tell an unchanged file without reading it; None if it cannot be
    stat'ed."""
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
            status.st_ctime_ns)


def _clash(file: ClientFile, owners: Mapping[tuple[str, str], tuple[Path, str]]) -> str | None:
    """Why ``file`` cannot join the files that define ``owners``, if it cannot."""
    for client in file.clients.values():
        for what, value in _identities(client):
            owner = owners.get((what, value))
            if owner is None:
                continue
            path, name = owner
            if what == "name":
                return (f"{_quoted(file.path)}: [{client.name}]: {_quoted(path)} has a client "
                        "of that name")
            return (f"{_quoted(file.path)}: [{client.name}] {what}: the same as [{name}] in "
                    f"{_quoted(path)}")
    return None


def load_server_settings(configdir: Path, overrides: Mapping[str, object]) -> ServerSettings:
    """mandos.conf's ``[DEFAULT]`` (other sections are ignored, as upstream) with the
    command-line ``overrides`` (option name -> value; None means not given) applied on top."""
    if not configdir.is_dir():
        # Upstream starts with no clients here; a mistyped --configdir deserves better.
        raise ConfigError(f"configuration directory {configdir} does not exist; check "
                          "--configdir")
    path = configdir / "mandos.conf"
    parser = configparser.ConfigParser(defaults=SERVER_DEFAULTS)
    source = _Source(path, configdir, _lines(parser, _read(parser, path) or ""))
    section = parser.default_section

    def text(key: str) -> str:
        # Upstream takes these from ``defaults()``: raw, without interpolation (the default
        # priority string contains a lone "%").
        value = parser.defaults()[key].strip()
        if "\0" in value:
            raise ConfigError(f"{source.where(DEFAULT, key)}: contains a NUL character")
        return value

    def integer(key: str) -> int | None:
        value = text(key)
        if not value:
            return None
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{source.where(DEFAULT, key)}: {value!r} is not a number") from None
        if number < 0:
            raise ConfigError(f"{source.where(DEFAULT, key)}: {value!r} is negative")
        return number

    values: dict[str, object] = {
        "configdir": configdir,
        "statedir": Path(text("statedir")),
        "interface": text("interface"),
        "address": text("address"),
        "port": integer("port"),
        "socket": integer("socket"),
        "priority": text("priority"),
        "servicename": text("servicename"),
        "debuglevel": text("debuglevel"),
        "etcd": text("etcd"),
        "etcd_prefix": text("etcd_prefix"),
        "metrics": text("metrics"),
    }
    for key in ("etcd_cacert", "etcd_cert", "etcd_key"):
        values[key] = Path(text(key)) if text(key) else None
    for key in ("debug", "use_dbus", "use_ipv6", "restore", "zeroconf"):
        values[key] = _boolean(parser, source, section, key)
    _boolean(parser, source, section, "foreground")  # checked as upstream; always the case
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
    level = str(values["debuglevel"]).upper()
    if level and level not in DEBUG_LEVELS:
        raise ConfigError(
            f"debuglevel {values['debuglevel']!r} is not one of {', '.join(DEBUG_LEVELS)}"
        )
    values["debuglevel"] = level
    port = values["port"]
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range 0-65535")
    return ServerSettings(**values)  # type: ignore[arg-type]
