# SPDX-License-Identifier: GPL-3.0-or-later
"""The agent's run: while requests are pending, fetch, decrypt, answer; back off while the
network or the server is not there yet; exit when nothing is left, or, with ``--watch``, wait
for the next request.

A simple blocking loop: every wait is a poll on the inotify descriptor with a deadline, so the
agent sleeps between attempts, notices at once when the last request goes away, and starts
fast in the initramfs (no asyncio).  One thing runs alongside: as soon as a request is
pending, a :class:`~password_agent.decrypt.Decryptor` prepares the GnuPG home in the
background while the blob is fetched, and it is removed only once no request is pending, so
that the answer goes out first.

With ``--watch`` (resident, as the initramfs runs it) the agent, started with no request
pending, does all that needs none: the imports, the TLS credentials and priority, and the GnuPG
home with both keys imported and gpg-agent running; only then does it send ``READY=1``.  Started
by a request (the initramfs's ``.path`` unit), it sends ``READY=1`` and answers that request
first, as an agent started on demand does.  A later request costs the fetch and gpg-agent's
decryption, nothing else.  The home is kept between requests and
removed when the agent exits (systemd stops it before switch-root: /run survives that, and the
home holds the secret key).  It never contacts a server before a request is pending: the
password is fetched for a request, never ahead of one.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Credentials, Priority
from password_agent import stopsignal
from password_agent.answered import AnsweredRecord
from password_agent.asks import socket_problem
from password_agent.decrypt import HOME_PREFIX, Decryptor
from password_agent.errors import AgentError, NetworkNotUp
from password_agent.fetch import FETCH_TIMEOUT, Wait, fetch_blob
from password_agent.gnupghome import remove_stale_homes
from password_agent.keyfiles import KeyFiles
from password_agent.race import Discover, Outcome, race
from password_agent.reply import send_password
from password_agent.rundir import hold, private_directory
from password_agent.servers import Interfaces, Server, wait_for_interfaces
from password_agent.watch import RequestWatcher

if TYPE_CHECKING:
    from mandos_protocol.notify import Notifier
    from password_agent.browse import Browser

log = logging.getLogger(__name__)

#: First pause after a round in which no server answered; doubled up to ``--retry``.
FIRST_BACKOFF = 0.5
#: How long one Zeroconf browse listens for announcements.
BROWSE_SECONDS = 2.0
#: The pause after a round in which every server failed for this host's own network (still
#: coming up: no route, or the link-local address in duplicate address detection), or in
#: which Zeroconf had no interface to browse on yet.
NETWORK_RETRY = 0.25


@dataclass(frozen=True)
class AgentConfig:
    """Everything a run needs, from the command line and the kernel command line."""

    agent_directory: Path
    keys: KeyFiles
    run_directory: Path
    connect: list[Server] = field(default_factory=list)
    priority: str | None = None
    interfaces: Interfaces = field(default_factory=Interfaces)
    retry: float = 3.0
    delay: float = 2.5
    timeout: float | None = None
    all_requests: bool = False
    watch: bool = False


class _Deadline:
    """The end of ``--timeout``, if any, in monotonic seconds."""

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def left(self, default: float) -> float:
        """Seconds left, at most ``default``."""
        return default if self.at is None else max(0.0, min(default, self.at - time.monotonic()))

    @property
    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


class Agent:
    """One run of the password agent over one agent directory."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._credentials: Credentials | None = None
        self._priority: Priority | None = None
        self._record: AnsweredRecord | None = None
        self._run_directory: Path | None = None
        self._run_directory_checked = False
        self._decryptor: Decryptor | None = None
        self._browser: Browser | None = None
        #: Whether the last round failed for this host's own network (every server, or
        #: Zeroconf with no interface to browse on).
        self._network_not_up = False
        self._interface_checked = False

    def _open_run_directory(self) -> None:
        """Once: check the OpenPGP key files (key problems are reported at once) and make the
        run directory, removing the GnuPG homes that killed agents left there."""
        if self._run_directory_checked:
            return
        keys = self.config.keys
        for path in (keys.pubkey, keys.seckey):
            if not path.is_file():
                raise AgentError(f"OpenPGP key file {path} is missing; check --pubkey/"
                                 "--seckey or --keydir")
        self._run_directory_checked = True
        try:
            self._run_directory = private_directory(self.config.run_directory)
        except AgentError as error:
            log.warning("%s; answers are remembered only until exit", error)
        else:
            if hold(self._run_directory):
                remove_stale_homes(self._run_directory, HOME_PREFIX)

    def _open_record(self) -> None:
        """Once: open the record of answers sent, in the run directory."""
        if self._record is None:
            self._record = AnsweredRecord(
                None if self._run_directory is None else self._run_directory / "answered")

    def _load_tls(self) -> None:
        """Once: the TLS credentials and the compiled priority."""
        if self._credentials is not None:
            return
        keys = self.config.keys
        try:
            self._priority = Priority(self.config.priority) if self.config.priority else Priority()
            self._credentials = Credentials.raw_public_key_files(keys.tls_pubkey,
                                                                 keys.tls_privkey)
        except ProtocolError as error:
            raise AgentError(f"{error}; check --tls-pubkey/--tls-privkey/--priority") from None

    def _prepare(self) -> None:
        """What fetching and answering need once a request is pending (an idle start costs
        nothing): the run directory, the GnuPG home (started as soon as there is a place for
        it, so that gpg works while the rest loads and the blob is fetched: on demand it is
        the longest step before the decryption), the record, the TLS credentials, and once
        the wait for ``--interface``."""
        self._open_run_directory()
        with contextlib.suppress(AgentError):  # reported when there is a blob to decrypt
            self._gnupg_home()
        self._open_record()
        self._load_tls()
        if not self._interface_checked:
            self._interface_checked = True
            if self.config.interfaces.awaited and not self.config.connect:
                wait_for_interfaces(self.config.interfaces.awaited, self.config.delay)

    def _warm_up(self) -> None:
        """``--watch``, before ``READY=1``: everything that needs no request, and no network.
        The wait for ``--interface`` and any contact with a server come with a request."""
        self._open_run_directory()
        decryptor = self._gnupg_home()
        self._open_record()
        self._load_tls()
        codecs.lookup("idna")  # the first name resolution would load it
        if not self.config.connect:
            with contextlib.suppress(ImportError):  # reported when there is a request
                importlib.import_module("password_agent.browse")  # zeroconf: 40 ms
        decryptor.wait_ready()

    def _gnupg_home(self) -> Decryptor:
        """The GnuPG home being prepared (or ready) for this busy spell; started if none is."""
        if self._decryptor is None:
            keys = self.config.keys
            self._decryptor = Decryptor(keys.pubkey, keys.seckey, self._run_directory)
        return self._decryptor

    def _close_decryptor(self) -> None:
        """Stop gpg-agent and remove the GnuPG home, if there is one."""
        if self._decryptor is not None:
            decryptor, self._decryptor = self._decryptor, None
            decryptor.close()

    def run(self) -> int:
        """Answer pending requests until none is left (with ``--watch``: until SIGTERM); the
        process exit status."""
        notifier: Notifier | None = None
        if self.config.watch:
            from mandos_protocol.notify import Notifier  # sdnotify: only when resident

            notifier = Notifier()
        try:
            return self._run(notifier)
        finally:
            if notifier is not None:
                notifier.notify("STOPPING=1")
            self._close_browser()
            self._close_decryptor()

    def _run(self, notifier: Notifier | None) -> int:
        deadline = _Deadline(self.config.timeout)
        with RequestWatcher(self.config.agent_directory, all_requests=self.config.all_requests,
                            create=self.config.watch) as watcher:
            if notifier is not None:
                if watcher.pending:
                    # Started by a request (the initramfs's .path unit): answer it first.  The
                    # GnuPG home is prepared while the blob is fetched, Zeroconf loaded when
                    # the browse starts.
                    log.info("a request is pending; answering it, then waiting for more")
                else:
                    self._warm_up()
                    stopsignal.check()
                    log.info("warm (GnuPG home ready); waiting for password requests")
                notifier.notify("READY=1", "STATUS=Waiting for password requests")
            backoff = FIRST_BACKOFF
            while True:
                watcher.poll()
                if not watcher.pending:
                    self._close_browser()
                if not watcher.pending and self.config.watch:
                    with contextlib.suppress(AgentError):  # reported with the next request
                        self._gnupg_home()  # a fresh one, if a failed decryption removed it
                    watcher.wait_for_request()
                    continue
                if not watcher.pending:
                    self._close_decryptor()  # the answers, if any, went out already
                    watcher.wait_until_idle(deadline.at)
                    if watcher.pending:
                        continue
                    if watcher.idle:
                        log.info("no request left; exiting")
                    else:
                        log.info("--timeout reached; no request left to answer")
                    return 0
                if deadline.passed:
                    raise AgentError(f"--timeout of {self.config.timeout:g} s reached with "
                                     f"{len(watcher.pending)} request(s) unanswered; no "
                                     "Mandos server sent a usable password")
                self._prepare()
                password = self._fetch_password(watcher, deadline)
                if password is None:
                    # An announcement (a server that came up) ends the back-off at once; a
                    # network still coming up is tried again soon, without growing it.
                    pause = NETWORK_RETRY if self._network_not_up else backoff
                    watcher.wait_while_pending(deadline.left(pause), wake=(
                        None if self._browser is None else self._browser.fileno()))
                    if not self._network_not_up:
                        backoff = min(backoff * 2, self.config.retry)
                    continue
                try:
                    watcher.poll()
                    self._answer(watcher, password)
                finally:
                    password[:] = bytes(len(password))
                backoff = FIRST_BACKOFF

    def _servers(self, deadline: _Deadline) -> list[Server] | Discover:
        """The servers to ask this round: ``--connect`` if given, else those that Zeroconf
        finds, each asked as soon as it is resolved while the browse goes on (it stays open
        while requests are pending: :class:`browse.Browser`)."""
        if self.config.connect:
            return self.config.connect
        if self._browser is None:
            from password_agent.browse import Browser  # zeroconf costs 40 ms; only here

            self._browser = Browser(self.config.interfaces.only)
        browser = self._browser
        seconds = deadline.left(BROWSE_SECONDS)

        def discover(stopped: Callable[[], bool], stop_fd: int) -> Iterator[Server]:
            def stop() -> bool:
                return stopped() or stopsignal.received() is not None

            found = False
            try:
                for host, port in browser.discover(seconds, stop, stop_fd):
                    found = True
                    server = Server(host, port)
                    log.info("Zeroconf found %s", server)
                    yield server
            except Exception as error:  # a network hiccup must not end the agent
                log.warning("Zeroconf browsing failed: %s", error)
                return
            if not found and not stop():
                log.info("Zeroconf found no Mandos server" if browser.browsing else
                         "Zeroconf has no network to browse yet: no interface with an "
                         "address (an IPv6 one done with duplicate address detection)")

        return discover

    def _close_browser(self) -> None:
        """No request pending: no more Zeroconf traffic."""
        if self._browser is not None:
            browser, self._browser = self._browser, None
            browser.close()

    def _fetch_password(self, watcher: RequestWatcher, deadline: _Deadline
                        ) -> bytearray | None:
        """One round over the servers, asked at once but staggered (:mod:`race`); the first
        password decrypted that some pending request did not get before, else one that all
        got before (to be left to the human), else None."""
        self._network_not_up = False
        try:
            servers = self._servers(deadline)
        except ImportError:
            raise AgentError("no --connect given and python-zeroconf is not installed; give "
                             "--connect ADDRESS:PORT or install zeroconf") from None
        except Exception as error:  # a network hiccup must not end the agent
            log.warning("Zeroconf browsing failed: %s", error)
            return None

        def fetch(server: Server, wait: Wait) -> bytes:
            assert self._credentials is not None and self._priority is not None
            return fetch_blob(server, self._credentials, self._priority, wait,
                              timeout=max(0.1, deadline.left(FETCH_TIMEOUT)))

        def wait(fd: int, seconds: float) -> None:
            watcher.wait_for_socket(fd, write=False, timeout=seconds)

        def keep_going() -> bool:
            return bool(watcher.pending) and not deadline.passed

        outcomes = race(servers, fetch, wait, keep_going)
        repeated: bytearray | None = None  # one already sent to every pending request
        ours: list[bool] = []  # per outcome, whether it failed for our own network
        try:
            for outcome in outcomes:
                ours.append(isinstance(outcome.error, NetworkNotUp))
                if outcome.error is not None:
                    log.info("%s", outcome.error)
                elif not outcome.blob:
                    log.info("%s refused: it sent nothing (unknown key, disabled, or not "
                             "approved)", outcome.server)
                elif (password := self._decrypt(outcome)) is not None:
                    if not self._sent_to_every_request(watcher, password):
                        if repeated is not None:
                            repeated[:] = bytes(len(repeated))
                        return password
                    log.info("%s sent the password already sent for every pending request; "
                             "asking the other servers", outcome.server)
                    if repeated is None:
                        repeated = password
                    else:
                        password[:] = bytes(len(password))
        finally:
            outcomes.close()  # abandons the servers still being asked
            # Every server failed for our own network, or Zeroconf had none to browse on:
            # tried again soon, without a growing back-off.
            self._network_not_up = ((bool(ours) and all(ours)) or (
                self._browser is not None and not self._browser.browsing))
        if not watcher.pending:
            log.info("no request is pending any more; fetch abandoned")
        return repeated  # if any, answering sets the requests aside for the human

    def _sent_to_every_request(self, watcher: RequestWatcher, password: bytearray) -> bool:
        """Whether ``password`` went out before to the Id of every pending request.

        Asked again with the same Id, the password was wrong.  Anyone with our OpenPGP
        public key (no secret) can encrypt a wrong one to it: a server that always hands one
        out, and always first, must not keep the other servers' password from the request."""
        assert self._record is not None
        return bool(watcher.pending) and all(
            self._record.contains(request.answer_key, password)
            for request in watcher.pending.values())

    def _decrypt(self, outcome: Outcome) -> bytearray | None:
        """The password in ``outcome``'s blob, or None (logged) if it does not decrypt."""
        log.info("%s sent %d bytes", outcome.server, len(outcome.blob))
        try:
            password = self._gnupg_home().decrypt(outcome.blob)
        except AgentError as error:
            log.warning("%s: %s", outcome.server, error)
            self._close_decryptor()  # the next attempt starts over with a fresh home
            return None
        if stopsignal.received() is not None:  # a stop during the decryption wins
            password[:] = bytes(len(password))
            stopsignal.check()
        return password

    def _answer(self, watcher: RequestWatcher, password: bytearray) -> None:
        """Send ``password`` to every pending request it was not already sent to.

        Requests pending together with the same Id all get it; a request whose Id got this
        password before (a wrong password, asked again) is left to the human."""
        assert self._record is not None
        record = self._record
        fresh = []
        for path, request in list(watcher.pending.items()):
            if record.contains(request.answer_key, password):
                log.info("not answering %s: this password was already sent for Id %s; "
                         "leaving it to the human", path.name, request.id)
                watcher.set_aside(path, "already answered with this password")
            else:
                fresh.append(request)
        for request in fresh:
            problem = request.stale_reason() or socket_problem(request.socket,
                                                               watcher.directory)
            if problem is not None:
                log.info("not answering %s: %s", request.name, problem)
                watcher.set_aside(request.path, problem)
                continue
            record.add(request.answer_key, password)
            try:
                send_password(request.socket, password)
            except AgentError as error:
                log.warning("%s: %s", request.name, error)
            else:
                log.info("answered %s (Id %s)", request.name, request.id)
            watcher.set_aside(request.path, "answered")
