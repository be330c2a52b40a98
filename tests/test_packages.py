# SPDX-License-Identifier: GPL-3.0-or-later
"""The Debian packages from ``./dev package`` (packaging/build.py), installed, upgraded, removed
and purged in a throwaway root, with real dpkg, apt, systemd-sysusers, dracut and lintian.

The throwaway root is :class:`peers.packages.Root`.

Debian's ``mandos`` and ``mandos-client`` are installed on the host as interop peers; our
packages conflict with them, so the test first removes them as a migrating admin would
(keeping their configuration), then checks after each step the files, the ``_mandos`` user and
what is left behind: install the packages (the admin's clients.conf is kept), make keys with
the installed ``mandos-keygen`` and build an initramfs with plain ``dracut``, upgrade to a
rebuilt higher version (configuration and state kept), remove (configuration and state kept),
purge (both gone, nothing of ours left but the user).  Then a fleet server: ``--etcd`` with
``mandos-server`` alone, and with ``mandos-server-etcd`` against a real etcd.
"""

from __future__ import annotations

import shlex
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.etcd import EtcdCluster
from peers.packages import PACKAGES, REPO, Build, Root, build
from peers.upstream import free_port

#: apt-get without recommends (dracut would replace the host's initramfs-tools) and keeping
#: the configuration files on disk, as an admin answers dpkg's question for clients.conf.
APT_INSTALL = ("apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold"
               " -o Dpkg::Options::=--force-confdef")
#: The admin's client section, in clients.conf before our package comes.
ADMIN_SECTION = "\n[admins-client]\nkey_id = " + "ab" * 32 + "\nsecret = c2VjcmV0\n"
#: What the server would have saved.
STATE = '{"clients": {}}\n'
#: The lintian tags left (not overridden), each justified in the README: the packages are not
#: uploaded to Debian, so no ITP bug is closed; the server runs under systemd only (socket
#: activation, Type=notify).  A new tag fails the test until it is fixed or justified there.
JUSTIFIED_TAGS = {"initial-upload-closes-no-bugs",
                  "package-supports-alternative-init-but-no-init.d-script"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def builds(packages: Build, tmp_path_factory: pytest.TempPathFactory) -> tuple[Build, Build]:
    """The session's packages (built as ``./dev package`` does, with lintian, which fails
    the build on an error), and a rebuild with a higher version."""
    newer = f"{packages.version}+rebuild1"
    newer_debs, _ = build(tmp_path_factory.mktemp("dist2"), "--version", newer, "--no-lintian")
    return packages, Build(newer, newer_debs, "")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Root]:
    directory = tmp_path / "throwaway"
    directory.mkdir()
    with Root(directory) as throwaway:
        yield throwaway


def install(root: Root, build: Build, *packages: str) -> str:
    """apt-get install the build's packages (those named, else all) from their .deb files."""
    chosen = [build.deb(package) for package in packages] if packages else build.debs
    for deb in chosen:
        root.copy_in(deb, f"/var/tmp/{deb.name}")
    debs = " ".join(shlex.quote(f"/var/tmp/{deb.name}") for deb in chosen)
    return root.run(f"{APT_INSTALL} {debs}\nrm {debs}").stdout


SERVER_FILES = ("/usr/bin/mandos-server", "/usr/bin/mandos-ctl",
                "/usr/lib/mandos-server/server/cli.py",
                "/usr/lib/mandos-server/mandos_protocol/gnutls.py",
                "/usr/lib/mandos-server/zeroconf/__init__.py",
                "/usr/lib/mandos-server/dbus_fast/__init__.py",
                "/lib/systemd/system/mandos.service", "/lib/systemd/system/mandos.socket",
                "/usr/share/dbus-1/system.d/se.recompile.Mandos.conf",
                "/usr/lib/systemd/catalog/mandos-catalog.catalog",
                "/usr/lib/sysusers.d/mandos-server.conf", "/usr/lib/tmpfiles.d/mandos-server.conf",
                "/usr/share/man/man8/mandos-server.8.gz", "/usr/share/man/man8/mandos-ctl.8.gz",
                "/usr/share/doc/mandos-server/examples/mandos-alerts.yml",
                "/usr/share/doc/mandos-server/examples/mandos-dashboard.json")
