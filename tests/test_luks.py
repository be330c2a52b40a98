# SPDX-License-Identifier: GPL-3.0-or-later
"""mandos-luks against real cryptsetup, real gpg and our real server, on LUKS2 images in files.

``bind`` makes the keys and the section, the section goes into the server's ``clients.d/``, and
``test`` fetches the secret over TLS as the agent does and checks it with ``cryptsetup open
--test-passphrase`` (no loop device, no device mapper).  Each image's own passphrase slot uses
a cheap PBKDF so that the tests are fast; the Mandos keyslots always do (see
password_agent/luks/cryptsetup.py).  The new key is registered with the secret scan as soon as
the test knows it, and every test's files are scanned for it at the end: it must never be
written in clear.
"""

from __future__ import annotations

import base64
import configparser
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from password_agent.decrypt import Decryptor
from peers.leaks import WATCH
from peers.netns import VethPair
from peers.ours import OurServer, clients_conf
from peers.zeroconf import OurServerInNamespace

pytestmark = pytest.mark.peers

NAME = "luks-client"
PASSPHRASE = b"the admin's passphrase"
FAST_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
WATCH.password("test_luks PASSPHRASE", PASSPHRASE)


def luks(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """``mandos-luks ARGS`` as an admin runs it, standard input not a terminal."""
    return subprocess.run([sys.executable, "-m", "password_agent.luks", *map(str, args)],
                          input=stdin.decode(), capture_output=True, text=True, timeout=120,
                          check=False)


def cryptsetup(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["cryptsetup", *map(str, args)], input=stdin, capture_output=True,
                          timeout=60, check=False)


def opens(image: Path, key: bytes) -> bool:
    """Whether ``key`` opens any keyslot of ``image`` (what the boot's prompt would do)."""
    result = cryptsetup("open", "--test-passphrase", "--key-file", "-", image, stdin=key)
    assert result.returncode in (0, 2), result.stderr
    return result.returncode == 0


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's message: exit 1 and one line on stderr, nothing on stdout."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mandos-luks: "), result.stderr
    return lines[0]


def header(image: Path) -> dict[str, dict[str, dict[str, object]]]:
    dump = cryptsetup("luksDump", "--dump-json-metadata", image)
    assert dump.returncode == 0, dump.stderr
    parsed: dict[str, dict[str, dict[str, object]]] = json.loads(dump.stdout)
    return parsed


@dataclass
class Setup:
    """A LUKS2 image with one passphrase, a key directory (empty until bind fills it), the
    passphrase in a file, and our server, not yet started."""

    directory: Path
    image: Path
    passfile: Path
    keydir: Path
    server: OurServer

    @property
    def installed(self) -> Path:
        return self.server.configdir / "clients.d" / f"{NAME}.conf"

    def bind(self, *extra: str | Path) -> tuple[str, bytes]:
        """``bind`` with the passphrase file; the section and the key inside it."""
        section_file = self.directory / "bind.conf"
        result = luks("bind", self.image, "--keydir", self.keydir, "--name", NAME,
                      "--key-file", self.passfile, "--no-ssh", "--section-file",
                      section_file, *extra)
        assert result.returncode == 0, result.stderr
        section = section_file.read_text()
        return section, self.key_in(section)

    def key_in(self, section: str) -> bytes:
        """The secret of ``section``, decrypted with the client's key, as the agent would."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(section)
        blob = base64.b64decode("".join(parser[NAME]["secret"].split()))
        with Decryptor(self.keydir / "pubkey.txt", self.keydir / "seckey.txt", None) as gpg:
            key = bytes(gpg.decrypt(blob))
        WATCH.password("mandos-luks key", key)
        return key

    def install(self, section: str) -> None:
        """The section into the server's clients.d/, the server (re)started to read it."""
        self.installed.parent.mkdir(exist_ok=True)
        self.installed.write_text(section)
        if self.server.process is not None:
            self.server.stop()
        self.server.start()

    def agent_options(self) -> list[str]:
        return ["--keydir", str(self.keydir), "--connect", self.server.connect,
                "--kernel-cmdline", "/dev/null", "--timeout", "20"]

    def test(self) -> subprocess.CompletedProcess[str]:
        return luks("test", self.image, *self.agent_options())


def make_image(path: Path, passphrase: bytes = PASSPHRASE, *options: str) -> Path:
    subprocess.run(["truncate", "-s", "20M", str(path)], check=True)
    result = cryptsetup("luksFormat", "--batch-mode", *FAST_PBKDF, *options, "--key-file", "-",
                        path, stdin=passphrase)
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    passfile = tmp_path / "passphrase"
    passfile.write_bytes(PASSPHRASE)
    (tmp_path / "server").mkdir()
    server = OurServer(clients_conf(), directory=tmp_path / "server")
    try:
        yield Setup(tmp_path, make_image(tmp_path / "disk.img"), passfile, tmp_path / "keys",
                    server)
    finally:
        server.close()
        passfile.unlink()  # the passphrase is where the admin put it; the key must be nowhere
        WATCH.scan_tree("file", tmp_path)


def test_bind_then_test_passes_against_our_server(setup: Setup) -> None:
    section, key = setup.bind()
    assert sorted(path.name for path in setup.keydir.iterdir()) == [
        "pubkey.txt", "seckey.txt", "tls-privkey.pem", "tls-pubkey.pem"]  # made by bind
    tokens = header(setup.image)["tokens"]
    assert len(tokens) == 1
    token = next(iter(tokens.values()))
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(section)
    assert token["type"] == "mandos" and token["name"] == NAME
    assert token["key_id"] == parser[NAME]["key_id"]
    slot = token["keyslots"][0]  # type: ignore[index]
    assert opens(setup.image, key) and opens(setup.image, PASSPHRASE)
    assert header(setup.image)["keyslots"][slot]["kdf"]["type"] == "pbkdf2"  # type: ignore[index]
    assert (setup.directory / "bind.conf").stat().st_mode & 0o777 == 0o600

    setup.install(section)
    result = setup.test()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK: the secret from {setup.server.connect} opens keyslot "
                                    f"{slot} of {setup.image}")
    assert len(result.stdout.splitlines()) == 1 and result.stderr == ""

    listed = luks("list", setup.image)
    assert listed.returncode == 0
    assert listed.stdout == (f"{setup.image}: keyslot {slot}, token 0, client {NAME}, key_id "
                             f"{token['key_id']}\n")


