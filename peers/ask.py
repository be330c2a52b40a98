# SPDX-License-Identifier: GPL-3.0-or-later
"""Password requests for agent tests: the real ``systemd-ask-password``, and a fake requester.

``systemd-ask-password`` hardcodes ``/run/systemd/ask-password`` and writes that absolute path
into the ``Socket=`` line of its ``ask.*`` file.  A test must not use the host's directory, so:

* :class:`AskNamespace` makes a private temporary directory ``D`` and a mount namespace (held
  open by a sleeping process) in which ``D`` is bind-mounted on ``/run/systemd/ask-password``.
  The test sees the requests in ``D`` from outside; commands run inside via :meth:`wrap`
  (``nsenter -t HOLDER -m``).
* The ``Socket=`` path, ``/run/systemd/ask-password/sck.*``, only means ``D/sck.*`` *inside* the
  namespace; outside it names the host's directory.  An agent that checks that the socket lies
  in its agent directory (ours does, as the design requires) therefore has to run **inside the
  namespace** too, with the default agent directory: ``ns.wrap([agent, ...])``.  An agent
  outside, given ``--agent-directory D``, must ignore such requests (a negative test).
* Replies are checked by the requester: only uid 0 (of its user namespace) is believed.  Tests
  run as root, and everything here stays in the initial user namespace.

:class:`AskPassword` runs the real requester in such a namespace; :class:`FakeRequester` writes
a raw ``ask.*`` file (any content, also broken ones) and binds the datagram socket itself, in
any directory, and reports what an agent sent to it.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from peers.process import StartStop

AGENT_DIRECTORY = Path("/run/systemd/ask-password")

_HOLDER = (
    'set -e; mkdir -p "$1"; mount --bind "$0" "$1"; echo ready; exec sleep infinity'
)


def parse_ask_file(text: str) -> dict[str, str]:
    """The ``key=value`` lines of an ask file, leniently (a broken ``Message=`` may continue on a
    line without ``=``, which is skipped)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields.setdefault(key.strip(), value)
    return fields


class AskNamespace(StartStop):
    """A private agent directory ``directory`` that is ``/run/systemd/ask-password`` inside a
    mount namespace held open until the ``with`` ends."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mandos-test-ask-"))
        self.directory.chmod(0o755)
        self.holder: subprocess.Popen[bytes] | None = None

    def start(self) -> AskNamespace:
        try:
            self.holder = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", _HOLDER,
                 str(self.directory), str(AGENT_DIRECTORY)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
            )
            assert self.holder.stdout is not None
            if not select.select([self.holder.stdout], [], [], 10)[0]:
                raise RuntimeError("the ask-password namespace did not come up in time")
            if self.holder.stdout.readline() != b"ready\n":
                raise RuntimeError(f"the ask-password namespace failed ({self.holder.wait()})")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        if self.holder is None:
            raise RuntimeError("the ask-password namespace is not running")
        return self.holder.pid

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace."""
        return ["nsenter", "-t", str(self.pid), "-m", "--", *argv]

    def outside(self, inside: str | Path) -> Path:
        """Where a path under ``/run/systemd/ask-password`` inside is, seen from outside."""
        return self.directory / Path(inside).relative_to(AGENT_DIRECTORY)

    def ask_files(self) -> list[Path]:
        return sorted(self.directory.glob("ask.*"))

    def stop(self) -> None:
        if self.holder is not None:
            if self.holder.poll() is None:
                self.holder.kill()
            self.holder.wait()
            if self.holder.stdout:
                self.holder.stdout.close()
            self.holder = None
        shutil.rmtree(self.directory, ignore_errors=True)


