"""The server's units as shipped, under a real systemd PID 1: units/mandos.socket and
units/mandos.service (Type=notify, the watchdog, User=_mandos, StateDirectory=, and the whole
sandbox: ProtectSystem=strict, MemoryDenyWriteExecute=, SystemCallFilter=, the capability
bounding set, RestrictAddressFamilies=, ...), units/mandos.sysusers.conf and the D-Bus policy
units/se.recompile.Mandos.conf; and in the same boot the booted system's password agent,
units/mandos-password-agent.path and .service.  ``systemd-analyze verify`` and ``security``
cannot tell whether the server and the agent still work inside their sandboxes; this test
runs them there.  (It found that the default checker, fping, could never succeed: see
CAP_NET_RAW in units/mandos.service; and that PrivateTmp= made the agent wait for
local-fs.target, so for the very volumes it is to unlock: see units/mandos-password-agent.service.)

The VM (tests/vm/hostroot.py) boots the host's own root file system, read-only through 9p
under a tmpfs overlay, so that the host's systemd, dbus-daemon, journald, Python, GnuTLS, gpg,
fping and Debian's mandos-client run in it unchanged.  The payload adds the units where a
package puts them, a ``/usr/bin/mandos-server`` and a ``/usr/bin/mandos-password-agent`` that
run this tree on the test's virtualenv, a configuration with one client (the cached VM key
set, in /etc/keys/mandos where the agent's unit takes it; ``host = localhost`` and the default
checker, every 2 s), a drop-in that points the agent at the server (``--connect``), and
``mandos-vmtest.target``, the only target the VM starts (``systemd.unit=`` on the kernel
command line).  Before systemd starts, it enables the agent's ``.path`` unit as its [Install]
says (sysinit.target, reached through basic.target), and removes what would hide a fault of
ours: the host's ``_mandos`` user (our sysusers file must make it), Debian's own D-Bus policy
and sysusers file for Mandos, and the host's /var/lib/mandos.

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
and the watchdog work; it stops cleanly and leaves its state file; nothing it logged looks
like a sandbox denial.  The VM has no network device and powers off when the checks are
done: about 85 s under TCG on a busy 2-core host.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import shutil
import stat
from pathlib import Path

import pytest

from server.journal import Event
from tests.peers import upstream
from tests.peers.ours import clients_conf
from tests.vm import hostroot, images, server_units_checks

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PROGRAMS = ("qemu-system-x86_64", "cpio", "apt-get", "dpkg-deb", "depmod", "fping",
            "dbus-send", "setpriv", upstream.MANDOS_CLIENT, upstream.MANDOS_CTL,
            upstream.MANDOS_KEYGEN)
UNITS = images.REPO / "units"
CLIENT = "vmtest"
TIMEOUT = 150.0
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

#: The host's root as the VM starts it; see the module docstring.
PREPARE = """\
# systemd would take /.dockerenv for a container and then ignore the kernel command line.
rm -f /.dockerenv
# Our sysusers file must make _mandos (Debian's mandos-client.conf would make it first).
sed -i '/^_mandos:/d' /etc/passwd /etc/group /etc/shadow /etc/gshadow
rm -f /usr/lib/sysusers.d/mandos-client.conf
# Only our D-Bus policy may let _mandos own the name; StateDirectory= must make the directory.
rm -f /etc/dbus-1/system.d/mandos.conf
rm -rf /var/lib/mandos
# The agent's .path unit, enabled as its [Install] says (sysinit.target, which the test target
# reaches through basic.target).
systemctl enable mandos-password-agent.path
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


def traversable(paths: list[str]) -> str:
    """Commands that let the server's user (not root) reach ``paths`` in the
    VM: ``chmod o+x`` on the directories that lack it (the overlay's copy only; a tox
    environment lies in a 0700 ``.tox``)."""
    closed = sorted({str(directory) for path in paths
                     for directory in (Path(path), *Path(path).parents)
                     if directory.is_dir() and not directory.stat().st_mode & stat.S_IXOTH})
    return "".join(f"chmod o+x {shlex.quote(directory)}\n" for directory in closed)


def make_payload(directory: Path, keydir: Path) -> hostroot.Payload:
    payload = hostroot.new_payload(directory)
    keys = upstream.KeySet.in_directory(keydir)
    password = secrets.token_urlsafe(18)
    # Upstream's keygen writes the section (our keys work with it); its host is this machine.
    section = re.sub(r"(?m)^host = .*$", "host = localhost",
                     upstream.upstream_section(keys, CLIENT, password.encode()))
    # The default checker (fping), soon enough to be seen.
    payload.write("/etc/mandos/clients.conf", clients_conf(section, defaults="interval = 2s\n"),
                  0o600)
    payload.write("/etc/mandos/mandos.conf", "[DEFAULT]\n")
    # As a package would make it readable by the server (systemd-tmpfiles runs after sysusers).
    payload.write("/etc/tmpfiles.d/mandos-vmtest.conf",
                  "z /etc/mandos/clients.conf 0640 root _mandos -\n")
    for unit in ("mandos.socket", "mandos.service", "mandos-password-agent.path",
                 "mandos-password-agent.service"):
        payload.copy(UNITS / unit, f"{SYSTEM}/{unit}")
    # The agent asks our server, socket-activated in the same VM, as the unit's comment says.
    payload.write("/etc/systemd/system/mandos-password-agent.service.d/vmtest.conf",
                  "[Service]\nEnvironment=MANDOS_PASSWORD_AGENT_OPTIONS="
                  f"--connect={socket_address()}\n")
    payload.copy(UNITS / "mandos.sysusers.conf", "/usr/lib/sysusers.d/mandos.conf")
    payload.copy(UNITS / "se.recompile.Mandos.conf",
                 "/usr/share/dbus-1/system.d/se.recompile.Mandos.conf")
    search_path = images.python_search_path()
    pythonpath = ":".join(payload.expose(search_path))
    payload.write("/usr/bin/mandos-server",
                  "#!/bin/sh\n# This tree's server on the test's virtualenv, as pip installs it.\n"
                  f"PYTHONPATH={shlex.quote(pythonpath)} exec /usr/bin/python3 -m server \"$@\"\n",
                  0o755)
    payload.write("/usr/bin/mandos-password-agent",
                  "#!/bin/sh\n# This tree's agent on the test's virtualenv, as pip installs it.\n"
                  f"PYTHONPATH={shlex.quote(pythonpath)} exec /usr/bin/python3 -m password_agent "
                  "\"$@\"\n", 0o755)
    payload.write("/etc/systemd/journald.conf.d/vmtest.conf", "[Journal]\nStorage=volatile\n")
    # /tmp stays the overlay's view of the host's: this tree and its virtualenv may lie there
    # (a clone in /tmp; exposed below), so systemd-tmpfiles must not empty it at boot
    # (Debian's tmp.conf: D).
    payload.write("/etc/tmpfiles.d/tmp.conf", "d /tmp 1777 root root -\n")
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
        "mandos_client": upstream.MANDOS_CLIENT, "pythonpath": pythonpath,
        "secret_sent_id": Event.SECRET_SENT.message_id}), 0o600)
    payload.prepare(PREPARE + traversable(search_path))
    return payload


def test_server_units_under_systemd(vm: tuple[images.Kernel, Path, Path], tmp_path: Path) -> None:
    kernel, initrd, keydir = vm
    payload = make_payload(tmp_path / "payload", keydir)
    result = hostroot.boot(kernel=kernel, initrd=initrd, payload=payload,
                           append="systemd.unit=mandos-vmtest.target systemd.show_status=error",
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
