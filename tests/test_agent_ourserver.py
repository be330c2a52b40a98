# SPDX-License-Identifier: GPL-3.0-or-later
"""The password agent against our own server (``mandos-server``), the real
``systemd-ask-password`` asking."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from peers.agent import AgentRun
from peers.ask import AskNamespace, AskPassword
from peers.ours import OurServer, clients_conf
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.interop


def test_real_requester_gets_the_password_from_our_server(
        upstream_client: UpstreamClient, ask_namespace: AskNamespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="mpa-"))
    agent: AgentRun | None = None
    try:
        with OurServer(clients_conf(upstream_client.section)) as server, \
                AskPassword.start(ask_namespace, id="cryptsetup:ours") as ask:
            ask.wait_ask_file()
            agent = AgentRun(
                ["--keydir", str(upstream_client.keys.directory), "--run-directory",
                 str(work / "run"), "--kernel-cmdline", "/dev/null", "--timeout", "20",
                 "--connect", server.connect],
                work / "agent.log", ask_namespace.wrap)
            assert ask.wait() == (0, upstream_client.password + b"\n"), ask.stderr
            assert agent.wait() == 0, agent.log()
        assert upstream_client.password not in (work / "agent.log").read_bytes()
        assert [path.name for path in (work / "run").iterdir()] == ["answered"]
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)


