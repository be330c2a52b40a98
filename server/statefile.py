# SPDX-License-Identifier: GPL-3.0-or-later
"""The state file: what must survive a restart, as JSON in the state directory.

``<statedir>/clients.json`` (mode 0600) holds, per client, its :class:`ClientState`, the
settings in force and the configuration as it was read, so that at the next start the merge
can tell which settings were changed in the file since, by upstream's merge rules (its server
restores its own ``clients.pickle`` the same way):

* clients no longer in the configuration are dropped, new ones start from the configuration;
* a setting whose configured value changed since the last run takes the configured value,
  otherwise the saved value (perhaps changed at run time) wins
  (:func:`server.clients.settings_in_force`, which a reload uses too);
* an enabled client whose ``expires`` has passed stays enabled (``expires = now + timeout``)
  only if its last checker succeeded; otherwise it is disabled with a warning.

The secret is not stored: the configuration has it.  Writes are atomic (a temporary file in
the same directory, fsync, rename, fsync of the directory: :mod:`mandos_protocol.durable`).
A damaged file (unreadable, not JSON, not our format) fails closed: it is moved aside to
``clients.json.damaged-<time>``, never overwritten, and every client starts *disabled* until
an admin enables it (``mandos-ctl --enable``).  Starting from the configuration instead would
enable every client, also one that was disabled because its checker failed (a stolen machine),
after one bad byte.  If the file cannot be moved aside, the server refuses to start.

Durability trade-off: the server does not write the file on every change.  During a reboot
storm every secret sent changes a client's state, and one fsync per unlock would cost more than
the unlock itself and stall the event loop.  So a change schedules *one* write a short while
later (the daemon's ``SAVE_DELAY``, 0.5 s), which covers every change made in the meantime; the
snapshot is taken on the event loop (:meth:`StateFile.document`, consistent) and written by a
worker thread (:meth:`StateFile.write`, so that the loop never waits for the disk); SIGTERM and
SIGINT flush the latest state before the server exits.  What a crash, SIGKILL or power loss can
lose is therefore the changes of the last half second: at most a ``last_secret_sent`` or
``last_checked_ok`` timestamp and an extended expiry, which the next checker or request restores.
Upstream Mandos saves its state only when it stops, so this is never less durable than upstream.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mandos_protocol import durable
from server.clients import Client, ClientState, settings_in_force, utcnow
from server.config import ClientConfig, ConfigError

FILENAME = "clients.json"
FORMAT = 1

#: ClientConfig fields that are stored and merged (not the name, which is the key, nor the
#: secret, which only the configuration holds).
SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(ClientConfig)
                       if f.name not in ("name", "secret"))


class StateError(Exception):
    """The state file cannot be used; the message says why (it is logged, never fatal)."""


def _encode(value: object) -> object:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


def settings_to_json(settings: ClientConfig) -> dict[str, object]:
    return {name: _encode(getattr(settings, name)) for name in SETTING_FIELDS}


def state_to_json(state: ClientState) -> dict[str, object]:
    return {f.name: _encode(getattr(state, f.name)) for f in dataclasses.fields(state)}


def _decode_settings(data: Mapping[str, Any], base: ClientConfig) -> dict[str, object]:
    """Saved setting values, typed like those of ``base``; unknown or ill-typed ones skipped."""
    values: dict[str, object] = {}
    for name in SETTING_FIELDS:
        if name not in data:
            continue
        current, saved = getattr(base, name), data[name]
        if isinstance(current, datetime.timedelta) and isinstance(saved, int | float):
            values[name] = datetime.timedelta(seconds=saved)
        elif type(current) is type(saved):
            values[name] = saved
    return values


def _saved_settings(data: Mapping[str, Any], config: ClientConfig) -> ClientConfig:
    """Saved settings (JSON form) as a ClientConfig; what is not saved (the secret) or cannot
    be used is taken from ``config``."""
    return dataclasses.replace(config, **_decode_settings(data, config))  # type: ignore[arg-type]


def _datetime(value: object) -> datetime.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StateError(f"bad timestamp {value!r}")
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise StateError(f"bad timestamp {value!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when


def _decode_state(data: Mapping[str, Any]) -> ClientState:
    try:
        created = _datetime(data["created"])
        status = data.get("last_checker_status", -2)
        if created is None or not isinstance(status, int) or not isinstance(data["enabled"],
                                                                            bool):
            raise StateError("bad client state")
        return ClientState(
            enabled=data["enabled"],
            created=created,
            last_enabled=_datetime(data.get("last_enabled")),
            expires=_datetime(data.get("expires")),
            last_checked_ok=_datetime(data.get("last_checked_ok")),
            last_checker_status=status,
            last_approval_request=_datetime(data.get("last_approval_request")),
            last_secret_sent=_datetime(data.get("last_secret_sent")),
        )
    except (KeyError, TypeError, AttributeError):
        raise StateError("bad client state") from None


@dataclass(frozen=True)
class SavedClient:
    """One client as the state file has it."""

    config: Mapping[str, Any]  # the configuration as read when saved (JSON form)
    settings: Mapping[str, Any]  # the settings in force when saved (JSON form)
    state: ClientState


@dataclass(frozen=True)
class Restored:
    """One client to create: its settings in force and its state."""

    settings: ClientConfig
    state: ClientState


class StateFile:
    """Load, merge and save ``<statedir>/clients.json``."""

    def __init__(self, directory: Path, warn: Callable[[str], None]) -> None:
        self.directory = directory
        self.path = directory / FILENAME
        self.warn = warn
        #: Why the file could not be used, if it was damaged: every client starts disabled.
        self.damage: str | None = None

    def remove_leftovers(self) -> int:
        """Remove the temporary files that a server killed while writing left (only one
        server uses a state directory); returns how many."""
        return durable.remove_leftovers(self.path)

    def load(self) -> dict[str, SavedClient]:
        """The saved clients; {} if there is no file.  A damaged file is moved aside and
        :attr:`damage` says why (:meth:`restore` then disables every client);
        :class:`ConfigError` if it cannot be moved aside."""
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise StateError("unknown format")
            clients = data["clients"]
            if not isinstance(clients, dict):
                raise StateError("no clients")
            return {
                name: SavedClient(config=dict(entry["config"]), settings=dict(entry["settings"]),
                                  state=_decode_state(entry["state"]))
                for name, entry in clients.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StateError) as error:
            reason = (error.strerror if isinstance(error, OSError) else None) or str(error)
            aside = self.path.with_name(
                f"{FILENAME}.damaged-{utcnow().strftime('%Y%m%dT%H%M%SZ')}")
            try:
                os.replace(self.path, aside)
            except OSError as move_error:
                raise ConfigError(
                    f"state file {self.path} is damaged ({reason}) and cannot be moved aside "
                    f"({move_error.strerror}); move it away (or fix it) and start again") \
                    from None
            self.damage = (f"State file {self.path} is damaged ({reason}); moved it to "
                           f"{aside}; every client starts disabled until an admin enables it")
            return {}

    def restore(self, configs: Mapping[str, ClientConfig], saved: Mapping[str, SavedClient],
                now: datetime.datetime) -> dict[str, Restored]:
        """Merge the configuration with the saved state (see the module docstring)."""
        result: dict[str, Restored] = {}
        for name, config in configs.items():
            entry = saved.get(name)
            if entry is None and self.damage is not None:  # fail closed
                state = fresh_state(config, now)
                state.enabled, state.expires, state.last_enabled = False, None, None
                result[name] = Restored(config, state)
                continue
            if entry is None:
                result[name] = Restored(config, fresh_state(config, now))
                continue
            was = _saved_settings(entry.config, config)
            settings, _ = settings_in_force(_saved_settings(entry.settings, config), was, config)
            state = dataclasses.replace(entry.state)
            if was.enabled != config.enabled:
                state.enabled = config.enabled
                state.expires = now + config.timeout if config.enabled else None
            if state.enabled and (state.expires is None or state.expires <= now):
                if state.last_checked_ok is None:
                    self.warn(f"Disabling client {name}: it never had a successful checker")
                    state.enabled, state.expires = False, None
                elif state.last_checker_status != 0:
                    self.warn(f"Disabling client {name}: its last checker failed with status "
                              f"{state.last_checker_status}")
                    state.enabled, state.expires = False, None
                else:
                    state.expires = now + settings.timeout
            result[name] = Restored(settings, state)
        return result

    def save(self, clients: Iterable[Client], configs: Mapping[str, ClientConfig]) -> None:
        """Write the file atomically now; ``configs`` is the configuration as last read."""
        self.write(self.document(clients, configs))

    @staticmethod
    def document(clients: Iterable[Client],
                 configs: Mapping[str, ClientConfig]) -> dict[str, object]:
        """What :meth:`write` writes, as new JSON-ready objects: a snapshot that later changes
        to the clients do not touch, so it can be written from another thread."""
        return {
            "format": FORMAT,
            "clients": {
                client.name: {
                    "config": settings_to_json(configs[client.name]),
                    "settings": settings_to_json(client.settings),
                    "state": state_to_json(client.state),
                }
                for client in clients if client.name in configs
            },
        }

    def write(self, document: Mapping[str, object]) -> None:
        """Write a :meth:`document` atomically (blocking: temporary file, fsync, rename, fsync
        of the directory)."""
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        durable.replace(self.path, data, 0o600)


def fresh_state(config: ClientConfig, now: datetime.datetime) -> ClientState:
    """The state of a client that the state file does not know."""
    return ClientState(
        enabled=config.enabled,
        created=now,
        last_enabled=now if config.enabled else None,
        expires=now + config.timeout if config.enabled else None,
    )
