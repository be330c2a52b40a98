# SPDX-License-Identifier: GPL-3.0-or-later
"""The server under faults: SIGKILL at random moments, a full disk, a read-only state
directory, no journal, the system bus going away, a hanging checker, a garbage clients.conf.

Each test drives the real server (``peers.ours``) with real peers: a private dbus-daemon,
a real systemd-journald, tmpfs mounts of the test's own.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from mandos_protocol.errors import ProtocolError
from peers.agent import processes_left
from peers.dbus import PrivateSystemBus
from peers.journald import PrivateJournal
from peers.mounts import fill, remount, tmpfs
from peers.ours import OurServer, clients_conf, fetch, set_options
from peers.upstream import section_secret
from server.checker import STOP_GRACE as CHECKER_STOP_GRACE
from server.daemon import SAVE_RETRY
from server.journal import DEFAULT_SOCKET
from server.statefile import FILENAME, StateFile
from tests.conftest import Keys
from tests.test_server_systemd import NotifySocket

CRASHES = 200


def _temporaries(statedir: Path) -> set[str]:
    """The temporary files of the state file's writes (``mandos_protocol.durable``)."""
    return {name for name in os.listdir(statedir)
            if name.startswith(f".{FILENAME}.") and name.endswith(".tmp")}


def _padding(count: int) -> list[str]:
    """Disabled clients that only make the state file bigger (a longer write to hit)."""
    sections = []
    for number in range(count):
        key_id = os.urandom(32).hex()
        secret = base64.b64encode(os.urandom(300)).decode()
        sections.append(f"[pad{number}]\nkey_id = {key_id}\nsecret = {secret}\nenabled = no\n")
    return sections


def _set_enabled(bus: PrivateSystemBus, client: str, value: bool) -> bool:
    """Set a client's ``Enabled`` over D-Bus as an admin's tool does; whether it took."""
    result = subprocess.run(
        ["dbus-send", "--system", "--print-reply", "--reply-timeout=1000",
         "--dest=se.recompile.Mandos", f"/clients/{client}",
         "org.freedesktop.DBus.Properties.Set", "string:se.recompile.Mandos.Client",
         "string:Enabled", f"variant:boolean:{'true' if value else 'false'}"],
        env=bus.environment(), capture_output=True, timeout=5, check=False)
    return result.returncode == 0


class Load:
    """Unlocks of ``foo`` and D-Bus toggles of ``bar`` in a thread, while the server is killed
    and restarted under it."""

    def __init__(self, keys: Keys, server: OurServer, bus: PrivateSystemBus) -> None:
        self.keys = keys
        self.server = server
        self.bus = bus
        self.blob = section_secret(keys.foo_section)
        self.fetched = 0
        self.toggled = 0
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        enable = False
        for turn in itertools.count():
            if not self._running:
                return
            try:
                if fetch(self.keys.foo, "127.0.0.1", self.server.port, 2.0) == self.blob:
                    self.fetched += 1
            except (OSError, ProtocolError):
                pass  # the server is down or was killed mid-request
            if turn % 3 == 0 and _set_enabled(self.bus, "bar", enable):
                self.toggled += 1
                enable = not enable
            time.sleep(0.05)

    def stop(self) -> None:
        self._running = False
        if self._thread.is_alive():
            self._thread.join(10)


@dataclass
class Observed:
    """What the state files seen after the kills held, to check each one against the last."""

    created: dict[str, str] = field(default_factory=dict)
    last_secret_sent: str = ""
    previous: bytes | None = None
    unchanged: int = 0
    changed: int = 0
    #: The temporary files that kills inside a write left.
    left: set[str] = field(default_factory=set)

    def check(self, statedir: Path, names: set[str]) -> None:
        """The state file after a kill: whole, every client in it, nothing gone back."""
        temporaries = _temporaries(statedir)
        assert len(temporaries) <= 1, f"temporary files pile up: {sorted(temporaries)}"
        self.left |= temporaries
        assert not list(statedir.glob(f"{FILENAME}.damaged-*"))
        path = statedir / FILENAME
        if not path.exists():
            assert self.previous is None, "the state file vanished"
            return
        data = path.read_bytes()
        warnings: list[str] = []
        statefile = StateFile(statedir, warnings.append)
        saved = statefile.load()
        assert statefile.damage is None, statefile.damage
        assert set(saved) == names
        document = json.loads(data)
        for name in names:
            created = document["clients"][name]["state"]["created"]
            assert self.created.setdefault(name, created) == created, "a client started afresh"
        sent = document["clients"]["foo"]["state"]["last_secret_sent"] or ""
        assert sent >= self.last_secret_sent, "the state went back in time"
        self.last_secret_sent = sent
        if data == self.previous:
            self.unchanged += 1
        else:
            self.changed += 1
        self.previous = data


