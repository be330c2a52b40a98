# SPDX-License-Identifier: GPL-3.0-or-later
"""A VM whose root file system is a throwaway copy of the host's own (peers/packages.py's
:class:`Root`: the host's ``/`` under an overlay, where the test installed its files and our
packages), so that the host's systemd runs as PID 1 on the host's programs and libraries.

qemu, started in the throwaway root's mount namespace, exports that root through virtio-9p
with ``readonly=on``: the guest cannot write to it, let alone to the host.  A tiny initramfs
(busybox-static, the kernel modules for 9p and overlayfs, and ``hostroot-init``) mounts it
under an overlay whose upper layer is a tmpfs and switches root to ``/lib/systemd/systemd``.
Everything the guest changes lives in guest memory and is gone when qemu exits.  What the
test adds is staged in a :class:`Payload` and copied into the root with owners and modes
(:meth:`Root.copy_in`); dpkg runs on the host side, in the root, where it is fast (under TCG
and 9p, reading dpkg's database alone took minutes).  The VM has no network device: only its
own loopback.

The kernel and busybox are the ones images.py caches; the initramfs is cached beside them,
named by a hash of what it is made of, and rebuilt when that changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peers.packages import Root
from peers.vm import images, qemu

INIT = images.HERE / "hostroot-init"
#: What the initramfs loads (with their dependencies): the PCI transport of the 9p device,
#: 9p itself, and overlayfs.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
#: Bump to rebuild the initramfs when its recipe changes.
RECIPE_VERSION = "2"
MOUNT_TAG = "hostroot"
#: The host's root, read-only; inode numbers of the host's several file systems remapped so
#: that they cannot collide in the guest.  No network device at all.


def load_order(moddir: Path, wanted: tuple[str, ...]) -> list[str]:
    """The module files (relative to ``moddir``) to insmod for ``wanted``, dependencies first,
    from modules.dep."""
    depends: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        module, _, dependencies = line.partition(":")
        depends[module] = dependencies.split()
    by_name = {Path(module).name.split(".")[0].replace("-", "_"): module for module in depends}
    order: list[str] = []

    def visit(module: str) -> None:
        if module not in order:
            for dependency in depends[module]:
                visit(dependency)
            order.append(module)

    for name in wanted:
        if name not in by_name:
            raise images.ImageError(f"no module {name} in {moddir}/modules.dep")
        visit(by_name[name])
    return order


def initrd(cache: Path, kernel: images.Kernel, busybox: Path) -> Path:
    """The host-root initramfs (an uncompressed cpio archive, about 3 MB)."""
    modules = load_order(kernel.moddir, MODULES)
    digest = hashlib.sha256(f"{RECIPE_VERSION} {kernel.version} {modules}".encode())
    for source in (INIT, busybox):
        digest.update(source.read_bytes())
    image = cache / f"hostroot-{digest.hexdigest()[:16]}.cpio"
    if image.exists():
        return image
    with tempfile.TemporaryDirectory(dir=cache) as work:
        tree = Path(work) / "tree"
        for directory in ("bin", "dev", "proc", "sys", "modules"):
            (tree / directory).mkdir(parents=True)
        # The kernel opens /dev/console for init before anything is mounted.
        os.mknod(tree / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
        shutil.copy2(busybox, tree / "bin" / "busybox")
        shutil.copy2(INIT, tree / "init")
        (tree / "init").chmod(0o755)
        for module in modules:
            shutil.copy2(kernel.moddir / module, tree / "modules" / Path(module).name)
        (tree / "modules" / "load-order").write_text(
            "".join(Path(module).name + "\n" for module in modules))
        names = sorted(str(path.relative_to(tree)) for path in tree.rglob("*"))
        partial = Path(work) / "initrd.cpio"
        with open(partial, "wb") as output:
            result = subprocess.run(
                ["cpio", "--create", "--format=newc", "--owner=0:0", "--null", "--quiet"],
                input="\0".join(names).encode() + b"\0", stdout=output,
                stderr=subprocess.PIPE, cwd=tree, check=False)
        if result.returncode != 0:
            raise images.ImageError(f"cpio failed: {result.stderr.decode(errors='replace')}")
        for old in cache.glob("hostroot-*.cpio"):
            old.unlink()
        os.replace(partial, image)
    return image


@dataclass(frozen=True)
class Payload:
    """What the test adds to the root, staged under ``root/`` with owners and modes."""

    directory: Path

    @property
    def root(self) -> Path:
        return self.directory / "root"

    def write(self, path: str, content: str | bytes, mode: int = 0o644) -> Path:
        """Put ``content`` at ``path`` (absolute, as the guest sees it), with ``mode``."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        target.chmod(mode)
        return target

    def copy(self, source: Path, path: str, mode: int = 0o644) -> Path:
        return self.write(path, source.read_bytes(), mode)


def new_payload(directory: Path) -> Payload:
    """An empty payload in ``directory`` (made 0700: it may hold keys)."""
    directory.mkdir(mode=0o700)
    (directory / "root").mkdir(mode=0o755)
    return Payload(directory)


def boot(*, kernel: images.Kernel, initrd: Path, root: Root, append: str, log: Path,
         timeout: float, done_marker: str) -> qemu.Boot:
    """Boot ``root``; ``append`` adds to the kernel command line (for example
    ``systemd.unit=``)."""
    command_line = " ".join(["console=ttyS0", "panic=-1", "loglevel=4", append])
    devices = ["-virtfs", f"local,path={root.root},mount_tag={MOUNT_TAG},security_model=none,"
               "readonly=on,multidevs=remap", "-nic", "none"]
    return qemu.run(kernel=kernel.vmlinuz, initrd=initrd, append=command_line, devices=devices,
                    log=log, timeout=timeout, done_marker=done_marker, wrap=root.wrap)
