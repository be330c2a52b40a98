"""A Prometheus-like scraper for the storm benchmark: GET ``/metrics`` every ``every`` seconds
(ten times as often as a real Prometheus is ever set to) while the storm runs, counting the
scrapes that failed and timing each one, so that ``./dev bench`` shows what scraping costs the
unlocks (p99 side by side with a server that is not scraped)."""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field

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
    """Scrapes ``http://127.0.0.1:PORT/metrics`` in a thread from :meth:`start` to
    :meth:`stop`, which returns what it saw.  A scrape fails on an error, a status other than
    200 or a body without the secrets-sent counter."""

    def __init__(self, port: int, every: float = EVERY) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.every = every
        self.result = ScrapeResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper")

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> ScrapeResult:
        self._stop.set()
        self._thread.join()
        return self.result

    def _run(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    ok = response.status == 200 and b"mandos_secrets_sent_total" in \
                        response.read()
            except OSError:
                ok = False
            elapsed = time.perf_counter() - started
            self.result.scrapes += 1
            if ok:
                self.result.latencies.append(elapsed)
            else:
                self.result.failures += 1
            if self._stop.wait(max(0.0, self.every - elapsed)):
                return