def _wait_for_creations(inotify: INotify, count: int, timeout: float) -> bool:
    """Wait until ``count`` temporary state files have been created; False on timeout."""
    deadline = time.monotonic() + timeout
    while count > 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        for event in inotify.read(timeout=int(remaining * 1000) + 1):
            if event.name.startswith(f".{FILENAME}.") and event.name.endswith(".tmp"):
                count -= 1
    return True


def test_200_sigkills_at_random_moments_leave_a_whole_state_file(
        keys: Keys, private_bus: PrivateSystemBus, tmp_path: Path) -> None:
    """SIGKILL while unlocks, checkers and D-Bus toggles keep changing the state: a quarter
    of the kills at a random moment of the start, a quarter at a random moment of serving,
    half a few milliseconds after a write of the state file began (inotify).  After every kill
    the state file is whole (it loads, holds every client, none started afresh, no timestamp
    went back), never the damaged path; left temporary files are removed at the next start."""
    # Other moments each run; a failure's captured output names its seed, to run it again.
    seed = int(os.environ.get("MANDOS_TEST_SEED") or random.randrange(1 << 32))
    print(f"MANDOS_TEST_SEED={seed}")
    rng = random.Random(seed)
    foo = set_options(keys.foo_section, interval="1s", timeout="3s")
    bar = set_options(keys.bar_section, checker="/bin/false", interval="1s", timeout="2s")
    conf = clients_conf(foo, bar, *_padding(40))
    names = {"foo", "bar", *(f"pad{number}" for number in range(40))}
    server = OurServer(conf, directory=tmp_path, use_dbus=True)
    observed = Observed()
    phases = ["start"] * (CRASHES // 4) + ["serving"] * (CRASHES // 4) \
        + ["first write", "later write"] * (CRASHES // 4)
    rng.shuffle(phases)
    load = Load(keys, server, private_bus)
    inotify = INotify()
    inotify.add_watch(server.statedir, flags.CREATE)
    started = time.monotonic()
    try:
        load.start()
        for phase in phases:
            before = len(server.journal.find("server-started")) if server.journal else 0
            inotify.read(timeout=0)
            server.start(wait=False, env=private_bus.environment())
            assert server.process is not None and server.journal is not None
            if phase == "start":
                time.sleep(rng.uniform(0.0, 0.35))
            elif phase == "serving":
                server.journal.wait_for("server-started", count=before + 1)
                time.sleep(rng.uniform(0.0, 0.5))
            else:
                writes = 1 if phase == "first write" else 2
                assert _wait_for_creations(inotify, writes, 10.0), server.stderr()
                time.sleep(rng.uniform(0.0, 0.002))
            assert server.process.poll() is None, server.stderr()
            server.process.kill()
            server.process.wait(10)
            server.process = None
            observed.check(server.statedir, names)
        # A last clean start and stop: the leftovers are gone, the state is saved.
        load.stop()
        server.start(env=private_bus.environment())
        assert server.stop() == 0
        elapsed = time.monotonic() - started
        observed.check(server.statedir, names)
        assert not _temporaries(server.statedir)
        assert server.journal is not None
        problems = server.journal.find("state-problem")
        assert not [p for p in problems if "damaged" in p["MESSAGE"]]
        removed = sum(int(match.group(1)) for p in problems
                      if (match := re.match(r"Removed (\d+) temporary", p["MESSAGE"])))
        # Fewer if a kill fell between a removal and its journal entry.
        assert 0 < removed <= len(observed.left)
        assert "Traceback" not in server.stderr()
    finally:
        load.stop()
        inotify.close()
        server.close()
    print(f"{CRASHES} SIGKILLs in {elapsed:.1f} s: {len(observed.left)} inside a write "
          f"(a temporary file left, removed at the next start), {observed.changed} new state "
          f"files, {observed.unchanged} unchanged, {load.fetched} unlocks, {load.toggled} "
          "D-Bus toggles")
    assert len(observed.left) >= CRASHES // 10
    # The load ran and the state changed under the kills.  How many unlocks fit between kills
    # depends on the machine's load (1,000 on a quiet one, under 20 on a loaded one: each
    # restart is slower), so only their presence is asserted, not a rate.
    assert load.fetched > 0 and load.toggled > 0 and observed.changed > 0


def test_the_system_bus_going_away_is_a_warning_and_serving_goes_on(
        keys: Keys, private_bus: PrivateSystemBus) -> None:
    """The dbus-daemon stops under a running server (upstream's server exits then): one
    warning that says what is lost, unlocks go on, SIGTERM still stops cleanly."""
    blob = section_secret(keys.foo_section)
    server = OurServer(clients_conf(keys.foo_section), use_dbus=True)
    try:
        server.start(env=private_bus.environment())
        assert server.journal is not None
        assert _set_enabled(private_bus, "foo", True)
        private_bus.stop()
        lost = server.journal.wait_for("server-error")
        assert lost[0]["PRIORITY"] == "4", lost
        assert "system bus" in lost[0]["MESSAGE"] and "\n" not in lost[0]["MESSAGE"]
        assert fetch(keys.foo, "127.0.0.1", server.port) == blob
        server.journal.wait_for("secret-sent")
        assert server.stop() == 0
        assert len(server.journal.find("server-error")) == 1
        assert "Traceback" not in server.stderr(), server.stderr()
    finally:
        server.close()


def _one_err(entries: list[dict[str, str]], *words: str) -> dict[str, str]:
    """The one entry among ``entries`` at priority err: one line, holding each of ``words``."""
    errors = [entry for entry in entries if entry["PRIORITY"] == "3"]
    assert len(errors) == 1, entries
    message = errors[0]["MESSAGE"]
    assert "\n" not in message and all(word in message for word in words), message
    return errors[0]


def test_a_full_disk_at_a_state_write_keeps_the_old_file_and_serving(
        keys: Keys, tmp_path: Path) -> None:
    """The state directory's file system fills up: one err entry naming the file and the
    cause (not one per write), STATUS= says so, the old state file whole, unlocks go on; when
    space returns, the next write succeeds and says so."""
    blob = section_secret(keys.foo_section)
    server = OurServer(clients_conf(keys.foo_section), directory=tmp_path)
    notify = NotifySocket(tmp_path)
    with tmpfs(server.statedir, "256k"):
        try:
            server.start(env={"NOTIFY_SOCKET": str(notify.path)})
            assert server.journal is not None
            state = server.statedir / FILENAME
            old = state.read_bytes()
            filler = fill(server.statedir)
            assert fetch(keys.foo, "127.0.0.1", server.port) == blob
            server.journal.wait_for("state-problem")
            for _ in range(3):  # more changes, more failed writes: no more entries
                time.sleep(0.6)
                assert fetch(keys.foo, "127.0.0.1", server.port) == blob
            _one_err(server.journal.find("state-problem"), str(state), "No space left on device")
            notify.wait_for("STATUS=CANNOT SAVE STATE (No space left on device); 1 clients",
                            prefix=True)
            assert state.read_bytes() == old
            assert sorted(os.listdir(server.statedir)) == [FILENAME, filler.name]
            filler.unlink()
            assert fetch(keys.foo, "127.0.0.1", server.port) == blob
            saved = server.journal.wait_for("state-problem", count=2)[-1]
            assert saved["PRIORITY"] == "5" and "again" in saved["MESSAGE"], saved
            document = json.loads(state.read_bytes())
            assert document["clients"]["foo"]["state"]["last_secret_sent"] is not None
            notify.messages.clear()
            notify.wait_for("STATUS=1 clients", prefix=True)
            assert server.stop() == 0
        finally:
            server.close()
            notify.close()


def test_a_read_only_state_directory_is_an_error_and_serving_goes_on(
        keys: Keys, tmp_path: Path) -> None:
    """The state directory went read-only (say, remounted after disk errors): the server
    starts and serves from the state it reads, one err entry says that it cannot save; a
    3 a.m. admin wants the machines to boot, and to be told.  The file stays as it was; once
    the directory is writable again the next retry saves the state."""
    blob = section_secret(keys.foo_section)
    server = OurServer(clients_conf(set_options(keys.foo_section, interval="1h")),
                       directory=tmp_path)  # no checker to change the state
    with tmpfs(server.statedir, "256k"):
        try:
            server.start()
            assert server.stop() == 0
            state = server.statedir / FILENAME
            old = state.read_bytes()
            remount(server.statedir, read_only=True)
            server.start()
            assert server.journal is not None
            problem = _one_err(server.journal.wait_for("state-problem"), str(state),
                               "Read-only file system")
            assert "serving on" in problem["MESSAGE"]
            assert fetch(keys.foo, "127.0.0.1", server.port) == blob
            server.journal.wait_for("secret-sent")
            time.sleep(0.7)  # the write that the secret asked for fails too: no new entry
            assert len(server.journal.find("state-problem")) == 1
            assert state.read_bytes() == old
            # Writable again: the retry saves the state with no change to ask for it.
            remount(server.statedir, read_only=False)
            saved = server.journal.wait_for("state-problem", count=2, timeout=SAVE_RETRY + 3)
            assert saved[-1]["PRIORITY"] == "5" and "again" in saved[-1]["MESSAGE"], saved
            document = json.loads(state.read_bytes())
            assert document["clients"]["foo"]["state"]["last_secret_sent"] is not None
            assert server.stop() == 0
        finally:
            server.close()


def _children(pid: int) -> list[str]:
    """The child processes of ``pid`` (zombies included), as ``PID STATE``."""
    children: list[str] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
                children.append(f"{child} {state}")
    return children


@pytest.mark.parametrize("ignores_sigterm", [False, True], ids=["sleeps", "ignores-sigterm"])
def test_a_hanging_checker_is_killed_at_its_next_turn_and_when_the_client_expires(
        keys: Keys, ignores_sigterm: bool) -> None:
    """A checker that never returns is stopped at its next turn (SIGKILL after a grace, if
    it ignores SIGTERM), logged, and a fresh one started; when the client expires, the one
    running then is stopped too.  Every checker's process group ends up killed and reaped."""
    marker = f"1000.{random.randrange(10**6)}"
    command = f"trap '' TERM; sleep {marker}" if ignores_sigterm else f"sleep {marker}"
    conf = clients_conf(set_options(keys.foo_section, checker=command, interval="1s",
                                    timeout="3s"))
    try:
        _hanging_checker(keys, conf, marker)
    finally:  # what a failure may leave: the checkers, ours by their unique marker
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)


def _checker_pids(marker: str) -> set[int]:
    """The ``sleep`` processes of the checkers (their command lines hold ``marker``)."""
    found = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"sleep")
                    and marker.encode() in (entry / "cmdline").read_bytes()):
                found.add(int(entry.name))
    return found


