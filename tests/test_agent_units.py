# SPDX-License-Identifier: GPL-3.0-or-later
"""Unit tests of the password agent's parts that need no network peer: ask-file parsing and
rules (against real files and sockets), the kernel command line, ``--connect`` parsing, the
datagram reply, and the systemd units (``systemd-analyze verify``)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from password_agent.asks import AskRequest, Ignored, load_request, parse_ask
from password_agent.cli import build_parser, config_from_arguments
from password_agent.cmdline import KernelOptions, parse_cmdline
from password_agent.errors import AgentError
from password_agent.reply import send_password
from password_agent.servers import (
    Interfaces,
    Server,
    parse_connect,
    parse_interfaces,
    wait_for_interfaces,
)
from password_agent.watch import RequestWatcher
from peers.ask import FakeRequester, monotonic_usec

REPO = Path(__file__).resolve().parent.parent


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# --- ask files ------------------------------------------------------------------------------

def test_parse_ask_skips_broken_lines_and_other_sections() -> None:
    text = ("[Ask]\nPID=12\nSocket=/x/sck.1\nMessage=first line\nsecond line without equals\n"
            "Id=cryptsetup:/dev/sda2\nIcon = drive-harddisk \n[Other]\nPID=99\n")
    values = parse_ask(text)
    assert values["PID"] == ["12"]
    assert values["Message"] == ["first line"]
    assert values["Id"] == ["cryptsetup:/dev/sda2"]
    assert values["Icon"] == ["drive-harddisk"]


def test_valid_request_is_accepted(tmp_path: Path) -> None:
    with FakeRequester(tmp_path, {"NotAfter": monotonic_usec(30)}) as fake:
        result = load_request(fake.ask_file, tmp_path)
    assert isinstance(result, AskRequest)
    assert result.socket == str(fake.socket_path)
    assert result.id == "cryptsetup:/dev/fake"
    assert not result.expired()


def test_broken_message_line_is_still_answerable(tmp_path: Path) -> None:
    with FakeRequester(tmp_path, {"Message": "Please enter\nthe passphrase"}) as fake:
        assert isinstance(load_request(fake.ask_file, tmp_path), AskRequest)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"PID": "dead"}, "is not running"),
    ({"PID": None}, "PID="),
    ({"PID": "abc"}, "PID="),
    ({"NotAfter": "past"}, "NotAfter has passed"),
    ({"NotAfter": "soon"}, "not a time"),
    ({"Id": "other:thing"}, "not a disk unlock"),
    ({"Id": None}, "not a disk unlock"),
    ({"Socket": "/tmp/sck.elsewhere"}, "not inside"),
    ({"Socket": "DIR/../DIRNAME/sck"}, "not a plain absolute path"),
    ({"Socket": "relative/sck"}, "not a plain absolute path"),
    ({"Socket": None}, "no Socket="),
    ({"Socket": "DIR/sck.missing"}, "No such file"),
    ({"Message": "hello\nId=cryptsetup:forged"}, "more than one Id="),
])
def test_rejected_requests(tmp_path: Path, fields: dict[str, str | None], reason: str) -> None:
    values: dict[str, str | int | None] = {}
    for key, value in fields.items():
        if value == "dead":
            values[key] = _dead_pid()
        elif value == "past":
            values[key] = monotonic_usec(-1)
        elif isinstance(value, str):
            values[key] = value.replace("DIRNAME", tmp_path.name).replace("DIR", str(tmp_path))
        else:
            values[key] = value
    with FakeRequester(tmp_path, values) as fake:
        result = load_request(fake.ask_file, tmp_path)
    assert isinstance(result, Ignored), result
    assert reason in result.reason


def test_all_requests_accepts_other_ids(tmp_path: Path) -> None:
    with FakeRequester(tmp_path, {"Id": None}) as fake:
        result = load_request(fake.ask_file, tmp_path, all_requests=True)
    assert isinstance(result, AskRequest)
    assert result.answer_key == f"file:{fake.ask_file}"


def test_socket_symlink_is_rejected(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    with FakeRequester(elsewhere) as target:
        link = agent_dir / "sck.link"
        link.symlink_to(target.socket_path)
        with FakeRequester(agent_dir, {"Socket": str(link)}) as fake:
            result = load_request(fake.ask_file, agent_dir)
    assert isinstance(result, Ignored)
    assert "symbolic link" in result.reason


def test_socket_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "sck.file").write_text("")
    with FakeRequester(tmp_path, {"Socket": str(tmp_path / "sck.file")}) as fake:
        result = load_request(fake.ask_file, tmp_path)
    assert isinstance(result, Ignored)
    assert "not a socket" in result.reason


def test_oversized_and_symlinked_ask_files_are_rejected(tmp_path: Path) -> None:
    with FakeRequester(tmp_path, {"Message": "x" * 70000}) as fake:
        result = load_request(fake.ask_file, tmp_path)
        assert isinstance(result, Ignored)
        assert "larger than" in result.reason
        link = tmp_path / "ask.link"
        link.symlink_to(fake.ask_file)
        result = load_request(link, tmp_path)
        assert isinstance(result, Ignored)
        assert "cannot be read" in result.reason


# --- kernel command line --------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("root=/dev/sda1 quiet", KernelOptions()),
    ("mandos=off", KernelOptions(off=True)),
    ("mandos=connect", KernelOptions()),
    ("mandos=connect:192.0.2.1:4711", KernelOptions(connect="192.0.2.1:4711")),
    ("mandos=connect:fe80::1%eth0:4711", KernelOptions(connect="fe80::1%eth0:4711")),
    ("mandos=connect:[2001:db8::1]:4711", KernelOptions(connect="[2001:db8::1]:4711")),
    ("mandos=connect:192.0.2.1:1,connect:192.0.2.2:2", KernelOptions(connect="192.0.2.2:2")),
    ("mandos=connect:192.0.2.1:1,off", KernelOptions(off=True, connect="192.0.2.1:1")),
    ("mandos=bogus,connect:10.0.0.1:9", KernelOptions(connect="10.0.0.1:9")),
    ("ip=10.0.0.2::10.0.0.1:255.255.255.0:host:eth1:off", KernelOptions(interface="eth1")),
    ("ip=dhcp", KernelOptions()),
])
def test_parse_cmdline(text: str, expected: KernelOptions) -> None:
    assert parse_cmdline(text) == expected


def test_kernel_cmdline_connect_comes_first_and_ip_sets_interface(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("ro mandos=connect:fe80::2:4711 ip=:::::eth7:dhcp\n")
    arguments = build_parser().parse_args(
        ["--kernel-cmdline", str(cmdline), "--connect", "192.0.2.9:1", "--keydir", "/k",
         "--seckey", "/s"])
    config = config_from_arguments(arguments)
    assert config is not None
    assert config.connect == [Server("fe80::2%eth7", 4711), Server("192.0.2.9", 1)]
    assert config.interfaces == Interfaces("eth7", ("eth7",))
    assert config.keys.pubkey == Path("/k/pubkey.txt")
    assert config.keys.seckey == Path("/s")


def test_mandos_off_makes_the_agent_do_nothing(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("quiet mandos=off\n")
    with FakeRequester(tmp_path) as fake:
        result = subprocess.run(
            [sys.executable, "-m", "password_agent", "--kernel-cmdline", str(cmdline),
             "--agent-directory", str(tmp_path), "--connect", "127.0.0.1:9",
             "--run-directory", str(tmp_path / "run"), "--timeout", "5"],
            capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert b"mandos=off" in result.stderr
        assert fake.receive(timeout=0) is None
    assert not (tmp_path / "run").exists()


# --- --connect ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "interface", "expected"), [
    ("192.0.2.1:4711", None, Server("192.0.2.1", 4711)),
    ("mandos.example:4711", None, Server("mandos.example", 4711)),
    ("[::1]:4711", None, Server("::1", 4711)),
    ("::1:4711", None, Server("::1", 4711)),
    ("fe80::1%eth0:4711", None, Server("fe80::1%eth0", 4711)),
    ("[fe80::1%eth0]:4711", None, Server("fe80::1%eth0", 4711)),
    ("[fe80::1]:4711", "veth1", Server("fe80::1%veth1", 4711)),
    ("[2001:db8::1]:4711", "veth1", Server("2001:db8::1", 4711)),
])
def test_parse_connect(text: str, interface: str | None, expected: Server) -> None:
    assert parse_connect(text, interface) == expected


# --- --interface ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    (None, Interfaces()),
    ("", Interfaces()),
    ("eth0", Interfaces("eth0", ("eth0",))),
    ("eth0,eth1", Interfaces(None, ("eth0", "eth1"))),
    ("eth0,,eth1,", Interfaces(None, ("eth0", "eth1"))),
    ("none", Interfaces()),
    ("eth0,none", Interfaces(None, ("eth0",))),
    ("eth0,none,eth1", Interfaces(None, ("eth0",))),
])
def test_parse_interfaces_as_upstream(text: str | None, expected: Interfaces) -> None:
    assert parse_interfaces(text) == expected


@pytest.mark.parametrize(("interface", "host"), [
    ("eth0", "fe80::1%eth0"), ("eth0,eth1", "fe80::1"), ("none", "fe80::1")])
def test_only_a_single_interface_scopes_link_local_connect(tmp_path: Path, interface: str,
                                                           host: str) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("ro\n")
    arguments = build_parser().parse_args(
        ["--kernel-cmdline", str(cmdline), "--connect", "[fe80::1]:4711",
         f"--interface={interface}"])
    config = config_from_arguments(arguments)
    assert config is not None
    assert config.connect == [Server(host, 4711)]


def _links(tmp_path: Path, **states: str) -> Path:
    """A stand-in for /sys/class/net with these operstates."""
    for name, state in states.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "operstate").write_text(state + "\n")
    return tmp_path


def test_wait_for_interfaces_returns_once_all_are_up(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    links = _links(tmp_path, eth0="up", eth1="down", lo="unknown")
    bring_up = threading.Timer(0.3, (links / "eth1" / "operstate").write_text, ["up\n"])
    bring_up.start()
    with caplog.at_level(logging.INFO):
        wait_for_interfaces(("eth0", "eth1", "lo"), 30.0, links)
    bring_up.join()
    assert (links / "eth1" / "operstate").read_text() == "up\n"
    assert "trying anyway" not in caplog.text


def test_wait_for_interfaces_gives_up_after_the_delay_and_names_the_laggards(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    links = _links(tmp_path, eth0="up", eth1="down")
    with caplog.at_level(logging.INFO):
        wait_for_interfaces(("eth0", "eth1", "eth2"), 0.2, links)
    assert "interface eth1 is down after 0.2 s; trying anyway" in caplog.text
    assert "interface eth2 is missing after 0.2 s; trying anyway" in caplog.text
    assert "interface eth0" not in caplog.text


@pytest.mark.parametrize("text", ["4711", "host:", "host:0", "host:70000", "[::1]4711", ":1",
                                  "host:port"])
def test_parse_connect_rejects(text: str) -> None:
    with pytest.raises(AgentError, match="--connect"):
        parse_connect(text)


def test_server_str_brackets_ipv6() -> None:
    assert str(Server("fe80::1%eth0", 1)) == "[fe80::1%eth0]:1"
    assert str(Server("10.0.0.1", 2)) == "10.0.0.1:2"


# --- reply ----------------------------------------------------------------------------------

def test_send_password_sends_one_datagram(tmp_path: Path) -> None:
    with FakeRequester(tmp_path) as fake:
        send_password(str(fake.socket_path), bytearray(b"pw\nwith newline"))
        assert fake.receive() == b"+pw\nwith newline"


def test_send_password_to_a_missing_socket_is_an_agent_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot answer") as raised:
        send_password(str(tmp_path / "sck.gone"), b"hunter2")
    assert "hunter2" not in str(raised.value)


# --- systemd units --------------------------------------------------------------------------

@pytest.mark.peers
def test_units_verify(tmp_path: Path, manpath: dict[str, str]) -> None:
    """``systemd-analyze verify`` accepts both units, without a single warning, their
    Documentation= pages (ours) included.  The installed command does not exist here, so
    ExecStart points at this venv's console script."""
    script = Path(sys.executable).parent / "mandos-password-agent"
    assert os.access(script, os.X_OK), "the project is not installed in this venv"
    for name in ("mandos-password-agent.path", "mandos-password-agent.service"):
        text = (REPO / "units" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/bin/mandos-password-agent", str(script)))
    path_unit = (tmp_path / "mandos-password-agent.path").read_text()
    assert "PathExistsGlob=/run/systemd/ask-password/ask.*" in path_unit
    assert "DefaultDependencies=no" in path_unit
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "mandos-password-agent.path"),
         str(tmp_path / "mandos-password-agent.service")],
        capture_output=True, text=True, timeout=60, env=manpath)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.peers
