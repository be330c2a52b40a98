# SPDX-License-Identifier: GPL-3.0-or-later
"""mandos.conf and clients.conf as upstream reads them, and every bad input as a one-line
error naming the file, the section and the key (exit status 1 at start-up)."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import re
import subprocess
from pathlib import Path

import pytest

from mandos_protocol.wire import DEFAULT_PRIORITY, EMPTY_KEY_ID
from peers.ours import REPO, SERVER
from server.config import (
    CLIENT_DEFAULTS,
    SERVER_DEFAULTS,
    ConfigError,
    load_clients,
    load_server_settings,
)

KEY_A = "a" * 64
KEY_B = "B" * 64
SECRET = base64.b64encode(b"\x85\x02blob bytes" * 20).decode()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clients.conf"
    path.write_text(text)
    return path


def test_upstream_style_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
[DEFAULT]
timeout = PT5M
interval = 2m 30s
checker = fping -q -- %%(host)s
ssh_fingerprint = AAAA

[foo]
key_id = {KEY_A[:32]} {KEY_A[32:]}
fingerprint = 2FD9 B45B F905 74CA 24BC 1EFE 1525 1BF2 A47A F724
secret =
    {SECRET[:60]}
    {SECRET[60:]}
host = foo.example
checker = ssh-keyscan %%(host)s | grep -q %(ssh_fingerprint)s
approved_by_default = no
approval_delay = PT10S
unknown_key = ignored

[bar]
fingerprint = {KEY_B}
secfile = bar.secret
enabled = false
""")
    (tmp_path / "bar.secret").write_bytes(b"raw blob")
    clients = load_clients(path)
    assert list(clients) == ["foo", "bar"]
    foo, bar = clients["foo"], clients["bar"]
    assert foo.key_id == KEY_A.upper()
    assert foo.fingerprint == "2FD9B45BF90574CA24BC1EFE15251BF2A47AF724"
    assert foo.secret == base64.b64decode(SECRET)
    assert foo.interval == datetime.timedelta(minutes=2, seconds=30)
    assert foo.timeout == datetime.timedelta(minutes=5)
    assert foo.extended_timeout == datetime.timedelta(minutes=15)
    assert foo.checker == "ssh-keyscan %(host)s | grep -q AAAA"
    assert foo.approved_by_default is False
    assert foo.approval_delay == datetime.timedelta(seconds=10)
    assert foo.approval_duration == datetime.timedelta(seconds=1)
    assert foo.enabled is True
    assert bar.key_id == "" and bar.fingerprint == KEY_B
    assert bar.secret == b"raw blob"
    assert bar.checker == "fping -q -- %(host)s"
    assert bar.enabled is False
    assert "blob" not in repr(foo)


def test_missing_file_means_no_clients(tmp_path: Path) -> None:
    assert load_clients(tmp_path / "clients.conf") == {}


