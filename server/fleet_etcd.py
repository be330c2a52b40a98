# SPDX-License-Identifier: GPL-3.0-or-later
"""The connection to etcd, through etcd3aio (asyncio gRPC): reads in pages, writes in
transactions, one watch of the prefix, a lease; TLS (a CA, a client certificate and key)
when the settings have a CA."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from etcd3aio import Etcd3Client
from etcd3aio.kv import SortOrder, prefix_range_end

from server.fleet_store import Change, FleetSettings

#: Keys read in one request of a snapshot.
PAGE_KEYS = 2000
#: Operations in one transaction: etcd's default limit (--max-txn-ops).
MAX_TXN_OPS = 128
#: Seconds an etcd request may take before the server counts etcd as unreachable.
REQUEST_TIMEOUT = 2.0


class EtcdStore:
    """The connection to etcd: reads, writes, one watch of the prefix, a lease."""

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        server_name = settings.endpoints[0].rsplit(":", 1)[0] if settings.tls else None
        self.client = Etcd3Client(list(settings.endpoints), rpc_max_attempts=1,
                                  watch_max_reconnect_backoff_seconds=0.5,
                                  tls_server_name=server_name, ca_cert=read(settings.cacert),
                                  cert_key=read(settings.key), cert_chain=read(settings.cert))

    async def connect(self) -> None:
        await self.client.connect()

    async def close(self) -> None:
        await self.client.close()

    async def snapshot(self, prefix: str) -> tuple[int, list[Change]]:
        """Every key under ``prefix`` now, and the revision they are at: read in pages of
        :data:`PAGE_KEYS`, all at the first page's revision (gRPC takes at most 4 MiB in one
        answer, 20,000 keys of the fleet)."""
        assert self.client.kv is not None
        changes: list[Change] = []
        start, end, revision = prefix.encode(), prefix_range_end(prefix), 0
        while True:
            response = await self.client.kv.get(start, range_end=end, revision=revision,
                                                limit=PAGE_KEYS, sort_order=SortOrder.ASCEND,
                                                timeout=REQUEST_TIMEOUT)
            revision = revision or response.header.revision
            changes += [Change(kv.key, kv.value, kv.mod_revision) for kv in response.kvs]
            if not response.more or not response.kvs:
                return revision, changes
            start = response.kvs[-1].key + b"\0"

    async def watch(self, prefix: str, revision: int) -> AsyncIterator[list[Change]]:
        """The changes under ``prefix`` after ``revision``, as etcd reports them."""
        assert self.client.watch is not None
        async for response in self.client.watch.watch(
                prefix, range_end=prefix_range_end(prefix), start_revision=revision + 1):
            yield [Change(event.kv.key, None if event.type == 1 else event.kv.value,
                          event.kv.mod_revision) for event in response.events]

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        assert self.client.kv is not None
        await self.client.kv.put(key, value, lease=lease, timeout=REQUEST_TIMEOUT)

    async def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        """Write several keys in one transaction (at most :data:`MAX_TXN_OPS`)."""
        assert self.client.kv is not None and len(items) <= MAX_TXN_OPS
        kv = self.client.kv
        await kv.txn([], [kv.txn_op_put(key, value) for key, value in items],
                     timeout=REQUEST_TIMEOUT)

    async def grant(self, ttl: int) -> int:
        assert self.client.lease is not None
        return int((await self.client.lease.grant(ttl=ttl, timeout=REQUEST_TIMEOUT)).ID)

    async def revoke(self, lease: int) -> None:
        assert self.client.lease is not None
        await self.client.lease.revoke(lease, timeout=REQUEST_TIMEOUT)

    async def keepalive(self, lease: int) -> int:
        """Refresh the lease; its remaining TTL (0 once it has expired)."""
        assert self.client.lease is not None
        stream = self.client.lease.keep_alive(lease)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                async for response in stream:
                    return int(response.TTL)
        finally:
            stream.cancel()
        return 0
