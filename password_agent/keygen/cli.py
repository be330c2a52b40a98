# SPDX-License-Identifier: GPL-3.0-or-later
"""``mandos-keygen``: make a Mandos client's keys, or a clients.conf section for a password.

Same options, file names, messages and output as upstream's shell script (Mandos 1.8).  Key
creation (the default mode) writes ``tls-privkey.pem``, ``tls-pubkey.pem``, ``seckey.txt`` and
``pubkey.txt``; ``--password``/``--passfile`` print a section that upstream's server reads, with
the password encrypted and signed to the client's own OpenPGP key.

Where we differ from upstream, on purpose:

* the OpenPGP key defaults to ed25519 with a cv25519 subkey instead of RSA-4096 (milliseconds
  instead of seconds; ``-t RSA -s RSA`` makes upstream's kind);
* ``--password`` keeps white space around the typed password, refuses a mismatch instead of
  asking again, and an empty password is refused in both modes;
* ``key_id`` is printed in upper case (upstream prints certtool's lower case; the server
  ignores case), the public key files are 0644 rather than 0600, and a ``%`` in ``host`` is
  doubled so that the server's interpolation reads it back.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from mandos_protocol.coredump import forbid_core_dumps
from mandos_protocol.version import version_line
from password_agent import stopsignal
from password_agent.errors import AgentError
from password_agent.keyfiles import KeyFiles
from password_agent.keygen.files import (
    PUBLIC_MODE,
    SECRET_MODE,
    check_directory,
    default_directory,
    install,
    refuse_overwrite,
)
from password_agent.keygen.openpgp import (
    DEFAULT_KEY_TYPE,
    DEFAULT_LENGTH,
    DEFAULT_SUBKEY_TYPE,
    KeySpec,
    armor_body,
    encrypt_to_own_key,
    generate_openpgp_key,
)
from password_agent.keygen.password import (
    SshHostKey,
    prompt_password,
    read_passfile,
    scan_local_ssh_key,
)
from password_agent.keygen.tls import (
    DEFAULT_TLS_KEY_TYPE,
    check_tls_key_type,
    generate_tls_key,
    key_id_of_pem,
    tls_key_types,
)

PROG = "mandos-keygen"
_USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of ours."""

    def error(self, message: str) -> NoReturn:
        self.exit(_USAGE_ERROR, f"{self.prog}: error: {message}\n")


def add_key_options(group: argparse._ActionsContainer) -> None:
    """The key type options, shared with ``mandos-luks bind``, which makes missing keys."""
    group.add_argument("-t", "--type", default=DEFAULT_KEY_TYPE, metavar="TYPE",
                       help=f"OpenPGP key type (default: {DEFAULT_KEY_TYPE}; RSA as upstream)")
    group.add_argument("-l", "--length", type=int, default=DEFAULT_LENGTH, metavar="BITS",
                       help=f"OpenPGP key length for RSA/DSA (default: {DEFAULT_LENGTH})")
    group.add_argument("-s", "--subtype", default=DEFAULT_SUBKEY_TYPE, metavar="TYPE",
                       help=f"OpenPGP subkey type (default: {DEFAULT_SUBKEY_TYPE}; RSA as "
                            "upstream)")
    group.add_argument("-L", "--sublength", type=int, default=DEFAULT_LENGTH, metavar="BITS",
                       help=f"OpenPGP subkey length for RSA/ELG-E (default: {DEFAULT_LENGTH})")
    group.add_argument("-e", "--email", default="", metavar="ADDRESS",
                       help="e-mail address of the OpenPGP key (default: none)")
    group.add_argument("-c", "--comment", default="", metavar="TEXT",
                       help="comment of the OpenPGP key (default: none)")
    group.add_argument("-x", "--expire", default="0", metavar="TIME",
                       help="OpenPGP key expiry, see gpg(1) (default: never)")
    group.add_argument("-T", "--tls-keytype", default=DEFAULT_TLS_KEY_TYPE, metavar="TYPE",
                       help=f"TLS key type: {', '.join(tls_key_types())} "
                            f"(default: {DEFAULT_TLS_KEY_TYPE})")


def key_spec(args: argparse.Namespace, name: str) -> KeySpec:
    """The OpenPGP key that :func:`add_key_options`' values ask for."""
    return KeySpec(name=name, key_type=args.type, length=args.length, subkey_type=args.subtype,
                   sublength=args.sublength, email=args.email, comment=args.comment,
                   expire=args.expire)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Generate the keys of a Mandos client, or encrypt a password with them "
                    "and print a section for the server's clients.conf.",
    )
    parser.add_argument("-v", "--version", action="version", version=version_line(PROG))
    parser.add_argument("-d", "--dir", type=Path, metavar="DIR",
                        help="directory of the key files (default: /etc/keys/mandos)")
    parser.add_argument("-n", "--name", metavar="NAME",
                        help="name of the key and of the section (default: the FQDN)")
    creation = parser.add_argument_group("key creation")
    add_key_options(creation)
    creation.add_argument("-f", "--force", action="store_true",
                          help="replace existing key files, keeping numbered backups (NAME.~N~)")
    password = parser.add_argument_group(
        "password creation", "encrypt a password with the existing keys and print a "
                             "clients.conf section; only --dir and --name apply")
    source = password.add_mutually_exclusive_group()
    source.add_argument("-p", "--password", action="store_true",
                        help="ask for the password twice on the terminal")
    source.add_argument("-F", "--passfile", metavar="FILE",
                        help="read the password from FILE, byte for byte (- for standard input)")
    password.add_argument("-S", "--no-ssh", action="store_true",
                          help="don't add an ssh-keyscan checker and ssh_fingerprint")
    return parser


