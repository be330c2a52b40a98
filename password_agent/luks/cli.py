# SPDX-License-Identifier: GPL-3.0-or-later
"""``mandos-luks``: bind a LUKS2 volume to Mandos, prove it unlocks, rotate, unbind, list.

``bind`` adds a keyslot opened by a fresh random key, records a ``mandos`` token naming it and
the client's key_id, and prints the clients.conf section whose secret is that key encrypted to
the client's OpenPGP key.  ``test`` fetches the secret as the initramfs agent would and checks
that it opens the keyslot.  ``rotate`` adds a new binding beside the old one and prints its
section; ``rotate --finish``, once the section is installed on the server, tests the new
secret and only then removes the old keyslot.  ``unbind`` removes a binding (never the last
keyslot); ``list`` shows them.  Expected failures print one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from mandos_protocol import durable
from mandos_protocol.coredump import forbid_core_dumps
from mandos_protocol.version import version_line
from password_agent.agent import AgentConfig
from password_agent.cli import build_parser as build_agent_parser
from password_agent.cli import config_from_arguments
from password_agent.errors import AgentError
from password_agent.keyfiles import KeyFiles
from password_agent.keygen.cli import (
    add_key_options,
    check_name,
    create_keys,
    key_spec,
    load_client_keys,
    run_key_command,
)
from password_agent.keygen.files import default_directory
from password_agent.keygen.password import SshHostKey, scan_local_ssh_key
from password_agent.keygen.tls import key_id_of_pem
from password_agent.luks import bindings
from password_agent.luks.header import Header, read_header
from password_agent.luks.proof import DEFAULT_TIMEOUT, prove

PROG = "mandos-luks"
_USAGE_ERROR = 2
#: The agent's options that mean nothing to a one-off proof; accepted, not shown.
_AGENT_ONLY = ("agent_directory", "watch", "all_requests", "run_directory", "retry")
#: The section file holds the encrypted secret: the server's clients.conf is root's alone too.
SECTION_MODE = 0o600

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of ours."""

    def error(self, message: str) -> NoReturn:
        self.exit(_USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _agent_options() -> _Parser:
    """``mandos-password-agent``'s own options, as a parent: ``test`` and ``rotate --finish``
    take its server and key options with its meanings, and build the agent's configuration
    with its code.  Its ``--keydir`` defaults here to mandos-keygen's directory (this runs
    on the installed system, not in the initramfs)."""
    parser = _Parser(add_help=False, parents=[build_agent_parser()])
    for action in parser._actions:
        if action.dest in _AGENT_ONLY:
            action.help = argparse.SUPPRESS
        elif action.dest == "timeout":
            action.help = f"give up after this long (default: {DEFAULT_TIMEOUT:g})"
        elif isinstance(action, argparse._VersionAction):
            action.version = version_line(PROG)
    parser.set_defaults(keydir=default_directory())
    return parser


def _passphrase_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--key-file", metavar="FILE",
                        help=f"read {what} from FILE, as cryptsetup's --key-file does (- for "
                             "all of standard input); default: cryptsetup asks on the terminal, "
                             "or reads a line from standard input")


