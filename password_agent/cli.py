# SPDX-License-Identifier: GPL-3.0-or-later
"""``mandos-password-agent``: the command line.

Options as upstream's ``mandos-client`` spells them (``--connect --pubkey --seckey --tls-pubkey
--tls-privkey --priority --interface --retry --delay``) plus ``--agent-directory`` (upstream's
``password-agent``), ``--keydir``, ``--timeout``, ``--all-requests`` and ``--watch`` (resident, as
``systemd-tty-ask-password-agent --watch``).  The kernel command line
(``mandos=off``, ``mandos=connect:ADDRESS:PORT``, ``ip=``) applies on top, as in upstream's
initramfs.  Expected failures print one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from mandos_protocol.coredump import forbid_core_dumps
from mandos_protocol.version import version_line
from password_agent import log as agentlog
from password_agent import stopsignal
from password_agent.agent import Agent, AgentConfig
from password_agent.cmdline import DEFAULT_CMDLINE, read_cmdline
from password_agent.errors import AgentError
from password_agent.keyfiles import KeyFiles
from password_agent.rundir import DEFAULT_RUN_DIRECTORY
from password_agent.servers import parse_connect, parse_interfaces
from password_agent.watch import DEFAULT_AGENT_DIRECTORY

log = logging.getLogger("password_agent")

#: Where upstream's dracut module puts the key set in the initramfs.
DEFAULT_KEY_DIRECTORY = Path("/etc/mandos/keys")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mandos-password-agent",
        description="Answer systemd disk-unlock password requests with the password a Mandos "
                    "server hands out.  Exits when no request is left (a .path unit starts it "
                    "when one appears), or with --watch stays resident until SIGTERM.")
    parser.add_argument("--agent-directory", type=Path, default=DEFAULT_AGENT_DIRECTORY,
                        help="directory of ask.* requests (default: %(default)s)")
    parser.add_argument("--connect", action="append", default=[], metavar="ADDRESS:PORT",
                        help="Mandos server to ask, repeatable, in order of preference, each "
                             "started 0.25 s after the one before ([::1]:PORT "
                             "and fe80::1%%eth0:PORT work); default: Zeroconf browsing")
    parser.add_argument("--keydir", type=Path, default=DEFAULT_KEY_DIRECTORY,
                        help="directory of pubkey.txt, seckey.txt, tls-pubkey.pem and "
                             "tls-privkey.pem (default: %(default)s)")
    parser.add_argument("--pubkey", type=Path, help="OpenPGP public key (KEYDIR/pubkey.txt)")
    parser.add_argument("--seckey", type=Path, help="OpenPGP secret key (KEYDIR/seckey.txt)")
    parser.add_argument("--tls-pubkey", type=Path,
                        help="TLS raw public key (KEYDIR/tls-pubkey.pem)")
    parser.add_argument("--tls-privkey", type=Path,
                        help="TLS private key (KEYDIR/tls-privkey.pem)")
    parser.add_argument("--priority",
                        help="GnuTLS priority string (default: upstream's, X25519 first)")
    parser.add_argument("--interface", metavar="NAME[,NAME...]",
                        help="network interfaces to give --delay to come up, comma-separated "
                             "('none' ends the list); exactly one name also confines Zeroconf "
                             "browsing to it and is the scope of link-local --connect "
                             "addresses (default: all interfaces)")
    parser.add_argument("--retry", type=_seconds, default=3.0, metavar="SECONDS",
                        help="longest pause between rounds of attempts (default: %(default)s)")
    parser.add_argument("--delay", type=_seconds, default=2.5, metavar="SECONDS",
                        help="how long to wait for the --interface interfaces to come up "
                             "(default: %(default)s)")
    lifetime = parser.add_mutually_exclusive_group()
    lifetime.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                          help="give up after this long with requests unanswered (exit 1); "
                               "default: never")
    lifetime.add_argument("--watch", action="store_true",
                          help="stay resident until SIGTERM instead of exiting when no "
                               "request is left: prepare the TLS credentials and the GnuPG "
                               "home (keys imported, gpg-agent running) before any request, "
                               "then tell systemd READY=1 (Type=notify); started with a "
                               "request pending (as the initramfs's path unit starts it), "
                               "say READY=1 and answer it first.  No server is contacted "
                               "before a request is pending")
    parser.add_argument("--all-requests", action="store_true",
                        help="answer every request, not only disk unlocks (Id=cryptsetup:…)")
    parser.add_argument("--run-directory", type=Path, default=DEFAULT_RUN_DIRECTORY,
                        help="private directory for the record of answers sent and the "
                             "temporary GnuPG homes (default: %(default)s)")
    parser.add_argument("--kernel-cmdline", type=Path, default=DEFAULT_CMDLINE, metavar="FILE",
                        help="kernel command line to honour mandos= and ip= from "
                             "(default: %(default)s)")
    parser.add_argument("--debug", action="store_true",
                        help="log more (as SYSTEMD_LOG_LEVEL=debug, which is honoured too)")
    parser.add_argument("-V", "--version", action="version",
                        version=version_line("mandos-password-agent"))
    return parser


def config_from_arguments(arguments: argparse.Namespace) -> AgentConfig | None:
    """The run's configuration, or None when the kernel command line says ``mandos=off``."""
    kernel = read_cmdline(arguments.kernel_cmdline)
    if kernel.off:
        return None
    interfaces = parse_interfaces(kernel.interface or arguments.interface)
    connect_texts = list(arguments.connect)
    if kernel.connect is not None:
        connect_texts.insert(0, kernel.connect)  # upstream: the kernel command line wins
    keys = KeyFiles.in_directory(arguments.keydir)
    return AgentConfig(
        agent_directory=arguments.agent_directory,
        keys=KeyFiles(arguments.pubkey or keys.pubkey, arguments.seckey or keys.seckey,
                      arguments.tls_pubkey or keys.tls_pubkey,
                      arguments.tls_privkey or keys.tls_privkey),
        run_directory=arguments.run_directory,
        connect=[parse_connect(text, interfaces.only) for text in connect_texts],
        priority=arguments.priority,
        interfaces=interfaces,
        retry=max(arguments.retry, 0.1),
        delay=arguments.delay,
        timeout=arguments.timeout,
        all_requests=arguments.all_requests,
        watch=arguments.watch,
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    forbid_core_dumps()  # the password and the private keys pass through this process
    agentlog.setup(arguments.debug)
    stopsignal.install()
    try:
        config = config_from_arguments(arguments)
        if config is None:
            log.info("mandos=off on the kernel command line; not answering anything")
            return 0
        return Agent(config).run()
    except AgentError as error:
        log.error("error: %s", error)
        return 1
    except stopsignal.Terminated as stop:
        log.info("terminated by %s; exiting", stop)
        return 0
