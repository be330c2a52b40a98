# SPDX-License-Identifier: GPL-3.0-or-later
"""Fixtures shared by all tests: real peers from :mod:`peers`, started per test (or once per
session when they are expensive and stateless, like upstream key sets)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import upstream
from peers.agent import AgentHarness
from peers.ask import AskNamespace
from peers.dbus import PrivateSystemBus
from peers.journald import JOURNALD, PrivateJournal
from peers.leaks import WATCH, ProcessSampler
from peers.netns import VethPair
from peers.packages import Build, build, changelog_version

#: Programs the peers need; ./dev setup installs every one of them.
PEER_PROGRAMS = (
    upstream.MANDOS, upstream.MANDOS_KEYGEN, upstream.MANDOS_CTL, upstream.MANDOS_CLIENT,
    JOURNALD, "certtool", "gpg", "dbus-daemon", "ip", "unshare", "nsenter", "timeout",
    "journalctl", "systemd-ask-password", "systemd-analyze", "systemd-socket-activate",
    "avahi-daemon", "tmux", "fping", "groff", "etcd", "etcdctl", "prometheus", "promtool",
)


@pytest.fixture(scope="session")
def peers_present() -> Iterator[None]:
    """Fail (not skip) when the test machine is not set up: a skipped suite would look green.
    While peer tests run, the argv and environment of every process are read for the secret
    scan (:mod:`peers.leaks`)."""
    if os.geteuid() != 0:
        pytest.fail("the tests outside the unit tier run as root (network namespaces, mounts,"
                    " upstream mandos); as a user, run only the unit tier: -m unit",
                    pytrace=False)
    missing = [program for program in PEER_PROGRAMS if shutil.which(program) is None]
    if missing:
        pytest.fail(f"missing peer programs {', '.join(missing)}: run ./dev setup",
                    pytrace=False)
    sampler = ProcessSampler()
    sampler.start()
    yield
    sampler.stop()


@pytest.fixture(autouse=True)
def _peers_unless_unit(request: pytest.FixtureRequest) -> None:
    """Every test outside the unit tier needs the peers (``peers_present``); a ``unit`` test
    needs none, so the unit tier runs as any user on a machine without them."""
    if request.node.get_closest_marker("unit") is None:
        request.getfixturevalue("peers_present")


#: Markers that put a test outside the unit tier (README "Tests").
NOT_UNIT_MARKERS = ("peers", "interop", "vm", "slow")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the unit tier: every test that needs no peer (no fixture that depends on
    ``peers_present``, no ``peers``, ``interop`` or ``vm`` marker) and is not ``slow``.
    The secret scan judges what the whole session scanned: its module runs last."""
    for item in items:
        needs_peers = "peers_present" in getattr(item, "fixturenames", ())
        if not needs_peers and not any(item.get_closest_marker(name)
                                       for name in NOT_UNIT_MARKERS):
            item.add_marker(pytest.mark.unit)
    items.sort(key=lambda item: item.path.name == "test_secret_scan.py")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"secret scan: {WATCH.summary()}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Every test's captured output (stdout, stderr, log records) goes through the secret
    scan."""
    for name, content in report.sections:
        WATCH.scan("captured output", f"{report.nodeid} ({name})",
                   content.encode("utf-8", "surrogateescape"))


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory, peers_present: None) -> Build:
    """Our Debian packages, built once per session as ``./dev package`` builds them."""
    output = tmp_path_factory.mktemp("dist")
    debs, lintian = build(output)
    return Build(changelog_version(), debs, lintian)


@pytest.fixture
def tmp_private(tmp_path: Path) -> Path:
    """A directory only root can enter, for secrets and keys."""
    directory = tmp_path / "private"
    directory.mkdir(mode=0o700)
    return directory


@dataclass(frozen=True)
class UpstreamClient:
    """A client as upstream's keygen makes it: keys, its ``clients.conf`` section and the
    password inside the section's blob."""

    name: str
    keys: upstream.KeySet
    password: bytes
    section: str

    @property
    def secret(self) -> bytes:
        """The OpenPGP blob a server hands out (the section's base64-decoded ``secret``)."""
        return upstream.section_secret(self.section)


