# SPDX-License-Identifier: GPL-3.0-or-later
"""mandos-keygen: our keys and sections against certtool, plain gpg, and upstream Mandos itself.

The CLI runs as a subprocess (as a user runs it), with TMPDIR pointing into the test's own
directory so that we can check that no throw-away GNUPGHOME is left behind.  Keys are made once
per module; only the RSA tests make RSA keys.
"""

from __future__ import annotations

import base64
import configparser
import fcntl
import os
import pty
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from mandos_protocol.wire import key_id
from password_agent.keygen.files import backup_name
from password_agent.keygen.openpgp import armor_body
from password_agent.keygen.tls import key_id_of_pem
from peers.agent import processes_left
from peers.leaks import WATCH
from peers.upstream import (
    MANDOS_KEYGEN,
    KeySet,
    UpstreamServer,
    run_upstream_client,
    section_secret,
)
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.peers

KEY_FILES = ("seckey.txt", "pubkey.txt", "tls-privkey.pem", "tls-pubkey.pem")
PASSWORD = b" the disk password, with spaces \xc3\xa9 "
NAME = "client.example"
WATCH.password("test_keygen PASSWORD", PASSWORD)


def keygen(args: Sequence[str], *, stdin: bytes | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Our ``mandos-keygen`` with ``args``; checks that it left no GNUPGHOME or gpg-agent.

    TMPDIR is a fresh short directory (a gpg-agent socket path must fit in 107 bytes), unless
    ``env`` (overrides of this process's environment) sets it.
    """
    scratch = Path(tempfile.mkdtemp(prefix="mkg-"))
    try:
        environment = {**os.environ, "TMPDIR": str(scratch), **(env or {})}
        result = subprocess.run([sys.executable, "-m", "password_agent.keygen", *args],
                                input=stdin if stdin is not None else b"",
                                capture_output=True, env=environment, timeout=120)
        assert_nothing_left(Path(environment["TMPDIR"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def assert_nothing_left(tmpdir: Path) -> None:
    """No GNUPGHOME in ``tmpdir`` and no gpg-agent serving one."""
    assert not any(tmpdir.glob("mandos-keygen-*"))
    assert processes_left(str(tmpdir)) == []


def write_private(directory: Path, name: str, data: bytes) -> Path:
    """``data`` in a 0600 file of a 0700 directory: how tests hand passwords over."""
    directory.mkdir(mode=0o700, exist_ok=True)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    path = directory / name
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)
    return path


def parse_section(text: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    (name,) = parser.sections()
    return parser[name]


def certtool_key_id(tls_pubkey: Path) -> str:
    result = subprocess.run(["certtool", "--key-id", "--hash=sha256",
                             f"--load-pubkey={tls_pubkey}"],
                            capture_output=True, check=True, timeout=30)
    return result.stdout.decode().strip().upper()


def spki_der(tls_pubkey: Path) -> bytes:
    public_key = serialization.load_pem_public_key(tls_pubkey.read_bytes())
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def gpg_records(key_file: Path, kind: str, home: Path) -> list[list[str]]:
    """The ``pub``/``sub``/``sec``/``ssb`` colon records of an armoured key file."""
    result = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--with-colons",
                             "--show-keys", str(key_file)],
                            capture_output=True, check=True, timeout=30)
    return [line.split(":") for line in result.stdout.decode().splitlines()
            if line.startswith(kind + ":")]


@pytest.fixture
def gpg_home(tmp_path: Path) -> Iterator[Path]:
    """A private GNUPGHOME for plain ``gpg`` in a test; its agent stopped afterwards."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    try:
        yield home
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def module_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mandos-test-keygen-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def our_keys(module_dir: Path) -> KeySet:
    """Keys from our keygen with every default but the name."""
    directory = module_dir / "ours"
    directory.mkdir()
    result = keygen(["--dir", str(directory), "--name", NAME])
    assert result.returncode == 0, result.stderr
    return KeySet.in_directory(directory)


@pytest.fixture(scope="module")
def our_section(our_keys: KeySet, module_dir: Path) -> str:
    """Our keygen's clients.conf section for ``our_keys`` and PASSWORD (no ssh checker)."""
    passfile = write_private(module_dir / "secret", "password", PASSWORD)
    result = keygen(["-d", str(our_keys.directory), "-n", NAME, "-F", str(passfile), "-S"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    WATCH.blob("our keygen's section", section_secret(result.stdout.decode()))
    return result.stdout.decode()


def test_creates_four_files_with_modes_and_formats(our_keys: KeySet, gpg_home: Path) -> None:
    modes = {path.name: stat.S_IMODE(path.stat().st_mode)
             for path in our_keys.directory.iterdir()}
    assert modes == {"seckey.txt": 0o600, "pubkey.txt": 0o644,
                     "tls-privkey.pem": 0o600, "tls-pubkey.pem": 0o644}
    private_pem = our_keys.tls_privkey.read_bytes()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    private_key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(private_key, ed25519.Ed25519PrivateKey)
    assert our_keys.tls_pubkey.read_bytes() == private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    # certtool (upstream's tool) reads the private key as it is.
    subprocess.run(["certtool", "--key-info", "--password=",
                    f"--infile={our_keys.tls_privkey}"], capture_output=True, check=True,
                   timeout=30)

    public_text = our_keys.pubkey.read_text()
    secret_text = our_keys.seckey.read_text()
    assert public_text.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----\n"
                                  f"Comment: Mandos client key for {NAME}\n")
    assert secret_text.startswith("-----BEGIN PGP PRIVATE KEY BLOCK-----\n"
                                  f"Comment: Mandos client key for {NAME}\n")
    (pub,) = gpg_records(our_keys.pubkey, "pub", gpg_home)
    (sub,) = gpg_records(our_keys.pubkey, "sub", gpg_home)
    assert (pub[3], pub[16], sub[3], sub[16]) == ("22", "ed25519", "18", "cv25519")
    assert "s" in pub[11] and "a" in pub[11] and sub[11] == "e"
    (sec,) = gpg_records(our_keys.seckey, "sec", gpg_home)
    assert sec[4] == pub[4]
    uids = [record[9] for record in gpg_records(our_keys.pubkey, "uid", gpg_home)]
    assert uids == [NAME]


def test_section_key_id_equals_certtool_and_wire(our_keys: KeySet, our_section: str) -> None:
    printed = parse_section(our_section)["key_id"]
    assert printed == certtool_key_id(our_keys.tls_pubkey)
    assert printed == key_id(spki_der(our_keys.tls_pubkey))
    assert printed == our_keys.key_id


def test_section_blob_decrypts_with_plain_gpg(our_keys: KeySet, our_section: str,
                                              gpg_home: Path) -> None:
    subprocess.run(["gpg", "--homedir", str(gpg_home), "--batch", "--import",
                    str(our_keys.seckey)], capture_output=True, check=True, timeout=30)
    result = subprocess.run(["gpg", "--homedir", str(gpg_home), "--batch", "--status-fd", "2",
                             "--decrypt"], input=section_secret(our_section),
                            capture_output=True, check=True, timeout=30)
    assert result.stdout == PASSWORD
    fingerprint = parse_section(our_section)["fingerprint"]
    assert f"[GNUPG:] VALIDSIG {fingerprint} ".encode() in result.stderr  # signed by itself


@pytest.mark.interop
def test_section_formatted_as_upstream_prints_it(our_keys: KeySet, our_section: str,
                                                 module_dir: Path) -> None:
    """Upstream's keygen on our keys prints the same section, apart from the random blob and
    the case of the key id (upstream prints certtool's lower case)."""
    passfile = module_dir / "secret" / "password"
    result = subprocess.run([MANDOS_KEYGEN, "-d", str(our_keys.directory), "-n", NAME,
                             "-F", str(passfile), "-S"], capture_output=True, check=True,
                            timeout=60)
    theirs = result.stdout.decode().splitlines(keepends=True)
    ours = our_section.splitlines(keepends=True)
    assert ours[:2] == theirs[:2] == [f"[{NAME}]\n", f"host = {NAME}\n"]
    assert ours[2] == theirs[2].upper().replace("KEY_ID", "key_id")
    assert ours[3:5] == theirs[3:5]
    assert ours[4] == "secret =\n"
    # Both blobs are the same kind of message (ed25519 signature, cv25519 encryption), so
    # the body has the same shape: 64 base64 characters a line, indented four spaces.  Not
    # the same length to the byte: the compressed literal packet holds its creation time,
    # which compresses a byte shorter or longer now and then.
    width = len("    ") + 64 + len("\n")
    for body in (ours[5:], theirs[5:]):
        assert {len(line) for line in body[:-1]} == {width} and len(body[-1]) <= width
    assert abs(len(ours) - len(theirs)) <= 1
    assert all(line.startswith("    ") and not line.startswith("     ") for line in ours[5:])
    assert section_secret(our_section) != section_secret(result.stdout.decode())


@pytest.mark.interop
def test_ssh_checker_as_upstream(our_keys: KeySet, module_dir: Path, tmp_path: Path) -> None:
    """Without -S, whatever upstream finds with ssh-keyscan on this host, we find too."""
    passfile = module_dir / "secret" / "password"
    args = ["-d", str(our_keys.directory), "-n", NAME, "-F", str(passfile)]
    theirs = subprocess.run([MANDOS_KEYGEN, *args], capture_output=True, check=True, timeout=60)
    ours = keygen(args)
    assert ours.returncode == 0, ours.stderr

    def tail(section: bytes) -> list[str]:
        return [line for line in section.decode().splitlines()
                if line.startswith(("checker", "ssh_fingerprint"))]

    assert tail(ours.stdout) == tail(theirs.stdout)


def test_ssh_keyscan_missing_gives_a_notice(our_keys: KeySet, module_dir: Path,
                                            tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("gpg", "gpgconf", "gpg-agent"):
        found = shutil.which(program)
        assert found is not None
        (bin_dir / program).symlink_to(found)
    result = keygen(["-d", str(our_keys.directory), "-n", NAME,
                     "-F", str(module_dir / "secret" / "password")],
                    env={"PATH": str(bin_dir)})
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"mandos-keygen: ssh-keyscan not found; no SSH checker in the section\n"
    assert b"checker" not in result.stdout


@pytest.mark.interop
def test_full_unlock_with_upstream_server_and_client(our_keys: KeySet,
                                                     our_section: str) -> None:
    with UpstreamServer(our_section) as server:
        result = run_upstream_client(our_keys, server.connect, timeout=30)
    assert result.stdout == PASSWORD, (result.returncode, result.stderr, server.log_text())


@pytest.mark.interop
def test_upstream_keys_work_with_our_code(upstream_client: UpstreamClient,
                                          tmp_private: Path) -> None:
    """Upstream's key set: our key id is the one upstream's keygen prints, and our keygen
    makes a section with the same key id and fingerprint, whose blob upstream's client reads."""
    keys = upstream_client.keys
    theirs = parse_section(upstream_client.section)
    assert key_id_of_pem(keys.tls_pubkey.read_bytes()) == theirs["key_id"].upper()
    passfile = write_private(tmp_private, "password", PASSWORD)
    result = keygen(["-d", str(keys.directory), "-n", upstream_client.name,
                     "-F", str(passfile), "-S"])
    assert result.returncode == 0, result.stderr
    ours = parse_section(result.stdout.decode())
    assert ours["key_id"] == theirs["key_id"].upper()
    assert ours["fingerprint"] == theirs["fingerprint"]
    with UpstreamServer(result.stdout.decode()) as server:
        client = run_upstream_client(keys, server.connect, timeout=30)
    assert client.stdout == PASSWORD, (client.returncode, client.stderr, server.log_text())


def test_refuses_to_overwrite_without_force(our_keys: KeySet, tmp_path: Path) -> None:
    before = {name: (our_keys.directory / name).read_bytes() for name in KEY_FILES}
    result = keygen(["-d", str(our_keys.directory), "-n", NAME])
    assert result.returncode == 1
    assert result.stderr == b"mandos-keygen: Refusing to overwrite old key files; use --force\n"
    assert {name: (our_keys.directory / name).read_bytes() for name in KEY_FILES} == before
    assert sorted(path.name for path in our_keys.directory.iterdir()) == sorted(KEY_FILES)


@pytest.mark.parametrize("present", KEY_FILES)
def test_any_one_old_key_file_is_enough_to_refuse(present: str, tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / present).write_bytes(b"old")
    result = keygen(["-d", str(directory)])
    assert result.returncode == 1
    assert b"Refusing to overwrite" in result.stderr
    assert [path.name for path in directory.iterdir()] == [present]


def test_force_keeps_numbered_backups(our_keys: KeySet, tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    shutil.copytree(our_keys.directory, directory)
    generations = [{name: (directory / name).read_bytes() for name in KEY_FILES}]
    for _ in range(2):
        result = keygen(["-d", str(directory), "-n", NAME, "--force"])
        assert result.returncode == 0, result.stderr
        generations.append({name: (directory / name).read_bytes() for name in KEY_FILES})
    for name in KEY_FILES:
        assert (directory / f"{name}.~1~").read_bytes() == generations[0][name]
        assert (directory / f"{name}.~2~").read_bytes() == generations[1][name]
        assert (directory / name).read_bytes() == generations[2][name]
        assert len({generation[name] for generation in generations}) == 3
    assert len(list(directory.iterdir())) == 3 * len(KEY_FILES)
    assert stat.S_IMODE((directory / "seckey.txt.~2~").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "tls-privkey.pem.~2~").stat().st_mode) == 0o600


def test_long_tmpdir_still_works(tmp_path: Path) -> None:
    """A TMPDIR too long for gpg-agent's socket path: the throw-away home goes to /tmp."""
    long_tmpdir = tmp_path / ("x" * 60)
    long_tmpdir.mkdir()
    directory = tmp_path / "keys"
    directory.mkdir()
    result = keygen(["-d", str(directory)], env={"TMPDIR": str(long_tmpdir)})
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in directory.iterdir()) == sorted(KEY_FILES)


def test_backup_numbers_follow_the_highest_as_cp_does(tmp_path: Path) -> None:
    for name in ("seckey.txt", "seckey.txt.~1~", "seckey.txt.~7~", "seckey.txt.~x~",
                 "other.~9~"):
        (tmp_path / name).write_bytes(b"")
    assert backup_name(tmp_path / "seckey.txt") == tmp_path / "seckey.txt.~8~"
    assert backup_name(tmp_path / "pubkey.txt") == tmp_path / "pubkey.txt.~1~"


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], b"mandos-keygen: error: unrecognized arguments: --bogus\n"),
    (["extra"], b"mandos-keygen: error: unrecognized arguments: extra\n"),
    (["-l", "many"], b"mandos-keygen: error: argument -l/--length: invalid int value: 'many'\n"),
    (["-p", "-F", "file"],
     b"mandos-keygen: error: argument -F/--passfile: not allowed with argument -p/--password\n"),
    (["-t", "RSA", "-l", "256"], b"mandos-keygen: Invalid key length\n"),
    (["-t", "ELGAMAL"], b"mandos-keygen: unknown OpenPGP key type 'ELGAMAL'; use one of "
                        b"ed25519, eddsa, nistp256, nistp384, nistp521, rsa, dsa\n"),
    (["-s", "ed25519"], b"mandos-keygen: unknown OpenPGP subkey type 'ed25519'; use one of "
                        b"cv25519, ecdh, nistp256, nistp384, nistp521, rsa, elg-e, elg\n"),
    (["-T", "rsa-pss"], b"mandos-keygen: TLS key type 'rsa-pss' is not supported here; "
                        b"use one of ed25519, ed448, ecdsa, ecc, rsa\n"),
    (["-T", "x25519"], b"mandos-keygen: unknown TLS key type 'x25519'; "
                       b"use one of ed25519, ed448, ecdsa, ecc, rsa\n"),
    (["-x", ""], b"mandos-keygen: Empty key expiration\n"),
    (["-n", ""], b"mandos-keygen: Empty key name\n"),
    (["-n", "two\nlines"], b"mandos-keygen: the name must be one line of printable text\n"),
    (["-c", "two\nlines"], b"mandos-keygen: the key comment must be one line of printable text\n"),
    (["-x", "someday"], b"mandos-keygen: gpg could not make the OpenPGP key: "
                        b"invalid expire date\n"),
])
def test_bad_options_give_one_line_and_create_nothing(args: list[str], message: bytes,
                                                      tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    result = keygen(["-d", str(directory), *args])
    assert result.returncode != 0
    assert result.stderr == message
    assert result.stdout == b""
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize("mode", [[], ["-F", "/dev/null"]])
def test_missing_directory_as_upstream_says_it(mode: list[str], tmp_path: Path) -> None:
    result = keygen(["-d", str(tmp_path / "absent"), *mode])
    assert result.returncode == 1
    assert result.stderr == f"mandos-keygen: {tmp_path / 'absent'} not a directory\n".encode()


def test_help_and_version(tmp_path: Path) -> None:
    help_result = keygen(["--help"])
    assert help_result.returncode == 0
    for option in (b"--dir", b"--name", b"--type", b"--length", b"--subtype", b"--sublength",
                   b"--email", b"--comment", b"--expire", b"--tls-keytype", b"--force",
                   b"--password", b"--passfile", b"--no-ssh", b"--version"):
        assert option in help_result.stdout
    version = keygen(["-v"])
    assert version.returncode == 0
    assert version.stdout.startswith(b"mandos-keygen ")


def test_password_mode_errors(our_keys: KeySet, tmp_path: Path) -> None:
    empty = write_private(tmp_path / "secret", "empty", b"")
    result = keygen(["-d", str(our_keys.directory), "-F", str(empty), "-S"])
    assert (result.returncode, result.stderr) == (1, b"mandos-keygen: the password is empty\n")
    result = keygen(["-d", str(tmp_path / "secret"), "-F", str(empty), "-S"])
    assert result.returncode == 1
    absent = tmp_path / "absent"
    result = keygen(["-d", str(our_keys.directory), "-F", str(absent), "-S"])
    assert result.returncode == 1
    assert result.stderr == (f"mandos-keygen: cannot read password file {absent}: "
                             "No such file or directory\n").encode()
    # -p without a terminal (the subprocess has none: new session) says what to do instead.
    result = subprocess.run([sys.executable, "-m", "password_agent.keygen", "-d",
                             str(our_keys.directory), "-p", "-S"], capture_output=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (b"mandos-keygen: no terminal to ask for the password on; "
                             b"use --passfile\n")


def test_passfile_from_standard_input_byte_for_byte(our_keys: KeySet, tmp_path: Path,
                                                    gpg_home: Path) -> None:
    password = b"\x00binary\nwith newline\n"
    result = keygen(["-d", str(our_keys.directory), "-n", NAME, "-F", "-", "-S"],
                    stdin=password)
    assert result.returncode == 0, result.stderr
    assert decrypt(our_keys, result.stdout.decode(), gpg_home) == password


def test_percent_in_name_survives_the_servers_interpolation(our_keys: KeySet) -> None:
    result = keygen(["-d", str(our_keys.directory), "-n", "50%host", "-F", "-", "-S"],
                    stdin=PASSWORD)
    assert result.returncode == 0, result.stderr
    parser = configparser.ConfigParser()  # with interpolation, as upstream's server reads it
    parser.read_string(result.stdout.decode())
    assert parser.sections() == ["50%host"]
    assert parser["50%host"]["host"] == "50%host"


def test_section_without_tls_key_has_no_key_id(our_keys: KeySet, tmp_path: Path) -> None:
    """As upstream: a directory with only the OpenPGP keys gives a section without key_id."""
    directory = tmp_path / "keys"
    directory.mkdir()
    for name in ("seckey.txt", "pubkey.txt"):
        shutil.copy(our_keys.directory / name, directory / name)
    result = keygen(["-d", str(directory), "-n", NAME, "-F", "-", "-S"],
                    stdin=PASSWORD)
    assert result.returncode == 0, result.stderr
    assert "key_id" not in parse_section(result.stdout.decode())
    assert result.stderr == (f"mandos-keygen: no {directory / 'tls-pubkey.pem'}; "
                             "the section has no key_id\n").encode()


def decrypt(keys: KeySet, section: str, home: Path) -> bytes:
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--import", str(keys.seckey)],
                   capture_output=True, check=True, timeout=30)
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--decrypt"],
                          input=section_secret(section), capture_output=True, check=True,
                          timeout=30).stdout


