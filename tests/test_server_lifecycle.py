# SPDX-License-Identifier: GPL-3.0-or-later
"""A client's life in the running server: checkers and timeouts, the extended timeout after a
secret, restart with state restore, reload on SIGHUP, SIGTERM during an approval wait."""

from __future__ import annotations

import base64
import datetime
import json
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from peers.ours import OurServer, clients_conf, fetch, set_options
from peers.upstream import (
    kill_process_group,
    run_upstream_client,
    section_secret,
    upstream_client_argv,
)
from tests.conftest import Keys


def hand_section(keys: Keys, name: str = "foo", **options: str) -> str:
    """A section written by hand with foo's key id and blob."""
    secret = base64.b64encode(section_secret(keys.foo_section)).decode()
    lines = [f"[{name}]", f"key_id = {keys.foo.key_id.lower()}",
             f"secret = {secret[:40]}", f"    {secret[40:]}"]
    lines += [f"{key} = {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def test_successful_checker_keeps_client_enabled(keys: Keys) -> None:
    conf = clients_conf(hand_section(keys, interval="1s", timeout="2s"),
                        defaults="checker = /bin/true\n")
    with OurServer(conf) as server:
        assert server.journal is not None
        server.journal.wait_for("checker-succeeded", count=3, MANDOS_CLIENT="foo")
        assert not server.journal.find("client-expired")
        assert fetch(keys.foo, "127.0.0.1", server.port) == section_secret(keys.foo_section)
        state = json.loads((server.statedir / "clients.json").read_text())["clients"]["foo"]
        assert state["state"]["last_checker_status"] == 0
        assert state["state"]["last_checked_ok"] is not None


def test_failing_checker_expires_client_for_good(keys: Keys) -> None:
    """foo's checker fails: foo expires and stays disabled, with no checker of its own.  bar,
    whose checker runs at the same interval, is the clock: two more of its checkers mean two
    more intervals in which foo's would have run too (guards against checking, and so perhaps
    re-enabling, a disabled client), without sleeping and hoping."""
    bar = set_options(keys.bar_section, interval="1s", timeout="1h", checker="/bin/true")
    conf = clients_conf(hand_section(keys, interval="1s", timeout="1s"), bar,
                        defaults="checker = /bin/false\n")
    with OurServer(conf) as server:
        assert server.journal is not None
        failed = server.journal.wait_for("checker-failed", MANDOS_CLIENT="foo")
        assert failed[0]["MANDOS_STATUS"] == "1"
        server.journal.wait_for("client-expired", MANDOS_CLIENT="foo", timeout=5)
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""
        server.journal.wait_for("refused-disabled", MANDOS_CLIENT="foo")
        checkers = len(server.journal.find("checker-started", MANDOS_CLIENT="foo"))
        bars = len(server.journal.find("checker-started", MANDOS_CLIENT="bar"))
        server.journal.wait_for("checker-started", count=bars + 2, MANDOS_CLIENT="bar")
        assert len(server.journal.find("checker-started", MANDOS_CLIENT="foo")) == checkers
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""


def test_checker_expansion_is_shell_quoted(keys: Keys, tmp_path: Path) -> None:
    host = tmp_path / "it's a host"
    conf = clients_conf(hand_section(keys, interval="1s", host=str(host)),
                        defaults="checker = touch %%(host)s\n")
    with OurServer(conf) as server:
        assert server.journal is not None
        server.journal.wait_for("checker-succeeded", MANDOS_CLIENT="foo")
        assert host.exists()


@pytest.mark.slow
def test_extended_timeout_after_secret(keys: Keys) -> None:
    """Handing out the secret moves the expiry to extended_timeout (4 s) from then, not
    timeout (1 s): read from the saved state (the save is an inotify event), so no sleeping
    and hoping that the client is still enabled a while later.  It then expires for real."""
    conf = clients_conf(hand_section(keys, interval="1s", timeout="1s", extended_timeout="4s"),
                        defaults="checker = /bin/false\n")
    with OurServer(conf) as server, INotify() as watch:
        assert server.journal is not None
        watch.add_watch(str(server.statedir), flags.MOVED_TO)
        blob = section_secret(keys.foo_section)
        assert fetch(keys.foo, "127.0.0.1", server.port) == blob
        state: dict[str, str | None] = {"last_secret_sent": None}
        while state["last_secret_sent"] is None:
            assert watch.read(timeout=10_000), "the state file was never saved"
            saved = json.loads((server.statedir / "clients.json").read_text())
            state = saved["clients"]["foo"]["state"]
        sent, expires = (datetime.datetime.fromisoformat(str(state[key]))
                         for key in ("last_secret_sent", "expires"))
        assert datetime.timedelta(seconds=4) <= expires - sent < datetime.timedelta(seconds=5)
        server.journal.wait_for("client-expired", MANDOS_CLIENT="foo", timeout=15)
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""


def test_restart_restores_state(keys: Keys, tmp_path: Path) -> None:
    conf = clients_conf(hand_section(keys, interval="1s", timeout="1s"),
                        defaults="checker = /bin/false\n")
    blob = section_secret(keys.foo_section)
    server = OurServer(conf, directory=tmp_path)
    try:
        server.start()
        assert server.journal is not None
        server.journal.wait_for("client-expired", MANDOS_CLIENT="foo", timeout=5)
        assert server.stop() == 0
        saved = json.loads((server.statedir / "clients.json").read_text())
        assert saved["clients"]["foo"]["state"]["enabled"] is False
        assert (server.statedir / "clients.json").stat().st_mode & 0o777 == 0o600
        text = (server.statedir / "clients.json").read_text()
        assert base64.b64encode(blob)[:32].decode() not in text
        assert '"secret"' not in text

        # Same configuration: the client stays disabled across the restart.
        server.start()
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""
        server.journal.wait_for("refused-disabled", MANDOS_CLIENT="foo")
        assert server.stop() == 0

        # A setting changed in the file takes effect; an unchanged "enabled" keeps the state.
        server.write_clients(clients_conf(hand_section(keys, interval="1s", timeout="7s"),
                                          defaults="checker = /bin/false\n"))
        server.start()
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""
        assert server.stop() == 0
        saved = json.loads((server.statedir / "clients.json").read_text())
        assert saved["clients"]["foo"]["settings"]["timeout"] == 7.0

        # --no-restore starts from the configuration.
        server.extra_args.append("--no-restore")
        server.start()
        assert fetch(keys.foo, "127.0.0.1", server.port) == blob
        assert server.stop() == 0
    finally:
        server.close()


@pytest.mark.parametrize("damage", ["not JSON", "truncated", "a directory", "wrong format"])
def test_a_damaged_state_file_fails_closed(damage: str, keys: Keys, tmp_path: Path) -> None:
    """A damaged clients.json is kept aside, never overwritten, and every client starts
    disabled (a client that was disabled, e.g. a stolen machine, must not come back enabled
    after one bad byte); an admin's --enable brings one back."""
    server = OurServer(clients_conf(hand_section(keys)), directory=tmp_path)
    state = server.statedir / "clients.json"
    damaged: bytes | None = None
    try:
        server.start()
        assert server.stop() == 0
        good = state.read_bytes()
        if damage == "a directory":
            state.unlink()
            state.mkdir()
        else:
            damaged = {"not JSON": b"{not json", "truncated": good[:len(good) // 2],
                       "wrong format": b'{"format": 99}'}[damage]
            state.write_bytes(damaged)
        server.start()
        assert server.journal is not None
        problem = server.journal.wait_for("state-problem")
        assert "damaged" in problem[-1]["MESSAGE"] and problem[-1]["PRIORITY"] == "3"
        asides = list(server.statedir.glob("clients.json.damaged-*"))
        assert len(asides) == 1
        if damaged is not None:
            assert asides[0].read_bytes() == damaged  # kept as it was
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""  # disabled
        server.stop()
        saved = json.loads(state.read_text())
        assert saved["clients"]["foo"]["state"]["enabled"] is False
    finally:
        server.close()


def test_sighup_reloads_clients(keys: Keys) -> None:
    foo_blob = section_secret(keys.foo_section)
    bar_blob = section_secret(keys.bar_section)
    with OurServer(clients_conf(keys.foo_section)) as server:
        assert server.journal is not None
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""

        server.write_clients(clients_conf(keys.foo_section, keys.bar_section))
        server.signal(signal.SIGHUP)
        server.journal.wait_for("config-loaded", count=2)
        assert fetch(keys.bar, "127.0.0.1", server.port) == bar_blob

        broken = "[broken]\nkey_id = 00\nsecret = AAAA\ntimeout = soon\n"
        server.write_clients(clients_conf(keys.bar_section, broken))
        server.signal(signal.SIGHUP)
        failed = server.journal.wait_for("config-reload-failed")
        assert "[broken] timeout" in failed[0]["MESSAGE"]
        assert fetch(keys.foo, "127.0.0.1", server.port) == foo_blob

        server.write_clients(clients_conf(keys.bar_section))
        server.signal(signal.SIGHUP)
        server.journal.wait_for("config-loaded", count=3)
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""
        assert fetch(keys.bar, "127.0.0.1", server.port) == bar_blob
        assert server.stop() == 0


def test_sighup_keeps_connections_waiting_for_approval(keys: Keys) -> None:
    conf = clients_conf(set_options(keys.foo_section, approval_delay="PT2S"))
    with OurServer(conf) as server:
        assert server.journal is not None
        result: list[bytes] = []
        thread = threading.Thread(
            target=lambda: result.append(fetch(keys.foo, "127.0.0.1", server.port, 10)))
        thread.start()
        server.journal.wait_for("needs-approval")
        server.write_clients(conf + "\n")
        server.signal(signal.SIGHUP)
        server.journal.wait_for("config-loaded", count=2)
        thread.join(10)
        assert result == [section_secret(keys.foo_section)]


def test_sigterm_during_approval_wait(keys: Keys, tmp_path: Path) -> None:
    conf = clients_conf(set_options(keys.foo_section, approval_delay="PT60S"))
    with OurServer(conf) as server:
        assert server.journal is not None
        assert server.process is not None
        process = server.process
        client = subprocess.Popen(
            ["timeout", "20", *upstream_client_argv(keys.foo, server.connect, tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            server.journal.wait_for("needs-approval")
            process.send_signal(signal.SIGTERM)
            # Guards against upstream's deadlock (the request would hold the server for the
            # whole 60 s approval delay): generous, and still far below that delay.
            assert process.wait(30) == 0
            server.journal.wait_for("server-stopping")
        finally:
            kill_process_group(client)  # timeout and the mandos-client it runs
        assert client.stdout is not None
        assert client.stdout.read() == b""
        client.stdout.close()


def test_real_client_after_reload(keys: Keys) -> None:
    with OurServer(clients_conf(keys.bar_section)) as server:
        assert server.journal is not None
        server.write_clients(clients_conf(keys.foo_section, keys.bar_section))
        server.signal(signal.SIGHUP)
        server.journal.wait_for("config-loaded", count=2)
        result = run_upstream_client(keys.foo, server.connect, 20)
        assert result.stdout == keys.password
