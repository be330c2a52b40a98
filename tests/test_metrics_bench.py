# SPDX-License-Identifier: GPL-3.0-or-later
"""The storm benchmark's scraped column still runs: our server with ``--metrics`` is scraped
all along a tiny storm, beside the same server not scraped (no timing is asserted: ``./dev
bench`` measures)."""

from __future__ import annotations

from bench import storm
from bench.loadgen import make_clients


def test_a_tiny_storm_scraped_all_along_unlocks_every_client() -> None:
    cells = storm.run_storm({4: (40, 0)}, make_clients(3), repeat=1, with_upstream=False,
                            with_scrape=True)
    assert [(cell.server, cell.unlocks, cell.failures) for cell in cells] == [
        ("ours", 40, 0), ("ours+scrape", 40, 0)]
    (row,) = cells[1].rows
    assert row.scrape is not None and row.scrape.scrapes >= 1 and row.scrape.failures == 0
    table = storm.format_table(cells)
    assert "| ours+scrape | 4 | 1 | 40 | 0 |" in table
    assert "beside the same server not scraped" in table
    assert f"| 0 | {row.scrape.scrapes} | 0 |" in table  # unlock failures, scrapes, failures