def create_keys(directory: Path, spec: KeySpec, tls_key_type: str, force: bool) -> None:
    """Upstream's default mode: check everything, make both key pairs, then write all four."""
    check_directory(directory, writable=True)
    check_tls_key_type(tls_key_type)
    spec.batch()  # refuse bad OpenPGP options before any slow work
    files = KeyFiles.in_directory(directory)
    refuse_overwrite(files, force)
    tls = generate_tls_key(tls_key_type)
    openpgp = generate_openpgp_key(spec)
    install({
        files.tls_privkey: (tls.private_pem, SECRET_MODE),
        files.tls_pubkey: (tls.public_pem, PUBLIC_MODE),
        files.seckey: (openpgp.secret_armor, SECRET_MODE),
        files.pubkey: (openpgp.public_armor, PUBLIC_MODE),
    })


@dataclass(frozen=True)
class ClientKeys:
    """What password mode needs from the key directory."""

    public_armor: bytes
    secret_armor: bytes
    key_id: str | None


def load_client_keys(directory: Path) -> ClientKeys:
    """The OpenPGP key files and the TLS key id, read before asking for the password."""
    check_directory(directory, writable=False)
    files = KeyFiles.in_directory(directory)
    return ClientKeys(public_armor=_read_key_file(files.pubkey),
                      secret_armor=_read_key_file(files.seckey),
                      key_id=_key_id(files.tls_pubkey))


def client_section(keys: ClientKeys, name: str, password: bytes | bytearray,
                   host_key: SshHostKey | None) -> str:
    """The clients.conf section upstream's keygen prints for ``--password``.

    One deliberate difference: a ``%`` in the name is doubled in ``host``, because upstream's
    server reads values with interpolation and would choke on a single one.
    """
    encrypted = encrypt_to_own_key(keys.public_armor, keys.secret_armor, password)
    lines = [f"[{name}]", f"host = {name.replace('%', '%%')}"]
    if keys.key_id is not None:
        lines.append(f"key_id = {keys.key_id}")
    lines += [f"fingerprint = {encrypted.fingerprint}", "secret ="]
    lines += [f"    {line}" for line in armor_body(encrypted.armored)]
    if host_key is not None:
        lines += [f"checker = {host_key.checker()}",
                  f"ssh_fingerprint = {host_key.fingerprint}"]
    return "".join(line + "\n" for line in lines)


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise AgentError(f"cannot read {path}: {error.strerror}") from None


def _key_id(tls_pubkey: Path) -> str | None:
    """The key id of ``tls-pubkey.pem``; like upstream, none (with a notice) without the file."""
    try:
        pem = tls_pubkey.read_bytes()
    except FileNotFoundError:
        print(f"{PROG}: no {tls_pubkey}; the section has no key_id", file=sys.stderr)
        return None
    except OSError as error:
        raise AgentError(f"cannot read {tls_pubkey}: {error.strerror}") from None
    return key_id_of_pem(pem)


def check_name(name: str) -> str:
    if not name:
        raise AgentError("Empty key name")
    if not name.isprintable():
        raise AgentError("the name must be one line of printable text")
    return name


def run(args: argparse.Namespace) -> None:
    directory = args.dir if args.dir is not None else default_directory()
    name = check_name(args.name if args.name is not None else socket.getfqdn())
    if not (args.password or args.passfile is not None):
        create_keys(directory, key_spec(args, name), args.tls_keytype, args.force)
        return
    keys = load_client_keys(directory)
    host_key = None if args.no_ssh else scan_local_ssh_key()
    password = read_passfile(args.passfile) if args.passfile is not None else prompt_password()
    try:
        if not password:
            raise AgentError("the password is empty")
        section = client_section(keys, name, password, host_key)
    finally:
        password[:] = bytes(len(password))
    sys.stdout.write(section)


def run_key_command(prog: str, command: Callable[[], None]) -> int:
    """Run ``command`` as a key tool (``mandos-keygen``, ``mandos-luks``) must, and return the
    exit status: 0, 1 with the error on one line, or the stop signal's.

    SIGTERM and SIGHUP are recorded and acted on after the gpg step under way, so that the
    temporary GnuPG home with the new secret key is removed (by default they would kill us at
    once and leave it).  SIGINT stays KeyboardInterrupt: it must end a password prompt.
    """
    stopsignal.install((signal.SIGTERM, signal.SIGHUP))
    try:
        command()
    except AgentError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except stopsignal.Terminated as stop:
        print(f"{prog}: stopped by {stop}", file=sys.stderr)
        return 128 + (stopsignal.received() or signal.SIGTERM)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    forbid_core_dumps()  # new private keys and the disk password pass through this process
    return run_key_command(PROG, lambda: run(args))

