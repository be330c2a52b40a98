# SPDX-License-Identifier: GPL-3.0-or-later
"""Booting the test VMs: qemu with the serial console in a log file and a hard deadline
(:func:`run`); :func:`boot` adds a disk and user networking that reaches nothing but one
forwarded port on host loopback (peers/vm/hostroot.py adds the host's root file system instead).

KVM is used only where it really works: on the build machines /dev/kvm is kvm_pvm, which hangs
a stock kernel, so TCG is the normal mode (``-cpu max -smp 2 -m 1024``: about 14 s to an
unlocked root).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
#: The Mandos server as the guest sees it; slirp forwards it to host loopback.
GUEST_SERVER = ("10.0.2.100", 7777)
#: How long qemu gets to exit after the guest said it is done.
POWEROFF_SECONDS = 10.0


def kvm_usable() -> bool:
    """True only with a real kvm_intel/kvm_amd and no kvm_pvm (which cannot run a stock kernel)."""
    modules = Path("/sys/module")
    return (os.access("/dev/kvm", os.R_OK | os.W_OK)
            and any((modules / name).exists() for name in ("kvm_intel", "kvm_amd"))
            and not (modules / "kvm_pvm").exists())


@dataclass
class Boot:
    """One boot's serial console log and when (seconds after qemu started) each line arrived."""

    log: Path
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    arrivals: list[tuple[float, str]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def first(self, pattern: str) -> float | None:
        """Seconds after start at which a line matching ``pattern`` first arrived."""
        regex = re.compile(pattern)
        return next((at for at, line in self.arrivals if regex.search(line)), None)


@dataclass(frozen=True)
class Typist:
    """A human at the serial console: ``after`` seconds after the console showed ``prompt``
    (no newline needed), type ``text`` and Enter, once."""

    prompt: str
    text: bytes
    after: float = 0.0


@dataclass(frozen=True)
class Trigger:
    """The first console line matching ``pattern`` calls ``action`` with the seconds since
    qemu started (once; it must not block the console reader)."""

    pattern: str
    action: Callable[[float], None]


def boot(*, kernel: Path, initrd: Path, disk: Path, append: str, host_port: int, log: Path,
         timeout: float, done_marker: str, typist: Typist | None = None) -> Boot:
    """Boot from ``disk`` (a snapshot: the image stays unchanged) with user networking whose
    ``GUEST_SERVER`` reaches 127.0.0.1:``host_port`` and nothing else; see :func:`run`."""
    address, port = GUEST_SERVER
    forward = f"guestfwd=tcp:{address}:{port}-cmd:socat - TCP:127.0.0.1:{host_port}"
    devices = ["-drive", f"file={disk},format=raw,if=virtio,snapshot=on",
               "-netdev", f"user,id=n0,restrict=on,{forward}",
               "-device", "virtio-net-pci,netdev=n0"]
    return run(kernel=kernel, initrd=initrd, append=append, devices=devices, log=log,
               timeout=timeout, done_marker=done_marker, typist=typist)


def run(*, kernel: Path, initrd: Path, append: str, devices: list[str], log: Path,
        timeout: float, done_marker: str, typist: Typist | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
        triggers: Sequence[Trigger] = ()) -> Boot:
    """Boot a VM with ``devices`` (qemu options) until qemu exits, or ``timeout`` passes, or the
    guest printed ``done_marker`` and did not power off soon after (qemu is killed then).
    Without a ``typist``, stdin is /dev/null, so nobody can type at a console prompt.  ``wrap``
    prefixes qemu's argv (e.g. to run it in a network namespace; it must exec qemu);
    ``triggers`` act on console lines."""
    accel = ["-accel", "kvm", "-cpu", "host"] if kvm_usable() else ["-accel", "tcg", "-cpu", "max"]
    argv = [QEMU, *accel, "-m", "1024", "-smp", "2", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", append, *devices]
    if wrap is not None:
        argv = wrap(argv)
    fired: set[int] = set()
    result = Boot(log)
    start = time.monotonic()
    with open(log, "wb") as output:
        output.write(f"# {shlex.join(argv)}\n".encode())
        output.flush()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL if typist is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        assert process.stdout is not None
        console = b""  # what the guest printed, for the typist to read
        prompted: float | None = None  # when the typist saw the prompt
        typed = False
        os.set_blocking(process.stdout.fileno(), False)
        pending = b""
        deadline = start + timeout
        try:
            while True:
                now = time.monotonic()
                elapsed = now - start
                if now > deadline:
                    result.timed_out = not any(done_marker in line
                                               for _, line in result.arrivals)
                    break
                chunk = _read(process.stdout.fileno())
                if chunk is None:
                    break  # qemu closed its output: it has exited
                if typist is not None and not typed:
                    console += chunk
                    if prompted is None and typist.prompt.encode() in console:
                        prompted = now
                    if prompted is not None and now >= prompted + typist.after:
                        assert process.stdin is not None
                        process.stdin.write(typist.text + b"\r")
                        process.stdin.flush()
                        typed = True
                if chunk:
                    output.write(chunk)
                    output.flush()
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        text = line.decode(errors="replace").rstrip("\r")
                        result.arrivals.append((elapsed, text))
                        for index, trigger in enumerate(triggers):
                            if index not in fired and re.search(trigger.pattern, text):
                                fired.add(index)
                                trigger.action(elapsed)
                        if done_marker in text:  # the guest powers off right after
                            deadline = min(deadline, now + POWEROFF_SECONDS)
                else:
                    time.sleep(0.05)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            result.returncode = process.wait()
            process.stdout.close()
            if process.stdin is not None:
                process.stdin.close()
    result.seconds = time.monotonic() - start
    return result


def _read(descriptor: int) -> bytes | None:
    """What is there to read now: bytes (maybe empty), or None at end of file."""
    try:
        data = os.read(descriptor, 65536)
    except BlockingIOError:
        return b""
    return data if data else None