@pytest.mark.parametrize(("body", "where"), [
    (f"key_id = {KEY_A}\nsecret = {SECRET}\ntimeout = soon\n", "4: [foo] timeout"),
    (f"key_id = {KEY_A}\nsecret = {SECRET}\ninterval = PT5X\n", "4: [foo] interval"),
    (f"key_id = {KEY_A}\nsecret = {SECRET}\nextended_timeout = -5s\n", "4: [foo] extended_timeout"),
    (f"key_id = {KEY_A}\nsecret = not*base64!\n", "3: [foo] secret"),
    (f"key_id = {KEY_A}\n", "1: [foo] secret"),
    (f"key_id = {KEY_A}\nsecfile = /nonexistent/blob\n", "3: [foo] secfile"),
    (f"secret = {SECRET}\n", "1: [foo] key_id"),
    (f"key_id = xyz\nsecret = {SECRET}\n", "2: [foo] key_id"),
    (f"key_id = {EMPTY_KEY_ID}\nsecret = {SECRET}\n", "2: [foo] key_id"),
    (f"key_id = {KEY_A}\nsecret = {SECRET}\nenabled = perhaps\n", "4: [foo] enabled"),
    (f"key_id = {KEY_A}\nsecret = {SECRET}\napproved_by_default = 2\n",
     "4: [foo] approved_by_default"),
    (f"key_id = {KEY_A}\nsecret = {SECRET}\nhost = %(nothing)s\n", "4: [foo] host"),
    (f"key_id = {KEY_A}\nsecret = {SECRET}\ntimeout = P9000Y\n", "4: [foo] timeout"),
    (f"key_id = {KEY_A}\nsecret = {SECRET}\nchecker = ping \"%%(host)s\"\n", "4: [foo] checker"),
    (f"key_id = {KEY_A}\nsecret = {SECRET}\nchecker = ssh x '%%(host)s'\n", "4: [foo] checker"),
])
def test_bad_client_values(tmp_path: Path, body: str, where: str) -> None:
    path = write(tmp_path, "[foo]\n" + body)
    with pytest.raises(ConfigError) as caught:
        load_clients(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{where}:"), message
    assert "\n" not in message
    assert SECRET[:20] not in message


def test_duplicate_key_id(tmp_path: Path) -> None:
    path = write(tmp_path, f"[foo]\nkey_id = {KEY_A}\nsecret = {SECRET}\n\n"
                           f"[bar]\nkey_id = {KEY_A.upper()}\nsecret = {SECRET}\n")
    with pytest.raises(ConfigError, match=r"\[bar\] key_id: the same as in \[foo\]"):
        load_clients(path)


def test_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "key_id = no section\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_clients(path)


def test_server_settings_defaults_and_overrides(tmp_path: Path) -> None:
    settings = load_server_settings(tmp_path, {})
    assert settings.priority == DEFAULT_PRIORITY
    assert settings.port is None and settings.socket is None
    assert settings.zeroconf and settings.use_ipv6 and settings.restore
    assert settings.statedir == Path("/var/lib/mandos")
    (tmp_path / "mandos.conf").write_text(
        "[DEFAULT]\nport = 1025\nuse_ipv6 = False\nservicename = Daena\ndebug = True\n"
        "statedir = /srv/state\n")
    settings = load_server_settings(tmp_path, {"port": 2000, "servicename": None})
    assert settings.port == 2000
    assert settings.use_ipv6 is False
    assert settings.servicename == "Daena"
    assert settings.debug
    assert settings.statedir == Path("/srv/state")


#: An option the packaged files show commented out: ";name = value".
COMMENTED_OPTION = re.compile(r"(?m)^;(\w+) =")


def commented_options(text: str) -> set[str]:
    """The names of the options ``text`` shows commented out."""
    return set(COMMENTED_OPTION.findall(text))


def uncommented(text: str) -> str:
    """``text`` with its commented-out options in force."""
    return COMMENTED_OPTION.sub(r"\1 =", text)


def test_packaged_clients_conf_shows_every_default(tmp_path: Path) -> None:
    """packaging/etc/clients.conf's [DEFAULT] shows every client default (host is each
    client's own); with its commented options and its example client uncommented, that
    client's settings are those of a file with the client alone."""
    shipped = (REPO / "packaging" / "etc" / "clients.conf").read_text()
    defaults, example = shipped.split("\n;[foo]", 1)
    assert commented_options(defaults) == set(CLIENT_DEFAULTS) - {"host"}
    client = "[foo]\nkey_id = " + KEY_A + "\nsecret = " + SECRET + "\n"
    alone = load_clients(write(tmp_path, client))
    assert load_clients(write(tmp_path, f"{uncommented(defaults)}\n{client}")) == alone
    assert "secret =" in example and "secfile =" in example


#: Options the packaged mandos.conf leaves out: the unit sets them (socket activation,
#: ExecStart's --foreground), not the admin.
NOT_IN_PACKAGED_CONF = {"socket", "foreground"}


def test_packaged_conf_shows_every_option_with_its_default(tmp_path: Path) -> None:
    """packaging/etc/mandos.conf says "the values shown are the defaults": with every
    commented option uncommented, the settings are those of no file at all."""
    shipped = (REPO / "packaging" / "etc" / "mandos.conf").read_text()
    assert commented_options(shipped) == set(SERVER_DEFAULTS) - NOT_IN_PACKAGED_CONF
    none, shown = tmp_path / "none", tmp_path / "shown"
    none.mkdir()
    shown.mkdir()
    (shown / "mandos.conf").write_text(uncommented(shipped))
    assert (dataclasses.replace(load_server_settings(shown, {}), configdir=none)
            == load_server_settings(none, {}))


@pytest.mark.parametrize(("conf", "where"), [
    ("[DEFAULT]\nport = http\n", "[DEFAULT] port"),
    ("[DEFAULT]\nuse_ipv6 = maybe\n", "[DEFAULT] use_ipv6"),
    ("[DEFAULT]\nforeground = maybe\n", "[DEFAULT] foreground"),
])
def test_bad_server_settings(tmp_path: Path, conf: str, where: str) -> None:
    (tmp_path / "mandos.conf").write_text(conf)
    with pytest.raises(ConfigError, match=rf"mandos.conf:2: \{where}"):
        load_server_settings(tmp_path, {})


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVER, *args], capture_output=True, text=True, timeout=30,
                          cwd=REPO, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("conf", "where"), [
    ("[foo]\nkey_id = {a}\nsecret = !!\n", "3: [foo] secret"),
    ("[foo]\nkey_id = {a}\nsecret = {s}\ntimeout = PT\n", "4: [foo] timeout"),
    ("[foo]\nkey_id = {a}\nsecret = {s}\ntimeout = P9000Y\n", "4: [foo] timeout"),
    ("[foo]\nkey_id = {a}\nsecret = {s}\n[bar]\nkey_id = {a}\nsecret = {s}\n", "5: [bar] key_id"),
])
def test_start_up_error_is_one_line(tmp_path: Path, conf: str, where: str) -> None:
    (tmp_path / "clients.conf").write_text(conf.format(a=KEY_A, s=SECRET))
    result = run_server(f"--configdir={tmp_path}", f"--statedir={tmp_path}", "--no-zeroconf",
                        "--port=0", f"--journal-socket={tmp_path / 'none'}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mandos-server: ")
    assert f"clients.conf:{where}:" in lines[0]


def test_needs_port_without_zeroconf(tmp_path: Path) -> None:
    result = run_server(f"--configdir={tmp_path}", f"--statedir={tmp_path}", "--no-zeroconf",
                        f"--journal-socket={tmp_path / 'none'}")
    assert result.returncode == 1
    assert "needs --port or --socket" in result.stderr


def test_help_documents_no_dbus_and_hides_test_options() -> None:
    result = run_server("--help")
    assert result.returncode == 0
    assert "--no-dbus" in result.stdout and "se.recompile.Mandos" in result.stdout
    assert "--journal-socket" not in result.stdout


def test_missing_configdir_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_server(f"--configdir={tmp_path / 'nonexistent'}", "--no-zeroconf",
                        "--port=0")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "configuration directory" in result.stderr and "does not exist" in result.stderr