AGENT_FILES = ("/usr/bin/mandos-password-agent", "/usr/bin/mandos-keygen",
               "/usr/bin/mandos-luks",
               "/usr/lib/mandos-password-agent/password_agent/cli.py",
               "/usr/lib/mandos-password-agent/gnupg.py",
               "/usr/lib/mandos-password-agent/inotify_simple.py",
               "/lib/systemd/system/mandos-password-agent.path",
               "/lib/systemd/system/mandos-password-agent.service",
               "/usr/lib/dracut/modules.d/90mandos-agent/module-setup.sh",
               "/usr/share/man/man8/mandos-password-agent.8.gz",
               "/usr/share/man/man8/mandos-keygen.8.gz",
               "/usr/share/man/man8/mandos-luks.8.gz")
ETCD_FILES = ("/usr/lib/mandos-server-etcd/etcd3aio/__init__.py",
              "/usr/lib/mandos-server-etcd/grpc/__init__.py",
              "/usr/lib/mandos-server-etcd/google/protobuf/__init__.py")


#: Run by the installed /usr/bin/python3 as the commands run it (-I, the private directories
#: first, as the wrappers put them): import every module of the packages named, then print
#: where each module came from.
IMPORT_ALL = """
import importlib, pkgutil, sys
sys.path[0:0] = sys.argv[1].split(":")
for name in sys.argv[2:]:
    package = importlib.import_module(name)
    for module in pkgutil.walk_packages(package.__path__, name + "."):
        if not module.name.endswith(".__main__"):
            importlib.import_module(module.name)
for name, module in sorted(sys.modules.items()):
    if getattr(module, "__file__", None):
        print(name, module.__file__)
"""
#: Each command package's search path (packaging/bin): mandos-server reads
#: mandos-server-etcd's directory second, for the fleet's modules (server.fleet).
SEARCH_PATH = {"mandos-server": ("mandos-server", "mandos-server-etcd"),
               "mandos-password-agent": ("mandos-password-agent",)}
#: What each package's private directory must provide, and what Debian must.
PRIVATE = {"mandos-server": {"zeroconf", "ifaddr", "dbus_fast", "sdnotify", "inotify_simple"},
           "mandos-server-etcd": {"etcd3aio", "grpc", "google.protobuf", "typing_extensions"},
           "mandos-password-agent": {"zeroconf", "ifaddr", "gnupg", "inotify_simple",
                                     "sdnotify"}}
FROM_DEBIAN = {"mandos-server": {"pystemd"}, "mandos-password-agent": {"cryptography"}}
OURS = {"mandos-server": ("server", "mandos_protocol"),
        "mandos-password-agent": ("password_agent", "mandos_protocol")}


def check_imports(root: Root, package: str) -> None:
    """Every module of ours imports under the installed interpreter, with its dependencies
    from the private directories (not from Debian's older python3-zeroconf, python3-gnupg,
    python3-grpcio or python3-protobuf) or from Debian where Debian's serve."""
    private = {name: f"/usr/lib/{name}" for name in SEARCH_PATH[package]}
    loaded = dict(line.split(" ", 1) for line in root.lines(
        f"/usr/bin/python3 -I -c {shlex.quote(IMPORT_ALL)} {':'.join(private.values())} "
        f"{' '.join(OURS[package])}"))
    for name in OURS[package]:
        assert loaded[name].startswith(private[package] + "/"), (name, loaded[name])
    for directory_package, directory in private.items():
        for name in PRIVATE[directory_package]:
            assert loaded[name].startswith(directory + "/"), (name, loaded[name])
    for name in FROM_DEBIAN[package]:
        assert loaded[name].startswith("/usr/lib/python3/dist-packages/"), (name, loaded[name])


#: The installed programs end to end, in the root: mandos-keygen makes the clients.conf
#: section, mandos-server serves it on loopback, and mandos-password-agent answers a real
#: systemd-ask-password request with it.  $1 is the port, $2 the password.
UNLOCK = r"""
printf '%s' "$2" > /root/password
mandos-keygen --passfile /root/password --no-ssh --name packaged >> /etc/mandos/clients.conf
rm /root/password
mandos-server --foreground --no-dbus --no-zeroconf --address ::1 --port "$1" \
    >/tmp/server.log 2>&1 &
server=$!
mkdir -p /run/systemd/ask-password
systemd-ask-password --no-tty --timeout=40 --id=cryptsetup:packaged 'Password:' \
    >/tmp/answer &
ask=$!
status=0
mandos-password-agent --connect "[::1]:$1" --keydir /etc/keys/mandos --timeout 30 \
    --kernel-cmdline /dev/null 2>/tmp/agent.log || status=$?
wait "$ask" || status=$?
kill -TERM "$server"
wait "$server" || true
cat /tmp/answer
[ "$status" = 0 ] || { cat /tmp/agent.log /tmp/server.log >&2; exit "$status"; }
"""


