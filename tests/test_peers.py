# SPDX-License-Identifier: GPL-3.0-or-later
"""Smoke tests of the test peers themselves: each helper starts its real program, the program
does what the other tests rely on, and nothing is left behind."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from mandos_protocol import wire
from peers import upstream
from peers.ask import AskNamespace, AskPassword, FakeRequester, monotonic_usec
from peers.dbus import PrivateSystemBus
from peers.journald import PrivateJournal
from peers.netns import VethPair
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.peers


def _dgram(path: Path | str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendto(data, str(path))


def test_private_bus_answers_and_is_gone_afterwards() -> None:
    with PrivateSystemBus() as bus:
        assert bus.address.startswith(f"unix:path={bus.socket_path}")
        result = subprocess.run(
            ["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus.ListNames"],
            env=bus.environment(), capture_output=True, text=True, timeout=10,
        )
        assert result.returncode == 0, result.stderr
        assert "org.freedesktop.DBus" in result.stdout
    assert not bus.directory.exists()


def test_upstream_keys_key_id_matches_certtool(upstream_client: UpstreamClient) -> None:
    keys = upstream_client.keys
    for path in (keys.pubkey, keys.seckey, keys.tls_pubkey, keys.tls_privkey):
        assert path.stat().st_size > 0
    info = subprocess.run(["certtool", "--key-id", "--hash=sha256", "--load-pubkey",
                           str(keys.tls_pubkey)], capture_output=True, text=True, check=True)
    assert wire.normalize_key_id(info.stdout.strip()) == wire.normalize_key_id(keys.key_id)
    assert f"key_id = {keys.key_id.lower()}" in upstream_client.section
    # The blob is a binary OpenPGP message (a public-key encrypted session key packet first).
    assert upstream_client.secret[0] & 0x80


def test_section_secret_decodes_the_indented_base64() -> None:
    blob = bytes(range(256))
    encoded = base64.b64encode(blob).decode()
    lines = "\n".join("    " + encoded[i:i + 64] for i in range(0, len(encoded), 64))
    section = f"[x]\nkey_id = 00\nsecret =\n{lines}\n"
    assert upstream.section_secret(section) == blob


@pytest.mark.interop
def test_upstream_server_serves_upstream_client(upstream_client: UpstreamClient) -> None:
    with upstream.UpstreamServer(upstream_client.section) as server:
        result = upstream.run_upstream_client(upstream_client.keys, server.connect, 20)
        assert result.returncode == 0, result.stderr + server.log_text().encode()
        assert result.stdout == upstream_client.password
        group = server.process.pid if server.process else 0
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
    assert not server.directory.exists()


@pytest.mark.interop
def test_upstream_client_times_out_when_refused(upstream_client: UpstreamClient) -> None:
    # An empty clients.conf: the server knows nobody, the client retries until killed.
    with upstream.UpstreamServer("", address="::1") as server:
        assert server.connect == f"::1:{server.port}"
        result = upstream.run_upstream_client(upstream_client.keys, server.connect, 2,
                                              extra_args=["--retry=0.5"])
    assert result.returncode == 124
    assert result.stdout == b""


@pytest.mark.interop
def test_upstream_server_with_dbus_answers_mandos_ctl(upstream_client: UpstreamClient) -> None:
    with upstream.UpstreamServer(upstream_client.section, use_dbus=True) as server:
        result = subprocess.run([upstream.MANDOS_CTL, "--dump-json"],
                                env=server.bus.environment(), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    client = json.loads(result.stdout)["test-client"]
    assert wire.normalize_key_id(client["KeyID"]) == upstream_client.keys.key_id


def test_veth_pair_links_two_namespaces() -> None:
    with VethPair() as pair:
        assert pair.a.netns != pair.b.netns
        assert pair.a.link_local.startswith("fe80::")
        for side in (pair.a, pair.b):
            peer = pair.peer_of(side)
            for address in (peer.ipv4, f"{peer.link_local}%{side.interface}"):
                result = pair.run(side, ["fping", "-t", "1000", address], capture_output=True)
                assert result.returncode == 0, result
        names = {pair.a.netns, pair.b.netns}
        assert names <= _netns_names()
        # The host does not see the link.
        assert pair.a.interface not in _host_links()
    assert not names & _netns_names()


def _netns_names() -> set[str]:
    output = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, check=True)
    return {entry["name"] for entry in json.loads(output.stdout or b"[]")}


def _host_links() -> set[str]:
    output = subprocess.run(["ip", "-j", "link"], capture_output=True, check=True).stdout
    return {link["ifname"] for link in json.loads(output)}


@pytest.mark.interop
def test_upstream_server_in_a_namespace(upstream_client: UpstreamClient) -> None:
    with VethPair() as pair, upstream.UpstreamServer(
        upstream_client.section, address=pair.a.ipv4, netns=pair.a.netns,
    ) as server:
        result = upstream.run_upstream_client(upstream_client.keys, server.connect, 20,
                                              netns=pair.b.netns)
        assert result.returncode == 0, result.stderr + server.log_text().encode()
        assert result.stdout == upstream_client.password


def test_private_journal_stores_native_and_inside_messages() -> None:
    with PrivateJournal() as journal:
        _dgram(journal.socket_path,
               b"MESSAGE=hello\nSYSLOG_IDENTIFIER=peer-test\nMANDOS_CLIENT=foo\n"
               b"MANDOS_BLOB\n" + len(b"a\nb").to_bytes(8, "little") + b"a\nb\n")
        (entry,) = journal.wait_for(MANDOS_CLIENT="foo")
        assert entry["MESSAGE"] == "hello"
        assert entry["MANDOS_BLOB"] == "a\nb"
        subprocess.run(journal.inside(["systemd-cat", "-t", "peer-test-2", "echo", "hi"]),
                       check=True, timeout=10)
        (entry,) = journal.wait_for("-t", "peer-test-2")
        assert entry["MESSAGE"] == "hi"
        pid = journal.pid
    assert not Path(f"/proc/{pid}").exists()


def test_ask_namespace_maps_the_directory_and_goes_away() -> None:
    with AskNamespace() as namespace:
        (namespace.directory / "probe").write_text("x")
        inside = subprocess.run(namespace.wrap(["cat", "/run/systemd/ask-password/probe"]),
                                capture_output=True, check=True, timeout=10)
        assert inside.stdout == b"x"
        assert not Path("/run/systemd/ask-password/probe").exists()  # the host's is untouched
        holder = namespace.pid
    assert not Path(f"/proc/{holder}").exists()
    assert not namespace.directory.exists()


def test_real_ask_password_answered_from_outside(ask_namespace: AskNamespace) -> None:
    with AskPassword.start(ask_namespace, "Unlock?", id="cryptsetup:/dev/peer",
                           timeout=10) as request:
        fields = request.fields()
        assert fields["Id"] == "cryptsetup:/dev/peer"
        assert fields["PID"] == str(request.pid)
        assert fields["Socket"].startswith("/run/systemd/ask-password/sck.")
        assert request.ask_file.parent == ask_namespace.directory
        _dgram(request.socket_outside(), b"+hunter2")
        assert request.wait() == (0, b"hunter2\n")
    assert ask_namespace.ask_files() == []


def test_real_ask_password_answered_from_inside(ask_namespace: AskNamespace) -> None:
    reply = ("import socket, sys; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)"
             ".sendto(b'+inside', sys.argv[1])")
    with AskPassword.start(ask_namespace, "Unlock?", timeout=10) as request:
        subprocess.run(ask_namespace.wrap(["python3", "-c", reply, request.fields()["Socket"]]),
                       check=True, timeout=10)
        assert request.wait() == (0, b"inside\n")


def test_real_ask_password_times_out(ask_namespace: AskNamespace) -> None:
    with AskPassword.start(ask_namespace, "Unlock?", timeout=0.5) as request:
        request.wait_ask_file()
        rc, stdout = request.wait()
    assert (rc, stdout) == (1, b"")
    assert b"Timer expired" in request.stderr


def test_fake_requester_receives_and_cleans_up(tmp_path: Path) -> None:
    not_after = monotonic_usec(5)
    with FakeRequester(tmp_path, {"NotAfter": not_after, "Echo": None}) as request:
        text = request.ask_file.read_text()
        assert f"NotAfter={not_after}\n" in text
        assert "Echo=" not in text
        assert f"Socket={request.socket_path}\n" in text
        assert request.receive(0.05) is None
        _dgram(request.socket_path, b"+pw")
        assert request.receive(1) == b"+pw"
    assert list(tmp_path.iterdir()) == []
