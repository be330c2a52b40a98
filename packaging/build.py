# SPDX-License-Identifier: GPL-3.0-or-later
"""Build the Debian packages mandos-server, mandos-password-agent and mandos-server-etcd
(``./dev package``).

1. The Python packages that Debian 12 lacks or ships too old are downloaded from PyPI, pinned
   with their sha256 (packaging/python/*.txt), and turned into wheels: for the two
   Architecture: all packages, wheels that hold only Python files (sources built with
   ``SKIP_CYTHON=1``); for mandos-server-etcd, grpcio's and protobuf's manylinux wheels as
   published.  They are cached in build/packaging/ under a hash of the pins, so only the
   first build needs the network.
2. The source tree as git sees it (tracked files and new ones that are not ignored) is copied
   to a fresh directory, with packaging/debian/ as debian/ and the wheels in packaging/wheels;
   ``--version`` puts a changelog entry for that version on top.
3. ``dpkg-buildpackage`` (debhelper, dh-python) builds the packages there, offline; they are
   moved to the output directory (dist/), and lintian checks them: errors fail the build,
   warnings are printed.

Run with /usr/bin/python3 (the stdlib only); the build dependencies are in
packaging/debian/control (``./dev package`` installs them when run as root).
"""

from __future__ import annotations

import argparse
import email.utils
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQUIREMENTS = sorted((HERE / "python").glob("*.txt"))
#: Debian's interpreter, which runs the packages, and its pip (python3-pip), whatever python3
#: comes first on PATH.
PYTHON = "/usr/bin/python3"
#: For the builds of sources: zeroconf and dbus-fast then leave out their optional Cython
#: speedups, so the wheels hold only Python files and the packages stay Architecture: all.
SKIP_CYTHON = {"SKIP_CYTHON": "1"}
PIP_ENVIRONMENT = {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                   "PIP_NO_INPUT": "1"}


class BuildError(Exception):
    """A step failed; the message says which and shows the end of its output."""


def run(command: Sequence[str | Path], *, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> str:
    """Run ``command``; its output (stdout and stderr together) or BuildError with its tail."""
    result = subprocess.run([str(part) for part in command], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **PIP_ENVIRONMENT, **(env or {})}, check=False)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-40:])
        raise BuildError(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{tail}")
    return result.stdout


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: two builds share the wheel cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def wheels(cache: Path) -> Path:
    """The directory of the wheels for every pin, built once per set of pins."""
    digest = hashlib.sha256(run([PYTHON, "-VV"]).encode())
    for requirements in REQUIREMENTS:
        digest.update(requirements.read_bytes())
    directory = cache / f"wheels-{digest.hexdigest()[:16]}"
    with locked(cache / ".lock"):
        if directory.is_dir():
            return directory
        with tempfile.TemporaryDirectory(dir=cache) as work:
            downloads, built = Path(work) / "downloads", Path(work) / "wheels"
            for requirements in REQUIREMENTS:
                # --require-hashes: only the very files pinned; --no-deps: every dependency
                # is pinned in the file too.
                run([PYTHON, "-m", "pip", "download", "--quiet", "--require-hashes",
                     "--no-deps", "--dest", downloads, "--requirement", requirements])
            built.mkdir()
            for download in sorted(downloads.iterdir()):
                if download.suffix == ".whl":
                    shutil.copy2(download, built)
                else:
                    run([PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps",
                         "--wheel-dir", built, download], env=SKIP_CYTHON)
            for old in cache.glob("wheels-*"):
                shutil.rmtree(old)
            built.rename(directory)
    return directory


def source_files() -> list[str]:
    """The tree's files as git sees them: tracked, and new ones that are not ignored."""
    listing = run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                   "--exclude-standard"])
    return sorted({name for name in listing.split("\0") if name and (REPO / name).is_file()
                   and not name.startswith("packaging/debian/")})


def changelog_entry(version: str, package: str, maintainer: str) -> str:
    return (f"{package} ({version}) unstable; urgency=medium\n\n"
            f"  * Rebuilt as {version}.\n\n"
            f" -- {maintainer}  {email.utils.formatdate(usegmt=False)}\n\n")


def prepare(tree: Path, wheel_directory: Path, version: str | None) -> None:
    """Copy the source to ``tree`` and put the Debian directory and the wheels in place."""
    for name in source_files():
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    shutil.copytree(HERE / "debian", tree / "debian")
    shutil.copytree(wheel_directory, tree / "packaging" / "wheels")
    if version:
        changelog = tree / "debian" / "changelog"
        text = changelog.read_text()
        package = text.split(" ", 1)[0]
        maintainer = text.split("\n -- ", 1)[1].split("  ", 1)[0]
        changelog.write_text(changelog_entry(version, package, maintainer) + text)


def lintian(debs: list[Path]) -> str:
    """lintian's tags for ``debs``: BuildError on an error, the warnings returned."""
    result = subprocess.run(["lintian", "--fail-on", "error", "--display-info", *map(str, debs)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"lintian found errors:\n{result.stdout}")
    return result.stdout


def build(output: Path, version: str | None, cache: Path, check: bool) -> list[Path]:
    wheel_directory = wheels(cache)
    with tempfile.TemporaryDirectory(dir=cache, prefix="source-") as work:
        tree = Path(work) / "mandos-agent"
        prepare(tree, wheel_directory, version)
        # -b: binary packages only (the source package is this repository).
        run(["dpkg-buildpackage", "-b", "--no-sign"], cwd=tree)
        output.mkdir(parents=True, exist_ok=True)
        debs = []
        for deb in sorted(Path(work).glob("*.deb")):
            target = output / deb.name
            shutil.move(deb, target)
            debs.append(target)
    if check:
        sys.stdout.write(lintian(debs))
    return debs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev package", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "dist",
                        help="where the .deb files go (default: dist/)")
    parser.add_argument("--version", help="the packages' version (default: the changelog's)")
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "packaging",
                        help="the wheel cache and the build directories")
    parser.add_argument("--no-lintian", dest="lintian", action="store_false",
                        help="do not run lintian on the packages")
    arguments = parser.parse_args(argv)
    try:
        debs = build(arguments.output.resolve(), arguments.version, arguments.cache.resolve(),
                     arguments.lintian)
    except BuildError as error:
        print(f"packaging/build.py: {error}", file=sys.stderr)
        return 1
    for deb in debs:
        print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