def _section_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--section-file", type=Path, metavar="FILE",
                        help="write the clients.conf section to FILE (mode 0600, replaced "
                             "atomically) instead of standard output")
    parser.add_argument("-S", "--no-ssh", action="store_true",
                        help="don't add an ssh-keyscan checker and ssh_fingerprint to the "
                             "section")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, allow_abbrev=False,
                     description="Bind a LUKS2 volume to a Mandos server, prove before a "
                                 "reboot that it would unlock, rotate or remove the binding.")
    parser.add_argument("-V", "--version", action="version", version=version_line(PROG))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    bind = commands.add_parser(
        "bind", allow_abbrev=False, help="add a keyslot and a token; print its section",
        description="Add a keyslot opened by a fresh random key (an existing passphrase is "
                    "asked once), record a LUKS2 token of type mandos naming it and the "
                    "client's key_id, and print the clients.conf section for the server.  "
                    "Makes the client's keys first if --keydir has none.")
    bind.add_argument("device", metavar="DEVICE", help="the LUKS2 volume (or image file)")
    bind.add_argument("--keydir", type=Path, metavar="DIR",
                      help="directory of the client's keys (default: mandos-keygen's, "
                           "/etc/keys/mandos)")
    bind.add_argument("-n", "--name", metavar="NAME",
                      help="name of the client and of its section (default: the FQDN)")
    _passphrase_option(bind, "an existing passphrase")
    _section_options(bind)
    add_key_options(bind.add_argument_group(
        "key creation", "used only when --keydir holds no keys yet, as mandos-keygen"))

    agent = _agent_options()
    test = commands.add_parser(
        "test", parents=[agent], add_help=False, allow_abbrev=False,
        help="prove that the next boot would unlock DEVICE",
        description="Fetch the secret from the Mandos servers exactly as the initramfs agent "
                    "would (same options), and check that it opens the keyslot of a binding "
                    "of the client's keys, unlocking nothing.  Prints one line; exits 0 only "
                    "if the next boot would unlock.")
    test.add_argument("device", metavar="DEVICE")

    unbind = commands.add_parser(
        "unbind", allow_abbrev=False, help="remove a binding's keyslot and token",
        description="Remove a binding's keyslot and its token; a passphrase of another "
                    "keyslot is asked.  Never removes the last keyslot.")
    unbind.add_argument("device", metavar="DEVICE")
    unbind.add_argument("--key-slot", type=int, metavar="N",
                        help="the binding's keyslot (default: the only binding)")
    _passphrase_option(unbind, "a passphrase of another keyslot")

    rotate = commands.add_parser(
        "rotate", parents=[agent], add_help=False, allow_abbrev=False,
        help="replace the binding's key in two steps",
        description="Step 1, rotate DEVICE: add a new keyslot and token beside the current "
                    "binding (an existing passphrase is asked) and print the new section.  "
                    "Install it on the server in place of the old one and reload the server.  "
                    "Step 2, rotate --finish DEVICE: fetch the secret as test does; only if it "
                    "opens the new keyslot is the old one removed.  The volume opens with "
                    "either secret all along.")
    rotate.add_argument("device", metavar="DEVICE")
    rotate.add_argument("--finish", action="store_true",
                        help="step 2: test the new secret, then remove the old keyslot")
    rotate.add_argument("-n", "--name", metavar="NAME",
                        help="name of the new section (default: the current binding's)")
    _passphrase_option(rotate, "an existing passphrase")
    _section_options(rotate)

    listing = commands.add_parser("list", allow_abbrev=False,
                                  help="show the Mandos bindings of DEVICE",
                                  description="Show the Mandos bindings in the LUKS2 header.")
    listing.add_argument("device", metavar="DEVICE")
    return parser


def _agent_config(args: argparse.Namespace) -> AgentConfig:
    config = config_from_arguments(args)
    if config is None:
        raise AgentError(f"the kernel command line ({args.kernel_cmdline}) says mandos=off: "
                         "the next boot would not ask a Mandos server")
    return config


def _key_id(keys: KeyFiles) -> str:
    try:
        return key_id_of_pem(keys.tls_pubkey.read_bytes())
    except OSError as error:
        raise AgentError(f"cannot read {keys.tls_pubkey}: {error.strerror}; check --keydir "
                         "or --tls-pubkey") from None


def _host_key(args: argparse.Namespace) -> SshHostKey | None:
    return None if args.no_ssh else scan_local_ssh_key()


def _deliver(section: str, args: argparse.Namespace) -> None:
    if args.section_file is None:
        sys.stdout.write(section)
        sys.stdout.flush()
        return
    try:
        durable.replace(args.section_file, section.encode(), SECTION_MODE)
    except OSError as error:
        raise AgentError(f"cannot write {args.section_file}: {error.strerror}") from None


def _hand_over(section: str, args: argparse.Namespace, done: str, placement: str,
               then: str) -> None:
    """Deliver the new ``section`` and tell the admin what was ``done`` and the steps left:
    install the section on the server (``placement`` says where), reload it, and run
    ``PROG then DEVICE``."""
    _deliver(section, args)
    where = "printed above" if args.section_file is None else f"in {args.section_file}"
    print(f"{PROG}: {done}; install the section {where} on the Mandos server {placement}, "
          f"reload it, then run {PROG} {then} {args.device}", file=sys.stderr)