#: The installed mandos-luks end to end, in the root: bind an image file (making the keys),
#: its section into clients.d/, then test it against the installed server.  $1 is the port.
#: The server is started only once bind is done, and test runs once the server listens.
LUKS = r"""
truncate -s 20M /root/disk.img
printf 'admin' | cryptsetup luksFormat --batch-mode --pbkdf pbkdf2 \
    --pbkdf-force-iterations 1000 --key-file - /root/disk.img
mkdir -p /etc/mandos/clients.d
printf 'admin\n' | mandos-luks bind /root/disk.img --keydir /root/luks-keys --name packaged-luks \
    --no-ssh --section-file /etc/mandos/clients.d/packaged-luks.conf 2>/tmp/luks.log
mandos-server --foreground --no-dbus --no-zeroconf --address ::1 --port "$1" \
    >/tmp/server.log 2>&1 &
server=$!
tries=0
until ss -Hltn "sport = :$1" | grep -q . || [ "$tries" -ge 100 ]; do
    tries=$((tries + 1)); sleep 0.1
done
status=0
mandos-luks test /root/disk.img --keydir /root/luks-keys --connect "[::1]:$1" \
    --kernel-cmdline /dev/null 2>>/tmp/luks.log || status=$?
kill -TERM "$server"
wait "$server" || true
rm -rf /root/disk.img /root/luks-keys /etc/mandos/clients.d/packaged-luks.conf
[ "$status" = 0 ] || { cat /tmp/luks.log /tmp/server.log >&2; exit "$status"; }
"""


#: The installed server in a fleet, in the root: it joins the etcd cluster at $2 (TLS with a
#: client certificate, the files in /etc/mandos/etcd), then etcdctl lists the servers there
#: and the server's log follows.  $1 is the port.
FLEET = r"""
mandos-server --foreground --no-dbus --no-zeroconf --address ::1 --port "$1" --etcd "$2" \
    --etcd-cacert=/etc/mandos/etcd/ca.pem --etcd-cert=/etc/mandos/etcd/cert.pem \
    --etcd-key=/etc/mandos/etcd/key.pem </dev/null >/tmp/server.log 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' EXIT
tries=0
until grep -q "in sync with etcd" /tmp/server.log || ! kill -0 "$server" 2>/dev/null \
        || [ "$tries" -ge 300 ]; do
    tries=$((tries + 1)); sleep 0.1
done
ETCDCTL_API=3 etcdctl --endpoints="$2" --cacert=/etc/mandos/etcd/ca.pem \
    --cert=/etc/mandos/etcd/cert.pem --key=/etc/mandos/etcd/key.pem \
    get --prefix --keys-only /mandos/servers/
kill -TERM "$server" 2>/dev/null || true
wait "$server" || true
cat /tmp/server.log
"""


def luks_bind_and_test(root: Root) -> str:
    """What ``mandos-luks test`` printed (see LUKS)."""
    return root.run(f"set -- {free_port('::1')}\n{LUKS}").stdout


def unlock(root: Root, password: str) -> str:
    """What systemd-ask-password printed (see UNLOCK)."""
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    return root.run(f"set -- {port} {shlex.quote(password)}\n{UNLOCK}").stdout


def dracut(root: Root) -> str:
    """Build /tmp/initrd.img with the root's dracut and configuration; its output."""
    return root.run("dracut --force --no-kernel --kver 0.0.0-test --no-compress"
                    " /tmp/initrd.img 2>&1").stdout


def enabled(root: Root, unit: str) -> str:
    return root.run(f"systemctl is-enabled {unit}", check=False).stdout.strip()