def test_units_security(tmp_path: Path) -> None:
    """The booted system's agent runs GnuTLS and gpg over what the network sends: sandboxed
    (security review, finding 9), rated at most 2.5 by ``systemd-analyze security``.
    tests/vm/test_server_units.py checks the same under systemd, where the agent still works;
    here, that it keeps out of the sandbox what would break it."""
    text = (REPO / "units" / "mandos-password-agent.service").read_text()
    (tmp_path / "mandos-password-agent.service").write_text(text)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=25",
                             str(tmp_path / "mandos-password-agent.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    exposure = float(result.stdout.split(
        "Overall exposure level for mandos-password-agent.service:")[1].split()[0])
    assert exposure <= 2.5, result.stdout
    # PrivateTmp= would order it after the volumes it unlocks, PrivateUsers= would give it an
    # empty keyring at each start (the record's key), PrivateNetwork= no server.
    for key in ("PrivateTmp", "PrivateUsers", "PrivateNetwork", "ProcSubset", "User",
                "DynamicUser"):
        assert _unit_values(text, key) == [], key
    assert _unit_values(text, "CapabilityBoundingSet") == []
    assert "CapabilityBoundingSet=" in text.splitlines()


def _unit_values(text: str, key: str) -> list[str]:
    """Every value of ``key=`` in a unit file, space-separated lists split."""
    return [word for line in text.splitlines() if line.startswith(f"{key}=")
            for word in line.split("=", 1)[1].split()]


