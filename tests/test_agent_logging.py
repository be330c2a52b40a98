# SPDX-License-Identifier: GPL-3.0-or-later
"""The agent's log lines reach the journal with their syslog priority (a warning is a warning
in ``journalctl -p warning``), and ``SYSTEMD_LOG_LEVEL`` sets how much it logs.

The agent's stderr is connected to a real ``systemd-journald``'s stdout stream, as systemd
connects a unit's ``StandardError=journal``, with ``JOURNAL_STREAM`` naming that stream.  The
run is one that logs at three priorities: a request pending, a run directory it cannot make
(warning), a server that refuses the connection (info), and ``--timeout`` reached (error).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from password_agent import log as agentlog
from peers.ask import FakeRequester
from peers.journald import PrivateJournal
from tests.conftest import Keys

pytestmark = pytest.mark.interop

IDENTIFIER = "mandos-agent-log-test"


@contextmanager
def journal_stream(journal: PrivateJournal) -> Iterator[socket.socket]:
    """A connection to journald's stdout stream with level prefixes on, as systemd opens one
    for a unit's stderr (the header: identifier, unit, default priority, level prefix, and no
    forwarding to syslog, kmsg or console)."""
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stream.connect(str(journal.root / "run/systemd/journal/stdout"))
        stream.sendall(f"{IDENTIFIER}\n\n6\n1\n0\n0\n0\n".encode())
        stream.shutdown(socket.SHUT_RD)
        yield stream
    finally:
        stream.close()


def closed_port() -> int:
    """A loopback port that nobody listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_agent(requests: Path, keys: Keys, tmp_path: Path, stderr: int,
              environment: dict[str, str]) -> int:
    """One run that warns, informs and fails: its exit status."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with FakeRequester(requests):
        return subprocess.run(
            [sys.executable, "-m", "password_agent", "--agent-directory", str(requests),
             "--keydir", str(keys.foo.directory), "--connect", f"127.0.0.1:{closed_port()}",
             "--run-directory", str(blocker / "run"), "--timeout", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, **environment}, timeout=60, check=False).returncode


def priorities(journal: PrivateJournal) -> dict[str, set[str]]:
    """``PRIORITY`` values by the start of each message the test's stream logged.  The last
    line, the error, is waited for: journald stores a stream's lines in order, so every line
    before it is in by then."""
    journal.wait_for(timeout=10.0, SYSLOG_IDENTIFIER=IDENTIFIER, PRIORITY="3")
    found: dict[str, set[str]] = {}
    for entry in journal.entries(SYSLOG_IDENTIFIER=IDENTIFIER):
        message = entry["MESSAGE"]
        assert message.startswith(agentlog.PREFIX), entry
        found.setdefault(message[len(agentlog.PREFIX):][:30], set()).add(entry["PRIORITY"])
    return found


def priorities_logged(journal: PrivateJournal, requests: Path, keys: Keys, tmp_path: Path,
                      log_level: str) -> dict[str, set[str]]:
    """Run the agent with its stderr on a journal stream, as a unit's is, and
    ``SYSTEMD_LOG_LEVEL=log_level``: the :func:`priorities` it logged at."""
    with journal_stream(journal) as stream:
        status = os.fstat(stream.fileno())
        environment = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}",
                       "SYSTEMD_LOG_LEVEL": log_level}
        assert run_agent(requests, keys, tmp_path, stream.fileno(), environment) == 1
    return priorities(journal)


def test_warnings_and_errors_carry_their_priority(private_journal: PrivateJournal,
                                                  requests: Path, keys: Keys,
                                                  tmp_path: Path) -> None:
    found = priorities_logged(private_journal, requests, keys, tmp_path, "")
    by_priority = {priority: [start for start, values in found.items() if priority in values]
                   for priority in ("3", "4", "6")}
    assert any(s.startswith("cannot create the private") for s in by_priority["4"]), found
    assert any(s.startswith("cannot connect to 127.0.0.1") for s in by_priority["6"]), found
    assert any(s.startswith("error: --timeout of 1 s") for s in by_priority["3"]), found
    warnings = private_journal.entries("-p", "warning", SYSLOG_IDENTIFIER=IDENTIFIER)
    assert warnings and all(entry["PRIORITY"] in ("3", "4") for entry in warnings), warnings


def test_systemd_log_level_leaves_out_the_lower_priorities(private_journal: PrivateJournal,
                                                          requests: Path, keys: Keys,
                                                          tmp_path: Path) -> None:
    found = priorities_logged(private_journal, requests, keys, tmp_path, "warning")
    assert {value for values in found.values() for value in values} == {"3", "4"}, found


def test_plain_lines_when_stderr_is_not_the_journal(requests: Path, keys: Keys,
                                                    tmp_path: Path) -> None:
    """A ``JOURNAL_STREAM`` inherited from a parent whose stderr went elsewhere (here: a file)
    puts no prefix on the lines."""
    log_path = tmp_path / "stderr"
    with open(log_path, "wb") as log_file:
        status = os.fstat(log_file.fileno())
        other = f"{status.st_dev}:{status.st_ino + 1}"
        assert run_agent(requests, keys, tmp_path, log_file.fileno(),
                         {"JOURNAL_STREAM": other, "SYSTEMD_LOG_LEVEL": "info"}) == 1
    lines = log_path.read_text().splitlines()
    assert any(line.startswith(agentlog.PREFIX + "cannot create the private") for line in lines)
    assert any(line.startswith(agentlog.PREFIX + "error: --timeout") for line in lines), lines
    assert not any(line.startswith("<") for line in lines), lines


@pytest.mark.parametrize(("value", "level"), [
    ("debug", logging.DEBUG), ("7", logging.DEBUG), ("info", logging.INFO),
    ("6", logging.INFO), ("notice", logging.WARNING), ("warning", logging.WARNING),
    ("4", logging.WARNING), ("err", logging.ERROR), ("3", logging.ERROR),
    ("crit", logging.CRITICAL), ("0", logging.CRITICAL), (" Warning ", logging.WARNING),
    ("", None), ("8", None), ("loud", None), (None, None)])
def test_systemd_log_level_values(value: str | None, level: int | None) -> None:
    assert agentlog.threshold(value) == level


@pytest.mark.parametrize(("level", "priority"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2)])
def test_logging_levels_map_to_syslog_priorities(level: int, priority: int) -> None:
    assert agentlog.priority(level) == priority
