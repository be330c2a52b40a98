# SPDX-License-Identifier: GPL-3.0-or-later
"""The record of answers sent (``password_agent/answered.py``): a restarted agent still never
sends the same password twice to one request ``Id``, while the file holds hashes only, never
the key that would let its reader test password guesses offline.  The key lives in root's real
kernel keyring (``/proc/keys`` shows it); these keys expire within half a minute here."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from password_agent import answered, keyring
from password_agent.answered import AnsweredRecord, key_description

PASSWORD = b"correct horse battery staple"
ID = "cryptsetup:/dev/a"


@pytest.fixture(autouse=True)
def _short_lived_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys these tests put in root's keyring go away within half a minute."""
    monkeypatch.setattr(answered, "KEY_LIFETIME", 30)


def _hmac(key: bytes, request_key: str, password: bytes) -> str:
    """A stored digest as the record computes it (HMAC-SHA256 of Id, NUL, password)."""
    return hmac.new(key, request_key.encode() + b"\0" + password, hashlib.sha256).hexdigest()


def _candidate_keys(content: bytes) -> Iterator[bytes]:
    """Every 32-byte string in ``content``: each 32-byte window of every run of hex digits,
    decoded, and each 32-byte window of the raw bytes."""
    for run in re.finditer(rb"[0-9a-fA-F]{64,}", content):
        digits = run.group()
        for start in range(len(digits) - 63):
            yield bytes.fromhex(digits[start:start + 64].decode())
    for start in range(len(content) - 31):
        yield content[start:start + 32]


def _proc_keys_line(description: str) -> str | None:
    lines = [line for line in Path("/proc/keys").read_text().splitlines()
             if line.endswith(f" {description}: 32")]
    return lines[0] if lines else None


def test_a_restarted_agent_still_refuses_the_same_password_for_the_same_id(
        tmp_path: Path) -> None:
    path = tmp_path / "answered"
    first = AnsweredRecord(path)
    assert not first.contains(ID, PASSWORD)
    first.add(ID, PASSWORD)
    assert first.contains(ID, PASSWORD)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = AnsweredRecord(path)  # a restarted agent
    assert second.path == path
    assert second.contains(ID, bytearray(PASSWORD))
    assert not second.contains("cryptsetup:/dev/b", PASSWORD)
    assert not second.contains(ID, b"another password")


#: One agent's run in a process of its own, with a fresh session keyring that does not lead to
#: the user keyring, as systemd starts every service (``KeyringMode=private``): it answers
#: ``argv[2]`` with the password on its standard input (never in an argv, where the secret
#: scan looks) unless the record says it was done, and prints what it did.
_SERVICE_RUN = """
import sys
from pathlib import Path
from password_agent import answered, keyring
keyring._keyctl(1, 0)  # KEYCTL_JOIN_SESSION_KEYRING, anonymous
answered.KEY_LIFETIME = 30
record = answered.AnsweredRecord(Path(sys.argv[1]))
assert record.path is not None, "the record has no file"
password = sys.stdin.buffer.read()
if record.contains(sys.argv[2], password):
    print("refused")
else:
    record.add(sys.argv[2], password)
    print("sent")
"""


def test_agents_in_private_session_keyrings_share_the_record(tmp_path: Path) -> None:
    """As systemd runs the agent: each start in a session keyring of its own.  The second
    start must still find the key (it once failed with EACCES there: a key in the user
    keyring is readable only by a process that reaches it from its own keyrings)."""
    path = tmp_path / "answered"

    def service_run(request_key: str) -> str:
        result = subprocess.run([sys.executable, "-c", _SERVICE_RUN, str(path), request_key],
                                input=PASSWORD, capture_output=True, timeout=30,
                                cwd=Path(__file__).resolve().parent.parent)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode().strip()

    assert service_run(ID) == "sent"
    assert service_run(ID) == "refused"
    assert service_run("cryptsetup:/dev/b") == "sent"


def test_the_file_holds_no_key_that_verifies_its_hashes(tmp_path: Path) -> None:
    """Anyone who reads the file must not be able to test guesses: no 32-byte string in it,
    raw or hex, makes one of its digests."""
    path = tmp_path / "answered"
    record = AnsweredRecord(path)
    answers = [(f"cryptsetup:/dev/disk{number}", secrets.token_bytes(24)) for number in range(3)]
    for request_key, password in answers:
        record.add(request_key, password)
    content = path.read_bytes()
    stored = set(re.findall(r"(?m)^[0-9a-f]{64}$", content.decode()))
    assert len(stored) == len(answers)
    for request_key, password in answers:
        assert password not in content and password.hex().encode() not in content
        assert AnsweredRecord(path).contains(request_key, password)
    verifying = [candidate.hex() for candidate in _candidate_keys(content)
                 if any(_hmac(candidate, request_key, password) in stored
                        for request_key, password in answers)]
    assert verifying == [], f"{path} holds its own key"