@pytest.mark.peers
def test_initramfs_units_verify_and_start_the_agent_with_the_first_request() -> None:
    """The dracut module's units: ``systemd-analyze verify`` accepts them without a warning;
    the .path unit is enabled for sysinit and starts the service when a request appears (the
    service has no [Install]: the boot never starts it); the service is resident from then on
    (``--watch``, ``Type=notify``) without anything waiting for it, stopped before switch-root,
    and both are off with ``mandos=off``."""
    module = REPO / "dracut-module" / "90mandos-agent"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(module / "mandos-password-agent.path"),
         str(module / "mandos-password-agent.service")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    service = (module / "mandos-password-agent.service").read_text()
    path = (module / "mandos-password-agent.path").read_text()
    assert _unit_values(service, "Type") == ["notify"]
    assert _unit_values(service, "ExecStart")[:6] == ["/usr/bin/python3", "-S", "-m",
                                                      "password_agent", "--watch", "--keydir"]
    assert "[Install]" not in service
    assert _unit_values(path, "WantedBy") == ["sysinit.target"]
    assert _unit_values(service, "DefaultDependencies") == ["no"]
    assert _unit_values(service, "After") == []  # it waits for nothing, not even the network
    for key in ("Conflicts", "Before"):
        assert "initrd-switch-root.target" in _unit_values(service, key)
    assert _unit_values(service, "KillMode") == ["mixed"]  # it stops its gpg-agent itself
    assert "--timeout" not in service  # it excludes --watch
    for unit in (service, path):
        assert _unit_values(unit, "ConditionKernelCommandLine") == ["!mandos=off"]
        assert _unit_values(unit, "Documentation") == ["https://www.recompile.se/mandos"]
    assert len(_unit_values(service, "ConditionFileNotEmpty")) == 4
    assert _unit_values(path, "PathExistsGlob") == ["/run/systemd/ask-password/ask.*"]