def run_bind(args: argparse.Namespace) -> None:
    header = read_header(args.device)
    header.free_keyslot()  # refuse a full header before making keys or asking anything
    header.free_token()
    directory = args.keydir if args.keydir is not None else default_directory()
    name = check_name(args.name if args.name is not None else socket.getfqdn())
    files = KeyFiles.in_directory(directory)
    if not any(path.exists() for path in (files.pubkey, files.seckey, files.tls_pubkey,
                                           files.tls_privkey)):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_keys(directory, key_spec(args, name), args.tls_keytype, force=False)
        print(f"{PROG}: made the client's keys in {directory}", file=sys.stderr)
    keys = load_client_keys(directory)
    enrolment = bindings.add_binding(header, keys, name, args.key_file, _host_key(args))
    _hand_over(enrolment.section, args,
               f"bound keyslot {enrolment.binding.keyslot} of {args.device} (token "
               f"{enrolment.binding.token_id}, client {name})",
               f"(clients.d/{name}.conf)", "test")


def run_test(args: argparse.Namespace) -> None:
    config = _agent_config(args)
    header = read_header(args.device)
    key_id = _key_id(config.keys)
    candidates = [binding for binding in header.bindings_of(key_id)
                  if binding.keyslot is not None]
    if not candidates:
        raise AgentError(f"{args.device} has no Mandos binding for the keys in {args.keydir} "
                         f"(key_id {key_id}) with a keyslot; bind it, or check --keydir")
    proof = prove(args.device, candidates, config, args.timeout or DEFAULT_TIMEOUT)
    if proof.binding is None:
        raise AgentError("the next boot would NOT unlock: "
                         + "; ".join(proof.problems or ["no server answered"]))
    print(f"OK: the secret from {proof.server} opens keyslot {proof.binding.keyslot} of "
          f"{args.device} (client {proof.binding.name}); the next boot would unlock it")


def run_unbind(args: argparse.Namespace) -> None:
    header = read_header(args.device)
    binding = bindings.choose(header, args.key_slot)
    bindings.unbind(header, binding, args.key_file)
    print(f"{PROG}: removed keyslot {binding.keyslot} and token {binding.token_id} of "
          f"{args.device}; remove the section of {binding.name} from the Mandos server",
          file=sys.stderr)


def run_rotate(args: argparse.Namespace) -> None:
    header = read_header(args.device)
    if args.finish:
        config = _agent_config(args)
        proof = bindings.finish_rotation(header, _key_id(config.keys), config,
                                         args.timeout or DEFAULT_TIMEOUT)
        assert proof.binding is not None
        print(f"OK: the secret from {proof.server} opens the new keyslot "
              f"{proof.binding.keyslot} of {args.device}; the old keyslot "
              f"{proof.binding.replaces} is removed")
        return
    name = check_name(args.name) if args.name is not None else None
    keys = load_client_keys(args.keydir)
    enrolment = bindings.start_rotation(header, keys, name, args.key_file, _host_key(args))
    _hand_over(enrolment.section, args,
               f"added keyslot {enrolment.binding.keyslot} beside keyslot "
               f"{enrolment.binding.replaces} of {args.device}",
               "in place of the old one", "rotate --finish")


def run_list(args: argparse.Namespace) -> None:
    header: Header = read_header(args.device)
    if not header.bindings:
        print(f"{args.device}: no Mandos binding")
    for binding in header.bindings:
        print(f"{args.device}: {binding.describe()}")


COMMANDS = {"bind": run_bind, "test": run_test, "unbind": run_unbind, "rotate": run_rotate,
            "list": run_list}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    forbid_core_dumps()  # new keys and fetched secrets pass through this process
    logging.basicConfig(level=logging.DEBUG if getattr(args, "debug", False)
                        else logging.WARNING, format=f"{PROG}: %(message)s", stream=sys.stderr)
    return run_key_command(PROG, lambda: COMMANDS[args.command](args))