def _hanging_checker(keys: Keys, conf: str, marker: str) -> None:
    with OurServer(conf) as server:
        assert server.journal is not None and server.process is not None
        server.journal.wait_for("checker-started", MANDOS_CLIENT="foo")
        deadline = time.monotonic() + 5
        while not (first := _checker_pids(marker)):  # the event comes before the spawn
            assert time.monotonic() < deadline, "the checker did not start"
            time.sleep(0.02)
        # Its next turn: stopped, logged, and a fresh checker started.
        stopped = server.journal.wait_for("checker-failed", MANDOS_CLIENT="foo", timeout=5)
        assert "still running" in stopped[0]["MESSAGE"], stopped
        server.journal.wait_for("checker-started", count=2, MANDOS_CLIENT="foo", timeout=5)
        deadline = time.monotonic() + CHECKER_STOP_GRACE + 2
        while first & _checker_pids(marker):
            assert time.monotonic() < deadline, "the hanging checker was not killed"
            time.sleep(0.05)
        # The client expires (no checker ever succeeds): the one running then is stopped too.
        server.journal.wait_for("client-expired", MANDOS_CLIENT="foo", timeout=10)
        assert processes_left(marker, grace=CHECKER_STOP_GRACE + 2) == []
        deadline = time.monotonic() + 2
        while (children := _children(server.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children == []
        started = len(server.journal.find("checker-started"))
        # Each checker-failed follows its reaping, and the journal collects on its own thread.
        assert len(server.journal.wait_for("checker-failed", count=started)) == started
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""
        assert server.stop() == 0


class ServerWithoutJournald(OurServer):
    """The server at journald's default socket, in a mount namespace whose ``/run`` is an
    empty tmpfs: as on a host whose journald is not (yet, or any more) running."""

    def __init__(self, clients: str) -> None:
        super().__init__(clients, extra_args=[f"--journal-socket={DEFAULT_SOCKET}"])

    def argv(self) -> list[str]:
        return ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c",
                'mount -t tmpfs tmpfs /run && exec "$@"', "sh", *super().argv()]


def _stderr_events(server: OurServer, event: str) -> list[str]:
    """The server's stderr lines for ``event`` (the journal's fallback format)."""
    return [line for line in server.stderr().splitlines() if f" {event}: " in line]


def test_no_journal_socket_at_start_means_stderr_and_serving(keys: Keys) -> None:
    """Nothing at /run/systemd/journal/socket: every entry goes to stderr, one line each,
    and the server serves."""
    blob = section_secret(keys.foo_section)
    with ServerWithoutJournald(clients_conf(keys.foo_section)) as server:
        assert fetch(keys.foo, "127.0.0.1", server.port) == blob
        assert server.stop() == 0
        assert len(_stderr_events(server, "server-started")) == 1, server.stderr()
        sent = _stderr_events(server, "secret-sent")
        assert len(sent) == 1 and " INFO " in sent[0] and "client=foo" in sent[0], sent
        assert _stderr_events(server, "server-stopping")
        assert server.journal is not None and not server.journal.entries


def test_journald_going_away_means_stderr_and_serving(keys: Keys,
                                                       private_journal: PrivateJournal) -> None:
    """A real journald stops under the running server: the entries after that go to stderr,
    the unlocks go on."""
    blob = section_secret(keys.foo_section)
    server = OurServer(clients_conf(keys.foo_section),
                       extra_args=[f"--journal-socket={private_journal.socket_path}"])
    try:
        server.start()
        assert fetch(keys.foo, "127.0.0.1", server.port) == blob
        private_journal.wait_for(MANDOS_EVENT="secret-sent")
        assert not _stderr_events(server, "secret-sent")
        private_journal.stop()
        assert fetch(keys.foo, "127.0.0.1", server.port) == blob
        assert server.stop() == 0
        assert len(_stderr_events(server, "secret-sent")) == 1, server.stderr()
        assert _stderr_events(server, "server-stopping")
    finally:
        server.close()


GARBAGE = {
    "binary": bytes(range(256)) * 4,
    "no section": b"this is not\nan ini file = at all\n",
    "half a section": b"[foo\nkey_id = 00\n",
    "a duplicate section": b"[foo]\nkey_id = 00\n[foo]\nkey_id = 01\n",
    "an unknown interpolation": b"[DEFAULT]\nhost = %(nothere)s\n[foo]\nkey_id = 00\n",
}


def test_garbage_clients_conf_on_sighup_keeps_the_old_configuration(keys: Keys) -> None:
    """clients.conf edited to garbage (5 kinds) or missing, SIGHUP: each time one err entry on
    one line naming the file, the old clients still served; then fixed, SIGHUP: the new one
    applies."""
    foo_blob = section_secret(keys.foo_section)
    with OurServer(clients_conf(keys.foo_section)) as server:
        assert server.journal is not None
        conf = server.configdir / "clients.conf"
        for number, garbage in enumerate([*GARBAGE.values(), None], start=1):
            if garbage is None:  # moved away to be edited, say
                conf.unlink()
            else:
                conf.write_bytes(garbage)
            server.signal(signal.SIGHUP)
            failed = server.journal.wait_for("config-reload-failed", count=number)[-1]
            assert failed["PRIORITY"] == "3" and str(conf) in failed["MESSAGE"], failed
            assert "\n" not in failed["MESSAGE"], failed
            assert fetch(keys.foo, "127.0.0.1", server.port) == foo_blob
        assert len(server.journal.find("config-loaded")) == 1
        server.write_clients(clients_conf(keys.bar_section))
        server.signal(signal.SIGHUP)
        server.journal.wait_for("config-loaded", count=2)
        assert fetch(keys.bar, "127.0.0.1", server.port) == section_secret(keys.bar_section)
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""
        assert server.stop() == 0
    print(f"{len(GARBAGE)} garbage files and a missing one refused on SIGHUP, then 1 good one "
          "applied")
