# SPDX-License-Identifier: GPL-3.0-or-later
"""The reboot-storm benchmark: our server and Debian's upstream ``mandos``, side by side.

After a power cut a rack boots at once and every machine asks for its password in the same second.
This runs the same simulated clients (:mod:`bench.loadgen`) against both servers, on the same
machine, in one run, at several concurrency levels, and prints one table with the ratio
ours/upstream per row, and our server once more with ``--metrics`` and a scrape of ``/metrics``
every 100 ms during the storm (``ours+scrape``: what scraping costs the unlocks).  It then
measures the handshake alone per role (:mod:`bench.roles`: the floor under the
server-CPU-over-generator-CPU ratio) and the agent's latency (:mod:`bench.agent_latency`).
Results are written to ``bench/results/``.

    ./dev bench            # the full run
    ./dev bench --quick    # under two minutes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import platform
import statistics
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from bench import agent_latency, roles
from bench.loadgen import (
    LevelResult,
    SimulatedClient,
    clients_conf,
    make_clients,
    process_tree_cpu,
    process_tree_pss,
    run_level,
)
from bench.scrape import EVERY as SCRAPE_EVERY
from bench.scrape import Scraper, ScrapeResult
from bench.servers import our_server, upstream_server
from peers.upstream import free_port

RESULTS = Path(__file__).resolve().parent / "results"

#: Unlocks per concurrency level: (ours, upstream).  Upstream collapses at 128 (a listen
#: backlog of 5, a fork per connection), so it gets fewer there and none at 512.
FULL_PLAN = {1: (200, 40), 8: (2000, 200), 32: (4000, 300), 128: (4000, 256), 512: (4096, 0)}
QUICK_PLAN = {1: (100, 20), 8: (500, 100), 32: (1000, 160), 128: (1000, 128), 512: (1024, 0)}


@dataclass
class Row:
    """One server at one concurrency level, one run."""

    server: str
    level: LevelResult
    server_cpu: float
    peak_pss: int
    scrape: ScrapeResult | None = None

    @property
    def server_cpu_per_unlock_ms(self) -> float:
        return 1000 * self.server_cpu / max(1, self.level.unlocks)

    @property
    def generator_cpu_per_unlock_ms(self) -> float:
        return 1000 * self.level.generator_cpu / max(1, self.level.unlocks)


@dataclass
class Cell:
    """One server at one concurrency level: the medians over the runs (failures summed)."""

    server: str
    concurrency: int
    rows: list[Row]

    def median(self, value: Callable[[Row], float]) -> float:
        return statistics.median(value(row) for row in self.rows)

    @property
    def unlocks(self) -> int:
        return sum(row.level.unlocks for row in self.rows)

    @property
    def failures(self) -> int:
        return sum(row.level.failures for row in self.rows)

    @property
    def rate(self) -> float:
        return self.median(lambda row: row.level.rate)

    @property
    def p99(self) -> float:
        return self.median(lambda row: row.level.percentile(0.99))

    @property
    def pss(self) -> float:
        return self.median(lambda row: row.peak_pss)


def measure(name: str, pid: int, port: int, clients: list[SimulatedClient], concurrency: int,
            unlocks: int, metrics_port: int | None = None) -> Row:
    """One level against one server, with the server's CPU and peak PSS sampled alongside
    (and, with ``metrics_port``, /metrics scraped all along)."""
    peak = process_tree_pss(pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            peak = max(peak, process_tree_pss(pid))

    sampler = threading.Thread(target=sample)
    cpu_before = process_tree_cpu(pid)
    sampler.start()
    scraper = Scraper(metrics_port).start() if metrics_port else None
    try:
        level = run_level(("127.0.0.1", port), clients, concurrency, unlocks)
    finally:
        scrape = scraper.stop() if scraper else None
        stop.set()
        sampler.join()
    return Row(name, level, process_tree_cpu(pid) - cpu_before, peak, scrape)


def format_floors(cells: list[Cell], floors: list[roles.RoleTimes]) -> str:
    """Markdown: our server's CPU per unlock at each level over the two floors of
    :mod:`bench.roles` (the bare handshake over loopback TCP, and a whole blocking server's
    accept to close), measured in the same run."""
    by_transport = {floor.transport: floor.mandos_server_ms for floor in floors}
    bare, whole = by_transport["loopback TCP"], by_transport[roles.WHOLE]
    lines = ["| server | conc. | server CPU ms/unlock | over the bare handshake "
             f"({bare:.3f} ms) | over accept to close ({whole:.3f} ms) |", "|---|---|---|---|---|"]
    for cell in cells:
        if cell.server.startswith("ours"):
            cpu = cell.median(lambda row: row.server_cpu_per_unlock_ms)
            lines.append(f"| {cell.server} | {cell.concurrency} | {cpu:.3f} | {cpu / bare:.2f} "
                         f"| {cpu / whole:.2f} |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def format_table(cells: list[Cell]) -> str:
    """Markdown: the medians per server and level, then the ratios ours/upstream."""
    lines = ["| server | conc. | runs | unlocks | failures | unlocks/s | p50 ms | p99 ms "
             "| max ms | server CPU ms/unlock | generator CPU ms/unlock | peak PSS MiB |",
             "|" + "---|" * 12]
    for cell in cells:
        lines.append(
            f"| {cell.server} | {cell.concurrency} | {len(cell.rows)} | {cell.unlocks} "
            f"| {cell.failures} | {cell.rate:.0f} "
            f"| {_ms(cell.median(lambda row: row.level.p50))} | {_ms(cell.p99)} "
            f"| {_ms(cell.median(lambda row: max(row.level.latencies, default=float('nan'))))} "
            f"| {cell.median(lambda row: row.server_cpu_per_unlock_ms):.3f} "
            f"| {cell.median(lambda row: row.generator_cpu_per_unlock_ms):.3f} "
            f"| {cell.pss / 2**20:.1f} |")
    lines += ["", "| conc. | throughput ours/upstream | p99 ours/upstream | PSS ours/upstream "
              "| our server CPU / generator CPU |", "|---|---|---|---|---|"]
    by_level: dict[int, dict[str, Cell]] = {}
    for cell in cells:
        by_level.setdefault(cell.concurrency, {})[cell.server] = cell
    for concurrency, pair in sorted(by_level.items()):
        ours = pair.get("ours")
        if ours is None:
            continue
        efficiency = ours.median(lambda row: row.server_cpu / max(row.level.generator_cpu, 1e-9))
        theirs = pair.get("upstream")
        if theirs is None:
            lines.append(f"| {concurrency} | - | - | - | {efficiency:.2f} |")
            continue
        lines.append(f"| {concurrency} | {ours.rate / max(theirs.rate, 1e-9):.1f}x "
                     f"| {ours.p99 / theirs.p99:.4f} | {ours.pss / max(theirs.pss, 1):.2f} "
                     f"| {efficiency:.2f} |")
    scraped = [(pair["ours"], pair["ours+scrape"]) for _, pair in sorted(by_level.items())
               if "ours" in pair and "ours+scrape" in pair]
    if scraped:
        lines += ["", f"Our server scraped (GET /metrics every {SCRAPE_EVERY * 1000:.0f} ms) "
                  "during the storm, beside the same server not scraped:", "",
                  "| conc. | p99 ms | p99 ms scraped | p99 scraped/not | unlock failures "
                  "scraped | scrapes | scrape failures | scrape p99 ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for plain, with_scrape in scraped:
            scrapes = [row.scrape for row in with_scrape.rows if row.scrape is not None]
            latencies = [x for result in scrapes for x in result.latencies]
            lines.append(
                f"| {plain.concurrency} | {_ms(plain.p99)} | {_ms(with_scrape.p99)} "
                f"| {with_scrape.p99 / plain.p99:.3f} | {with_scrape.failures} "
                f"| {sum(result.scrapes for result in scrapes)} "
                f"| {sum(result.failures for result in scrapes)} "
                f"| {_ms(ScrapeResult(latencies=latencies).percentile(0.99))} |")
    return "\n".join(lines)


def run_storm(plan: dict[int, tuple[int, int]], clients: list[SimulatedClient], repeat: int,
              with_upstream: bool, with_scrape: bool = False) -> list[Cell]:
    """Every level of ``plan`` against each server, the whole plan ``repeat`` times (servers
    started afresh for each run), so that the medians smooth out a noisy machine.  With
    ``with_scrape``, our server once more, scraped (``ours+scrape``, as many unlocks): both of
    ours run at once and take turns at each level, so that a load on the machine that comes
    and goes hits them alike."""
    metrics_port = free_port() if with_scrape else None
    servers: list[tuple[str, Callable[[], AbstractContextManager[tuple[int, int]]]]] = [
        ("ours", lambda: our_server(clients_conf(clients)))]
    if with_scrape:
        servers.append(("ours+scrape", lambda: our_server(clients_conf(clients), metrics_port)))
    if with_upstream:
        sections = clients_conf(clients).split("\n\n", 1)[1]
        servers.append(("upstream", lambda: upstream_server(sections)))
    cells = {(name, level): Cell(name, level, []) for name, _ in servers for level in plan}
    # Our two take turns at each level; upstream runs alone, after them: the forks it leaves
    # behind when it collapses must not slow ours down.
    groups = [[entry for entry in servers if entry[0] != "upstream"],
              [entry for entry in servers if entry[0] == "upstream"]]
    for run, group in itertools.product(range(repeat), [group for group in groups if group]):
        with contextlib.ExitStack() as stack:
            started = {name: stack.enter_context(start()) for name, start in group}
            for concurrency, counts in plan.items():
                for name, (pid, port) in started.items():
                    unlocks = counts[1] if name == "upstream" else counts[0]
                    if unlocks:
                        print(f"run {run + 1}/{repeat} {name}: {unlocks} unlocks at "
                              f"concurrency {concurrency} ...", file=sys.stderr, flush=True)
                        cells[name, concurrency].rows.append(measure(
                            name, pid, port, clients, concurrency, unlocks,
                            metrics_port if name == "ours+scrape" else None))
    return [cell for cell in cells.values() if cell.rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer unlocks, under two minutes")
    parser.add_argument("--clients", type=int, default=64, help="configured clients (64)")
    parser.add_argument("--repeat", type=int, help="runs of the whole plan (3; quick: 1)")
    parser.add_argument("--agent-runs", type=int, help="agent latency runs per agent (7; "
                        "quick: 3; 0: skip)")
    parser.add_argument("--no-upstream", action="store_true", help="measure only our server")
    parser.add_argument("--no-scrape", action="store_true",
                        help="skip our server scraped during the storm (ours+scrape)")
    options = parser.parse_args(argv)
    repeat = options.repeat or (1 if options.quick else 3)
    agent_runs = options.agent_runs if options.agent_runs is not None else (
        3 if options.quick else 7)
    clients = make_clients(options.clients)
    cells = run_storm(QUICK_PLAN if options.quick else FULL_PLAN, clients, repeat,
                      not options.no_upstream, not options.no_scrape)
    report = format_table(cells)
    print("the handshake alone, per role ...", file=sys.stderr, flush=True)
    floors = roles.measure(500, 1) if options.quick else roles.measure()
    report += "\n\n" + roles.format_table(floors) + "\n\n" + format_floors(cells, floors)
    if agent_runs:
        print(f"agent latency: {agent_runs} runs per agent ...", file=sys.stderr, flush=True)
        report += "\n\n" + agent_latency.format_table(agent_latency.measure(agent_runs), "our")
    stamp = datetime.datetime.now(datetime.UTC)
    header = (f"# Reboot storm, {stamp:%Y-%m-%d %H:%M} UTC, {platform.node()}, "
              f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
              f"{options.clients} clients, {repeat} run(s), medians"
              f"{' (quick)' if options.quick else ''}\n\n")
    print(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"storm-{stamp:%Y%m%dT%H%M%S}{'-quick' if options.quick else ''}.md"
    out.write_text(header + report + "\n")
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
