# SPDX-License-Identifier: GPL-3.0-or-later
"""Ask files of the systemd password-agent protocol: read one, and decide whether to answer it.

systemd 252 writes ``[Ask]`` files with ``PID=``, ``Socket=``, ``NotAfter=`` (CLOCK_MONOTONIC µs,
0 = no limit), ``Id=`` and an unescaped ``Message=`` that may run over several lines, so the file
is parsed line by line, not with configparser: a line is split on its first ``=``, lines without
one are skipped, unknown keys are ignored.  Only root can write into the agent directory, but
the message may carry text from elsewhere; a key that matters appearing twice (``Message=a\\nId=b``
could forge one) makes the whole request ambiguous, and it is ignored.

Every rule that makes the agent ignore a request yields one human-readable reason, which the
caller logs once.  The format is the one systemd 252's ``systemd-ask-password`` writes, which the
tests drive for real (peers/ask.py).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

#: An ask file larger than this is not something systemd wrote.
MAX_ASK_SIZE = 64 * 1024

#: The requests a disk unlock makes (systemd-cryptsetup writes ``Id=cryptsetup:<device>``).
CRYPTSETUP_PREFIX = "cryptsetup:"

#: The kernel's PID_MAX_LIMIT: no process id is larger (and os.kill() cannot take much larger).
PID_MAX = 1 << 22

#: systemd writes NotAfter= as an unsigned 64-bit number; a larger one is not a time, and one
#: beyond a float's range would crash the arithmetic of the waits.
NOT_AFTER_MAX = (1 << 64) - 1

#: Keys whose duplicates make a request ambiguous.
_SINGLE_KEYS = ("PID", "Socket", "NotAfter", "Id")


@dataclass(frozen=True)
class AskRequest:
    """One request the agent may answer, with what the answer and the safety checks need."""

    path: Path
    socket: str
    pid: int
    not_after: int  # CLOCK_MONOTONIC µs; 0 means no limit
    id: str | None

    @property
    def name(self) -> str:
        """The ask file's name, for log lines."""
        return self.path.name

    @property
    def answer_key(self) -> str:
        """What "the same request" means for never sending a password twice: the ``Id``, or,
        for requests without one (only with ``--all-requests``), the ask file."""
        return self.id if self.id is not None else f"file:{self.path}"

    def expired(self, now_us: int | None = None) -> bool:
        """Whether ``NotAfter`` has passed."""
        if self.not_after == 0:
            return False
        return (monotonic_us() if now_us is None else now_us) >= self.not_after

    def seconds_left(self) -> float | None:
        """Seconds until ``NotAfter``, or None without a limit."""
        if self.not_after == 0:
            return None
        return max(0.0, (self.not_after - monotonic_us()) / 1e6)

    def stale_reason(self) -> str | None:
        """Why this request, valid when read, is no longer worth answering, if it is not."""
        if self.expired():
            return "its NotAfter has passed"
        if not pid_alive(self.pid):
            return f"its requester (PID {self.pid}) is not running"
        return None


@dataclass(frozen=True)
class Ignored:
    """A request the agent will not answer, and why (one log line)."""

    path: Path
    reason: str


def monotonic_us() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock of ``NotAfter``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed requester nobody reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        status = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True  # no /proc: kill() said it exists
    # "pid (comm) S ...": the state follows the last ')'; comm may contain anything.
    return status[status.rfind(b")") + 2:][:1] != b"Z"


def parse_ask(text: str) -> dict[str, list[str]]:
    """The ``[Ask]`` section's keys and their values (in order), read leniently."""
    values: dict[str, list[str]] = {}
    section: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        if section != "Ask" or "=" not in line:
            continue  # another section, or a broken line (say, the rest of a Message=)
        key, value = line.split("=", 1)
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def read_ask_file(path: Path) -> str:
    """The text of an ask file: a regular file, not a symlink, at most :data:`MAX_ASK_SIZE`.

    Raises ``OSError`` (ENOENT when it went away) or ``ValueError`` with the reason."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("it is not a regular file")
        # (os.fdopen() of a directory raises without closing the descriptor: check first)
        stream = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with stream:
        data = stream.read(MAX_ASK_SIZE + 1)
    if len(data) > MAX_ASK_SIZE:
        raise ValueError(f"it is larger than {MAX_ASK_SIZE} bytes")
    return data.decode("utf-8", "surrogateescape")


def socket_problem(socket_path: str, directory: Path) -> str | None:
    """Why ``Socket=`` is not a place the password may go, if it is not: it must name an
    AF_UNIX socket (not a symlink) directly inside the agent directory."""
    if not socket_path:
        return "it has no Socket="
    if ("\0" in socket_path or not os.path.isabs(socket_path)
            or os.path.normpath(socket_path) != socket_path):
        return f"its Socket= {socket_path!r} is not a plain absolute path"
    if os.path.dirname(socket_path) != os.path.abspath(directory):
        return f"its Socket= {socket_path!r} is not inside {directory}"
    try:
        mode = os.lstat(socket_path).st_mode
    except OSError as error:
        return f"its Socket= {socket_path!r} cannot be used: {error.strerror}"
    if stat.S_ISLNK(mode):
        return f"its Socket= {socket_path!r} is a symbolic link"
    if not stat.S_ISSOCK(mode):
        return f"its Socket= {socket_path!r} is not a socket"
    return None


def load_request(path: Path, directory: Path, *, all_requests: bool = False
                 ) -> AskRequest | Ignored:
    """Read the ask file ``path`` in the agent ``directory`` and apply every rule: readable and
    small, unambiguous, a live requester, ``NotAfter`` not passed, a safe ``Socket``, and an
    ``Id`` starting with ``cryptsetup:`` unless ``all_requests``."""
    try:
        text = read_ask_file(path)
    except ValueError as error:
        return Ignored(path, str(error))
    except OSError as error:
        return Ignored(path, f"it cannot be read: {error.strerror}")
    values = parse_ask(text)
    for key in _SINGLE_KEYS:
        if len(values.get(key, ())) > 1:
            return Ignored(path, f"it has more than one {key}= line")

    def single(key: str) -> str | None:
        found = values.get(key)
        return found[0] if found else None

    pid_text = single("PID")
    try:
        pid = int(pid_text) if pid_text is not None else 0
    except ValueError:
        pid = 0
    if not 0 < pid <= PID_MAX:
        return Ignored(path, f"its PID= {pid_text!r} is missing or not a process id")
    not_after_text = single("NotAfter") or "0"
    try:
        not_after = int(not_after_text)
    except ValueError:
        not_after = -1
    if not 0 <= not_after <= NOT_AFTER_MAX:
        return Ignored(path, f"its NotAfter= {not_after_text!r} is not a time")
    request_id = single("Id")
    if not all_requests and not (request_id or "").startswith(CRYPTSETUP_PREFIX):
        return Ignored(path, f"its Id= {request_id!r} is not a disk unlock (cryptsetup:…); "
                             "use --all-requests to answer it")
    problem = socket_problem(single("Socket") or "", directory)
    if problem is not None:
        return Ignored(path, problem)
    request = AskRequest(path=path, socket=single("Socket") or "", pid=pid,
                         not_after=not_after, id=request_id)
    stale = request.stale_reason()
    if stale is not None:
        return Ignored(path, stale)
    return request
