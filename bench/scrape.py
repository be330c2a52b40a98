# SPDX-License-Identifier: GPL-3.0-or-later
"""A Prometheus-like scraper for the storm benchmark: GET ``/metrics`` every ``every`` seconds
(far more often than a real Prometheus is ever set to) while the storm runs, counting the
scrapes that failed and timing each one, so that ``./dev bench`` shows what scraping costs the
unlocks (p99 side by side with a server that is not scraped).

It runs in a process of its own (``python -m bench.scrape PORT EVERY``, until its standard
input closes, then one JSON line), as Prometheus would: a thread of the load generator would
take the generator's GIL and slow the simulated clients instead of the server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field

#: Seconds between the starts of two scrapes.
EVERY = 0.1


@dataclass
class ScrapeResult:
    scrapes: int = 0
    failures: int = 0
    latencies: list[float] = field(default_factory=list, repr=False)

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Scraper:
    """Scrapes ``http://127.0.0.1:PORT/metrics`` from another process between :meth:`start`
    and :meth:`stop`, which returns what it saw."""

    def __init__(self, port: int, every: float = EVERY) -> None:
        self.port = port
        self.every = every
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> Scraper:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.scrape", str(self.port), str(self.every)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        # Its start-up (an interpreter, urllib) must not fall into the measured storm.
        if self._process.stdout.readline() != "ready\n":
            raise RuntimeError("the scraper did not start")
        return self

    def stop(self) -> ScrapeResult:
        assert self._process is not None
        output, _ = self._process.communicate(timeout=30)
        return ScrapeResult(**json.loads(output))


def scrape(port: int, every: float, stop: threading.Event) -> ScrapeResult:
    """Scrape until ``stop`` is set.  A scrape fails on an error, a status other than 200 or
    a body without the secrets-sent counter."""
    url = f"http://127.0.0.1:{port}/metrics"
    result = ScrapeResult()
    while True:
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                ok = response.status == 200 and b"mandos_secrets_sent_total" in response.read()
        except OSError:
            ok = False
        elapsed = time.perf_counter() - started
        result.scrapes += 1
        if ok:
            result.latencies.append(elapsed)
        else:
            result.failures += 1
        if stop.wait(max(0.0, every - elapsed)):
            return result


def main() -> None:
    port, every = int(sys.argv[1]), float(sys.argv[2])
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    print("ready", flush=True)
    print(json.dumps(asdict(scrape(port, every, stop))))


if __name__ == "__main__":
    main()
