# SPDX-License-Identifier: GPL-3.0-or-later
"""What the VM boot test boots, built once and cached: a Debian kernel, a LUKS2 root disk with a
busybox root file system, a Mandos key set, and an initramfs made by dracut with our module.

Everything lives in one cache directory (``MANDOS_TEST_VM_CACHE``, default
/var/cache/mandos-agent-vm) and is rebuilt only when what it is made from changes: the
initramfs's name carries a hash of its inputs (our module, every Python file the agent needs,
the keys, the kernel, dracut's version).  Nothing is installed on the host: the kernel and
busybox-static are only downloaded and unpacked (``apt-get download``, ``dpkg-deb -x``);
dracut runs from a private copy of its base directory, so /usr/lib/dracut is never modified.
The disk is made without mounts, loop devices or device-mapper: mkfs.ext4 -d, then cryptsetup's
offline in-place encryption.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peers.packages import Root
from peers.upstream import MANDOS_KEYGEN

REPO = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent
SLIM_NETWORK_MODULE = HERE / "dracut" / "90kernel-network-modules"
ROOT_INIT = HERE / "rootfs-init"

DEFAULT_CACHE = Path("/var/cache/mandos-agent-vm")
#: Bump to throw away every cached disk and initramfs (their recipe changed).
RECIPE_VERSION = "2"

DRACUT_MODULES = ("systemd systemd-initrd systemd-udevd systemd-ask-password systemd-networkd "
                  "dracut-systemd crypt dm rootfs-block kernel-network-modules base fs-lib "
                  "udev-rules mandos-agent")
DRACUT_DRIVERS = "virtio_blk virtio_pci virtio_net dm_crypt ext4"


class ImageError(Exception):
    """A build step failed; the message says which and shows its output."""


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    moddir: Path


@dataclass(frozen=True)
class Disk:
    image: Path
    luks_uuid: str


@dataclass(frozen=True)
class VmImages:
    """Everything one boot needs; ``passphrase`` and ``keydir`` are in a 0700 directory."""

    kernel: Kernel
    disk: Disk
    initrd: Path
    keydir: Path
    passphrase: Path


def cache_directory() -> Path:
    return Path(os.environ.get("MANDOS_TEST_VM_CACHE") or DEFAULT_CACHE)


def run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a build step; on failure raise :class:`ImageError` with its output."""
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            check=False, cwd=cwd, env=env)
    if result.returncode != 0:
        raise ImageError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n"
                         f"{result.stdout[-4000:]}{result.stderr[-4000:]}")
    return result


@contextmanager
def locked(cache: Path) -> Iterator[None]:
    """One builder at a time per cache directory."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


#: Images another build replaced are kept this long: a test run from another checkout (a
#: fresh clone beside the work tree) may still be booting one.
STALE_SECONDS = 24 * 3600


def remove_stale(paths: Iterator[Path]) -> None:
    """Remove the cached images among ``paths`` that were last used over a day ago."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - path.stat().st_atime > STALE_SECONDS:
                path.unlink()


def download_deb(package: str, debs: Path) -> Path:
    """``apt-get download package`` into ``debs`` unless a .deb of it is already there."""
    debs.mkdir(parents=True, exist_ok=True)
    existing = sorted(debs.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    run(["apt-get", "download", "-q", package], cwd=debs)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise ImageError(f"apt-get download {package} left no .deb in {debs}")
    return found[-1]


def kernel_package() -> str:
    """The kernel image package that Debian's linux-image-amd64 currently points to."""
    output = run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    match = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)", output)
    if match is None:
        raise ImageError(f"cannot find the kernel package in: {output}")
    return match.group(1)


def kernel(cache: Path) -> Kernel:
    """A Debian kernel unpacked (never installed) with its modules' depmod done; reuses any
    kernel already in the cache."""
    root = cache / "kernel"
    for done in sorted(root.glob("*/.done"), reverse=True):
        version = done.parent.name
        return Kernel(version, done.parent / "boot" / f"vmlinuz-{version}",
                      done.parent / "lib" / "modules" / version)
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    deb = download_deb(package, cache / "debs")
    tree = root / version
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    run(["dpkg-deb", "-x", str(deb), str(tree)])
    run(["depmod", "-b", str(tree), version])
    deb.unlink()  # 70 MB; the unpacked tree is what is used
    (tree / ".done").touch()
    return Kernel(version, tree / "boot" / f"vmlinuz-{version}", tree / "lib/modules" / version)


def busybox(cache: Path) -> Path:
    """The static busybox from Debian's busybox-static, unpacked, not installed (installing it
    would replace the host's busybox)."""
    binary = cache / "busybox"
    if binary.exists():
        return binary
    deb = download_deb("busybox-static", cache / "debs")
    with tempfile.TemporaryDirectory(dir=cache) as tree:
        run(["dpkg-deb", "-x", str(deb), tree])
        shutil.copy2(Path(tree) / "bin" / "busybox", cache / "busybox.tmp")
    os.replace(cache / "busybox.tmp", binary)
    return binary


