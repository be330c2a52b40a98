# SPDX-License-Identifier: GPL-3.0-or-later
"""``--metrics``: a real Prometheus (Debian's) scrapes our server during a short storm and counts
what the test did; ``promtool check metrics`` accepts the exposition; ``/healthz`` follows the
state directory going read-only and writable again, and etcd going away and coming back; the
series stay bounded by the configured clients; a silent scraper delays no unlock."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from peers.etcd import EtcdCluster
from peers.mounts import remount, tmpfs
from peers.ours import SERVER, OurServer, clients_conf, fetch, set_options
from peers.prometheus import Prometheus, promtool_check_metrics
from peers.upstream import free_port, section_secret
from server.daemon import SAVE_RETRY
from server.http_endpoint import MAX_CONNECTIONS, READ_DEADLINE
from tests.conftest import Keys
from tests.test_metrics_contrib import DASHBOARD, RULES

UNLOCKS = 40
UNKNOWN = 7
#: Series that the storm test's server does not export.
OPTIONAL_SERIES = ("mandos_etcd_in_sync", "mandos_client_last_checked_ok_timestamp_seconds")


def _get(port: int, path: str, accept: str = "") -> tuple[int, str, bytes]:
    """(status, content type, body) of GET ``path`` on the metrics endpoint."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), str(response.headers["Content-Type"]), response.read()
    except urllib.error.HTTPError as error:
        return error.code, str(error.headers["Content-Type"]), error.read()


def _sample(exposition: bytes, series: str) -> float | None:
    """The value of ``series`` (name and labels exactly as exposed) in a text exposition."""
    for line in exposition.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return None


