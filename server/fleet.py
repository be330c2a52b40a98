# SPDX-License-Identifier: GPL-3.0-or-later
"""Fleet sync: several servers share their clients' state through etcd.

What this server decides (a client enabled or disabled, a successful check, a secret sent, an
approval) is written to etcd (:mod:`server.fleet_store` has the keys); what the others decide
arrives by one watch of the prefix and is applied to the client table through the methods the
D-Bus API uses (``Client.enable``, ``disable``, ``approve``, ``bump_timeout``), so the journal,
D-Bus signals and the state file follow as for a local change.

Each server holds a lease and a key under ``servers/``; the live servers' ids decide by
rendezvous hashing which one runs a client's checker.  A server that dies loses its key when
its lease runs out (:data:`LEASE_TTL`), and the next server in each of its clients' orders
takes over at that client's next turn.

When etcd cannot be reached, or has no quorum (a lease refresh fails), the server is
*detached*: it says so in the journal and in STATUS=, serves from what it last knew (the
state file keeps that across a restart), runs every checker itself, and records each disable
it makes as ``offline``.  When etcd answers again it reads the whole prefix and reconciles,
fact by fact: the newer fact holds, except that a disable made offline beats any enable — so
no disable made on either side is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import itertools
from collections.abc import Callable, Iterator

import grpc
from etcd3aio.errors import EtcdError

from server import events
from server.clients import ClientTable, utcnow
from server.events import By
from server.fleet_etcd import MAX_TXN_OPS, EtcdStore
from server.fleet_store import Change, FleetSettings, Kind, Record, Schema

#: Seconds a server's lease lives without a refresh: how long a dead server holds its checkers.
LEASE_TTL = 5
#: Seconds between two lease refreshes (each one also tells whether etcd has a quorum).
REFRESH_INTERVAL = 1.0
#: Seconds between two tries to reach etcd while detached.
RETRY_INTERVAL = 0.5
#: Seconds the start-up waits for a first sync before serving detached.
START_WAIT = 5.0

#: What etcd's client raises when etcd is unreachable, slow or without quorum.
FAILURES = (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError)

#: How late an approval may arrive and still count (beyond the client's approval_duration).
APPROVAL_SLACK = datetime.timedelta(seconds=1)

#: The oldest time: a record the server has from its state file alone, which etcd's overrides.
DAWN = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class FleetSync:
    """The link between this server's client table and etcd."""

    def __init__(self, settings: FleetSettings, clients: ClientTable, server_id: str, *,
                 log: Callable[[str, bool], None],
                 on_status: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.schema = Schema(settings.prefix)
        self.clients = clients
        self.server_id = server_id
        self._log = log  # (message, is_problem)
        self._on_status = on_status
        self.store = EtcdStore(settings)
        #: The facts this server holds, by (client, kind): its own or applied from etcd.
        self.records: dict[tuple[str, Kind], Record] = {}
        #: The live servers, as etcd last said.
        self.servers: set[str] = set()
        self.detached = True
        self.detached_reason = "not yet connected to etcd"
        self.detached_since: datetime.datetime | None = utcnow()
        self._applying = False
        self._pending: dict[bytes, bytes] = {}
        self._wake_writer = asyncio.Event()
        self._attached = asyncio.Event()
        self._lease = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._watch: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and sync, waiting up to :data:`START_WAIT` for etcd; serve detached if it
        does not answer by then (the link keeps trying in the background)."""
        for client in self.clients:
            self.records[(client.name, "enabled")] = Record(
                "enabled", client.name, self.server_id, DAWN, enabled=client.enabled,
                why="as this server last knew")
        await self.store.connect()
        self._tasks = [asyncio.create_task(self._link()), asyncio.create_task(self._writer())]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT):
                await self._attached.wait()

    async def stop(self) -> None:
        """Write what is pending (briefly), give up the lease so that another server takes
        over the checkers at once, and close."""
        if not self.detached and self._pending:
            with contextlib.suppress(*FAILURES):
                async with asyncio.timeout(1.0):
                    await self._flush()
        for task in [*self._tasks, *([self._watch] if self._watch else [])]:
            task.cancel()
        for task in [*self._tasks, *([self._watch] if self._watch else [])]:
            with contextlib.suppress(asyncio.CancelledError, *FAILURES):
                await task
        if self._lease and not self.detached:
            with contextlib.suppress(*FAILURES):
                await self.store.revoke(self._lease)
        with contextlib.suppress(*FAILURES):
            await self.store.close()

    def status(self) -> str | None:
        """The STATUS= prefix while detached, else None."""
        if not self.detached:
            return None
        return f"DETACHED from etcd ({self.detached_reason})"

    # -- the link: attach, keep the lease, detach -------------------------------------------

    async def _link(self) -> None:
        while True:
            try:
                await self._attach()
                while True:
                    await asyncio.sleep(REFRESH_INTERVAL)
                    if await self.store.keepalive(self._lease) <= 0:
                        # etcd answers, but the lease ran out (this server's loop was busy
                        # for longer than its TTL): register again, the watch goes on.
                        await self._register()
                        self._log("Fleet: this server's lease had run out (the server was "
                                  "too busy to refresh it); registered again", True)
            except FAILURES as error:
                self._detach(_describe(error))
            await asyncio.sleep(RETRY_INTERVAL)

    async def _register(self) -> None:
        """Take a lease, and this server's key under ``servers/`` with it."""
        self._lease = await self.store.grant(LEASE_TTL)
        await self.store.put(self.schema.server_key(self.server_id),
                             f'{{"since":"{utcnow().isoformat()}"}}'.encode(), self._lease)

    async def _attach(self) -> None:
        await self._register()
        revision, changes = await self.store.snapshot(self.settings.prefix)
        self.servers = set()
        remote: dict[tuple[str, Kind], Record] = {}
        for change in changes:
            record = self._parse(change)
            if isinstance(record, Record):
                remote[(record.client, record.kind)] = record
        self._pending.clear()
        for key in set(remote) | set(self.records):
            theirs, ours = remote.get(key), self.records.get(key)
            if theirs is not None and theirs.beats(ours):
                self._apply(theirs)
            elif ours is not None and (theirs is None or (ours != theirs and ours.at != DAWN)):
                self._publish(ours)
        await self._flush()
        if self._watch is not None:
            self._watch.cancel()
        self._watch = asyncio.create_task(self._follow(revision))
        was_detached, since = self.detached, self.detached_since
        self.detached, self.detached_since = False, None
        back = self._attached.is_set()  # False at start-up: not back, just arrived
        self._attached.set()
        if was_detached:
            duration = (f" after {(utcnow() - since).total_seconds():.1f} s detached"
                        if back and since is not None else "")
            self._log(f"Fleet: in sync with etcd at revision {revision} as {self.server_id}"
                      f"{duration}; {self._describe_servers()}", False)
            self._on_status()

    def _detach(self, reason: str) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.detached:
            self.detached_reason = reason
            return
        self.detached, self.detached_reason, self.detached_since = True, reason, utcnow()
        self._log(f"Fleet: running detached from etcd ({reason}); serving from the last "
                  "synced state, running every checker here, and keeping every disable for "
                  "when etcd is back", True)
        self._on_status()

    async def _follow(self, revision: int) -> None:
        """Apply every change after ``revision`` (etcd3aio resumes a broken watch itself)."""
        with contextlib.suppress(*FAILURES):
            async for changes in self.store.watch(self.settings.prefix, revision):
                for change in changes:
                    self._on_change(change)

    def _parse(self, change: Change) -> Record | str | None:
        """A client record, or a server id (after updating the live set), or None."""
        parsed = self.schema.parse(change.key)
        if parsed is None:
            return None
        what, name, kind = parsed
        if what == "server":
            if change.value is None:
                self.servers.discard(name)
            else:
                self.servers.add(name)
            return name
        if kind is None or change.value is None:
            return None
        return Record.decode(kind, name, change.value, change.revision)

    def _describe_servers(self) -> str:
        return f"{len(self.servers)} live servers: {', '.join(sorted(self.servers))}"

    def _on_change(self, change: Change) -> None:
        before = set(self.servers)
        record = self._parse(change)
        if self.servers != before:
            self._log(f"Fleet: {self._describe_servers()}", False)
        if not isinstance(record, Record):
            return
        ours = self.records.get((record.client, record.kind))
        if record.beats(ours):
            self._apply(record)
        elif ours is not None and ours.at != DAWN and ours.beats(record):
            # Written by a server that had not seen ours yet (two servers coming back from
            # an outage at once): ours holds, so etcd must say it again.
            self._publish(ours)

    # -- writing ----------------------------------------------------------------------------

    def _publish(self, record: Record) -> None:
        self.records[(record.client, record.kind)] = record
        self._pending[self.schema.client_key(record.client, record.kind)] = record.encode()
        self._wake_writer.set()

    async def _writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            if self.detached:
                continue  # the next attach reconciles everything
            with contextlib.suppress(*FAILURES):
                await self._flush()

    async def _flush(self) -> None:
        """Write what is pending, in transactions of many keys (a start-up with thousands of
        clients, or the return from an outage)."""
        while self._pending:
            batch = list(itertools.islice(self._pending.items(), MAX_TXN_OPS))
            await self.store.put_many(batch)
            for key, value in batch:
                if self._pending.get(key) == value:
                    del self._pending[key]

    # -- what happens here ------------------------------------------------------------------

    def subscribe(self, publisher: events.Publisher) -> Callable[[], None]:
        """Publish this server's decisions from now on; returns the unsubscriber."""
        return publisher.subscribe(self.on_event, events.ClientEnabled, events.ClientDisabled,
                                   events.CheckedOK, events.SecretSent, events.Approved,
                                   events.ConfigLoaded)

    def on_event(self, event: events.ServerEvent) -> None:
        """One local decision, written to etcd (decisions applied from etcd are not)."""
        if self._applying or getattr(event, "by", None) is By.FLEET:
            return
        if isinstance(event, events.ConfigLoaded):
            self._adopt(event.clients)
            return
        client = self.clients.get(event.client) if isinstance(event, events.ClientEvent) \
            else None
        if client is None:
            return
        record: Record
        if isinstance(event, events.ClientEnabled):
            record = Record("enabled", client.name, self.server_id, utcnow(), enabled=True,
                            why=f"enabled by {event.by.value}")
        elif isinstance(event, events.ClientDisabled):
            record = Record("enabled", client.name, self.server_id, utcnow(), enabled=False,
                            why=f"{event.by.value}: {event.reason}", offline=self.detached)
        elif isinstance(event, events.CheckedOK):
            record = Record("checked", client.name, self.server_id, event.at,
                            expires=event.at + client.settings.timeout)
        elif isinstance(event, events.SecretSent):
            record = Record("secret-sent", client.name, self.server_id, event.at,
                            expires=event.at + client.settings.extended_timeout)
        elif isinstance(event, events.Approved):
            record = Record("approval", client.name, self.server_id, utcnow(),
                            approved=event.approved)
        else:
            return
        self._publish(record)

    def _adopt(self, names: tuple[str, ...]) -> None:
        """Clients new in the configuration take the fleet's state, if it has one."""
        for name in names:
            for kind in ("enabled", "checked"):
                record = self.records.get((name, kind))
                if record is not None and record.at != DAWN:
                    self._apply(record)

    def owns_checker(self, name: str) -> bool:
        """Whether this server runs the client's checker: the first of the live servers in
        the client's rendezvous order (every checker, while detached)."""
        if self.detached:
            return True
        servers = self.servers | {self.server_id}
        return max(servers, key=lambda server: hashlib.sha256(
            f"{server}\0{name}".encode()).digest()) == self.server_id

    # -- what happens elsewhere -------------------------------------------------------------

    @contextlib.contextmanager
    def _remote(self) -> Iterator[None]:
        """Changes applied from etcd are not published again."""
        self._applying = True
        try:
            yield
        finally:
            self._applying = False

    def _apply(self, record: Record) -> None:
        self.records[(record.client, record.kind)] = record
        client = self.clients.get(record.client)
        if client is None or (record.server == self.server_id and record.kind != "enabled"):
            return
        with self._remote():
            if record.kind == "enabled":
                if record.enabled:
                    client.enable(By.FLEET)
                else:
                    client.disable(By.FLEET, f"Client {client.name} disabled on server "
                                             f"{record.server} ({record.why})")
            elif record.kind == "approval":
                age = utcnow() - record.at
                if age <= client.settings.approval_duration + APPROVAL_SLACK:
                    client.approve(record.approved)
            elif record.kind == "checked":
                last = client.state.last_checked_ok
                if last is None or record.at > last:
                    client.checked_ok()
            else:
                last = client.state.last_secret_sent
                if last is None or record.at > last:
                    client.state.last_secret_sent = record.at
                    if record.expires is not None and client.enabled and (
                            client.expires is None or record.expires > client.expires):
                        client.bump_timeout(record.expires - utcnow())


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
