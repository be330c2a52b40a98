# SPDX-License-Identifier: GPL-3.0-or-later
"""The pre-reboot proof: fetch the secret from the Mandos servers exactly as the initramfs
agent does, and check with cryptsetup that it opens a binding's keyslot, unlocking nothing.

Same servers (``--connect``, else Zeroconf), same keys, same TLS priority, same staggered race
(:mod:`password_agent.race`), same fetch and gpg decryption as :mod:`password_agent.agent`;
only one round instead of retrying until a request goes away, bounded by ``--timeout``.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Generator
from dataclasses import dataclass, field

from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Credentials, Priority
from password_agent import stopsignal
from password_agent.agent import BROWSE_SECONDS, AgentConfig
from password_agent.decrypt import Decryptor
from password_agent.errors import AgentError
from password_agent.fetch import FETCH_TIMEOUT, Wait, fetch_blob
from password_agent.luks import cryptsetup
from password_agent.luks.header import Binding
from password_agent.race import race
from password_agent.servers import Server, wait_for_interfaces

#: How long one proof may take when ``--timeout`` is not given.
DEFAULT_TIMEOUT = FETCH_TIMEOUT


def opens(device: str, keyslot: int, secret: bytes | bytearray) -> bool:
    """Whether ``secret`` opens ``keyslot`` of ``device`` (``--test-passphrase``: nothing is
    unlocked)."""
    result = cryptsetup.run(["open", "--test-passphrase", "--key-slot", str(keyslot),
                             "--key-file", "-", device], stdin_data=secret)
    if result.returncode in (0, cryptsetup.WRONG_PASSPHRASE):
        return result.returncode == 0
    raise AgentError(f"cannot test keyslot {keyslot} of {device}: "
                     f"{result.complaint or f'exit status {result.returncode}'}")


@dataclass
class Proof:
    """What a proof found: the server and binding whose secret opened, or every problem."""

    server: Server | None = None
    binding: Binding | None = None
    problems: list[str] = field(default_factory=list)


def _wait(fd: int, seconds: float) -> None:
    """How the race's calling thread waits (at most a second at a time), acting on SIGTERM."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.poll(max(0.0, seconds) * 1000)
    stopsignal.check()


def _servers(config: AgentConfig, deadline: float) -> list[Server]:
    if config.connect:
        return config.connect
    if config.interfaces.awaited:
        wait_for_interfaces(config.interfaces.awaited, config.delay)
    try:
        from password_agent.browse import Browser  # zeroconf, as the agent imports it
    except ImportError:
        raise AgentError("no --connect given and python-zeroconf is not installed; give "
                         "--connect ADDRESS:PORT") from None
    with Browser(config.interfaces.only) as browser:
        found = browser.servers(min(BROWSE_SECONDS, max(0.1, deadline - time.monotonic())))
    if not found:
        raise AgentError("Zeroconf found no Mandos server; is one running on this network? "
                         "Or give --connect ADDRESS:PORT")
    return [Server(host, port) for host, port in found]


def secrets(config: AgentConfig, timeout: float, problems: list[str]
            ) -> Generator[tuple[Server, bytearray], None, None]:
    """Each server's decrypted secret as it arrives (the caller zeroes it); what went wrong
    with the others is appended to ``problems``."""
    deadline = time.monotonic() + timeout
    keys = config.keys
    try:
        priority = Priority(config.priority) if config.priority else Priority()
    except ProtocolError as error:
        raise AgentError(f"{error}; check --priority") from None
    with contextlib.ExitStack() as stack:
        stack.enter_context(priority)
        try:
            credentials = Credentials.raw_public_key_files(keys.tls_pubkey, keys.tls_privkey)
        except ProtocolError as error:
            raise AgentError(f"{error}; check --tls-pubkey/--tls-privkey or --keydir"
                             ) from None
        stack.enter_context(credentials)
        decryptor = stack.enter_context(Decryptor(keys.pubkey, keys.seckey, None))
        servers = _servers(config, deadline)

        def fetch(server: Server, wait: Wait) -> bytes:
            return fetch_blob(server, credentials, priority, wait,
                              timeout=max(0.1, deadline - time.monotonic()))

        def keep_going() -> bool:
            return time.monotonic() < deadline

        outcomes = race(servers, fetch, _wait, keep_going)
        try:
            for outcome in outcomes:
                if outcome.error is not None:
                    problems.append(str(outcome.error))
                elif not outcome.blob:
                    problems.append(f"{outcome.server} refused: it sent nothing (key_id in "
                                    "none of its clients.conf and clients.d/ files, client "
                                    "disabled, or not approved)")
                else:
                    try:
                        secret = decryptor.decrypt(outcome.blob)
                    except AgentError as error:
                        problems.append(f"{outcome.server}: {error}")
                        continue
                    yield outcome.server, secret
        finally:
            outcomes.close()
        if time.monotonic() >= deadline and len(problems) < len(servers):
            problems.append(f"no answer within --timeout {timeout:g} s")


def prove(device: str, bindings: list[Binding], config: AgentConfig, timeout: float
          ) -> Proof:
    """Fetch as the agent does until a server's secret opens one of ``bindings``' keyslots;
    a :class:`Proof` with that server and binding, or with the problems of every server."""
    proof = Proof()
    slots = [binding for binding in bindings if binding.keyslot is not None]
    with contextlib.closing(secrets(config, timeout, proof.problems)) as found:
        for server, secret in found:
            try:
                opened = next((binding for binding in slots
                               if binding.keyslot is not None
                               and opens(device, binding.keyslot, secret)), None)
            finally:
                secret[:] = bytes(len(secret))
            if opened is not None:
                proof.server, proof.binding = server, opened
                return proof
            listed = ", ".join(str(binding.keyslot) for binding in slots)
            proof.problems.append(f"the secret {server} sent opens no Mandos keyslot of "
                                  f"{device} (keyslot {listed}); is the section that bind or "
                                  "rotate printed installed on it?")
    return proof