def test_booted_system_agent_starts_on_demand() -> None:
    service = (REPO / "units" / "mandos-password-agent.service").read_text()
    assert "--watch" not in _unit_values(service, "ExecStart")
    assert _unit_values(service, "Type") == ["exec"]
    assert "[Install]" not in service  # started by the .path unit only


def test_watch_and_timeout_exclude_each_other(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "password_agent", "--watch", "--timeout", "5",
         "--agent-directory", str(tmp_path), "--run-directory", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "not allowed with" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_signal_ends_the_watchers_sleep_even_when_another_thread_takes_it(
        tmp_path: Path) -> None:
    """A signal that the main thread does not receive itself (here: blocked in it, so the
    kernel gives it to another thread; in the agent: one that lands just before the ``poll``
    call) must still end the sleep at once, so that the handler (SIGTERM's) runs: else it would
    run only when the sleep times out."""
    handled: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: handled.append(number))
    try:
        with RequestWatcher(tmp_path) as watcher:
            # Started first: a thread inherits its creator's signal mask.
            sender = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1))
            sender.start()
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            try:
                started = time.monotonic()
                watcher.poll(30.0)
                slept = time.monotonic() - started
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
                sender.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert handled == [signal.SIGUSR1]
    assert slept < 15.0, f"the watcher slept {slept:.1f} s through the signal"
