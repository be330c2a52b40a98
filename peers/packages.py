# SPDX-License-Identifier: GPL-3.0-or-later
"""Our Debian packages for the tests: built as ``./dev package`` builds them
(packaging/build.py), and a throwaway root to install them in.

The throwaway root is the host's own ``/`` under an overlay whose upper layer is a tmpfs, in a
private mount namespace held by one shell (:class:`Root`): whatever the steps change is gone when
that shell exits, which it does when the test closes its stdin, even if the test dies.  Each
step runs there with ``nsenter`` and ``chroot``, with an empty ``/tmp``, a fresh ``/run``
(no ``/run/systemd/system``: the maintainer scripts see no running systemd and start nothing,
and ``systemctl`` in a chroot is offline anyway) and a ``policy-rc.d`` that refuses every
start.
The overlay shows the root file system only: :meth:`Root.copy_in` brings in files from
elsewhere.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "packaging" / "build.py"
#: What ./dev package builds: the server, the agent, and the etcd client of a fleet of servers.
PACKAGES = ("mandos-server", "mandos-password-agent", "mandos-server-etcd")
#: What a step in the root runs with: no proxy, locale or Python settings of the test's own.
ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
               "DEBIAN_FRONTEND": "noninteractive"}


@dataclass(frozen=True)
class Build:
    version: str
    debs: tuple[Path, ...]
    lintian: str

    def deb(self, package: str) -> Path:
        """The .deb of ``package``."""
        (found,) = (deb for deb in self.debs if deb.name.startswith(f"{package}_"))
        return found


def changelog_version() -> str:
    first = (REPO / "packaging" / "debian" / "changelog").read_text().split("\n", 1)[0]
    return first.split("(", 1)[1].split(")", 1)[0]


def build(output: Path, *extra: str) -> tuple[tuple[Path, ...], str]:
    """Build the packages into ``output`` (``extra``: build.py's options); the .deb files
    and build.py's output (lintian's findings)."""
    result = subprocess.run([sys.executable, str(BUILD), "--output", str(output), *extra],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    debs = tuple(sorted(output.glob("*.deb")))
    assert sorted(deb.name.split("_")[0] for deb in debs) == sorted(PACKAGES)
    return debs, result.stdout


#: Run by the shell that holds the mount namespace: the overlay, then wait until the test closes
#: stdin.  $1 is an empty directory on the host; in the namespace it becomes a tmpfs holding
#: the overlay's upper layer and the root.
HOLD = """set -eu
mount -t tmpfs -o mode=0755 throwaway-root "$1"
mkdir "$1/upper" "$1/work" "$1/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$1/upper,workdir=$1/work" "$1/root"
mount -t proc proc "$1/root/proc"
mount --rbind /dev "$1/root/dev"
mount --rbind /sys "$1/root/sys"
mount -t tmpfs -o mode=0755 run "$1/root/run"
# An empty /tmp, not the host's (test runs and clones): a VM booting this root would have
# systemd-tmpfiles empty it at boot, file by file through 9p, which took minutes.
mount -t tmpfs -o mode=1777 tmp "$1/root/tmp"
printf '#!/bin/sh\\nexit 101\\n' > "$1/root/usr/sbin/policy-rc.d"
chmod 0755 "$1/root/usr/sbin/policy-rc.d"
echo ready
read -r _ || true
"""


class Root:
    """A throwaway copy of the host's root; see the module's docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.root = directory / "root"
        self.upper = directory / "upper"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", HOLD, "sh",
             str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line != "ready\n":
            self.close()
            raise RuntimeError("the throwaway root could not be set up")

    def __enter__(self) -> Root:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run in the root's mount namespace, not chrooted (for qemu, which then
        sees the root at :attr:`root`); nsenter execs it."""
        return ["nsenter", "--target", str(self.holder.pid), "--mount", "--", *argv]

    def copy_in(self, source: Path, target: str) -> None:
        """Copy ``source`` (a file or a directory's contents, from anywhere on the host) to
        ``target`` in the root."""
        origin = f"{source}/." if source.is_dir() else str(source)
        self.run(f"mkdir -p {shlex.quote(str(self.root) + target.rsplit('/', 1)[0])}\n"
                 f"cp -a {shlex.quote(origin)} {shlex.quote(str(self.root) + target)}",
                 chroot=False)

    def close(self) -> None:
        assert self.holder.stdin is not None
        self.holder.stdin.close()
        try:
            self.holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait()

    def run(self, script: str, check: bool = True,
            chroot: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``sh -c script`` chrooted into the root (or only in its mount namespace)."""
        inside = ["chroot", str(self.root)] if chroot else []
        result = subprocess.run(
            self.wrap([*inside, "/bin/sh", "-ec", script]), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, env=ENVIRONMENT, check=False, timeout=300)
        if check:
            assert result.returncode == 0, (
                f"{script}\nexit {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def lines(self, script: str) -> list[str]:
        return self.run(script).stdout.splitlines()

    def status(self, package: str) -> str:
        """dpkg's status of ``package``: "installed", "config-files", "not-installed"."""
        return self.run(f"dpkg-query -W -f='${{db:Status-Status}}' {package} 2>/dev/null"
                        " || echo not-installed").stdout.strip()

    def stat(self, path: str) -> tuple[str, str, int] | None:
        """Owner, group and permission bits of ``path``, or None when it is not there."""
        result = self.run(f"stat -c '%U %G %a' {shlex.quote(path)}", check=False)
        if result.returncode != 0:
            return None
        owner, group, mode = result.stdout.split()
        return owner, group, int(mode, 8)

    def exists(self, path: str) -> bool:
        return self.run(f"test -e {shlex.quote(path)}", check=False).returncode == 0

    def read(self, path: str) -> str:
        return self.run(f"cat {shlex.quote(path)}").stdout

    def changed(self) -> list[str]:
        """The files the steps created or changed that name Mandos (the overlay's upper layer,
        without whiteouts, which record deletions)."""
        upper = shlex.quote(str(self.upper))
        found = self.run(f"cd {upper} && find . ! -type c ! -type d -path '*mandos*'",
                         chroot=False).stdout
        return sorted(line[1:] for line in found.splitlines())


