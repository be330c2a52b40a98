# SPDX-License-Identifier: GPL-3.0-or-later
"""The secret scan (issue 9): no test password, blob or private key in any captured log,
journal entry, state file, process argv or environment, core file, or D-Bus property that a
non-root caller can read.

The conftest runs this module after every other test (``pytest_collection_modifyitems``), so
that its last test judges everything the suite scanned on the way (see
:mod:`peers.leaks`).  Run alone, its own tests give it an unlock, a journal, a state
file and D-Bus reads to scan, so that it never passes on nothing.
"""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.agent import AgentHarness
from peers.ask import FakeRequester
from peers.dbus import PrivateSystemBus
from peers.leaks import WATCH
from peers.ours import OurServer, clients_conf, fetch
from server.dbus_api import object_path
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.interop

CRASH = signal.SIGSEGV


@pytest.fixture
def core_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory for the processes of the test, with core dumps allowed
    (the soft RLIMIT_CORE raised to the hard one, inherited by the children), after proving
    that an ordinary process crashing there does leave a core file: otherwise "no core file"
    would prove nothing."""
    directory = tmp_path / "cwd"
    directory.mkdir()
    monkeypatch.chdir(directory)
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    try:
        control = subprocess.run(
            [sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(CRASH)})"],
            cwd=directory, timeout=30, check=False)
        assert control.returncode == -CRASH
        cores = list(directory.iterdir())
        assert cores, ("a crashing python3 left no core file here (kernel.core_pattern is "
                       f"{Path('/proc/sys/kernel/core_pattern').read_text().strip()!r}, "
                       f"RLIMIT_CORE hard {hard}): this test cannot tell anything")
        for core in cores:
            core.unlink()
        yield directory
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def _crash(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(CRASH)
    assert process.wait(30) == -CRASH


def _remove_gnupg_homes(run_directory: Path) -> None:
    """What a crashed agent could not clean up: its GnuPG home, and the gpg-agent in it."""
    for home in run_directory.glob("gnupg.*"):
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       capture_output=True, timeout=30, check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_a_crashing_server_or_agent_leaves_no_core_file(
        core_directory: Path, upstream_client: UpstreamClient, agents: AgentHarness) -> None:
    """Crashed while holding the secrets (the server after handing out the blob, the agent
    after answering with the password), neither writes a core file."""
    server = OurServer(clients_conf(upstream_client.section))
    try:
        server.start(cwd=core_directory)
        assert fetch(upstream_client.keys, "127.0.0.1", server.port) == upstream_client.secret
        requests = core_directory.parent / "ask-password"
        requests.mkdir()
        agent = agents.start("--watch", connect=[server.connect], agent_directory=requests)
        try:
            with FakeRequester(requests) as request:
                reply = request.receive(30) or b""
                assert reply.removesuffix(b"\0") == b"+" + upstream_client.password, agent.log()
            assert server.process is not None
            _crash(server.process)
            _crash(agent.process)
        finally:
            agent.stop()
            _remove_gnupg_homes(agents.run_directory)
    finally:
        server.close()
    assert list(core_directory.iterdir()) == []


def _dbus_as_nobody(bus: PrivateSystemBus, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``dbus-send --system --print-reply ARGUMENTS`` as the unprivileged user nobody."""
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "dbus-send",
         "--system", "--print-reply", "--dest=se.recompile.Mandos", *arguments],
        env=bus.environment(), capture_output=True, text=True, timeout=30, check=False)


def test_dbus_properties_readable_by_a_non_root_caller_hold_no_secret(
        private_bus: PrivateSystemBus, upstream_client: UpstreamClient) -> None:
    """Even on a bus whose policy lets anyone call anything (the shipped policy lets only
    root and _mandos call), every property a non-root caller reads holds no secret, and
    ``Secret`` itself cannot be read."""
    path = object_path(upstream_client.name)
    found_before = len(WATCH.leaks)
    server = OurServer(clients_conf(upstream_client.section), use_dbus=True)
    try:
        server.start(env=private_bus.environment())
        assert fetch(upstream_client.keys, "127.0.0.1", server.port) == upstream_client.secret
        deadline = time.monotonic() + 10
        while True:
            reply = _dbus_as_nobody(private_bus, path, "org.freedesktop.DBus.Properties.GetAll",
                                    "string:se.recompile.Mandos.Client")
            if reply.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.returncode == 0, reply.stderr
        assert upstream_client.keys.key_id in reply.stdout  # a real answer, not an error
        WATCH.scan("D-Bus property", f"GetAll {path} as nobody", reply.stdout.encode())
        managed = _dbus_as_nobody(private_bus, "/", "org.freedesktop.DBus.ObjectManager."
                                  "GetManagedObjects")
        assert managed.returncode == 0, managed.stderr
        WATCH.scan("D-Bus property", "GetManagedObjects as nobody", managed.stdout.encode())
        secret = _dbus_as_nobody(private_bus, path, "org.freedesktop.DBus.Properties.Get",
                                 "string:se.recompile.Mandos.Client", "string:Secret")
        assert secret.returncode != 0, secret.stdout
        WATCH.scan("D-Bus property", f"Get Secret {path} as nobody",
                   (secret.stdout + secret.stderr).encode())
    finally:
        server.close()
    assert WATCH.leaks[found_before:] == [], WATCH.leaks[found_before:]


def test_no_secret_in_any_log_journal_state_file_argv_or_environment(
        pytestconfig: pytest.Config) -> None:
    """Last of the whole suite: what every test registered and scanned on the way."""
    kinds = ["log", "journal entries", "state file", "argv", "environment", "D-Bus property"]
    if pytestconfig.getoption("capture") != "no":
        kinds.append("captured output")
    counts = {kind: WATCH.scanned[kind] for kind in kinds}
    assert all(counts.values()), f"nothing scanned of some kind: {counts}"
    assert WATCH.leaks == [], "\n".join(f"{leak.secret} in {leak.kind}: {leak.where}"
                                        for leak in WATCH.leaks)
