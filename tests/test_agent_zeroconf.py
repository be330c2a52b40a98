"""The password agent without ``--connect``: it browses with Zeroconf (lazily importing
:mod:`password_agent.browse`) and asks what it finds, here our announcer in the other network
namespace of a veth pair, serving the upstream-made blob.  Also: what the agent imports when it
does not browse (the initramfs has no room for more)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import UpstreamClient
from tests.peers.ask import FakeRequester
from tests.peers.netns import VethPair
from tests.peers.zeroconf import PORT, Announcement
from tests.test_agent_interop import AgentRun

pytestmark = pytest.mark.interop

#: Third-party top-level modules the agent may load when given --connect.
ALLOWED = {"password_agent", "mandos_protocol", "inotify_simple", "gnupg"}


def test_agent_imports_only_what_the_initramfs_has() -> None:
    code = ("import sys; before = set(sys.modules); import password_agent.cli; "
            "print(' '.join({name.split('.')[0] for name in set(sys.modules) - before}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=30)
    loaded = set(result.stdout.split())
    foreign = loaded - set(sys.stdlib_module_names) - ALLOWED
    assert foreign == set(), foreign
    assert "zeroconf" not in loaded and "cryptography" not in loaded


def test_agent_finds_the_server_with_zeroconf(
        veth_pair: VethPair, upstream_client: UpstreamClient, tmp_private: Path,
        tmp_path: Path) -> None:
    secret = tmp_private / "secret"
    secret.write_bytes(upstream_client.secret)
    requests = tmp_path / "ask-password"
    requests.mkdir()
    work = Path(tempfile.mkdtemp(prefix="mpa-"))
    agent: AgentRun | None = None
    try:
        with Announcement(veth_pair.a, PORT, serve=(upstream_client.keys.key_id, secret)), \
                FakeRequester(requests) as fake:
            agent = AgentRun(
                ["--keydir", str(upstream_client.keys.directory), "--run-directory",
                 str(work / "run"), "--kernel-cmdline", "/dev/null", "--timeout", "30",
                 "--agent-directory", str(requests), "--interface", veth_pair.b.interface],
                work / "agent.log", functools.partial(VethPair.wrap, veth_pair.b))
            assert fake.receive(25) == b"+" + upstream_client.password, agent.log()
            fake.remove_ask_file()
            assert agent.wait() == 0, agent.log()
        log = agent.log()
        assert "Zeroconf found" in log
        assert upstream_client.password.decode() not in log
        assert [path.name for path in (work / "run").iterdir()] == ["answered"]
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
