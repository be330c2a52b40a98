# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet's shared state in etcd: the key schema, its records, and the etcd connection.

Keys, under the prefix (``--etcd-prefix``, default ``/mandos/``); a client's name is
percent-encoded, so that any section name makes one path element:

``servers/ID``
    one per live server, bound to that server's lease (it vanishes when the server dies);
``clients/NAME/enabled``
    enabled or disabled, by which server, why, when, and whether it was decided while that
    server was cut off from etcd (``offline``);
``clients/NAME/checked``
    the last successful check, by which server, and the expiry it set;
``clients/NAME/secret-sent``
    the last secret sent, by which server, and the expiry it set;
``clients/NAME/approval``
    the last approval or denial, by which server and when.

Each value is one small JSON object (a :class:`Record`).  Nothing here needs etcd's client
library (:mod:`server.fleet_etcd` has the connection), so the settings are checked at start-up
before it is imported.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from server.config import ConfigError, ServerSettings

Kind = Literal["enabled", "checked", "secret-sent", "approval"]
KINDS: tuple[Kind, ...] = ("enabled", "checked", "secret-sent", "approval")

@dataclass(frozen=True)
class FleetSettings:
    """Where etcd is and how to reach it."""

    endpoints: tuple[str, ...]  # host:port
    prefix: str
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def tls(self) -> bool:
        return self.cacert is not None

    @classmethod
    def from_server(cls, settings: ServerSettings) -> FleetSettings | None:
        """The fleet settings of ``mandos.conf`` and the command line; None without etcd."""
        if not settings.etcd:
            return None
        endpoints: list[str] = []
        schemes: set[str] = set()
        for url in settings.etcd.split(","):
            url = url.strip()
            if not url:
                continue
            parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
            if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path:
                raise ConfigError(f"etcd: {url!r} is not an etcd URL like "
                                  "https://192.0.2.1:2379")
            schemes.add(parsed.scheme)
            endpoints.append(f"{parsed.hostname}:{parsed.port or 2379}")
        if not endpoints:
            raise ConfigError("etcd: no URL given")
        files = {name: getattr(settings, f"etcd_{name}") for name in ("cacert", "cert", "key")}
        for name, path in files.items():
            if path is not None:
                _check_readable(f"etcd_{name}", Path(path))
        if "https" in schemes and files["cacert"] is None:
            raise ConfigError("etcd: https:// needs etcd_cacert (the CA of the etcd cluster)")
        if (files["cert"] is None) != (files["key"] is None):
            raise ConfigError("etcd: give both etcd_cert and etcd_key, or neither")
        if importlib.util.find_spec("etcd3aio") is None:
            raise ConfigError("etcd: the etcd client (the Python package etcd3aio, with grpcio "
                              "and protobuf) is not installed: apt install mandos-server-etcd, "
                              "or pip install etcd3aio")
        prefix = settings.etcd_prefix
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ConfigError(f"etcd_prefix: {prefix!r} must start and end with /")
        return cls(tuple(endpoints), prefix, files["cacert"], files["cert"], files["key"])


def _check_readable(option: str, path: Path) -> None:
    """Open ``path`` as the server's user does, so that a key readable by root alone stops the
    start with one line (and not the fleet's first connection, after the server started)."""
    if not path.is_file():
        raise ConfigError(f"{option}: {path} is not a readable file")
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise ConfigError(f"{option}: cannot read {path} ({error.strerror}): the server's "
                          "user (mandos.service: _mandos) must be able to read it") from None


def _time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    when = datetime.datetime.fromisoformat(value)
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


@dataclass(frozen=True, slots=True)
class Record:
    """One client fact in etcd.  ``at`` orders the facts of one kind: the newer one holds,
    except that a disable made while cut off from etcd (``offline``) beats an enable."""

    kind: Kind
    client: str
    server: str
    at: datetime.datetime
    enabled: bool = False  # kind "enabled"
    why: str = ""  # kind "enabled"
    offline: bool = False  # kind "enabled"
    expires: datetime.datetime | None = None  # kinds "checked" and "secret-sent"
    approved: bool = False  # kind "approval"
    revision: int = field(default=0, compare=False)  # etcd's mod_revision, 0 if local

    def encode(self) -> bytes:
        data: dict[str, object] = {"server": self.server, "at": self.at.isoformat()}
        if self.kind == "enabled":
            data.update(enabled=self.enabled, why=self.why, offline=self.offline)
        elif self.kind == "approval":
            data["approved"] = self.approved
        elif self.expires is not None:
            data["expires"] = self.expires.isoformat()
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, kind: Kind, client: str, value: bytes, revision: int = 0) -> Record | None:
        """The record, or None when the value is not one (written by something else)."""
        try:
            data = json.loads(value)
            at = _time(data["at"])
            if at is None or not isinstance(data.get("server"), str):
                return None
            return cls(kind, client, data["server"], at, enabled=data.get("enabled") is True,
                       why=str(data.get("why", "")), offline=data.get("offline") is True,
                       expires=_time(data.get("expires")), approved=data.get("approved") is True,
                       revision=revision)
        except (ValueError, KeyError, TypeError):
            return None

    def beats(self, other: Record | None) -> bool:
        """Whether this record should replace ``other`` (the one held so far)."""
        if other is None:
            return True
        if self.kind == "enabled" and self.enabled != other.enabled:
            disable = other if self.enabled else self
            if disable.offline:
                return disable is self
        return self.at > other.at


class Schema:
    """Keys under a prefix, both ways."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.servers = f"{prefix}servers/"

    def client_key(self, name: str, kind: Kind) -> bytes:
        return f"{self.prefix}clients/{urllib.parse.quote(name, safe='')}/{kind}".encode()

    def server_key(self, server_id: str) -> bytes:
        return f"{self.servers}{urllib.parse.quote(server_id, safe='')}".encode()

    def parse(self, key: bytes) -> tuple[str, str, Kind | None] | None:
        """``("server", id, None)``, ``("client", name, kind)``, or None for other keys."""
        text = key.decode("utf-8", "replace")
        if not text.startswith(self.prefix):
            return None
        parts = text[len(self.prefix):].split("/")
        if len(parts) == 2 and parts[0] == "servers":
            return "server", urllib.parse.unquote(parts[1]), None
        if len(parts) == 3 and parts[0] == "clients":
            for kind in KINDS:
                if parts[2] == kind:
                    return "client", urllib.parse.unquote(parts[1]), kind
        return None


@dataclass(frozen=True, slots=True)
class Change:
    """One key changed in etcd: its new value, or None when it was deleted."""

    key: bytes
    value: bytes | None
    revision: int