@pytest.mark.peers
def test_the_key_is_in_roots_keyring_readable_only_by_its_possessor(tmp_path: Path) -> None:
    path = tmp_path / "answered"
    AnsweredRecord(path).add(ID, PASSWORD)
    line = _proc_keys_line(key_description(path))
    assert line is not None, f"no key {key_description(path)} in /proc/keys"
    _serial, _flags, _usage, expiry, permissions, uid, _gid, key_type = line.split()[:8]
    assert (key_type, uid) == ("user", "0"), line
    # Possessor: view, read, write, search, link, setattr; user (other root processes that
    # do not possess it): view only.
    assert permissions == "3f010000", line
    assert re.fullmatch(r"\d+s", expiry) and int(expiry[:-1]) <= 30, line


def test_two_agents_on_one_record_share_its_key(tmp_path: Path) -> None:
    """The initramfs's resident agent and a started one, or two runs overlapping: the second
    opens the record before the first answers, and every answer of either still counts."""
    path = tmp_path / "answered"
    first, second = AnsweredRecord(path), AnsweredRecord(path)
    first.add(ID, PASSWORD)
    second.add("cryptsetup:/dev/b", PASSWORD)
    third = AnsweredRecord(path)
    assert third.contains(ID, PASSWORD) and third.contains("cryptsetup:/dev/b", PASSWORD)


def test_an_old_format_file_with_its_key_is_emptied_and_never_trusted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An older agent kept the key in the file: its hashes cannot be checked without a key
    that may have been read, so they are thrown away with the key."""
    path = tmp_path / "answered"
    old_key = secrets.token_bytes(32)
    old_digest = _hmac(old_key, ID, PASSWORD)
    path.write_text("# mandos-password-agent: keyed hashes of (Id, password) answered; "
                    f"no passwords\nkey={old_key.hex()}\n{old_digest}\n")
    path.chmod(0o600)
    with caplog.at_level(logging.INFO):
        record = AnsweredRecord(path)
    assert record.path == path
    assert not record.contains(ID, PASSWORD)
    content = path.read_text()
    assert old_key.hex() not in content and old_digest not in content and "key=" not in content
    assert "starting a new record" in caplog.text
    record.add(ID, PASSWORD)
    assert AnsweredRecord(path).contains(ID, PASSWORD)


def test_a_record_whose_key_expired_starts_afresh(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(answered, "KEY_LIFETIME", 1)
    path = tmp_path / "answered"
    AnsweredRecord(path).add(ID, PASSWORD)
    time.sleep(1.5)
    record = AnsweredRecord(path)
    assert record.path == path
    assert not record.contains(ID, PASSWORD)
    assert re.findall(r"(?m)^[0-9a-f]{64}$", path.read_text()) == []  # the old hashes are gone
    record.add(ID, PASSWORD)
    assert AnsweredRecord(path).contains(ID, PASSWORD)


def test_a_discarded_key_leaves_the_record_untrusted(tmp_path: Path) -> None:
    """What the tests' agent peer does when it stops (peers/agent.py)."""
    path = tmp_path / "answered"
    AnsweredRecord(path).add(ID, PASSWORD)
    keyring.discard(key_description(path))
    keyring.discard(key_description(path))  # gone already: nothing to do
    assert not AnsweredRecord(path).contains(ID, PASSWORD)


def test_without_the_keyring_answers_are_remembered_until_exit_and_the_file_emptied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An architecture whose system call numbers we do not know (ENOSYS, as under a container
    runtime's seccomp filter): no file to trust, and an old key in it is wiped all the same."""
    path = tmp_path / "answered"
    old_key = secrets.token_bytes(32)
    path.write_text(f"key={old_key.hex()}\n{_hmac(old_key, ID, PASSWORD)}\n")
    monkeypatch.setattr(sys.implementation, "_multiarch", "unknown-linux-gnu")
    with caplog.at_level(logging.WARNING):
        record = AnsweredRecord(path)
    assert record.path is None
    assert "remembering answers only until exit" in caplog.text
    assert path.read_bytes() == b""
    assert not record.contains(ID, PASSWORD)
    record.add(ID, PASSWORD)
    assert record.contains(ID, PASSWORD)


def test_without_a_usable_file_answers_are_remembered_until_exit(tmp_path: Path) -> None:
    record = AnsweredRecord(tmp_path / "missing-dir" / "answered")
    assert record.path is None
    record.add("cryptsetup:x", b"pw")
    assert record.contains("cryptsetup:x", b"pw")
