# SPDX-License-Identifier: GPL-3.0-or-later
"""The fleet benchmark: three of our servers sharing a real 3-member etcd, beside one server alone.

In one run, on this machine:

1. a reboot storm at concurrency 128 against one server without etcd, three without etcd,
   and three with ``--etcd`` (the same 128 connections spread over them), in turn, three
   times: failures, rate, p50 and p99, and the etcd transactions per second the fleet caused
   (three servers without etcd show what sharing two cores costs, etcd aside);
2. propagation: a client disabled in etcd (a record as another server writes it), timed
   until every server refuses it, and enabled again, many times: median and worst;
3. 10,000 clients: each server's start-up time (spawn to in sync with etcd, with the other
   servers already there for the second and third) and memory (PSS) once started, and etcd's
   database per client.

Results are printed and written to ``bench/results/fleet-*.md``.

    ./dev bench --fleet            # the full run
    ./dev bench --fleet --quick    # about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import (
    LevelResult,
    SimulatedClient,
    clients_conf,
    make_clients,
    process_tree_pss,
    run_level,
    unlock_once,
)
from mandos_protocol import gnutls
from peers.etcd import EtcdCluster
from peers.process import stop_process
from peers.upstream import free_port, listening_ports
from server.fleet_etcd import EtcdStore
from server.fleet_store import FleetSettings, Record, Schema

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = 128
#: Seconds a propagation may take before the benchmark gives up.
PROPAGATION_LIMIT = 10.0


@dataclass
class Started:
    pid: int
    port: int
    seconds: float  # spawn to ready (in sync with etcd, if any)
    directory: Path


@contextlib.contextmanager
def server(conf: str, extra_args: Sequence[str] = ()) -> Iterator[Started]:
    """Our server with ``conf`` as clients.conf, timed from spawn until it serves (and, with
    ``--etcd``, until it says it is in sync)."""
    directory = Path(tempfile.mkdtemp(prefix="mandos-bench-fleet-"))
    (directory / "conf").mkdir()
    (directory / "state").mkdir(mode=0o700)
    (directory / "conf" / "clients.conf").write_text(conf)
    port = free_port()
    log_path = directory / "server.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--no-dbus", "--no-zeroconf", "--no-restore",
             "--no-ipv6", "--address=127.0.0.1", f"--port={port}",
             f"--configdir={directory / 'conf'}", f"--statedir={directory / 'state'}",
             f"--journal-socket={directory / 'no-journald'}", *extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        fleet = any(arg.startswith("--etcd=") for arg in extra_args)
        deadline = time.monotonic() + 120
        while port not in listening_ports(process.pid) or (
                fleet and "Fleet: in sync" not in log_path.read_text(errors="replace")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"our server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.01)
        yield Started(process.pid, port, time.monotonic() - started, directory)
    finally:
        stop_process(process, 20)
        shutil.rmtree(directory, ignore_errors=True)


def storm(ports: list[int], clients: list[SimulatedClient], unlocks: int) -> LevelResult:
    """``unlocks`` unlocks by :data:`CONCURRENCY` connections spread over the servers."""
    shares = [CONCURRENCY // len(ports) + (i < CONCURRENCY % len(ports))
              for i in range(len(ports))]
    results: list[LevelResult] = []
    lock = threading.Lock()

    def one(port: int, concurrency: int) -> None:
        result = run_level(("127.0.0.1", port), clients, concurrency,
                           unlocks * concurrency // CONCURRENCY)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=one, args=(port, share))
               for port, share in zip(ports, shares, strict=True)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return LevelResult(CONCURRENCY, sum(r.unlocks for r in results),
                       sum(r.failures for r in results), seconds,
                       [latency for r in results for latency in r.latencies],
                       sum(r.generator_cpu for r in results))


def etcd_status(etcd: EtcdCluster) -> dict[str, int]:
    """The leader's revision and database sizes (bytes allocated, and in use)."""
    statuses = json.loads(etcd.etcdctl("endpoint", "status", "-w", "json").stdout)
    status = statuses[0]["Status"]
    return {"revision": int(status["header"]["revision"]), "db": int(status["dbSize"]),
            "in_use": int(status.get("dbSizeInUse", status["dbSize"]))}


def refused(client: SimulatedClient, port: int, priority: gnutls.Priority) -> bool:
    try:
        return not unlock_once(("127.0.0.1", port), client, priority, 5.0)
    except OSError:
        return True


def propagation(etcd: EtcdCluster, ports: list[int], client: SimulatedClient,
                rounds: int) -> list[float]:
    """Seconds from a disable written to etcd until every server refuses the client."""
    settings = FleetSettings(tuple(url.removeprefix("https://") for url in
                                   etcd.endpoints.split(",")), "/mandos/", etcd.tls.cacert,
                             etcd.tls.cert, etcd.tls.key)
    schema = Schema(settings.prefix)
    priority = gnutls.Priority()
    times: list[float] = []

    async def put(enabled: bool) -> None:
        store = EtcdStore(settings)
        await store.connect()
        try:
            record = Record("enabled", client.name, "bench", datetime.datetime.now(datetime.UTC),
                            enabled=enabled, why="bench")
            await store.put(schema.client_key(client.name, "enabled"), record.encode())
        finally:
            await store.close()

    try:
        for _ in range(rounds):
            started = time.perf_counter()
            asyncio.run(put(False))
            pending = set(ports)
            while pending:
                pending = {port for port in pending if not refused(client, port, priority)}
                if time.perf_counter() - started > PROPAGATION_LIMIT:
                    raise SystemExit(f"no refusal within {PROPAGATION_LIMIT} s on {pending}")
            times.append(time.perf_counter() - started)
            asyncio.run(put(True))
            for port in ports:
                while refused(client, port, priority):
                    if time.perf_counter() - started > 2 * PROPAGATION_LIMIT:
                        raise SystemExit(f"not enabled again within {PROPAGATION_LIMIT} s")
                    time.sleep(0.01)
    finally:
        priority.close()
    return times