class Terminal:
    """Our keygen with a pseudo-terminal as its controlling terminal (its ``/dev/tty``)."""

    def __init__(self, args: Sequence[str]) -> None:
        self.master, slave = pty.openpty()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "password_agent.keygen", *args], stdin=slave,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )
        finally:
            os.close(slave)
        self.seen = b""

    def expect(self, text: bytes, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} on the terminal, only {self.seen!r}"
            if select.select([self.master], [], [], remaining)[0]:
                try:
                    self.seen += os.read(self.master, 1024)
                except OSError:  # EIO: the child closed the terminal
                    assert text in self.seen, self.seen

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def finish(self) -> tuple[int, bytes, bytes]:
        stdout, stderr = self.process.communicate(timeout=60)
        return self.process.returncode, stdout, stderr

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()
        os.close(self.master)


# ids: a test's id goes into logs and into every process's environment (PYTEST_CURRENT_TEST).
@pytest.mark.parametrize(("first", "second"), [(PASSWORD, PASSWORD), (b"one", b"two")],
                         ids=["same", "different"])
def test_password_prompted_twice_on_the_terminal(first: bytes, second: bytes,
                                                 our_keys: KeySet, gpg_home: Path) -> None:
    terminal = Terminal(["-d", str(our_keys.directory), "-n", NAME, "-p", "-S"])
    try:
        terminal.expect(b"Enter passphrase: ")
        terminal.type(first + b"\n")
        terminal.expect(b"Repeat passphrase: ")
        terminal.type(second + b"\n")
        returncode, stdout, stderr = terminal.finish()
        assert first not in terminal.seen and second not in terminal.seen  # echo was off
    finally:
        terminal.close()
    if first == second:
        assert (returncode, stderr) == (0, b"")
        assert decrypt(our_keys, stdout.decode(), gpg_home) == PASSWORD  # spaces kept
    else:
        assert (returncode, stdout, stderr) == (1, b"", b"mandos-keygen: Passphrase mismatch\n")