def _own_listening_ports(pid: int) -> set[int]:
    """The TCP ports that process ``pid`` itself listens on (its sockets' inodes in the
    namespace's LISTEN entries)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _metrics_server(sections: list[str], directory: Path | None = None) -> tuple[OurServer, int]:
    port = free_port()
    return OurServer(clients_conf(*sections), directory=directory,
                     extra_args=["--metrics", f"127.0.0.1:{port}"]), port


def test_prometheus_counts_the_unlocks_and_unknown_keys_of_a_storm(keys: Keys) -> None:
    """Prometheus scrapes every second while 40 unlocks and 7 unknown-key attempts run eight
    at a time; its query API then says 40 and 7, the alert for unknown keys fires, and every
    query of the Grafana dashboard evaluates on what it scraped, most to some series."""
    blob = section_secret(keys.foo_section)
    server, port = _metrics_server([set_options(keys.foo_section, interval="1h",
                                                timeout="3h", extended_timeout="3h")])
    with server, Prometheus([f"127.0.0.1:{port}"], rule_files=[RULES]) as prometheus:
        prometheus.wait_for('up{job="mandos"}', 1)
        attempts = [keys.foo] * UNLOCKS + [keys.bar] * UNKNOWN
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda k: fetch(k, "127.0.0.1", server.port), attempts))
        assert got.count(blob) == UNLOCKS and got.count(b"") == UNKNOWN
        prometheus.wait_for('mandos_secrets_sent_total{client="foo"}', UNLOCKS)
        prometheus.wait_for('mandos_refusals_total{reason="unknown_key"}', UNKNOWN)
        prometheus.wait_for('sum(mandos_refusals_total)', UNKNOWN)
        prometheus.wait_for('mandos_clients{state="enabled"}', 1)
        prometheus.wait_for("mandos_connections_open", 0)
        prometheus.wait_firing("MandosUnknownKeysKnocking")
        assert "MandosClientExpiringSoon" not in prometheus.firing()
        for expression in re.findall(r'"expr": "((?:[^"\\]|\\.)*)"', DASHBOARD.read_text()):
            query = (expression.encode().decode("unicode_escape")
                     .replace("$__rate_interval", "1m").replace("$job", ".*")
                     .replace("$instance", ".*"))
            result = prometheus.query(query)  # evaluates: raises on an error
            # Each panel shows something, but etcd's (no --etcd here) and the last check's
            # (no checker has run yet).
            assert result or any(name in query for name in OPTIONAL_SERIES), query


def test_promtool_accepts_the_exposition_and_openmetrics_is_offered(keys: Keys) -> None:
    server, port = _metrics_server([keys.foo_section, keys.bar_section])
    with server:
        fetch(keys.foo, "127.0.0.1", server.port)
        status, content_type, text = _get(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        result = promtool_check_metrics(text)
        assert result.returncode == 0, result.stdout + result.stderr
        assert _sample(text, 'mandos_secrets_sent_total{client="foo"}') == 1
        assert _sample(text, 'mandos_secrets_sent_total{client="bar"}') == 0
        status, content_type, openmetrics = _get(
            port, "/metrics", "application/openmetrics-text; version=1.0.0")
        assert status == 200 and content_type.startswith("application/openmetrics-text")
        assert openmetrics.count(b"# EOF\n") == 1 and openmetrics.endswith(b"# EOF\n")
        families = {family.name: family for family in
                    text_string_to_metric_families(openmetrics.decode())}  # raises if invalid
        assert families["mandos_secrets_sent"].type == "counter"
        assert len(families["mandos_secrets_sent"].samples) == 2
        assert _get(port, "/nothing")[0] == 404
        # The journal says where the metrics are, in the server-started entry.
        assert server.journal is not None
        started = server.journal.wait_for("server-started")[0]["MESSAGE"]
        assert f"metrics and health at http://127.0.0.1:{port}/" in started


def test_series_are_bounded_by_the_configured_clients(keys: Keys) -> None:
    """An unknown key adds no series (its key id appears nowhere); a client removed from
    clients.conf loses its series at the reload."""
    server, port = _metrics_server([keys.foo_section, keys.bar_section])
    with server:
        before = _get(port, "/metrics")[2]
        for _ in range(3):
            assert fetch(keys.foo, "127.0.0.1", server.port)
        assert b'client="bar"' in before
        server.write_clients(clients_conf(keys.foo_section))
        server.signal(signal.SIGHUP)
        assert server.journal is not None
        server.journal.wait_for("config-loaded", count=2)
        after = _get(port, "/metrics")[2]
        assert b'client="bar"' not in after
        assert _sample(after, 'mandos_secrets_sent_total{client="foo"}') == 3
        # bar's key is unknown now: counted under a fixed reason, never as a label.
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""
        unknown = _get(port, "/metrics")[2]
        assert _sample(unknown, 'mandos_refusals_total{reason="unknown_key"}') == 1
        key_id = server.journal.wait_for("client-not-found")[0]["MANDOS_KEY_ID"]
        assert key_id.encode() not in unknown and key_id.lower().encode() not in unknown
        assert len(unknown.splitlines()) == len(after.splitlines())


def test_healthz_follows_the_state_directory(keys: Keys, tmp_path: Path) -> None:
    """200 while serving with a writable state directory; 503 with the reason once it is
    read-only (unlocks go on); 200 again once a write succeeds after it is writable again."""
    blob = section_secret(keys.foo_section)
    server, port = _metrics_server([set_options(keys.foo_section, interval="1h")], tmp_path)
    with tmpfs(server.statedir, "256k"):
        try:
            server.start()
            assert _get(port, "/healthz")[::2] == (200, b"ok\n")
            remount(server.statedir, read_only=True)
            status, _, reason = _get(port, "/healthz")
            assert status == 503
            # Said by access(2), or by a write of the start-up's changes that came first.
            assert reason in (
                f"state directory {server.statedir} is not writable\n".encode(),
                f"cannot save the state in {server.statedir / 'clients.json'}: Read-only file "
                "system\n".encode()), reason
            assert fetch(keys.foo, "127.0.0.1", server.port) == blob
            assert server.journal is not None
            server.journal.wait_for("state-problem")  # the write the unlock asked for failed
            text = _get(port, "/metrics")[2]
            assert _sample(text, "mandos_state_writable") == 0
            assert _sample(text, "mandos_state_write_failures_total") == 1
            remount(server.statedir, read_only=False)
            status, _, reason = _get(port, "/healthz")  # the failed write is not retried yet
            assert status == 503 and b"Read-only file system" in reason, reason
            server.journal.wait_for("state-problem", count=2, timeout=SAVE_RETRY + 3)
            assert _get(port, "/healthz")[::2] == (200, b"ok\n")
            assert _sample(_get(port, "/metrics")[2], "mandos_state_writable") == 1
            assert server.stop() == 0
        finally:
            server.close()


def test_silent_scrapers_delay_no_unlock(keys: Keys) -> None:
    """More silent connections than the endpoint serves at once, and one that sends half a
    request: unlocks go on, and the endpoint answers again after the read deadline."""
    blob = section_secret(keys.foo_section)
    server, port = _metrics_server([keys.foo_section])
    silent: list[socket.socket] = []
    with server:
        try:
            for _ in range(MAX_CONNECTIONS + 4):
                silent.append(socket.create_connection(("127.0.0.1", port)))
            silent[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x")
            for _ in range(5):
                assert fetch(keys.foo, "127.0.0.1", server.port) == blob
            # The endpoint closes each silent one at its deadline (nothing is sent to it).
            for sock in silent:
                sock.settimeout(READ_DEADLINE + 5)
                assert sock.recv(1) == b""
            assert _get(port, "/healthz")[0] == 200
        finally:
            for sock in silent:
                sock.close()


def _start_failure(directory: Path, metrics: str) -> str:
    """Start the server with ``--metrics=metrics``, which must fail: its stderr."""
    (directory / "clients.conf").write_text("")
    result = subprocess.run(
        [*SERVER, f"--configdir={directory}", f"--statedir={directory}", "--no-dbus",
         "--no-zeroconf", "--port=0", f"--metrics={metrics}"],
        capture_output=True, text=True, timeout=30, check=False,
        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent),
             "MANDOS_JOURNAL_SOCKET": str(directory / "none")})
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize("value", ["host", "::1:9120", "127.0.0.1:0", "127.0.0.1:70000"])
def test_a_bad_metrics_address_is_one_line_and_exit_1(tmp_path: Path, value: str) -> None:
    assert _start_failure(tmp_path, value).startswith(f"mandos-server: metrics {value!r}:")


def test_a_metrics_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _start_failure(tmp_path, str(port)) == (
            f"mandos-server: metrics: cannot listen on 127.0.0.1 port {port}: "
            "Address already in use\n")


def test_metrics_are_off_by_default(keys: Keys) -> None:
    """Without --metrics nothing listens but the Mandos port, and prometheus-client is not
    even imported."""
    with OurServer(clients_conf(keys.foo_section)) as server:
        assert server.process is not None
        assert _own_listening_ports(server.process.pid) == {server.port}
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, server.cli, server.daemon; "
         "print('prometheus_client' in sys.modules)"],
        capture_output=True, text=True, timeout=30, check=True,
        cwd=Path(__file__).resolve().parent.parent)
    assert probe.stdout.strip() == "False"


def _wait_health(port: int, status: int, timeout: float = 30.0) -> bytes:
    """Wait until /healthz answers ``status`` (the fleet sync notices etcd on its own
    schedule); the body then."""
    deadline = time.monotonic() + timeout
    while True:
        seen, _, body = _get(port, "/healthz")
        if seen == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz is {seen} {body!r}, not {status}, after {timeout} s")
        time.sleep(0.1)


def test_healthz_and_metrics_follow_etcd(keys: Keys) -> None:
    """With --etcd: in sync, 200 and mandos_etcd_in_sync 1; etcd gone, 503 saying detached and
    0, while unlocks go on from the last synced state; etcd back, 200 and 1 again."""
    blob = section_secret(keys.foo_section)
    with EtcdCluster(size=1) as etcd:
        port = free_port()
        server = OurServer(clients_conf(keys.foo_section),
                           extra_args=[*etcd.server_options(), "--metrics", str(port)])
        with server:
            assert _wait_health(port, 200) == b"ok\n"
            assert _sample(_get(port, "/metrics")[2], "mandos_etcd_in_sync") == 1
            etcd.kill(0)
            assert _wait_health(port, 503).startswith(b"DETACHED from etcd (")
            assert _sample(_get(port, "/metrics")[2], "mandos_etcd_in_sync") == 0
            assert fetch(keys.foo, "127.0.0.1", server.port) == blob
            etcd.start_member(0)
            assert _wait_health(port, 200) == b"ok\n"
            assert _sample(_get(port, "/metrics")[2], "mandos_etcd_in_sync") == 1
