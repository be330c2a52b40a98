# SPDX-License-Identifier: GPL-3.0-or-later
"""The running server: one asyncio loop holding the clients, the listener, the state file,
sd_notify, the Zeroconf announcement and the signal handlers.

SIGHUP reloads clients.conf without dropping connections (a bad file is logged and the old
configuration kept); SIGTERM and SIGINT stop at any moment, requests waiting for approval
included: connections are closed, checkers stopped, the state saved.

State changes are saved in batches (see :mod:`server.statefile` for the durability trade-off):
the first change schedules one write ``SAVE_DELAY`` later, snapshot on the loop, disk work in
a worker thread, at most one write in flight; the systemd STATUS line is refreshed then too.
A write that fails (a full disk, a read-only file system) leaves the old file whole; the server
serves on, says so once at ``err`` (and in STATUS=) rather than at every change, tries again
every ``SAVE_RETRY`` seconds and at every change, and says when a write succeeds again.
Refusing to serve would keep every machine from booting for want of a few bytes of bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from typing import TYPE_CHECKING

from mandos_protocol.errors import ProtocolError
from mandos_protocol.gnutls import Priority
from mandos_protocol.notify import Notifier
from server import events, systemd
from server.approval_command import ApprovalCommands
from server.clients import Client, ClientState, ClientTable, utcnow
from server.config import (
    CLIENTS_D,
    ClientConfig,
    ClientsConfiguration,
    ConfigError,
    ServerSettings,
    load_configuration,
)
from server.configwatch import ClientsDirWatch
from server.events import By
from server.fleet_store import FleetSettings
from server.health import Health, directory_writable
from server.http_endpoint import MetricsEndpoint, parse_address
from server.journal import ERR, NOTICE, WARNING, Event, Journal, journalled_publisher
from server.listener import Listener, adopt_socket, bind_socket
from server.statefile import StateFile

if TYPE_CHECKING:  # imported lazily at run time: python-zeroconf and dbus-fast cost 40 ms
    from server.announce import Announcer
    from server.dbus_api import AdminService
    from server.fleet import FleetSync
    from server.metrics import ServerMetrics

#: Seconds from a state change to the write that saves it (and every change made meanwhile).
SAVE_DELAY = 0.5
#: Seconds from a failed write to the next try, if no change asks for one sooner.
SAVE_RETRY = 10.0


class Daemon:
    """The server process after option parsing."""

    def __init__(self, settings: ServerSettings, journal: Journal) -> None:
        self.settings = settings
        self.journal = journal
        #: Every decision and state change (:mod:`server.events`): subscribe here.
        self.events = journalled_publisher(journal)
        self.events.subscribe(self._state_changed)
        self.notifier = Notifier()
        self.statefile = StateFile(settings.statedir, self._state_warning)
        self.clients = ClientTable()
        self.approval_commands = ApprovalCommands(self.clients, self.events,
                                                  show_output=settings.debug)
        self.configs: dict[str, ClientConfig] = {}
        #: The client files in force (clients.conf, clients.d/*.conf), for the next reload.
        self.configuration: ClientsConfiguration | None = None
        self.watch = ClientsDirWatch(settings.configdir, self._clients_d_changed,
                                     self._watch_warning)
        #: While starting, whether clients.d changed (it is reloaded once serving); None
        #: once serving, when a change reloads it at once.
        self._changed_while_starting: bool | None = False
        self.listener: Listener | None = None
        self.announcer: Announcer | None = None
        self.dbus: AdminService | None = None
        self.fleet: FleetSync | None = None
        self._save_timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        #: Why the last write of the state failed; None once one succeeds.
        self._save_failure: str | None = None
        self._stop = asyncio.Event()
        self._watchdog: asyncio.TimerHandle | None = None
        #: What /healthz checks (server.health); the fleet sync adds its own.
        self.health = Health()
        self.health.add(self._serving_problem)
        self.health.add(self._state_problem)
        self.metrics: ServerMetrics | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._metrics_address = parse_address(settings.metrics) if settings.metrics else None

    def _state_warning(self, message: str) -> None:
        self.journal.event(Event.STATE_PROBLEM, message)

    def _state_changed(self, event: events.ServerEvent) -> None:
        if event.saves_state:
            self.schedule_save()

    # -- start-up ---------------------------------------------------------------------------

    def _sockets(self) -> list[socket.socket]:
        inherited = systemd.listen_fds()
        if inherited:
            return inherited
        if self.settings.socket is not None:
            return [adopt_socket(self.settings.socket)]
        if self.settings.port is None and not self.settings.zeroconf:
            raise ConfigError("needs --port or --socket (or socket activation) to work without "
                              "Zeroconf")
        return [bind_socket(self.settings.address, self.settings.port or 0,
                            use_ipv6=self.settings.use_ipv6, interface=self.settings.interface)]

    def _make_client(self, settings: ClientConfig, state: ClientState) -> Client:
        return Client(settings, state, self.events, show_checker_output=self.settings.debug,
                      checks_here=self._checks_here)

    def _checks_here(self, name: str) -> bool:
        return self.fleet is None or self.fleet.owns_checker(name)

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop."""
        loop = asyncio.get_running_loop()
        try:
            priority = Priority(self.settings.priority)
        except ProtocolError as error:
            raise ConfigError(f"priority: {error}") from None
        FleetSettings.from_server(self.settings)  # a bad --etcd stops the start here
        if self._metrics_address is not None:  # first: a port in use stops the start here
            self.metrics_endpoint = MetricsEndpoint(self.health)
            self.metrics_endpoint.bind(*self._metrics_address)
        self.watch.start()  # before reading: a change from now on is seen
        self.configuration = load_configuration(self.settings.configdir)
        self.configs = self.configuration.clients
        leftovers = self.statefile.remove_leftovers()
        if leftovers:
            self.journal.event(Event.STATE_PROBLEM,
                               f"Removed {leftovers} temporary file(s) beside "
                               f"{self.statefile.path}: a write was interrupted (the server "
                               "was killed); the state file itself is whole", priority=NOTICE)
        if self.settings.use_dbus:
            from server.dbus_api import AdminService  # lazy: dbus-fast only with D-Bus on

            # It subscribes to the events; without a bus, the server runs without it.
            self.dbus = await AdminService.connect(self.clients, self.journal, self.events)
        saved = self.statefile.load() if self.settings.restore else {}
        for _name, restored in self.statefile.restore(self.configs, saved, utcnow()).items():
            self.clients.add(self._make_client(restored.settings, restored.state))
        if self.statefile.damage is not None:
            self.journal.event(Event.STATE_PROBLEM, self.statefile.damage, priority=ERR)
        self._config_loaded(reloaded=False)
        sockets = self._sockets()
        self.listener = Listener(sockets, self.clients, self.journal, self.events, priority)
        for client in self.clients:
            client.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            self.listener.start()
            await self._join_fleet(self.listener.port)
            await self._serve_metrics()
            if self.settings.zeroconf:
                await self._announce(self.listener.port)
            self._save_now()
            self.events.publish(events.ServerStarted(
                addresses=tuple(_describe(sock) for sock in sockets),
                metrics=None if self.metrics_endpoint is None
                else _describe(self.metrics_endpoint.listening_socket)))
            self.notifier.ready(self.status_line())
            self._arm_watchdog()
            changed, self._changed_while_starting = self._changed_while_starting, None
            if changed:
                self.reload(clients_conf=False)
            await self._stop.wait()
        finally:
            await self._shutdown()

    async def _join_fleet(self, port: int) -> None:
        """With ``--etcd``: share the clients' state with the other servers (docs/fleet.md)."""
        if not self.settings.etcd:
            return
        from server.fleet import FleetSync  # lazy: gRPC costs 100 ms to import

        settings = FleetSettings.from_server(self.settings)
        assert settings is not None

        def log(message: str, problem: bool) -> None:
            self.journal.event(Event.FLEET, message, priority=WARNING if problem else NOTICE)

        self.fleet = FleetSync(settings, self.clients, f"{socket.gethostname()}:{port}",
                               log=log, on_status=self._update_status)
        self.fleet.subscribe(self.events)
        await self.fleet.start()

    async def _announce(self, port: int) -> None:
        from server.announce import Announcer  # lazy: python-zeroconf costs 40 ms to import

        def log(message: str) -> None:
            self.journal.event(Event.ZEROCONF, message)

        self.announcer = Announcer(port, self.settings.servicename,
                                   self.settings.interface or None, self.settings.use_ipv6, log)
        await self.announcer.start()

    async def _serve_metrics(self) -> None:
        """With ``--metrics``: /metrics and /healthz (:mod:`server.http_endpoint`)."""
        if self.metrics_endpoint is None:
            return
        from server.metrics import ServerMetrics  # lazy: prometheus-client only if asked for

        assert self.listener is not None
        self.metrics = ServerMetrics(self.clients, self.listener,
                                     lambda: self._state_problem() is None)
        self.metrics.subscribe(self.events)
        if self.fleet is not None:
            fleet = self.fleet
            self.health.add(fleet.status)  # None while in sync
            self.metrics.etcd_in_sync = lambda: not fleet.detached
        await self.metrics_endpoint.start(self.metrics.exposition)

    def _serving_problem(self) -> str | None:
        return "stopping" if self._stop.is_set() else None

    def _state_problem(self) -> str | None:
        """Why the state cannot be saved now: the last write failed (until one succeeds),
        or the state directory takes no file (read-only)."""
        if self._save_failure is not None:
            return f"cannot save the state in {self.statefile.path}: {self._save_failure}"
        return directory_writable(self.settings.statedir)

    def _arm_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return

        def ping() -> None:
            self.notifier.watchdog()
            self._watchdog = asyncio.get_running_loop().call_later(interval, ping)

        ping()

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        self.events.publish(events.ServerStopping())
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.watch.close()
        if self.listener is not None:
            await self.listener.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        await self.approval_commands.close()
        for client in self.clients:
            client.close()
        if self.announcer is not None:
            with contextlib.suppress(Exception):
                await self.announcer.stop()
        if self.dbus is not None:
            self.dbus.close()
        await self.flush()

    # -- state ------------------------------------------------------------------------------

    def schedule_save(self, delay: float = SAVE_DELAY) -> None:
        """Save soon: one write ``delay`` from now (or sooner, if one is due sooner) for all the
        changes made until then."""
        loop = asyncio.get_running_loop()
        if self._save_timer is not None:
            if self._save_timer.when() <= loop.time() + delay:
                return
            self._save_timer.cancel()
        self._save_timer = loop.call_later(delay, self._save_later)

    def _save_later(self) -> None:
        self._save_timer = None
        self._update_status()
        if self._writing is not None:  # one write at a time; this change gets the next one
            self.schedule_save()
            return
        document = self.statefile.document(self.clients, self.configs)
        self._writing = asyncio.get_running_loop().run_in_executor(
            None, self.statefile.write, document)
        self._writing.add_done_callback(self._written)

    def _written(self, future: asyncio.Future[None]) -> None:
        self._writing = None
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._save_failed(error)
        else:
            self._saved()

    async def flush(self) -> None:
        """Write the latest state now (at shutdown), after any write in flight."""
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writing)
        self._save_now()

    def _save_now(self) -> None:
        try:
            self.statefile.save(self.clients, self.configs)
        except OSError as error:
            self._save_failed(error)
        else:
            self._saved()

    def _save_failed(self, error: BaseException) -> None:
        """Log the first failure of a kind at err (not every retry), and try again later."""
        reason = (error.strerror if isinstance(error, OSError) else None) or str(error) \
            or type(error).__name__
        if reason != self._save_failure:
            self.events.publish(events.StateWriteFailed(path=str(self.statefile.path),
                                                        reason=reason, retry=SAVE_RETRY))
            self._save_failure = reason
            self._update_status()
        if not self._stop.is_set():
            self.schedule_save(SAVE_RETRY)

    def _saved(self) -> None:
        if self._save_failure is not None:
            self._save_failure = None
            self.events.publish(events.StateWriteRecovered(path=str(self.statefile.path)))
            self._update_status()

    def status_line(self) -> str:
        clients = list(self.clients)
        enabled = sum(1 for client in clients if client.enabled)
        sent = [(c.state.last_secret_sent, c.name) for c in clients
                if c.state.last_secret_sent is not None]
        line = f"{len(clients)} clients, {enabled} enabled"
        if self.statefile.damage is not None:
            line = f"STATE FILE DAMAGED, all clients disabled at start; {line}"
        if self._save_failure is not None:
            line = f"CANNOT SAVE STATE ({self._save_failure}); {line}"
        fleet = self.fleet.status() if self.fleet is not None else None
        if fleet is not None:
            line = f"{fleet}; {line}"
        if sent:
            stamp, name = max(sent)
            line += f"; last secret sent to {name} at {stamp.strftime('%Y-%m-%d %H:%M:%S')}Z"
        else:
            line += "; no secret sent yet"
        return line

    def _update_status(self) -> None:
        if self.notifier.enabled:
            self.notifier.status(self.status_line())

    # -- reload -----------------------------------------------------------------------------

    def reload(self, *, clients_conf: bool = True) -> None:
        """Read the client files again (SIGHUP: clients.conf and clients.d/; a change in
        clients.d/: only that) and add, drop and change clients in place; connections stay.

        A file that cannot be used keeps its previous contents, and so does a missing
        clients.conf (at start-up it means no clients, as upstream): a file moved away while
        being edited must not drop its clients, and with them their state (a client disabled
        for cause would come back enabled with the file).  The other files' changes apply
        (:func:`server.config.load_configuration`).  A file removed from clients.d takes its
        clients with it.  A client removed over D-Bus comes back on SIGHUP, or when its
        configuration changes."""
        self.notifier.notify("RELOADING=1")
        try:
            loaded = load_configuration(self.settings.configdir, self.configuration,
                                        clients_conf=clients_conf)
            for problem in loaded.problems:
                self.events.publish(events.ConfigReloadFailed(path=str(problem.path),
                                                              error=problem.message))
            configs = loaded.clients
            changed = configs != self.configs
            now = utcnow()
            for name in list(self.configs):
                if name not in configs:
                    client = self.clients.remove(name)
                    if client is not None:
                        client.remove(By.CONFIG)
            for name, config in configs.items():
                client = self.clients.get(name)
                if client is None:
                    if not clients_conf and self.configs.get(name) == config:
                        continue  # removed over D-Bus, and its file did not change
                    restored = self.statefile.restore({name: config}, {}, now)[name]
                    client = self._make_client(restored.settings, restored.state)
                    self.clients.add(client)
                    client.start()
                else:
                    client.apply_settings(config, self.configs[name])
            self.configuration = loaded
            self.configs = configs
            self.clients.reindex()
            if changed or not loaded.problems:  # else the refusals said it all
                self._config_loaded(reloaded=True, changed=not clients_conf)
        finally:
            self.notifier.notify("READY=1", f"STATUS={self.status_line()}")

    def _clients_d_changed(self) -> None:
        if self._changed_while_starting is None:
            self.reload(clients_conf=False)
        else:
            self._changed_while_starting = True

    def _watch_warning(self, message: str) -> None:
        self.journal.event(Event.SERVER_ERROR, message, priority=WARNING)

    def _config_loaded(self, *, reloaded: bool, changed: bool = False) -> None:
        assert self.configuration is not None
        directory = self.settings.configdir / CLIENTS_D
        self.events.publish(events.ConfigLoaded(
            path=str(self.settings.clients_conf), clients=tuple(self.configs),
            reloaded=reloaded, directory=str(directory), changed=changed,
            files=tuple(str(file.path) for file in self.configuration.files
                        if file.path.parent == directory)))
        if not self.configs:
            self.journal.event(Event.CONFIG_LOADED, "No clients defined", priority=WARNING)


def _describe(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in str(name[0]) else str(name[0])
        return f"{host}:{name[1]}"
    return str(name) or f"fd {sock.fileno()}"