class AskPassword:
    """One run of the real ``systemd-ask-password --no-tty`` inside an :class:`AskNamespace`."""

    def __init__(self, namespace: AskNamespace, process: subprocess.Popen[bytes]) -> None:
        self.namespace = namespace
        self.process = process
        self._ask_file: Path | None = None
        self._result: tuple[int, bytes] | None = None
        #: The requester's stderr, once :meth:`wait` returned.
        self.stderr = b""

    @classmethod
    def start(cls, namespace: AskNamespace, message: str = "Password:", *,
              id: str | None = "cryptsetup:/dev/test", timeout: float = 30,
              extra_args: Sequence[str] = ()) -> AskPassword:
        """Start the requester; ``timeout`` is its ``--timeout`` (0 = none)."""
        argv = ["systemd-ask-password", "--no-tty", f"--timeout={timeout:g}"]
        if id is not None:
            argv.append(f"--id={id}")
        argv += [*extra_args, message]
        # nsenter without -p execs: the pid is the requester's own (the ask file's PID=).
        process = subprocess.Popen(namespace.wrap(argv), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return cls(namespace, process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ask_file(self, timeout: float = 5.0) -> Path:
        """The ``ask.*`` file of this request (outside path), once it exists."""
        deadline = time.monotonic() + timeout
        while self._ask_file is None:
            for path in self.namespace.ask_files():
                try:
                    fields = parse_ask_file(path.read_text(errors="replace"))
                except FileNotFoundError:
                    continue
                if fields.get("PID") == str(self.pid):
                    self._ask_file = path
                    break
            else:
                if self.process.poll() is not None:
                    raise RuntimeError(f"systemd-ask-password exited: {self.wait()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("systemd-ask-password wrote no ask file in time")
                time.sleep(0.01)
        return self._ask_file

    @property
    def ask_file(self) -> Path:
        return self.wait_ask_file()

    def fields(self) -> dict[str, str]:
        return parse_ask_file(self.ask_file.read_text(errors="replace"))

    def socket_outside(self) -> Path:
        """The request's socket, as the test (outside the namespace) reaches it."""
        return self.namespace.outside(self.fields()["Socket"])

    def wait(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """Wait for the requester to exit: its exit status and stdout (the password and a
        newline on success)."""
        if self._result is None:
            stdout, self.stderr = self.process.communicate(timeout=timeout)
            self._result = (self.process.returncode, stdout)
        return self._result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()

    def __enter__(self) -> AskPassword:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


class FakeRequester:
    """A hand-made password request in ``directory``: ``ask.<random>`` (written atomically, as
    systemd does) and a bound ``sck.<random>`` datagram socket.

    ``fields`` override or extend the defaults (PID of this process, the socket, NotAfter=0,
    Id=cryptsetup:/dev/fake); a value None drops the line.  ``raw`` replaces the whole file.
    """

    def __init__(self, directory: Path, fields: Mapping[str, str | int | None] | None = None,
                 *, raw: str | None = None) -> None:
        self.directory = Path(directory)
        tag = secrets.token_hex(8)
        self.socket_path = self.directory / f"sck.{tag}"
        self.ask_file = self.directory / f"ask.{tag[:6]}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.socket.bind(str(self.socket_path))
            self.socket_path.chmod(0o600)
            if raw is None:
                values: dict[str, str | int | None] = {
                    "PID": os.getpid(), "Socket": str(self.socket_path), "AcceptCached": 0,
                    "Echo": 0, "NotAfter": 0, "Silent": 0, "Message": "Fake request",
                    "Id": "cryptsetup:/dev/fake",
                }
                values.update(fields or {})
                raw = "[Ask]\n" + "".join(
                    f"{key}={value}\n" for key, value in values.items() if value is not None
                )
            temporary = self.directory / f"tmp.{tag[:6]}"
            temporary.write_text(raw)
            temporary.rename(self.ask_file)
        except BaseException:
            self.close()
            raise

    def receive(self, timeout: float = 5.0) -> bytes | None:
        """The next datagram an agent sent, or None after ``timeout`` seconds."""
        if not select.select([self.socket], [], [], timeout)[0]:
            return None
        return self.socket.recv(65536)

    def remove_ask_file(self) -> None:
        """Withdraw the request, as a requester does when answered or timed out."""
        self.ask_file.unlink(missing_ok=True)

    def close(self) -> None:
        self.socket.close()
        self.ask_file.unlink(missing_ok=True)
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> FakeRequester:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def monotonic_usec(offset: float = 0.0) -> int:
    """CLOCK_MONOTONIC in microseconds plus ``offset`` seconds, for ``NotAfter=``."""
    return int((time.clock_gettime(time.CLOCK_MONOTONIC) + offset) * 1_000_000)
