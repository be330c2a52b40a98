# SPDX-License-Identifier: GPL-3.0-or-later
"""``mandos-server``: the command line, as upstream's ``mandos`` takes it.

Options override mandos.conf's ``[DEFAULT]``, which overrides the built-in defaults.  The server
never forks into the background: it is meant to run as a systemd service (``Type=notify``), so
``--foreground`` is accepted and changes nothing.  An expected failure (bad configuration,
unusable socket) is printed as one line on stderr, with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mandos_protocol.coredump import forbid_core_dumps
from mandos_protocol.version import version_line
from server.config import ConfigError, load_server_settings
from server.daemon import Daemon
from server.journal import DEBUG, DEFAULT_SOCKET, INFO, LEVELS, Event, Journal


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mandos-server",
        description="Give encrypted passwords to Mandos clients that prove their identity "
        "with TLS raw public keys, as long as they stay online.",
    )
    add = parser.add_argument
    add("-v", "--version", action="version", version=version_line("mandos-server"))
    add("-i", "--interface", metavar="IF", help="bind to network interface IF")
    add("-a", "--address", help="address to listen for requests on")
    add("-p", "--port", type=int, help="port number to receive requests on")
    add("--debug", action="store_true", default=None,
        help="debug mode: log everything, also to the terminal, and show checker output")
    add("--debuglevel", metavar="LEVEL",
        help="lowest level logged: CRITICAL, ERROR, WARNING, INFO (default) or DEBUG")
    add("--priority", help="GnuTLS priority string (see gnutls_priority_init(3))")
    add("--servicename", metavar="NAME", help="Zeroconf service name")
    add("--configdir", default="/etc/mandos", metavar="DIR",
        help="directory with mandos.conf, clients.conf and clients.d/ (default: "
        "%(default)s)")
    add("--no-dbus", action="store_false", dest="use_dbus", default=None,
        help="do not provide the D-Bus admin interface (se.recompile.Mandos on the system "
        "bus, for mandos-ctl and mandos-monitor)")
    add("--no-ipv6", action="store_false", dest="use_ipv6", default=None,
        help="do not use IPv6")
    add("--no-restore", action="store_false", dest="restore", default=None,
        help="do not restore the saved state")
    add("--socket", type=int, metavar="FD",
        help="use the listening network socket on file descriptor FD instead of creating one")
    add("--statedir", metavar="DIR", help="directory to save and restore state in")
    add("--foreground", action="store_true", default=None,
        help="run in the foreground (always the case; accepted for compatibility)")
    add("--no-zeroconf", action="store_false", dest="zeroconf", default=None,
        help="do not announce the service with Zeroconf")
    add("--etcd", metavar="URL[,URL...]",
        help="share the clients' state with other servers through these etcd endpoints "
        "(docs/fleet.md)")
    add("--etcd-prefix", metavar="PREFIX", help="key prefix in etcd (default: /mandos/)")
    add("--etcd-cacert", type=Path, metavar="FILE", help="CA certificate of the etcd cluster")
    add("--etcd-cert", type=Path, metavar="FILE", help="client certificate for etcd")
    add("--etcd-key", type=Path, metavar="FILE", help="key of the client certificate for etcd")
    add("--metrics", metavar="[ADDRESS:]PORT",
        help="serve Prometheus metrics at /metrics and a health check at /healthz over HTTP "
        "on PORT, on loopback unless ADDRESS is given (default: off)")
    add("--journal-socket", type=Path,
        default=Path(os.environ.get("MANDOS_JOURNAL_SOCKET", str(DEFAULT_SOCKET))),
        help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    forbid_core_dumps()  # every client's secret blob is in this process's memory
    overrides = {
        name: getattr(options, name)
        for name in ("interface", "address", "port", "debug", "debuglevel", "priority",
                     "servicename", "use_dbus", "use_ipv6", "restore", "socket",
                     "zeroconf", "etcd", "etcd_prefix", "etcd_cacert", "etcd_cert", "etcd_key",
                     "metrics")
    }
    if options.statedir is not None:
        overrides["statedir"] = Path(options.statedir)
    journal: Journal | None = None
    try:
        settings = load_server_settings(Path(options.configdir), overrides)
        level = DEBUG if settings.debug else LEVELS.get(settings.debuglevel, INFO)
        journal = Journal(options.journal_socket, max_priority=level, echo=settings.debug)
        asyncio.run(Daemon(settings, journal).run())
    except ConfigError as error:
        if journal is not None and journal.connected:
            journal.event(Event.SERVER_ERROR, f"Cannot start: {error}")
        print(f"mandos-server: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if journal is not None:
            journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
