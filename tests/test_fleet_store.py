# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet's records, keys and settings (server/fleet_store.py), without etcd."""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peers.ours import REPO
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


#: Run as root without the capabilities that bypass file permissions: the settings with a
#: client key that only its owner (not root) can read.
UNREADABLE_KEY = """
import dataclasses, sys
from server.config import ConfigError, ServerSettings
from server.fleet_store import FleetSettings
try:
    FleetSettings.from_server(dataclasses.replace(
        ServerSettings(), etcd="10.0.0.1", etcd_cert=sys.argv[1], etcd_key=sys.argv[2]))
except ConfigError as error:
    print(error)
"""


@pytest.mark.peers  # root, to drop its capabilities
def test_a_key_the_server_cannot_read_stops_the_start(tmp_path: Path) -> None:
    """Checked as the server's user would read it: a key that user cannot read (an admin's
    0600 root:root key when the service runs as _mandos) is one line at start-up, not a
    failure later when the fleet first connects."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    key.chmod(0o600)
    os.chown(key, 65534, 65534)  # nobody's, so that root without CAP_DAC_* cannot read it
    result = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
         UNREADABLE_KEY, str(cert), str(key)],
        capture_output=True, text=True, check=False, cwd=REPO, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout == (f"etcd_key: cannot read {key} (Permission denied): the server's "
                             "user (mandos.service: _mandos) must be able to read it\n"), result
