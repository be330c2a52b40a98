# SPDX-License-Identifier: GPL-3.0-or-later
"""Our server against Debian's real mandos-client, with keys and sections from upstream's
mandos-keygen: the password arrives over IPv4 and IPv6; an unknown key, a disabled client and
a denied approval get nothing (the client keeps retrying until ``timeout`` stops it)."""

from __future__ import annotations

import time

import pytest

from peers.ours import JournalSink, OurServer, clients_conf, fetch, set_options
from peers.upstream import KeySet, run_upstream_client, section_secret
from tests.conftest import Keys

pytestmark = pytest.mark.interop


def refused(server: OurServer, keys: KeySet) -> JournalSink:
    """Run upstream's client with ``keys`` against ``server`` and check that it got nothing:
    refused, it retries until ``timeout`` ends it (status 124), having printed nothing.  The
    server's journal, which says why."""
    result = run_upstream_client(keys, server.connect, 3)
    assert result.returncode == 124, result.stderr.decode(errors="replace")
    assert result.stdout == b""
    assert server.journal is not None
    return server.journal


@pytest.mark.parametrize(("address", "ipv6"), [
    ("127.0.0.1", False),  # --no-ipv6: an AF_INET socket
    ("::1", True),
    ("127.0.0.1", True),  # an AF_INET6 socket bound to ::ffff:127.0.0.1, as upstream's default
])
def test_real_client_gets_password(keys: Keys, address: str, ipv6: bool) -> None:
    conf = clients_conf(keys.foo_section, keys.bar_section)
    with OurServer(conf, address=address, ipv6=ipv6) as server:
        result = run_upstream_client(keys.foo, server.connect, 20)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout == keys.password
        assert server.journal is not None
        sent = server.journal.wait_for("secret-sent", MANDOS_CLIENT="foo")
        assert sent[0]["MANDOS_KEY_ID"] == keys.foo.key_id
        assert sent[0]["MANDOS_PEER"] == address
        assert server.stop() == 0


def test_unknown_key_gets_nothing(keys: Keys) -> None:
    with OurServer(clients_conf(keys.foo_section)) as server:
        found = refused(server, keys.bar).wait_for("client-not-found")
        assert found[0]["MANDOS_KEY_ID"] == keys.bar.key_id
        assert found[0]["MANDOS_PEER"] == "127.0.0.1"
        # The same refusal, seen at the protocol level: 0 bytes, then close_notify.
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""
        assert fetch(keys.foo, "127.0.0.1", server.port) == section_secret(keys.foo_section)


def test_disabled_client_gets_nothing(keys: Keys) -> None:
    conf = clients_conf(set_options(keys.foo_section, enabled="no"))
    with OurServer(conf) as server:
        journal = refused(server, keys.foo)
        journal.wait_for("refused-disabled", MANDOS_CLIENT="foo")
        assert not journal.find("secret-sent")


def test_denied_by_default_gets_nothing(keys: Keys) -> None:
    conf = clients_conf(set_options(keys.foo_section, approval_delay="PT1S",
                                    approved_by_default="False"))
    with OurServer(conf) as server:
        journal = refused(server, keys.foo)
        journal.wait_for("needs-approval", MANDOS_CLIENT="foo")
        journal.wait_for("approval-timed-out", MANDOS_CLIENT="foo")
        assert not journal.find("secret-sent")


def test_approved_by_default_after_delay(keys: Keys) -> None:
    conf = clients_conf(set_options(keys.foo_section, approval_delay="PT1S",
                                    approved_by_default="True"))
    with OurServer(conf) as server:
        started = time.monotonic()
        result = run_upstream_client(keys.foo, server.connect, 20)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout == keys.password
        assert elapsed >= 1.0
        assert server.journal is not None
        server.journal.wait_for("needs-approval", MANDOS_CLIENT="foo")
        server.journal.wait_for("secret-sent", MANDOS_CLIENT="foo")