def test_bind_reads_the_passphrase_from_stdin_and_prints_the_section(setup: Setup) -> None:
    result = luks("bind", setup.image, "--keydir", setup.keydir, "--name", NAME, "--no-ssh",
                  stdin=PASSPHRASE + b"\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"[{NAME}]\n")
    assert opens(setup.image, setup.key_in(result.stdout))
    assert len(header(setup.image)["tokens"]) == 1
    # Bound to these keys already: a second binding would leave one keyslot nobody opens.
    assert "bound to these keys already" in one_line_error(
        luks("bind", setup.image, "--keydir", setup.keydir, "--no-ssh",
             stdin=PASSPHRASE + b"\n"))
    assert len(header(setup.image)["tokens"]) == 1


def test_test_finds_the_server_with_zeroconf_as_the_agent_does(setup: Setup,
                                                                veth_pair: VethPair) -> None:
    """No --connect: test browses on its --interface, as the initramfs agent would, and asks
    our server announced in the other namespace, over IPv6 link-local."""
    section, _ = setup.bind()
    directory = setup.directory / "announced"
    directory.mkdir()
    with OurServerInNamespace(veth_pair.a, section, directory):
        result = subprocess.run(VethPair.wrap(veth_pair.b, [
            sys.executable, "-m", "password_agent.luks", "test", str(setup.image), "--keydir",
            str(setup.keydir), f"--interface={veth_pair.b.interface}", "--kernel-cmdline",
            "/dev/null", "--timeout", "20"]), capture_output=True, text=True, timeout=120,
            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK: the secret from [{veth_pair.a.link_local}%"), \
        result.stdout


def test_unbind_makes_test_fail_and_the_key_no_longer_opens(setup: Setup) -> None:
    section, key = setup.bind()
    setup.install(section)
    assert setup.test().returncode == 0

    result = luks("unbind", setup.image, "--key-file", setup.passfile)
    assert result.returncode == 0, result.stderr
    assert not opens(setup.image, key)
    assert opens(setup.image, PASSPHRASE)
    assert header(setup.image)["tokens"] == {}
    assert "has no Mandos binding" in one_line_error(setup.test())
    assert "has no Mandos binding" in one_line_error(luks("unbind", setup.image))


def test_unbind_refuses_the_last_keyslot(setup: Setup) -> None:
    _, key = setup.bind()
    assert cryptsetup("luksKillSlot", "--batch-mode", setup.image, "0").returncode == 0
    assert "is the last keyslot" in one_line_error(luks("unbind", setup.image, "--key-file",
                                                        setup.passfile))
    assert opens(setup.image, key)


def test_unbind_with_the_key_of_the_slot_itself_is_a_wrong_passphrase(setup: Setup) -> None:
    _, key = setup.bind()
    keyfile = setup.directory / "key-in-a-file-on-purpose"
    keyfile.write_bytes(key)
    try:
        message = one_line_error(luks("unbind", setup.image, "--key-file", keyfile))
    finally:
        keyfile.unlink()
    assert "wrong passphrase" in message
    assert opens(setup.image, key)


def finish(setup: Setup) -> subprocess.CompletedProcess[str]:
    return luks("rotate", "--finish", setup.image, *setup.agent_options())


def test_rotate_keeps_the_volume_openable_at_every_step(setup: Setup) -> None:
    section, old_key = setup.bind()
    setup.install(section)

    new_file = setup.directory / "rotated.conf"
    result = luks("rotate", setup.image, "--keydir", setup.keydir, "--key-file",
                  setup.passfile, "--no-ssh", "--section-file", new_file)
    assert result.returncode == 0, result.stderr
    assert "rotate --finish" in result.stderr
    new_key = setup.key_in(new_file.read_text())
    assert new_key != old_key
    assert opens(setup.image, old_key) and opens(setup.image, new_key)
    assert "under way" in luks("list", setup.image).stdout
    # A second rotate while one is under way is refused.
    assert "under way already" in one_line_error(
        luks("rotate", setup.image, "--keydir", setup.keydir, "--key-file", setup.passfile,
             "--no-ssh"))

    # The server still hands out the old secret: --finish refuses, both keyslots stay.
    assert "still hands out the old secret" in one_line_error(finish(setup))
    assert opens(setup.image, old_key) and opens(setup.image, new_key)
    assert setup.test().returncode == 0  # the next boot would unlock all along

    # The server is down: --finish refuses, both keyslots stay.
    setup.server.stop()
    assert "cannot connect" in one_line_error(finish(setup))
    assert opens(setup.image, old_key) and opens(setup.image, new_key)

    # The new section installed: --finish removes the old keyslot.
    setup.install(new_file.read_text())
    result = finish(setup)
    assert result.returncode == 0, result.stderr
    assert not opens(setup.image, old_key)
    assert opens(setup.image, new_key) and opens(setup.image, PASSPHRASE)
    assert setup.test().returncode == 0
    tokens = header(setup.image)["tokens"]
    assert len(tokens) == 1 and "replaces_keyslot" not in next(iter(tokens.values()))
    assert "no rotation" in one_line_error(finish(setup))


def test_not_luks2(tmp_path: Path) -> None:
    luks1 = make_image(tmp_path / "luks1.img", PASSPHRASE, "--type", "luks1")
    assert "is LUKS1" in one_line_error(luks("bind", luks1, "--keydir", tmp_path / "keys"))
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1 << 20))
    assert "is not a LUKS volume" in one_line_error(luks("list", plain))
    assert "does not exist" in one_line_error(luks("list", tmp_path / "missing.img"))


def test_wrong_passphrase_changes_nothing(setup: Setup) -> None:
    setup.keydir.mkdir(mode=0o700)
    subprocess.run([sys.executable, "-m", "password_agent.keygen", "-d", str(setup.keydir),
                    "-n", NAME], check=True, capture_output=True, timeout=60)
    before = header(setup.image)
    setup.passfile.write_bytes(b"not the passphrase")
    message = one_line_error(luks("bind", setup.image, "--keydir", setup.keydir, "--key-file",
                                  setup.passfile, "--no-ssh"))
    assert "wrong passphrase" in message
    after = header(setup.image)
    assert after["keyslots"].keys() == before["keyslots"].keys()
    assert after["tokens"] == before["tokens"]


def test_no_free_keyslot(setup: Setup) -> None:
    for slot in range(1, 32):
        added = cryptsetup("luksAddKey", *FAST_PBKDF, "--key-file", setup.passfile,
                           "--new-key-slot", str(slot), setup.image, setup.passfile)
        assert added.returncode == 0, added.stderr
    message = one_line_error(luks("bind", setup.image, "--keydir", setup.keydir, "--key-file",
                                  setup.passfile))
    assert "no free keyslot" in message
    assert not setup.keydir.exists()  # refused before making keys


def test_server_unreachable_or_refusing(setup: Setup) -> None:
    setup.bind()
    message = one_line_error(setup.test())  # the server never started
    assert "would NOT unlock" in message and "cannot connect" in message
    setup.server.start()  # the section not installed
    message = one_line_error(setup.test())
    assert "would NOT unlock" in message and "refused: it sent nothing" in message


def test_a_secret_that_does_not_open_the_keyslot(setup: Setup) -> None:
    section, _ = setup.bind()
    setup.install(section)
    # Another binding's section in place of this one: its secret opens no keyslot of ours.
    other = setup.directory / "other.img"
    make_image(other)
    stray = luks("bind", other, "--keydir", setup.keydir, "--name", NAME, "--key-file",
                 setup.passfile, "--no-ssh")
    assert stray.returncode == 0, stray.stderr
    setup.key_in(stray.stdout)
    setup.install(stray.stdout)
    message = one_line_error(setup.test())
    assert "opens no Mandos keyslot" in message


def test_test_needs_a_binding_of_these_keys(setup: Setup) -> None:
    setup.bind()
    other_keys = setup.directory / "other-keys"
    result = luks("bind", make_image(setup.directory / "other.img"), "--keydir", other_keys,
                  "--key-file", setup.passfile, "--no-ssh")
    assert result.returncode == 0, result.stderr
    message = one_line_error(luks("test", setup.image, "--keydir", other_keys, "--connect",
                                  "127.0.0.1:9", "--kernel-cmdline", "/dev/null"))
    assert "has no Mandos binding for the keys in" in message


def test_mandos_off_on_the_kernel_command_line(setup: Setup) -> None:
    setup.bind()
    cmdline = setup.directory / "cmdline"
    cmdline.write_text("root=/dev/mapper/root mandos=off\n")
    message = one_line_error(luks("test", setup.image, "--keydir", setup.keydir,
                                  "--connect", "127.0.0.1:9", "--kernel-cmdline", cmdline))
    assert "mandos=off" in message


@pytest.mark.parametrize("command", [["bind"], ["test"], ["unbind"], ["rotate"], ["list"]])
def test_help(command: Sequence[str]) -> None:
    result = luks(*command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: mandos-luks {command[0]}")
