# SPDX-License-Identifier: GPL-3.0-or-later
"""The benchmark code still runs and checks what it measures (no timings are asserted here:
performance is measured by ``./dev bench``, not by tests)."""

from __future__ import annotations

from bench import roles, storm
from bench.loadgen import make_clients


def test_roles_runs_every_transport_and_reports_each_side() -> None:
    results = roles.measure(unlocks=10, runs=1)
    assert [r.transport for r in results] == ["unix socket pair", "loopback TCP", roles.WHOLE]
    for result in results:
        assert result.mandos_server_ms > 0 and result.mandos_client_ms > 0
    table = roles.format_table(results)
    assert table.count("\n") == 4 and roles.WHOLE in table


def test_a_tiny_storm_against_our_server_unlocks_every_client() -> None:
    clients = make_clients(3)
    cells = storm.run_storm({1: (6, 0), 4: (8, 0)}, clients, repeat=1, with_upstream=False)
    assert [(cell.server, cell.concurrency) for cell in cells] == [("ours", 1), ("ours", 4)]
    assert [cell.unlocks for cell in cells] == [6, 8]
    assert all(cell.failures == 0 for cell in cells)
    assert "| ours | 4 | 1 | 8 | 0 |" in storm.format_table(cells)


def test_the_floor_table_sets_our_cpu_against_both_floors() -> None:
    clients = make_clients(2)
    cells = storm.run_storm({1: (4, 0)}, clients, repeat=1, with_upstream=False)
    floors = [roles.RoleTimes("loopback TCP", 0.25, 0.2), roles.RoleTimes(roles.WHOLE, 0.5, 0.3)]
    table = storm.format_floors(cells, floors)
    rows = [line for line in table.splitlines() if line.startswith("| ours")]
    assert len(rows) == len([cell for cell in cells if cell.server.startswith("ours")]) >= 1
    cpu, over_bare, over_whole = (float(field) for field in rows[0].split("|")[3:6])
    assert abs(over_bare - cpu / 0.25) < 0.02 and abs(over_whole - cpu / 0.5) < 0.02
