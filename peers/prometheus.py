# SPDX-License-Identifier: GPL-3.0-or-later
"""A real Prometheus (Debian's ``prometheus``) for one test, and its ``promtool``.

The server runs on loopback with its own configuration and TSDB in a temporary directory,
scraping the given targets every :data:`SCRAPE_INTERVAL`; :meth:`Prometheus.wait_for` asks its
HTTP query API until an expression has the wanted value (Prometheus says when it has scraped:
there is nothing to sleep for).  It is stopped by its pid and its directory removed, also when
the test fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from peers.process import StartStop, stop_process
from peers.upstream import free_port

PROMETHEUS = "prometheus"
PROMTOOL = "promtool"
SCRAPE_INTERVAL = "1s"
_START_TIMEOUT = 30.0

_CONFIG = """global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
rule_files: [{rules}]
scrape_configs:
  - job_name: mandos
    static_configs:
      - targets: [{targets}]
"""


def promtool(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``promtool`` with ``arguments`` (never raising on its exit status)."""
    return subprocess.run([PROMTOOL, *map(str, arguments)], capture_output=True, text=True,
                          timeout=60, check=False)


def promtool_check_metrics(exposition: bytes) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on an exposition (it reads standard input)."""
    return subprocess.run([PROMTOOL, "check", "metrics"], input=exposition.decode(),
                          capture_output=True, text=True, timeout=60, check=False)


class Prometheus(StartStop):
    """``prometheus`` scraping ``targets`` (``host:port``) on 127.0.0.1, evaluating the
    alerting rules in ``rule_files``."""

    def __init__(self, targets: Sequence[str], rule_files: Sequence[Path] = ()) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mandos-test-prometheus-"))
        self.targets = list(targets)
        self.rule_files = list(rule_files)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        config = self.directory / "prometheus.yml"
        config.write_text(_CONFIG.format(
            interval=SCRAPE_INTERVAL, targets=", ".join(f"'{t}'" for t in self.targets),
            rules=", ".join(f"'{path}'" for path in self.rule_files)))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}",
                 f"--storage.tsdb.path={self.directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}: {self.log()}")
            try:
                if self._get("/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in {_START_TIMEOUT:g} s: {self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def query(self, expression: str) -> list[dict[str, object]]:
        """The instant vector of ``expression`` now (``/api/v1/query``)."""
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode(
            {"query": expression}))
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(f"query {expression!r} failed ({status}): {answer}")
        result: list[dict[str, object]] = answer["data"]["result"]
        return result

    def value(self, expression: str) -> float | None:
        """The one sample of ``expression`` now, or None if it has none."""
        result = self.query(expression)
        if not result:
            return None
        if len(result) != 1:
            raise AssertionError(f"{expression!r} has {len(result)} series: {result}")
        sample = result[0]["value"]
        assert isinstance(sample, list)
        return float(sample[1])

    def wait_for(self, expression: str, wanted: float, timeout: float = 30.0) -> float:
        """Wait until ``expression`` has the value ``wanted`` (each scrape may bring it);
        AssertionError with the last value seen if it does not within ``timeout``."""
        deadline = time.monotonic() + timeout
        seen: float | None = None
        while True:
            seen = self.value(expression)
            if seen == wanted:
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression} is {seen}, not {wanted}, after "
                                     f"{timeout:g} s; targets: {self.targets_health()}")
            time.sleep(0.2)

    def firing(self) -> set[str]:
        """The names of the alerts firing now (``/api/v1/alerts``)."""
        status, body = self._get("/api/v1/alerts")
        assert status == 200, body
        return {alert["labels"]["alertname"] for alert in json.loads(body)["data"]["alerts"]
                if alert["state"] == "firing"}

    def wait_firing(self, alert: str, timeout: float = 30.0) -> None:
        """Wait until ``alert`` fires (the rules are evaluated every scrape interval)."""
        deadline = time.monotonic() + timeout
        while alert not in self.firing():
            if time.monotonic() > deadline:
                raise AssertionError(f"{alert} not firing after {timeout:g} s; firing: "
                                     f"{self.firing()}")
            time.sleep(0.2)

    def targets_health(self) -> list[tuple[object, object]]:
        """(scrape URL, health, last error) of each target, for failure messages."""
        status, body = self._get("/api/v1/targets")
        if status != 200:
            return []
        active = json.loads(body)["data"]["activeTargets"]
        return [(target["scrapeUrl"], (target["health"], target["lastError"]))
                for target in active]

    def stop(self) -> None:
        if self.process is not None:
            process, self.process = self.process, None
            stop_process(process, 10)
        shutil.rmtree(self.directory, ignore_errors=True)