def check_installed(root: Root, build: Build) -> None:
    for package in PACKAGES:
        assert root.status(package) == "installed"
        assert root.lines(f"dpkg-query -W -f='${{Version}}' {package}") == [build.version]
    missing = [path for path in SERVER_FILES + AGENT_FILES + ETCD_FILES if not root.exists(path)]
    assert not missing
    for unit in ("mandos.service", "mandos.socket"):
        assert root.read(f"/lib/systemd/system/{unit}") == (REPO / "units" / unit).read_text()
    # The Prometheus alerts and the Grafana dashboard for --metrics, as contrib/ has them.
    for example in ("prometheus/mandos-alerts.yml", "grafana/mandos-dashboard.json"):
        installed = f"/usr/share/doc/mandos-server/examples/{example.split('/')[1]}"
        assert root.read(installed) == (REPO / "contrib" / example).read_text()
    # Byte-compiled by the postinst (py3compile), in the private directories only.
    assert root.exists("/usr/lib/mandos-server/server/__pycache__")
    assert root.exists("/usr/lib/mandos-password-agent/password_agent/__pycache__")
    assert root.exists("/usr/lib/mandos-server-etcd/etcd3aio/__pycache__")
    assert not root.lines("ls /usr/lib/python3/dist-packages | grep -E "
                          "'^(server|password_agent|mandos_protocol)$' || true")
    # The user from our sysusers file, the state directory from our tmpfiles file.
    assert root.lines("getent passwd _mandos | cut -d: -f6,7") == [
        "/var/lib/mandos:/usr/sbin/nologin"]
    assert root.stat("/var/lib/mandos") == ("_mandos", "_mandos", 0o700)
    # clients.conf: readable by the server's group only, and still the admin's.
    assert root.stat("/etc/mandos/clients.conf") == ("root", "_mandos", 0o640)
    assert root.lines("dpkg-statoverride --list /etc/mandos/clients.conf") == [
        "root _mandos 640 /etc/mandos/clients.conf"]
    assert ADMIN_SECTION in root.read("/etc/mandos/clients.conf")
    assert root.stat("/etc/mandos/mandos.conf") == ("root", "root", 0o644)
    # clients.d: shipped empty, listed only by root and the server's group.
    assert root.stat("/etc/mandos/clients.d") == ("root", "_mandos", 0o750)
    assert not root.lines("ls -A /etc/mandos/clients.d")
    # Not enabled by the package (the admin enables it), but Debian's mandos.service was
    # enabled, and deb-systemd-helper carries that over to ours.
    assert enabled(root, "mandos-password-agent.path") == "disabled"
    assert enabled(root, "mandos.service") == "enabled"
    # The commands run under /usr/bin/python3 from the private directories.
    for command in ("mandos-server", "mandos-ctl", "mandos-password-agent", "mandos-keygen",
                    "mandos-luks"):
        assert "usage:" in root.run(f"{command} --help").stdout
    for package in SEARCH_PATH:
        check_imports(root, package)


def test_lintian(builds: tuple[Build, Build]) -> None:
    """No error (packaging/build.py fails on one), and only the warnings the README justifies."""
    tags = {line.split()[2] for line in builds[0].lintian.splitlines()
            if line[:3] in ("E: ", "W: ", "I: ", "P: ", "X: ")}
    assert tags <= JUSTIFIED_TAGS