def test_armor_body_drops_headers_and_checksum() -> None:
    armored = ("-----BEGIN PGP MESSAGE-----\nComment: x\n\nAAAA\nBBB=\n=abc+\n"
               "-----END PGP MESSAGE-----\n")
    assert armor_body(armored) == ["AAAA", "BBB="]


@pytest.mark.interop
@pytest.mark.parametrize(("tls_type", "key_class"), [
    ("ed448", ed448.Ed448PrivateKey),
    ("ECDSA", ec.EllipticCurvePrivateKey),
    pytest.param("rsa", rsa.RSAPrivateKey, marks=pytest.mark.slow),
])
def test_other_tls_key_types(tls_type: str, key_class: type, tmp_path: Path) -> None:
    """Each -T type: certtool's sizes, certtool's key id, and a full unlock with upstream."""
    directory = tmp_path / "keys"
    directory.mkdir()
    result = keygen(["-d", str(directory), "-n", NAME, "-T", tls_type])
    assert result.returncode == 0, result.stderr
    private_key = serialization.load_pem_private_key(
        (directory / "tls-privkey.pem").read_bytes(), password=None)
    assert isinstance(private_key, key_class)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        assert private_key.curve.name == "secp384r1"  # what certtool's --sec-param ultra picks
    if isinstance(private_key, rsa.RSAPrivateKey):
        assert private_key.key_size == 8192
    tls_pubkey = directory / "tls-pubkey.pem"
    assert key_id_of_pem(tls_pubkey.read_bytes()) == certtool_key_id(tls_pubkey)
    section = keygen(["-d", str(directory), "-n", NAME, "-F", "-", "-S"], stdin=PASSWORD)
    assert section.returncode == 0, section.stderr
    with UpstreamServer(section.stdout.decode()) as server:
        client = run_upstream_client(KeySet.in_directory(directory), server.connect, timeout=30)
    assert client.stdout == PASSWORD, (client.returncode, client.stderr, server.log_text())