def secrets_directory(cache: Path) -> tuple[Path, Path]:
    """A key set from our keygen and the LUKS passphrase, in a 0700 directory: made once, as
    both the disk and the initramfs depend on them."""
    private = cache / "secret"
    private.mkdir(mode=0o700, exist_ok=True)
    private.chmod(0o700)
    keydir = private / "keys"
    passphrase = private / "passphrase"
    if not (keydir / "tls-privkey.pem").exists():
        shutil.rmtree(keydir, ignore_errors=True)
        keydir.mkdir(mode=0o700)
        run([sys.executable, "-m", "password_agent.keygen", "--dir", str(keydir),
             "--name", "vmtest"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if not passphrase.exists():
        descriptor = os.open(passphrase.with_suffix(".tmp"),
                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(18))  # no newline: the file is the passphrase
        os.replace(passphrase.with_suffix(".tmp"), passphrase)
    return keydir, passphrase


def disk(cache: Path, busybox_binary: Path, passphrase: Path) -> Disk:
    """A 64 MiB LUKS2 disk holding an ext4 root file system whose /sbin/init reports success."""
    stamp = hashlib.sha256(ROOT_INIT.read_bytes() + passphrase.read_bytes()
                           + RECIPE_VERSION.encode()).hexdigest()[:16]
    image = cache / f"disk-{stamp}.img"
    uuid_file = image.with_suffix(".uuid")
    if image.exists() and uuid_file.exists():
        return Disk(image, uuid_file.read_text().strip())
    with tempfile.TemporaryDirectory(dir=cache) as work:
        root = Path(work) / "root"
        for directory in ("bin", "sbin", "etc", "dev", "proc", "sys", "run", "tmp", "usr/lib",
                          "sysroot"):
            (root / directory).mkdir(parents=True)
        shutil.copy2(busybox_binary, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        shutil.copy2(ROOT_INIT, root / "sbin" / "init")
        # systemd's switch-root wants to see an OS tree.
        (root / "usr/lib/os-release").write_text('ID=mandosvmtest\nNAME="Mandos VM test"\n')
        (root / "etc" / "os-release").symlink_to("../usr/lib/os-release")
        partial = Path(work) / "disk.img"
        with open(partial, "wb") as file:
            file.truncate(64 << 20)
        run(["mkfs.ext4", "-q", "-L", "vmroot", "-d", str(root), str(partial), "48M"])
        run(["cryptsetup", "reencrypt", "--encrypt", "--type", "luks2",
             "--reduce-device-size", "16M", "--pbkdf", "pbkdf2",
             "--pbkdf-force-iterations", "1000", "--key-file", str(passphrase), "-q",
             str(partial)])
        uuid = run(["cryptsetup", "luksUUID", str(partial)]).stdout.strip()
        remove_stale(cache.glob("disk-*"))
        os.replace(partial, image)
    uuid_file.write_text(uuid + "\n")
    return Disk(image, uuid)


def python_search_path() -> list[str]:
    """Where the source tree's agent finds its Python packages, as it runs outside the
    packages: this tree, then the running environment's site-packages (inotify_simple,
    python-gnupg, zeroconf)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([str(REPO), paths["purelib"], paths["platlib"]]))


def initrd_inputs(kernel_: Kernel, keydir: Path, client: bytes) -> str:
    """A hash of everything an initramfs is made of, so that a change rebuilds it: the client
    (our package, or the version of Debian's mandos-client), the slim network module, the
    keys, the kernel and dracut."""
    digest = hashlib.sha256(RECIPE_VERSION.encode() + client)
    files = [(path, path.name) for path in sorted(SLIM_NETWORK_MODULE.iterdir())
             if path.is_file()]
    files += [(path, path.name) for path in sorted(keydir.iterdir())]
    for source, name in files:
        digest.update(name.encode() + b"\0" + source.read_bytes())
    dracut = run(["dpkg-query", "-W", "-f=${Version}", "dracut-core"]).stdout
    digest.update(f"{kernel_.version} {dracut} {DRACUT_MODULES} {DRACUT_DRIVERS}".encode())
    return digest.hexdigest()[:16]


def initrd(cache: Path, kernel_: Kernel, keydir: Path, client_deb: Path | None) -> Path:
    """The initramfs with our client package (``client_deb``), or with Debian's own
    ``mandos-client`` and its dracut module (None: the host has them), from the cache when it
    is up to date."""
    client = (client_deb.read_bytes() if client_deb is not None else run(
        ["dpkg-query", "-W", "-f=upstream ${Version}", "mandos-client"]).stdout.encode())
    flavour = "initrd" if client_deb is not None else "upstream-initrd"
    image = cache / f"{flavour}-{initrd_inputs(kernel_, keydir, client)}.img"
    if image.exists():
        return image
    with tempfile.TemporaryDirectory(dir=cache) as work:
        partial = Path(work) / "initrd.img"
        with client_root(Path(work), kernel_, keydir, client_deb) as root:
            run_dracut(root, kernel_, "/tmp/initrd.img",
                       module="mandos-agent" if client_deb is not None else "mandos")
            root.run(f"cp {root.root}/tmp/initrd.img {partial}", chroot=False)
        remove_stale(cache.glob(f"{flavour}-*.img"))
        os.replace(partial, image)
    return image


#: Where :func:`client_root` puts the kernel's modules (dracut wants .../lib/modules/VERSION).
ROOT_KERNEL = "/var/tmp/vm-kernel/lib/modules"
NETWORK_MODULE = "/usr/lib/dracut/modules.d/90kernel-network-modules"
#: An empty configuration directory: the host's dracut.conf.d is left out.
ROOT_DRACUT_CONF = "/var/tmp/dracut-conf.d"


@contextmanager
def client_root(work: Path, kernel_: Kernel, keydir: Path, client_deb: Path | None
                ) -> Iterator[Root]:
    """A throwaway copy of this host's root (peers/packages.py) with a Mandos client as
    an admin installs it: our package ``client_deb`` (Debian's ``mandos-client``, which it
    replaces, goes), or with None Debian's own, which the host has; the key set ``keydir``
    where the keygens write it; the VM's kernel modules; and dracut's network-driver module
    replaced by the slim one (the root is thrown away after)."""
    directory = work / "throwaway"
    directory.mkdir()
    with Root(directory) as root:
        if client_deb is not None:
            root.copy_in(client_deb, f"/var/tmp/{client_deb.name}")
            root.run(f"dpkg -i --force-confold /var/tmp/{client_deb.name}")
        root.run("rm -rf /etc/keys/mandos")
        root.copy_in(keydir, "/etc/keys/mandos")
        root.run("chown -R root:root /etc/keys/mandos\nchmod 0700 /etc/keys/mandos\n"
                 f"chmod 0600 /etc/keys/mandos/*\nmkdir {ROOT_DRACUT_CONF}\n"
                 f"rm -r {NETWORK_MODULE}")
        root.copy_in(kernel_.moddir, f"{ROOT_KERNEL}/{kernel_.version}")
        root.copy_in(SLIM_NETWORK_MODULE, NETWORK_MODULE)
        yield root


def run_dracut(root: Root, kernel_: Kernel, output: str, *,
               module: str | None = "mandos-agent", hostonly: bool | None = None) -> None:
    """Run the root's dracut as ``dracut -f`` would (the host's dracut configuration left
    out), for the VM's kernel, writing ``output`` (a path in the root), with the Mandos dracut
    module ``module``: ours, Debian's ``mandos``, or None (the base image, for comparing
    sizes).  Debian's module refuses to build anything but a host-only image (``hostonly``
    defaults to that for it), which on this host leaves out the ciphers of the VM's LUKS
    volume, so those are named."""
    modules = DRACUT_MODULES.replace("mandos-agent", module or "").strip()
    drivers, mode = DRACUT_DRIVERS, "--no-hostonly"
    if hostonly if hostonly is not None else module == "mandos":
        drivers += " xts aes_generic"
        mode = "--hostonly --hostonly-mode sloppy"
    omit = "plymouth" if module == "mandos" else "mandos plymouth"
    root.run(f"dracut --conf /dev/null --confdir {ROOT_DRACUT_CONF} --force {mode} "
             f"--no-hostonly-cmdline --kver {kernel_.version} "
             f"--kmoddir {ROOT_KERNEL}/{kernel_.version} --compress zstd --omit '{omit}' "
             f"--modules '{modules}' --drivers '{drivers}' {output} 2>&1")


def upstream_keys(cache: Path) -> Path:
    """A key set from Debian's ``mandos-keygen`` (RSA, as upstream makes them), for the
    upstream initramfs: made once."""
    keydir = cache / "secret" / "upstream-keys"
    if not (keydir / "tls-privkey.pem").exists():
        shutil.rmtree(keydir, ignore_errors=True)
        keydir.mkdir(mode=0o700, parents=True)
        run([MANDOS_KEYGEN, "--dir", str(keydir), "--name", "vmupstream"])
    return keydir


def build(client_deb: Path, cache: Path | None = None) -> VmImages:
    """Everything a boot needs, the initramfs made with the client package ``client_deb``,
    from the cache when it is up to date."""
    cache = cache or cache_directory()
    with locked(cache):
        for leftover in cache.glob("tmp*"):  # from a build that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        kernel_ = kernel(cache)
        keydir, passphrase = secrets_directory(cache)
        disk_ = disk(cache, busybox(cache), passphrase)
        return VmImages(kernel_, disk_, initrd(cache, kernel_, keydir, client_deb), keydir,
                        passphrase)


def build_upstream(cache: Path | None = None) -> tuple[Path, Path]:
    """The initramfs made with Debian's own ``mandos-client`` and dracut module, and its key
    set (from Debian's keygen), from the cache when up to date; boot it with :func:`build`'s
    kernel and disk."""
    cache = cache or cache_directory()
    with locked(cache):
        keydir = upstream_keys(cache)
        return initrd(cache, kernel(cache), keydir, None), keydir
