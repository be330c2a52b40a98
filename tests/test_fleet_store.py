# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet's records, keys and settings (server/fleet_store.py), without etcd."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest

from server.config import ConfigError, ServerSettings
from server.fleet_store import FleetSettings, Record, Schema

T0 = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)
LATER = T0 + datetime.timedelta(seconds=1)


def enabled(value: bool, at: datetime.datetime, *, offline: bool = False) -> Record:
    return Record("enabled", "foo", "a:1", at, enabled=value, why="admin", offline=offline)


def test_the_newer_fact_wins() -> None:
    assert enabled(True, LATER).beats(enabled(False, T0))
    assert not enabled(True, T0).beats(enabled(False, LATER))
    assert enabled(False, LATER).beats(enabled(False, T0))
    assert not enabled(False, T0).beats(enabled(False, T0))  # the same: nothing to do
    assert enabled(False, T0).beats(None)


def test_a_disable_made_offline_beats_any_enable() -> None:
    offline = enabled(False, T0, offline=True)
    assert offline.beats(enabled(True, LATER))
    assert not enabled(True, LATER).beats(offline)
    # Among disables, and against an enable from before it, time decides as usual.
    assert enabled(False, LATER).beats(offline)


def test_records_round_trip_and_junk_is_ignored() -> None:
    for record in (enabled(False, T0, offline=True),
                   Record("checked", "foo", "a:1", T0, expires=LATER),
                   Record("secret-sent", "foo", "b:2", T0, expires=LATER),
                   Record("approval", "foo", "b:2", T0, approved=True)):
        assert Record.decode(record.kind, "foo", record.encode(), 7) == record
    for junk in (b"", b"[]", b"{}", b'{"at": 3, "server": "a"}', b'{"at": "x", "server": "a"}',
                 b"\xff"):
        assert Record.decode("enabled", "foo", junk) is None


def test_keys_both_ways() -> None:
    schema = Schema("/mandos/")
    key = schema.client_key("web/1 ü", "secret-sent")
    assert key == b"/mandos/clients/web%2F1%20%C3%BC/secret-sent"
    assert schema.parse(key) == ("client", "web/1 ü", "secret-sent")
    assert schema.parse(schema.server_key("host:1")) == ("server", "host:1", None)
    for other in (b"/mandos/clients/foo/other", b"/other/clients/foo/enabled", b"/mandos/x"):
        assert schema.parse(other) is None


def settings(**changes: object) -> ServerSettings:
    return dataclasses.replace(ServerSettings(), **changes)  # type: ignore[arg-type]


def test_settings(tmp_path: Path) -> None:
    assert FleetSettings.from_server(settings()) is None
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    fleet = FleetSettings.from_server(settings(
        etcd="https://10.0.0.1:2379, https://10.0.0.2:32379,10.0.0.3", etcd_cacert=ca))
    assert fleet is not None
    assert fleet.endpoints == ("10.0.0.1:2379", "10.0.0.2:32379", "10.0.0.3:2379")
    assert fleet.prefix == "/mandos/" and fleet.tls


@pytest.mark.parametrize(("changes", "words"), [
    ({"etcd": "https://10.0.0.1:2379"}, "needs etcd_cacert"),
    ({"etcd": "ftp://10.0.0.1"}, "not an etcd URL"),
    ({"etcd": "http://10.0.0.1/path"}, "not an etcd URL"),
    ({"etcd": " , "}, "no URL"),
    ({"etcd": "10.0.0.1", "etcd_prefix": "mandos"}, "must start and end with /"),
    ({"etcd": "10.0.0.1", "etcd_cacert": Path("/nonexistent")}, "not a readable file"),
])
def test_bad_settings_are_one_line_errors(changes: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        FleetSettings.from_server(settings(**changes))
