"""mandos.conf and clients.conf, read as upstream Mandos 1.8 reads them.

Both are ConfigParser files with ``[DEFAULT]``, ``%(key)s`` interpolation and indented
continuation lines.  ``mandos.conf`` uses only ``[DEFAULT]`` (command-line options override it);
``clients.conf`` has one section per client.  We accept every file upstream accepts, with one
deliberate difference: a section without ``fingerprint`` is fine here (upstream crashes with a
KeyError although its manual says ``key_id`` is enough).  Where upstream would crash or silently
misbehave on bad input (an unparseable duration, bad base64, no secret, two clients with the
same key id) we raise :class:`ConfigError` naming the file, the section and the key.

A relative ``secfile`` is taken relative to the configuration directory (upstream takes it
relative to its working directory, which is ``/`` for a daemon).
"""

from __future__ import annotations

import base64
import binascii
import configparser
import datetime
import os
from collections.abc import Mapping
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
}

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
    foreground: bool = False
    zeroconf: bool = True

    @property
    def clients_conf(self) -> Path:
        return self.configdir / "clients.conf"


def _read(parser: configparser.ConfigParser, path: Path) -> None:
    """Read ``path`` into ``parser`` if it exists (upstream ignores a missing file)."""
    try:
        with open(path, encoding="utf-8") as stream:
            parser.read_file(stream, source=str(path))
    except FileNotFoundError:
        return
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except configparser.Error as error:
        raise ConfigError(f"{path}: {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _quoted(path: Path) -> str:
    """A file name for a one-line message: as it is, unless it holds a line break or other
    unprintable characters (a continuation line in the file can put one first)."""
    return str(path) if str(path).isprintable() else repr(str(path))


def _get(parser: configparser.ConfigParser, path: Path, section: str, key: str) -> str:
    """An interpolated value, with interpolation errors named precisely (but never quoting
    the ``secret``: configparser's messages quote the raw value), and without NUL characters
    (no file name, host or command can hold one: open() and exec() raise ValueError)."""
    try:
        value = parser.get(section, key)
    except configparser.Error as error:
        detail = ("cannot expand a % in it (write %% for a literal %)" if key == "secret"
                  else _one_line(error))
        raise ConfigError(f"{path}: [{section}] {key}: {detail}") from None
    if "\0" in value:
        raise ConfigError(f"{path}: [{section}] {key}: contains a NUL character")
    return value


def _boolean(parser: configparser.ConfigParser, path: Path, section: str, key: str) -> bool:
    value = _get(parser, path, section, key)
    try:
        return parser.BOOLEAN_STATES[value.lower()]
    except KeyError:
        raise ConfigError(
            f"{path}: [{section}] {key}: {value!r} is not a boolean (use yes/no, true/false, "
            "on/off or 1/0)"
        ) from None


def _duration(parser: configparser.ConfigParser, path: Path, section: str,
              key: str) -> datetime.timedelta:
    value = _get(parser, path, section, key)
    try:
        delta = parse_duration(value)
    except ProtocolError as error:
        raise ConfigError(f"{path}: [{section}] {key}: {error}") from None
    if delta < datetime.timedelta(0):
        raise ConfigError(f"{path}: [{section}] {key}: {value!r} is negative")
    return delta


def _checker(parser: configparser.ConfigParser, path: Path, section: str) -> str:
    command = _get(parser, path, section, "checker")
    try:
        refuse_quoted_expansion(command)
    except ExpansionError as error:
        raise ConfigError(f"{path}: [{section}] checker: {error}") from None
    return command


def _secret(parser: configparser.ConfigParser, path: Path, section: str) -> bytes:
    """The blob: base64 ``secret`` (may span indented lines) or the raw contents of
    ``secfile``."""
    if parser.has_option(section, "secret"):
        text = "".join(_get(parser, path, section, "secret").split())
        try:
            secret = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{path}: [{section}] secret: not valid base64") from None
        if not secret:
            raise ConfigError(f"{path}: [{section}] secret: empty")
        return secret
    if parser.has_option(section, "secfile"):
        name = os.path.expanduser(os.path.expandvars(_get(parser, path, section, "secfile")))
        secfile = path.parent / name
        try:
            secret = secfile.read_bytes()
        except OSError as error:
            raise ConfigError(
                f"{path}: [{section}] secfile: cannot read {_quoted(secfile)}: {error.strerror}"
            ) from None
        if not secret:
            raise ConfigError(f"{path}: [{section}] secfile: {_quoted(secfile)} is empty")
        return secret
    raise ConfigError(f"{path}: [{section}] secret: missing (give secret or secfile)")


def _hex_id(parser: configparser.ConfigParser, path: Path, section: str, key: str) -> str:
    if not parser.has_option(section, key):
        return ""
    value = normalize_key_id(_get(parser, path, section, key))
    if value and any(c not in "0123456789ABCDEF" for c in value):
        raise ConfigError(f"{path}: [{section}] {key}: {value!r} is not hexadecimal")
    return value


def parse_client(parser: configparser.ConfigParser, path: Path, name: str) -> ClientConfig:
    """One section as a :class:`ClientConfig`."""
    key_id = _hex_id(parser, path, name, "key_id")
    fingerprint = _hex_id(parser, path, name, "fingerprint")
    if key_id == EMPTY_KEY_ID:
        raise ConfigError(f"{path}: [{name}] key_id: this is the key id of an empty key")
    if not key_id and not fingerprint:
        raise ConfigError(f"{path}: [{name}] key_id: missing (give key_id or fingerprint)")
    return ClientConfig(
        name=name,
        key_id=key_id,
        fingerprint=fingerprint,
        secret=_secret(parser, path, name),
        host=_get(parser, path, name, "host"),
        timeout=_duration(parser, path, name, "timeout"),
        extended_timeout=_duration(parser, path, name, "extended_timeout"),
        interval=_duration(parser, path, name, "interval"),
        checker=_checker(parser, path, name),
        approved_by_default=_boolean(parser, path, name, "approved_by_default"),
        approval_delay=_duration(parser, path, name, "approval_delay"),
        approval_duration=_duration(parser, path, name, "approval_duration"),
        enabled=_boolean(parser, path, name, "enabled"),
    )


def load_clients(path: Path) -> dict[str, ClientConfig]:
    """Parse clients.conf into client configs by name, in file order.  A missing file means
    no clients, as upstream."""
    parser = configparser.ConfigParser(defaults=CLIENT_DEFAULTS)
    _read(parser, path)
    clients: dict[str, ClientConfig] = {}
    seen: dict[str, str] = {}
    for name in parser.sections():
        client = parse_client(parser, path, name)
        for key, value in (("key_id", client.key_id), ("fingerprint", client.fingerprint)):
            if not value:
                continue
            other = seen.get(f"{key}:{value}")
            if other is not None:
                raise ConfigError(f"{path}: [{name}] {key}: the same as in [{other}]")
            seen[f"{key}:{value}"] = name
        clients[name] = client
    return clients


def load_server_settings(configdir: Path, overrides: Mapping[str, object]) -> ServerSettings:
    """mandos.conf's ``[DEFAULT]`` (other sections are ignored, as upstream) with the
    command-line ``overrides`` (option name -> value; None means not given) applied on top."""
    if not configdir.is_dir():
        # Upstream starts with no clients here; a mistyped --configdir deserves better.
        raise ConfigError(f"configuration directory {configdir} does not exist; check "
                          "--configdir")
    path = configdir / "mandos.conf"
    parser = configparser.ConfigParser(defaults=SERVER_DEFAULTS)
    _read(parser, path)
    section = parser.default_section

    def text(key: str) -> str:
        # Upstream takes these from ``defaults()``: raw, without interpolation (the default
        # priority string contains a lone "%").
        value = parser.defaults()[key].strip()
        if "\0" in value:
            raise ConfigError(f"{path}: [DEFAULT] {key}: contains a NUL character")
        return value

    def integer(key: str) -> int | None:
        value = text(key)
        if not value:
            return None
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{path}: [DEFAULT] {key}: {value!r} is not a number") from None
        if number < 0:
            raise ConfigError(f"{path}: [DEFAULT] {key}: {value!r} is negative")
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
    }
    for key in ("debug", "use_dbus", "use_ipv6", "restore", "foreground", "zeroconf"):
        values[key] = _boolean(parser, path, section, key)
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
    settings = ServerSettings(**values)  # type: ignore[arg-type]
    if settings.debug:
        settings = ServerSettings(**{**values, "foreground": True})  # type: ignore[arg-type]
    return settings