@pytest.mark.slow
def test_rsa_openpgp_keys_as_upstream(tmp_path: Path, gpg_home: Path) -> None:
    """``-t RSA -s RSA`` makes upstream's kind of key; -l and -L reach gpg."""
    directory = tmp_path / "keys"
    directory.mkdir()
    result = keygen(["-d", str(directory), "-n", NAME, "-t", "RSA", "-s", "RSA", "-L", "3072",
                     "-e", "root@client.example", "-c", "test key", "-x", "2y"])
    assert result.returncode == 0, result.stderr
    (pub,) = gpg_records(directory / "pubkey.txt", "pub", gpg_home)
    (sub,) = gpg_records(directory / "pubkey.txt", "sub", gpg_home)
    assert (pub[2], pub[3], sub[2], sub[3]) == ("4096", "1", "3072", "1")
    assert pub[6] != ""  # it expires
    (uid,) = gpg_records(directory / "pubkey.txt", "uid", gpg_home)
    assert uid[9] == f"{NAME} (test key) <root@client.example>"
    assert (directory / "pubkey.txt").read_text().splitlines()[1] == (
        f"Comment: Mandos client key for {NAME} (test key) <root@client.example>")


def test_rsa_primary_length_reaches_gpg(tmp_path: Path, gpg_home: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    result = keygen(["-d", str(directory), "-t", "rsa", "-l", "2048"])
    assert result.returncode == 0, result.stderr
    (pub,) = gpg_records(directory / "pubkey.txt", "pub", gpg_home)
    (sub,) = gpg_records(directory / "pubkey.txt", "sub", gpg_home)
    assert (pub[2], pub[3], sub[16]) == ("2048", "1", "cv25519")


def test_secret_is_base64_of_the_blob(our_section: str) -> None:
    """The server base64-decodes ``secret``: the lines must be plain base64 (no CRC line)."""
    lines = parse_section(our_section)["secret"].split()
    blob = base64.b64decode("".join(lines), validate=True)
    assert blob[0] & 0x80  # an OpenPGP packet


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_an_interrupted_keygen_leaves_no_gnupg_home_nor_gpg_agent(signum: int,
                                                                   tmp_path: Path) -> None:
    """SIGTERM or SIGHUP at random moments of a key generation (RSA-4096: several seconds in
    gpg): the temporary GnuPG home holding the new secret key is removed and its gpg-agent
    stopped (by default the signal killed keygen and left both), 3 tries each."""
    rng = random.Random(signum)
    for attempt in range(3):
        scratch = Path(tempfile.mkdtemp(prefix="mkg-"))
        (tmp_path / f"keys{attempt}").mkdir(mode=0o700)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "password_agent.keygen", "-d",
                 str(tmp_path / f"keys{attempt}"), "-t", "RSA", "-l", "4096", "-f"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env={**os.environ, "TMPDIR": str(scratch)})
            deadline = time.monotonic() + 10
            while not any(scratch.glob("mandos-keygen-*")):
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=60)
            assert process.returncode != 0, stderr
            assert_nothing_left(scratch)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            shutil.rmtree(scratch, ignore_errors=True)
