# SPDX-License-Identifier: GPL-3.0-or-later
"""The two servers under test, each started in a private temporary directory for a ``with``:
ours (``python -m server``) and Debian's upstream ``mandos``, both on 127.0.0.1, both yielding
``(pid, port)``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peers.process import stop_process
from peers.upstream import UpstreamServer, free_port, listening_ports


@contextmanager
def our_server(clients_conf: str, metrics_port: int | None = None) -> Iterator[tuple[int, int]]:
    """Our server with this ``clients.conf`` and default settings (with ``metrics_port``,
    serving /metrics there on 127.0.0.1); its log (stderr: no journald here) goes to a file,
    as journald would take it."""
    directory = Path(tempfile.mkdtemp(prefix="mandos-bench-"))
    try:
        (directory / "conf").mkdir()
        (directory / "state").mkdir(mode=0o700)
        (directory / "conf" / "clients.conf").write_text(clients_conf)
        (directory / "conf" / "mandos.conf").write_text("[DEFAULT]\n")
        port = free_port()
        with open(directory / "server.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "server", "--foreground", "--no-dbus", "--no-zeroconf",
                 "--no-restore", "--no-ipv6", "--address=127.0.0.1", f"--port={port}",
                 f"--configdir={directory / 'conf'}", f"--statedir={directory / 'state'}",
                 f"--journal-socket={directory / 'no-journald'}",
                 *([f"--metrics=127.0.0.1:{metrics_port}"] if metrics_port else [])],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )
        try:
            deadline = time.monotonic() + 20
            while not {port, metrics_port or port} <= listening_ports(process.pid):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("our server did not start:\n"
                                     + (directory / "server.log").read_text())
                time.sleep(0.02)
            yield process.pid, port
        finally:
            stop_process(process, 10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def upstream_server(sections: str) -> Iterator[tuple[int, int]]:
    """Debian's ``mandos`` with these ``clients.conf`` sections (checker ``/bin/true``)."""
    with UpstreamServer(sections) as server:
        assert server.process is not None
        yield server.process.pid, server.port