@pytest.fixture(scope="session")
def upstream_key_factory(
    tmp_path_factory: pytest.TempPathFactory, peers_present: None,
) -> Callable[[str], upstream.KeySet]:
    """``make(name)``: a key set made by upstream's keygen, one per name for the session
    (each takes a few seconds: RSA-4096)."""
    made: dict[str, upstream.KeySet] = {}

    def make(name: str) -> upstream.KeySet:
        if name not in made:
            directory = tmp_path_factory.mktemp(f"keys-{name}")
            directory.chmod(0o700)
            made[name] = upstream.make_upstream_keys(directory, name)
        return made[name]

    return make


@pytest.fixture(scope="session")
def upstream_keys(upstream_key_factory: Callable[[str], upstream.KeySet]) -> upstream.KeySet:
    """The session's one upstream key set (name ``test-client``)."""
    return upstream_key_factory("test-client")


@pytest.fixture(scope="session")
def upstream_client(upstream_keys: upstream.KeySet) -> UpstreamClient:
    """``upstream_keys`` with a section whose blob holds a password (with a space and a
    non-ASCII letter, but nothing that systemd-ask-password would cut off)."""
    password = "upstream secret pässword".encode()
    section = upstream.upstream_section(upstream_keys, "test-client", password)
    return UpstreamClient("test-client", upstream_keys, password, section)


@pytest.fixture
def password(upstream_client: UpstreamClient) -> bytes:
    """The password in the upstream client's blob."""
    return upstream_client.password


@pytest.fixture
def requests(tmp_path: Path) -> Path:
    """An agent directory for fake requesters (the agent runs outside any namespace)."""
    directory = tmp_path / "ask-password"
    directory.mkdir()
    return directory


@pytest.fixture
def private_bus(peers_present: None) -> Iterator[PrivateSystemBus]:
    with PrivateSystemBus() as bus:
        yield bus


@pytest.fixture
def veth_pair(peers_present: None) -> Iterator[VethPair]:
    with VethPair() as pair:
        yield pair


@pytest.fixture
def private_journal(peers_present: None) -> Iterator[PrivateJournal]:
    with PrivateJournal() as journal:
        yield journal


@pytest.fixture
def ask_namespace(peers_present: None) -> Iterator[AskNamespace]:
    with AskNamespace() as namespace:
        yield namespace


class Keys:
    """Two upstream key sets (``foo`` and ``bar``) and their clients.conf sections."""

    def __init__(self, foo: upstream.KeySet, bar: upstream.KeySet) -> None:
        self.password = b"correct horse battery staple"
        self.foo = foo
        self.bar = bar
        self.foo_section = upstream.upstream_section(self.foo, "foo", self.password)
        self.bar_section = upstream.upstream_section(self.bar, "bar", b"bar password")


@pytest.fixture(scope="session")
def keys(upstream_key_factory: Callable[[str], upstream.KeySet]) -> Keys:
    """Made once per session, from the conftest's upstream key factory."""
    return Keys(upstream_key_factory("foo"), upstream_key_factory("bar"))


@pytest.fixture
def manpath(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``MANPATH`` finds our manual pages as a package installs them
    (``man8/``), for ``systemd-analyze verify`` to check the units' ``Documentation=``."""
    pages = tmp_path / "manpath" / "man8"
    pages.mkdir(parents=True)
    for page in (Path(__file__).resolve().parent.parent / "man").glob("*.8"):
        shutil.copy(page, pages)
    return {**os.environ, "MANPATH": str(pages.parent)}


@pytest.fixture
def agents(upstream_client: UpstreamClient) -> Iterator[AgentHarness]:
    """Agents with the upstream client's keys, checked and stopped after the test."""
    # Short paths: gpg-agent puts its sockets into the GnuPG home (108-byte limit).
    work = Path(tempfile.mkdtemp(prefix="mpa-"))
    harness = AgentHarness(upstream_client.keys, upstream_client.password, work)
    try:
        yield harness
        harness.check_and_stop()
    finally:
        for run in harness.runs:
            run.stop()
        shutil.rmtree(work, ignore_errors=True)
