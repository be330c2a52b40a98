"""The reboot-storm benchmark: our server and Debian's upstream ``mandos``, side by side.

After a power cut a rack boots at once and every machine asks for its password in the same second.
This runs the same simulated clients (:mod:`bench.loadgen`) against both servers, on the same
machine, in one run, at several concurrency levels, and prints one table with the ratio
ours/upstream per row.  Results are written to ``bench/results/``.

    ./dev bench            # the full run
    ./dev bench --quick    # under two minutes
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import (
    LevelResult,
    SimulatedClient,
    clients_conf,
    make_clients,
    process_tree_cpu,
    process_tree_pss,
    run_level,
)
from tests.peers.upstream import UpstreamServer, free_port, listening_ports

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One server at one concurrency level."""

    server: str
    level: LevelResult
    server_cpu: float
    peak_pss: int

    @property
    def server_cpu_per_unlock_ms(self) -> float:
        return 1000 * self.server_cpu / max(1, self.level.unlocks)

    @property
    def generator_cpu_per_unlock_ms(self) -> float:
        return 1000 * self.level.generator_cpu / max(1, self.level.unlocks)


@contextmanager
def our_server(clients: list[SimulatedClient]) -> Iterator[tuple[int, int]]:
    """Our server on 127.0.0.1, yielding (pid, port)."""
    directory = Path(tempfile.mkdtemp(prefix="mandos-bench-"))
    try:
        (directory / "conf").mkdir()
        (directory / "state").mkdir(mode=0o700)
        (directory / "conf" / "clients.conf").write_text(clients_conf(clients))
        (directory / "conf" / "mandos.conf").write_text("[DEFAULT]\n")
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--foreground", "--no-dbus", "--no-zeroconf",
             "--no-restore", "--no-ipv6", "--address=127.0.0.1", f"--port={port}",
             f"--configdir={directory / 'conf'}", f"--statedir={directory / 'state'}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(directory / "server.log", "wb"),  # noqa: SIM115 - closed with the dir
        )
        try:
            deadline = time.monotonic() + 20
            while port not in listening_ports(process.pid):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("our server did not start:\n"
                                     + (directory / "server.log").read_text())
                time.sleep(0.02)
            yield process.pid, port
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def upstream_server(clients: list[SimulatedClient]) -> Iterator[tuple[int, int]]:
    """Debian's ``mandos`` on 127.0.0.1, yielding (pid, port)."""
    sections = clients_conf(clients).split("\n\n", 1)[1]
    with UpstreamServer(sections) as server:
        assert server.process is not None
        yield server.process.pid, server.port


def measure(name: str, pid: int, port: int, clients: list[SimulatedClient], concurrency: int,
            unlocks: int) -> Row:
    """One level against one server, with the server's CPU and peak PSS sampled alongside."""
    peak = process_tree_pss(pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            peak = max(peak, process_tree_pss(pid))

    sampler = threading.Thread(target=sample)
    cpu_before = process_tree_cpu(pid)
    sampler.start()
    try:
        level = run_level(("127.0.0.1", port), clients, concurrency, unlocks)
    finally:
        stop.set()
        sampler.join()
    return Row(name, level, process_tree_cpu(pid) - cpu_before, peak)


def format_table(rows: list[Row]) -> str:
    """A Markdown table, ours and upstream per level, with the ratios."""
    header = ("| server | conc. | unlocks | failures | unlocks/s | p50 ms | p99 ms | max ms "
              "| server CPU ms/unlock | generator CPU ms/unlock | peak PSS MiB |")
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        level = row.level
        lines.append(
            f"| {row.server} | {level.concurrency} | {level.unlocks} | {level.failures} "
            f"| {level.rate:.0f} | {1000 * level.p50:.1f} | {1000 * level.percentile(0.99):.1f} "
            f"| {1000 * max(level.latencies, default=float('nan')):.1f} "
            f"| {row.server_cpu_per_unlock_ms:.3f} | {row.generator_cpu_per_unlock_ms:.3f} "
            f"| {row.peak_pss / 2**20:.1f} |"
        )
    ratios = ["", "| conc. | throughput ours/upstream | p99 ours/upstream | PSS ours/upstream |",
              "|---|---|---|---|"]
    by_level: dict[int, dict[str, Row]] = {}
    for row in rows:
        by_level.setdefault(row.level.concurrency, {})[row.server] = row
    for concurrency, pair in sorted(by_level.items()):
        if {"ours", "upstream"} <= pair.keys():
            ours, theirs = pair["ours"], pair["upstream"]
            lines_ratio = (
                f"| {concurrency} | {ours.level.rate / max(theirs.level.rate, 1e-9):.1f}x "
                f"| {ours.level.percentile(0.99) / theirs.level.percentile(0.99):.4f} "
                f"| {ours.peak_pss / max(theirs.peak_pss, 1):.2f} |"
            )
            ratios.append(lines_ratio)
    return "\n".join(lines + ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer unlocks, under two minutes")
    parser.add_argument("--clients", type=int, default=64, help="configured clients (64)")
    parser.add_argument("--no-upstream", action="store_true", help="measure only our server")
    options = parser.parse_args(argv)
    # Unlocks per level: (ours, upstream).  Upstream collapses at 128, so it gets fewer there.
    plan = {1: (200, 40), 8: (2000, 200), 32: (4000, 300), 128: (4000, 256), 512: (4000, 0)}
    if options.quick:
        plan = {1: (100, 20), 8: (500, 100), 32: (1000, 160), 128: (1000, 128), 512: (1024, 0)}
    clients = make_clients(options.clients)
    rows: list[Row] = []
    servers = [("ours", our_server)]
    if not options.no_upstream:
        servers.append(("upstream", upstream_server))
    for name, start in servers:
        with start(clients) as (pid, port):
            for concurrency, counts in plan.items():
                unlocks = counts[0] if name == "ours" else counts[1]
                if unlocks:
                    print(f"{name}: {unlocks} unlocks at concurrency {concurrency} ...",
                          file=sys.stderr, flush=True)
                    rows.append(measure(name, pid, port, clients, concurrency, unlocks))
    table = format_table(rows)
    stamp = datetime.datetime.now(datetime.UTC)
    header = (f"# Reboot storm, {stamp:%Y-%m-%d %H:%M} UTC, {platform.node()}, "
              f"{os.cpu_count()} cores{' (quick)' if options.quick else ''}\n\n")
    print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"storm-{stamp:%Y%m%dT%H%M%S}{'-quick' if options.quick else ''}.md"
    out.write_text(header + table + "\n")
    print(f"\nwritten to {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