def many_sections(count: int) -> str:
    """``count`` clients for the start-up measure (they never connect: random key ids)."""
    blob = base64.b64encode(secrets.token_bytes(1024)).decode()
    header = ("[DEFAULT]\ntimeout = PT1H\nextended_timeout = PT1H\ninterval = PT1H\n"
              "checker = /bin/true\n\n")
    return header + "".join(f"[c{n:06d}]\nkey_id = {secrets.token_hex(32).upper()}\n"
                            f"secret = {blob}\n\n" for n in range(count))


def _p99(runs: list[LevelResult]) -> float:
    return statistics.median(r.percentile(0.99) for r in runs)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench --fleet",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer unlocks and rounds")
    parser.add_argument("--many", type=int, default=10_000,
                        help="clients for the start-up measure (10000)")
    options = parser.parse_args(argv)
    unlocks = 1024 if options.quick else 4096
    repeat = 1 if options.quick else 3
    rounds = 10 if options.quick else 40
    clients = make_clients(64)
    conf = clients_conf(clients)
    lines: list[str] = []
    transactions: list[float] = []
    configs = {"1, no etcd": (1, False), "3, no etcd": (3, False), "3, etcd": (3, True)}
    results: dict[str, list[LevelResult]] = {name: [] for name in configs}
    with EtcdCluster() as etcd, contextlib.ExitStack() as stack:
        ports: dict[str, list[int]] = {}
        for name, (count, fleet) in configs.items():
            args = etcd.server_options() if fleet else []
            ports[name] = [stack.enter_context(server(conf, args)).port for _ in range(count)]
            storm(ports[name], clients, 256)  # warm-up
        for run in range(repeat):
            for name in configs:
                print(f"storm {run + 1}/{repeat}: {name} ...", file=sys.stderr, flush=True)
                before = etcd_status(etcd)
                results[name].append(storm(ports[name], clients, unlocks))
                if name == "3, etcd":
                    transactions.append((etcd_status(etcd)["revision"] - before["revision"])
                                        / results[name][-1].seconds)
        print("propagation ...", file=sys.stderr, flush=True)
        delays = propagation(etcd, ports["3, etcd"], clients[0], rounds)
    lines += [f"Storm: {unlocks} unlocks at concurrency {CONCURRENCY}, {repeat} runs of each "
              "in turn; medians of the runs, failures summed", "",
              "| servers | conc. | unlocks | failures | unlocks/s | p50 ms | p99 ms |",
              "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {CONCURRENCY} | {sum(r.unlocks for r in runs)} | "
                     f"{sum(r.failures for r in runs)} | "
                     f"{statistics.median(r.rate for r in runs):.0f} | "
                     f"{_ms(statistics.median(r.p50 for r in runs))} | "
                     f"{_ms(_p99(runs))} |")
    ratio = _p99(results["3, etcd"]) / _p99(results["1, no etcd"])
    rate = statistics.median(r.rate for r in results["3, etcd"])
    lines += ["", f"p99 of the fleet / p99 of one server: {ratio:.2f}; etcd transactions "
              f"during the fleet's storms: {statistics.median(transactions):.0f}/s "
              f"(the servers batch their writes: {statistics.median(transactions) / rate:.2f} "
              "per unlock)",
              "", f"propagation of a disable written to etcd until all 3 servers refuse "
              f"({rounds} rounds): median {_ms(statistics.median(delays))} ms, "
              f"worst {_ms(max(delays))} ms"]

    print(f"{options.many} clients: start-up ...", file=sys.stderr, flush=True)
    with EtcdCluster() as etcd:
        empty = etcd_status(etcd)
        many = many_sections(options.many)
        with contextlib.ExitStack() as stack:
            started = [stack.enter_context(server(many, etcd.server_options()))
                       for _ in range(3)]
            pss = [process_tree_pss(member.pid) for member in started]
            full = etcd_status(etcd)
        with server(many) as alone:
            alone_pss = process_tree_pss(alone.pid)
        lines += ["", f"| {options.many} clients | start-up s | PSS MiB |", "|---|---|---|"]
        lines.append(f"| alone, no etcd | {alone.seconds:.2f} | {alone_pss / 2**20:.0f} |")
        for number, (member, size) in enumerate(zip(started, pss, strict=True), 1):
            lines.append(f"| fleet server {number} | {member.seconds:.2f} | "
                         f"{size / 2**20:.0f} |")
        per_client = (full["in_use"] - empty["in_use"]) / options.many
        lines += ["", f"etcd database: {full['db'] / 2**20:.1f} MiB allocated, "
                  f"{full['in_use'] / 2**20:.1f} MiB in use after {options.many} clients "
                  f"({per_client:.0f} bytes in use per client; revision {full['revision']})"]

    stamp = datetime.datetime.now(datetime.UTC)
    report = (f"# Fleet, {stamp:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} "
              f"cores{' (quick)' if options.quick else ''}\n\n" + "\n".join(lines) + "\n")
    print(report)
    RESULTS.mkdir(exist_ok=True)
    name = f"fleet-{stamp:%Y%m%dT%H%M%S}{'-quick' if options.quick else ''}.md"
    (RESULTS / name).write_text(report)
    failures = sum(r.failures for runs in results.values() for r in runs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
