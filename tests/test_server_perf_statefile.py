# SPDX-License-Identifier: GPL-3.0-or-later
"""The state file under load: a burst of unlocks is saved in a few batched writes, not one
write per unlock, and SIGTERM still saves the latest state (server/statefile.py explains the
trade-off).  Writes are counted with inotify: every atomic write ends in a rename onto
``clients.json``."""

from __future__ import annotations

import datetime
import json
import os
import time

from inotify_simple import INotify, flags

from peers.ours import OurServer, clients_conf, fetch
from peers.upstream import section_secret
from server.daemon import SAVE_DELAY
from tests.conftest import Keys

UNLOCKS = 40


def _renames_onto_state_file(watch: INotify) -> int:
    return sum(1 for event in watch.read(timeout=0) if event.name == "clients.json")


def test_a_burst_of_unlocks_causes_few_writes_and_sigterm_saves_the_last(keys: Keys) -> None:
    blob = section_secret(keys.foo_section)
    with OurServer(clients_conf(keys.foo_section)) as server, INotify() as watch:
        watch.add_watch(str(server.statedir), flags.MOVED_TO)
        started = time.monotonic()
        for _ in range(UNLOCKS):
            assert fetch(keys.foo, "127.0.0.1", server.port) == blob
        windows = (time.monotonic() - started) / SAVE_DELAY
        writes = _renames_onto_state_file(watch)
        # Guards against a write per unlock: a change schedules one write SAVE_DELAY later,
        # so there is at most one write per SAVE_DELAY window (and one that was already
        # scheduled).  A loaded machine makes the burst longer and the bound with it; it
        # stays far below UNLOCKS as long as an unlock takes less than SAVE_DELAY.
        assert writes <= windows + 2, (f"{writes} writes for {UNLOCKS} unlocks in"
                                       f" {windows:.1f} windows")

        # One more unlock, then SIGTERM at once: the pending write is not lost.
        before = datetime.datetime.now(datetime.UTC)
        assert fetch(keys.foo, "127.0.0.1", server.port) == blob
        assert server.stop() == 0
        saved = json.loads((server.statedir / "clients.json").read_text())
        sent = saved["clients"]["foo"]["state"]["last_secret_sent"]
        assert sent is not None
        assert datetime.datetime.fromisoformat(sent) >= before
        assert not [name for name in os.listdir(server.statedir) if name.endswith(".tmp")]
