# SPDX-License-Identifier: GPL-3.0-or-later
"""The server's units as the mandos-server package installs them, under a real systemd PID 1:
mandos.socket and mandos.service (Type=notify, the watchdog, User=_mandos, StateDirectory=, and
the whole sandbox: ProtectSystem=strict, MemoryDenyWriteExecute=, SystemCallFilter=, the
capability bounding set, RestrictAddressFamilies=, ...), the sysusers file and the D-Bus
policy; and in the same boot the booted system's password agent from the
mandos-password-agent package, its .path and .service.  ``systemd-analyze verify`` and
``security`` cannot tell whether the server and the agent still work inside their sandboxes;
this test runs them there.  (It found that the default checker, fping, could never succeed:
see CAP_NET_RAW in units/mandos.service; and that PrivateTmp= made the agent wait for
local-fs.target, so for the very volumes it is to unlock: see
units/mandos-password-agent.service.)

The VM (peers/vm/hostroot.py) boots a throwaway copy of the host's own root file system
(peers/packages.py's Root), read-only through 9p under a tmpfs overlay, so that the
host's systemd, dbus-daemon, journald, Python, GnuTLS, gpg, fping and Debian's mandos-client
run in it unchanged.  Into that copy the test puts a configuration with one client (the cached
VM key set, in /etc/keys/mandos where the agent's unit takes it; ``host = localhost`` and the
default checker, every 2 s), a drop-in that points the agent at the server (``--connect``),
and ``mandos-vmtest.target``, the only target the VM starts (``systemd.unit=`` on the kernel
command line).  Then, as an admin would: it keeps Debian's mandos-client and mandos-ctl aside
as peers, removes what would hide a fault of ours (the host's ``_mandos`` user, which our
sysusers file must make, Debian's own D-Bus policy and sysusers file for Mandos, and
/var/lib/mandos), installs our packages with ``dpkg -i`` (they replace Debian's
``mandos`` and ``mandos-client``; the configuration is kept) and enables ``mandos.socket`` and
the agent's ``.path`` unit.  dpkg runs there on the host side: under TCG and 9p, reading its
database alone took minutes.

``mandos-vmtest.service`` then runs tests/vm/server_units_checks.py, whose console lines this
test asserts: upstream's mandos-client gets the password through the socket, which starts the
service; the service is running with our STATUS= line, as _mandos with no capability but
CAP_NET_RAW, under no_new_privs and a seccomp filter; it owns its D-Bus name, which nobody
else may own or call; the journal holds our structured entries, and the checker succeeded;
both mandos-ctl list the client.  Then the agent: nothing it starts after waits for
local-fs.target; ``systemd-analyze security`` rates its sandbox at most 2.5; the real
``systemd-ask-password --id=cryptsetup:vmtest`` gets the password from our agent, which the
``.path`` unit started (systemd's console agent prompts in parallel, with nobody to type); the
agent exits with Result=success once nothing is pending, having logged its answer and no
sandbox denial, leaving only its ``answered`` record in /run/mandos-password-agent (one hash,
no key: the key is in root's kernel keyring) and no gpg-agent; the server logged the secret
sent; a second request with the same Id is left to the human (the agent says so, and the
requester, stopped then, got no password), while the agent that waits for it runs as root
without a capability, under no_new_privs and a seccomp filter.  Then the server again: reload
and the watchdog work; it stops cleanly; started again with ``etcd =`` in mandos.conf, it
loads the etcd client of mandos-server-etcd (grpcio, compiled) inside the sandbox and joins
an etcd started in the VM; it leaves its state file; nothing it logged looks like a sandbox
denial.  The VM has no network device and powers off when the checks are
done: about 45-50 s under TCG on a 2-core host.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import stat
from pathlib import Path

import pytest

from peers import upstream
from peers.ours import clients_conf
from peers.packages import PACKAGES, Build, Root
from peers.vm import hostroot, images
from server.journal import Event
from tests.vm import server_units_checks

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PROGRAMS = ("qemu-system-x86_64", "cpio", "apt-get", "dpkg-deb", "depmod", "fping",
            "dbus-send", "setpriv", upstream.MANDOS_CLIENT, upstream.MANDOS_CTL,
            upstream.MANDOS_KEYGEN)
UNITS = images.REPO / "units"
CLIENT = "vmtest"
TIMEOUT = 180.0
SETTINGS = "/etc/mandos-vmtest/settings.json"
#: The client's key set, where the agent's unit takes it (its ConditionFileNotEmpty= paths).
KEYS = "/etc/keys/mandos"
SYSTEM = "/usr/lib/systemd/system"

TARGET = """\
[Unit]
Description=Mandos server units under test
# As multi-user.target: basic.target brings sockets.target, so dbus.socket.
Requires=basic.target
After=basic.target
Wants=mandos-vmtest.service
After=mandos-vmtest.service
AllowIsolate=yes
"""

SERVICE = f"""\
[Unit]
Description=Check the Mandos server units
Wants=mandos.socket
After=mandos.socket
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /etc/mandos-vmtest/checks.py {SETTINGS}
TimeoutStartSec={TIMEOUT:.0f}
"""

#: Where the payload puts our packages, and where the host's upstream mandos-client and
#: mandos-ctl are kept aside (ours replace Debian's packages, which take those along).
DEBS = "/var/tmp/mandos-debs"
UPSTREAM = "/usr/local/lib/mandos-upstream"

#: Run in the throwaway root, the payload in it, before the VM boots it; see the module
#: docstring.
PREPARE = f"""\
# systemd would take /.dockerenv for a container and then ignore the kernel command line.
rm -f /.dockerenv
# Debian's mandos-client and mandos-ctl stay, as peers, outside the packages that go.
mkdir -p {UPSTREAM}
cp {upstream.MANDOS_CLIENT} {upstream.MANDOS_CTL} {UPSTREAM}/
# Our sysusers file must make _mandos (Debian's mandos-client.conf would make it first).
sed -i '/^_mandos:/d' /etc/passwd /etc/group /etc/shadow /etc/gshadow
rm -f /usr/lib/sysusers.d/mandos-client.conf
# Only our D-Bus policy may let _mandos own the name (Debian's stays as a removed package's
# conffile); the package must make the state directory.
rm -f /etc/dbus-1/system.d/mandos.conf
rm -rf /var/lib/mandos
# Our packages, as an admin installs them; they replace Debian's mandos and mandos-client.
dpkg -i --force-confold {DEBS}/*.deb
# The agent's .path unit, enabled as its [Install] says (sysinit.target, which the test target
# reaches through basic.target).
systemctl enable mandos-password-agent.path mandos.socket
"""


@pytest.fixture(scope="module")
def vm() -> tuple[images.Kernel, Path, Path]:
    """The kernel, the host-root initramfs and the cached VM key set."""
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run ./dev setup", pytrace=False)
    cache = images.cache_directory()
    with images.locked(cache):
        kernel = images.kernel(cache)
        keydir, _ = images.secrets_directory(cache)
        return kernel, hostroot.initrd(cache, kernel, images.busybox(cache)), keydir


def socket_address() -> str:
    """Where the shipped mandos.socket listens, as mandos-client's --connect takes it."""
    match = re.search(r"^ListenStream=\[::\]:(\d+)$", (UNITS / "mandos.socket").read_text(),
                      re.MULTILINE)
    assert match is not None, "mandos.socket has no ListenStream=[::]:PORT"
    return f"127.0.0.1:{match.group(1)}"


def make_payload(directory: Path, keydir: Path, packages: Build) -> hostroot.Payload:
    payload = hostroot.new_payload(directory)
    keys = upstream.KeySet.in_directory(keydir)
    password = secrets.token_urlsafe(18)
    # Upstream's keygen writes the section (our keys work with it); its host is this machine.
    section = re.sub(r"(?m)^host = .*$", "host = localhost",
                     upstream.upstream_section(keys, CLIENT, password.encode()))
    # The default checker (fping), soon enough to be seen.  The package keeps this file
    # (a conffile, installed with --force-confold) and makes it readable by the server.
    payload.write("/etc/mandos/clients.conf", clients_conf(section, defaults="interval = 2s\n"),
                  0o600)
    payload.write("/etc/mandos/mandos.conf", "[DEFAULT]\n")
    for package in PACKAGES:
        deb = packages.deb(package)
        payload.copy(deb, f"{DEBS}/{deb.name}")
    # The agent asks our server, socket-activated in the same VM, as the unit's comment says.
    payload.write("/etc/systemd/system/mandos-password-agent.service.d/vmtest.conf",
                  "[Service]\nEnvironment=MANDOS_PASSWORD_AGENT_OPTIONS="
                  f"--connect={socket_address()}\n")
    payload.write("/etc/systemd/journald.conf.d/vmtest.conf", "[Journal]\nStorage=volatile\n")
    payload.write("/etc/systemd/system/mandos-vmtest.target", TARGET)
    payload.write("/etc/systemd/system/mandos-vmtest.service", SERVICE)
    payload.copy(Path(server_units_checks.__file__), "/etc/mandos-vmtest/checks.py")
    payload.write("/etc/mandos-vmtest/password", password, 0o600)
    # As mandos-keygen writes them: the secret keys 0600 (the cached set is our keygen's).
    for key in keydir.iterdir():
        payload.copy(key, f"{KEYS}/{key.name}", stat.S_IMODE(key.stat().st_mode))
    payload.write(SETTINGS, json.dumps({
        "client": CLIENT, "key_id": keys.key_id, "keydir": KEYS,
        "password_file": "/etc/mandos-vmtest/password", "connect": socket_address(),
        "mandos_client": f"{UPSTREAM}/mandos-client", "mandos_ctl": f"{UPSTREAM}/mandos-ctl",
        "secret_sent_id": Event.SECRET_SENT.message_id}), 0o600)
    return payload


def test_server_units_under_systemd(vm: tuple[images.Kernel, Path, Path], packages: Build,
                                    tmp_path: Path) -> None:
    kernel, initrd, keydir = vm
    payload = make_payload(tmp_path / "payload", keydir, packages)
    (tmp_path / "throwaway").mkdir()
    with Root(tmp_path / "throwaway") as root:
        root.copy_in(payload.root, "/")
        root.run(PREPARE)
        result = hostroot.boot(kernel=kernel, initrd=initrd, root=root,
                               append="systemd.unit=mandos-vmtest.target "
                                      "systemd.show_status=error",
                               log=tmp_path / "serial.log", timeout=TIMEOUT,
                               done_marker=server_units_checks.DONE)
    console = result.text
    context = f"serial console ({result.log}), last lines:\n" + "\n".join(
        console.splitlines()[-60:])
    assert not result.timed_out, f"the checks did not finish within {TIMEOUT:g} s; {context}"
    failed = [name for name in server_units_checks.CHECKS
              if result.first(rf"^VMTEST {name} ok: ") is None]
    assert not failed, f"checks not passed: {failed}; {context}"
    assert result.returncode == 0, f"qemu: {result.returncode}; {context}"
    first = result.first(r"^VMTEST ")
    done = result.first(server_units_checks.DONE)
    assert first is not None and done is not None
    print(f"VM: first check at {first:.1f} s, all done at {done:.1f} s, "
          f"qemu exited at {result.seconds:.1f} s")
