# SPDX-License-Identifier: GPL-3.0-or-later
"""A load generator that speaks the real Mandos protocol, as many clients booting at once.

Each simulated client connects, runs the Mandos client's side of the exchange as the agent does
(:mod:`mandos_protocol.client`: the protocol line, the TLS handshake in the TLS server role with
a raw public key, the blob until close_notify) and checks the blob byte for byte against what
its ``clients.conf`` section holds.  Threads do the work: the crypto runs in
libgnutls with the GIL released, so a few threads keep both cores busy.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import socket
import statistics
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mandos_protocol import gnutls, wire
from mandos_protocol.client import exchange_blob


@dataclass(frozen=True)
class SimulatedClient:
    """One client's identity and the blob the server should hand it."""

    name: str
    credentials: gnutls.Credentials
    key_id: str
    blob: bytes

    def section(self) -> str:
        """Its clients.conf section, readable by our server and upstream's."""
        encoded = base64.b64encode(self.blob).decode()
        lines = [encoded[i:i + 64] for i in range(0, len(encoded), 64)]
        return (
            f"[{self.name}]\nkey_id = {self.key_id}\n"
            f"fingerprint = {hashlib.sha1(self.key_id.encode()).hexdigest().upper()}\n"
            "host = localhost\nsecret =\n" + "".join(f"    {line}\n" for line in lines) + "\n"
        )


def make_clients(count: int, blob_size: int = 1024) -> list[SimulatedClient]:
    """``count`` clients, each with a fresh Ed25519 key and a random blob."""
    clients = []
    for number in range(count):
        key = ed25519.Ed25519PrivateKey.generate()
        private_pem = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        public = key.public_key()
        spki = public.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        public_pem = public.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
        clients.append(SimulatedClient(
            name=f"bench{number:04d}",
            credentials=gnutls.Credentials.raw_public_key(public_pem, private_pem),
            key_id=wire.key_id(spki),
            blob=secrets.token_bytes(blob_size),
        ))
    return clients


def clients_conf(clients: list[SimulatedClient]) -> str:
    """A clients.conf for these clients: long timeouts, a checker that always succeeds."""
    header = "[DEFAULT]\ntimeout = PT1H\nextended_timeout = PT1H\ninterval = PT1H\n"
    header += "checker = /bin/true\n\n"
    return header + "".join(client.section() for client in clients)


@dataclass
class LevelResult:
    """What one concurrency level measured."""

    concurrency: int
    unlocks: int
    failures: int
    seconds: float
    latencies: list[float] = field(repr=False)
    generator_cpu: float

    @property
    def rate(self) -> float:
        return self.unlocks / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


def unlock_once(address: tuple[str, int], client: SimulatedClient, priority: gnutls.Priority,
                timeout: float) -> bool:
    """One complete unlock; True if the right blob arrived.

    The socket is blocking with kernel send/receive timeouts (``SO_SNDTIMEO``/``SO_RCVTIMEO``)
    rather than Python's socket timeout, which would make it non-blocking and have GnuTLS poll
    before every read: the generator should spend its CPU on the protocol, not on waiting.
    """
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        limit = struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(address)
        return exchange_blob(sock, client.credentials, priority) == client.blob


def run_level(address: tuple[str, int], clients: list[SimulatedClient], concurrency: int,
              unlocks: int, timeout: float = 60.0) -> LevelResult:
    """``unlocks`` unlocks by ``concurrency`` threads, each request timed from connect to blob.

    The generator's CPU time is the sum of its worker threads' own CPU time, so that the
    measuring (the PSS sampler) does not count as load generation.
    """
    priority = gnutls.Priority()
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    counter = iter(range(unlocks))

    cpu = 0.0

    def worker() -> None:
        nonlocal failures, cpu
        while True:
            with lock:
                number = next(counter, None)
            if number is None:
                with lock:
                    cpu += time.thread_time()
                return
            client = clients[number % len(clients)]
            started = time.perf_counter()
            try:
                ok = unlock_once(address, client, priority, timeout)
            except Exception:
                ok = False
            elapsed = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    failures += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    priority.close()
    return LevelResult(concurrency, len(latencies), failures, seconds, latencies, cpu)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for member in _process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        total += (utime + stime + cutime + cstime) / ticks
    return total


def process_tree_pss(pid: int) -> int:
    """Proportional set size, in bytes, summed over a process and its descendants."""
    total = 0
    for member in _process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree
