# SPDX-License-Identifier: GPL-3.0-or-later
"""The race over servers found while it runs (password_agent/race.py with a ``Discover``): a
server found by Zeroconf is asked at once, while the browse goes on, and the end of the race
ends the browse at once."""

from __future__ import annotations

import select
import threading
from collections.abc import Callable, Iterator

from password_agent.errors import AgentError
from password_agent.fetch import Wait
from password_agent.race import race
from password_agent.servers import Server

FIRST = Server("fe80::1%2", 49901)
SECOND = Server("fe80::2%2", 49901)


def _wait(fd: int, seconds: float) -> None:
    select.select([fd], [], [], max(0.0, seconds))


def _fetch(blobs: dict[Server, bytes]) -> Callable[[Server, Wait], bytes]:
    def fetch(server: Server, wait: Wait) -> bytes:
        if server not in blobs:
            raise AgentError(f"cannot connect to {server}: Connection refused")
        return blobs[server]
    return fetch


class Browse:
    """A discovery that finds ``servers`` and then browses on (up to a minute) until the race
    stops it; records how it ended."""

    def __init__(self, *servers: Server, release: threading.Event | None = None,
                 later: tuple[Server, ...] = ()) -> None:
        self.servers, self.later, self.release = servers, later, release
        self.browsing = threading.Event()
        self.stopped_by_race: bool | None = None

    def __call__(self, stopped: Callable[[], bool], stop_fd: int) -> Iterator[Server]:
        yield from self.servers
        if self.release is not None:
            self.release.wait(60)
            yield from self.later
            return
        self.browsing.set()
        readable, _, _ = select.select([stop_fd], [], [], 60)
        self.stopped_by_race = bool(readable) and stopped()


def test_a_found_server_is_asked_while_the_browse_goes_on() -> None:
    browse = Browse(FIRST)
    outcomes = race(browse, _fetch({FIRST: b"blob"}), _wait, lambda: True)
    outcome = next(outcomes)
    assert (outcome.server, outcome.blob) == (FIRST, b"blob")
    assert browse.stopped_by_race is None, \
        "the first server's answer came only after the browse ended"
    assert browse.browsing.wait(10), "the browse did not go on after the first server"
    outcomes.close()
    assert browse.stopped_by_race is True, "closing the race did not stop the browse"


def test_a_server_found_later_joins_the_race() -> None:
    release = threading.Event()
    browse = Browse(FIRST, release=release, later=(SECOND,))
    outcomes = race(browse, _fetch({SECOND: b"blob"}), _wait, lambda: True)
    first = next(outcomes)
    assert first.server == FIRST and first.error is not None
    release.set()
    second = next(outcomes)
    assert (second.server, second.blob) == (SECOND, b"blob")
    assert list(outcomes) == [], "the race went on after every server answered and the " \
        "browse ended"


def test_a_browse_that_finds_nothing_ends_the_race() -> None:
    release = threading.Event()
    release.set()
    assert list(race(Browse(release=release), _fetch({}), _wait, lambda: True)) == []
