# SPDX-License-Identifier: GPL-3.0-or-later
"""A private *system* D-Bus for one test.

Upstream's ``mandos`` opens the system bus even with ``--no-dbus``, and its D-Bus API (used by
``mandos-ctl``) lives there.  Tests must never touch the host's bus, so they start their own
``dbus-daemon`` with ``<type>system</type>``, an allow-everything policy and a socket in a
temporary directory, and hand its address to peers as ``DBUS_SYSTEM_BUS_ADDRESS``.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from peers.process import StartStop, stop_process

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""

_START_TIMEOUT = 10.0


class PrivateSystemBus(StartStop):
    """A ``dbus-daemon`` of type system, listening on a socket in a temporary directory.

    The directory is mode 0755 so that peers which drop privileges (upstream ``mandos`` runs as
    ``_mandos``) can still reach the socket.  ``address`` is the value for
    ``DBUS_SYSTEM_BUS_ADDRESS``; ``environment()`` returns ``os.environ`` with it set.
    """

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mandos-test-dbus-"))
        self.directory.chmod(0o755)
        self.socket_path = self.directory / "system_bus_socket"
        self.address = ""
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateSystemBus:
        config = self.directory / "system.conf"
        config.write_text(_CONFIG.format(socket=self.socket_path))
        read_end, write_end = os.pipe()
        try:
            self._process = subprocess.Popen(
                ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile",
                 f"--print-address={write_end}"],
                pass_fds=[write_end], stdin=subprocess.DEVNULL, start_new_session=True,
            )
            os.close(write_end)
            write_end = -1
            deadline = time.monotonic() + _START_TIMEOUT
            output = b""
            while not output.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                    raise RuntimeError("dbus-daemon did not print its address in time")
                chunk = os.read(read_end, 4096)
                if not chunk:
                    raise RuntimeError(f"dbus-daemon exited (status {self._process.wait()})")
                output += chunk
        except BaseException:
            self.stop()
            raise
        finally:
            if write_end >= 0:
                os.close(write_end)
            os.close(read_end)
        self.address = output.decode().strip()
        return self

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for a peer that should use this bus as its system bus."""
        environment = dict(os.environ if base is None else base)
        environment["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        return environment

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
            self._process = None
        shutil.rmtree(self.directory, ignore_errors=True)
