# SPDX-License-Identifier: GPL-3.0-or-later
"""The names of the D-Bus admin API, which the server (:mod:`server.dbus_api`) serves and
``mandos-ctl`` (:mod:`server.ctl`) calls: upstream's bus name, object paths, interfaces and
client properties (/usr/share/doc/mandos/DBUS-API), so that upstream's ``mandos-ctl`` and
``mandos-monitor`` work with our server and ours with upstream's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BUS_NAME = "se.recompile.Mandos"
SERVER_PATH = "/"
SERVER_INTERFACE = "se.recompile.Mandos"
CLIENT_INTERFACE = "se.recompile.Mandos.Client"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"


@dataclass(frozen=True)
class ClientProperty:
    """A readable client property: its D-Bus signature, and its column header in
    ``mandos-ctl --verbose`` (empty for one that mandos-ctl does not show)."""

    signature: str
    header: str = ""


#: The readable client properties (``Secret`` is write-only), in the order of upstream
#: mandos-ctl's ``--verbose`` columns.
CLIENT_PROPERTIES: Mapping[str, ClientProperty] = {
    "Name": ClientProperty("s", "Name"),
    "Enabled": ClientProperty("b", "Enabled"),
    "Timeout": ClientProperty("t", "Timeout"),
    "LastCheckedOK": ClientProperty("s", "Last Successful Check"),
    "Created": ClientProperty("s", "Created"),
    "Interval": ClientProperty("t", "Interval"),
    "Host": ClientProperty("s", "Host"),
    "KeyID": ClientProperty("s", "Key ID"),
    "Fingerprint": ClientProperty("s", "Fingerprint"),
    "CheckerRunning": ClientProperty("b", "Check Is Running"),
    "LastEnabled": ClientProperty("s", "Last Enabled"),
    "ApprovalPending": ClientProperty("b", "Approval Is Pending"),
    "ApprovedByDefault": ClientProperty("b", "Approved By Default"),
    "LastApprovalRequest": ClientProperty("s", "Last Approval Request"),
    "ApprovalDelay": ClientProperty("t", "Approval Delay"),
    "ApprovalDuration": ClientProperty("t", "Approval Duration"),
    "Checker": ClientProperty("s", "Checker"),
    "ExtendedTimeout": ClientProperty("t", "Extended Timeout"),
    "Expires": ClientProperty("s", "Expires"),
    "LastCheckerStatus": ClientProperty("n", "Last Checker Status"),
    "ObjectPath": ClientProperty("o"),
}