def test_install_upgrade_remove_purge(builds: tuple[Build, Build], root: Root) -> None:
    first, second = builds

    # A migrating admin removes Debian's packages and keeps their configuration; the user and
    # the state directory are dropped too, so that ours must make them.
    root.run("systemctl enable mandos.service\napt-get remove -y -q mandos mandos-client")
    assert root.status("mandos") == root.status("mandos-client") == "config-files"
    root.run("sed -i '/^_mandos:/d' /etc/passwd /etc/group /etc/shadow /etc/gshadow\n"
             "rm -rf /var/lib/mandos\n"
             f"printf '%s' {shlex.quote(ADMIN_SECTION)} >> /etc/mandos/clients.conf")

    install(root, first)
    check_installed(root, first)

    # Plain dracut (no kernel here, so no kernel modules).  Before mandos-keygen made the keys,
    # it warns, leaves the module out and builds the initramfs all the same.
    root.run("mkdir /etc/keys/mandos.debian\nmv /etc/keys/mandos/* /etc/keys/mandos.debian/")
    log = dracut(root)
    assert "mandos-agent: no Mandos key set" in log
    assert "mandos-password-agent" not in root.run("lsinitrd /tmp/initrd.img").stdout
    # The installed keygen (Debian's python3-cryptography, gpg), into the directory the
    # package made; then the module includes itself and finds the agent in the package's
    # directory.
    assert root.stat("/etc/keys/mandos") == ("root", "root", 0o700)
    root.run("mandos-keygen >/dev/null")
    assert root.stat("/etc/keys/mandos/seckey.txt") == ("root", "root", 0o600)
    dracut(root)
    listing = root.run("lsinitrd /tmp/initrd.img").stdout
    for path in ("usr/lib/mandos-password-agent/password_agent/cli.py",
                 "usr/lib/mandos-password-agent/gnupg.py",
                 "usr/lib/mandos-password-agent/zeroconf/__init__.py",
                 "usr/lib/systemd/system/mandos-password-agent.service",
                 "etc/mandos/keys/tls-privkey.pem"):
        assert path in listing, path
    assert root.stat("/tmp/initrd.img") == ("root", "root", 0o600)
    assert unlock(root, "packaged-password") == "packaged-password\n"
    assert luks_bind_and_test(root).startswith("OK: the secret from [::1]:")

    # Upgrade: the configuration (also as changed since), the state and the mode are kept.
    root.run("printf '\\n# changed by the admin\\n' >> /etc/mandos/mandos.conf\n"
             f"printf '%s' {shlex.quote(STATE)} > /var/lib/mandos/clients.json\n"
             "chown _mandos:_mandos /var/lib/mandos/clients.json\n"
             "chmod 0600 /var/lib/mandos/clients.json")
    install(root, second)
    check_installed(root, second)
    assert root.read("/etc/mandos/mandos.conf").endswith("# changed by the admin\n")
    assert root.read("/var/lib/mandos/clients.json") == STATE
    assert root.stat("/var/lib/mandos/clients.json") == ("_mandos", "_mandos", 0o600)

    # Remove: the programs go, the configuration and the state stay.
    root.run("apt-get remove -y -q " + " ".join(PACKAGES))
    for package in PACKAGES:  # the etcd client has no configuration to keep
        assert root.status(package) == ("not-installed" if package == "mandos-server-etcd"
                                        else "config-files")
    left = [path for path in SERVER_FILES + AGENT_FILES + ETCD_FILES if root.exists(path)]
    assert not left
    assert not root.exists("/usr/lib/mandos-server")
    assert not root.exists("/usr/lib/mandos-server-etcd")
    assert not root.exists("/usr/lib/mandos-password-agent")
    assert ADMIN_SECTION in root.read("/etc/mandos/clients.conf")
    assert root.stat("/etc/mandos/clients.conf") == ("root", "_mandos", 0o640)
    assert root.read("/var/lib/mandos/clients.json") == STATE
    assert root.exists("/etc/keys/mandos/seckey.txt")

    # Purge: configuration and state go; the user stays (Debian keeps system users).
    root.run("dpkg --purge " + " ".join(PACKAGES))
    for package in PACKAGES:
        assert root.status(package) == "not-installed"
    assert not root.exists("/etc/mandos/clients.conf")
    assert not root.exists("/etc/mandos/mandos.conf")
    assert not root.exists("/var/lib/mandos")
    assert not root.exists("/etc/keys/mandos")
    assert not root.lines("dpkg-statoverride --list /etc/mandos/clients.conf || true")
    assert not root.exists("/etc/mandos/clients.d")
    assert not root.lines("dpkg-statoverride --list /etc/mandos/clients.d || true")
    assert root.lines("getent passwd _mandos | cut -d: -f1") == ["_mandos"]
    # deb-systemd-helper removed the symlinks that enabled the units.
    assert not root.lines("find /etc/systemd/system -name 'mandos*'")
    # Nothing else of ours is left: every file the steps made or changed that names Mandos
    # belongs to Debian's removed packages (dpkg's records, the init script that mandos's
    # postrm made non-executable, its keys moved aside).
    debians = ("/var/lib/dpkg/info/mandos.", "/var/lib/dpkg/info/mandos-client.",
               "/etc/init.d/mandos")
    assert [path for path in root.changed()
            if not path.startswith((*debians, "/etc/keys/mandos.debian/"))] == []


def test_fleet_needs_the_etcd_package_and_works_with_it(packages: Build, root: Root) -> None:
    """mandos-server alone: --etcd stops the start with one line that names the package to
    install.  With mandos-server-etcd: the installed server joins a real etcd (TLS, a client
    certificate) and registers there."""
    root.run("apt-get remove -y -q mandos")
    install(root, packages, "mandos-server")
    alone = root.run("mandos-server --foreground --no-dbus --no-zeroconf --etcd "
                     "http://127.0.0.1:2379 --address ::1 --port 1", check=False)
    assert alone.returncode == 1 and "apt install mandos-server-etcd" in alone.stderr, alone
    assert len(alone.stderr.strip().splitlines()) == 1 and "Traceback" not in alone.stderr

    install(root, packages, "mandos-server-etcd")
    with EtcdCluster(size=1) as cluster:
        for path, name in ((cluster.tls.cacert, "ca.pem"), (cluster.tls.cert, "cert.pem"),
                           (cluster.tls.key, "key.pem")):
            root.copy_in(path, f"/etc/mandos/etcd/{name}")
        output = root.run(f"set -- {free_port('::1')} {shlex.quote(cluster.endpoints)}\n"
                          f"{FLEET}").stdout
    assert [line for line in output.splitlines() if line.startswith("/mandos/servers/")], output
    assert "in sync with etcd" in output and "Traceback" not in output, output
