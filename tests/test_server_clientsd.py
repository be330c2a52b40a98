# SPDX-License-Identifier: GPL-3.0-or-later
"""clients.d/*.conf: read after clients.conf in name order, with clients.conf's [DEFAULT]; a
broken file keeps its previous contents on a reload; a client name, key_id or fingerprint
defined twice refuses the later file; reloaded on SIGHUP and, through inotify, whenever a file
there changes, without dropping an unlock.

The first half tests the loader (:func:`server.config.load_configuration`) on files; the
second half our real server process, with the journal sink or a real journald."""

from __future__ import annotations

import base64
import datetime
import json
import signal
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peers.dbus import PrivateSystemBus
from peers.journald import PrivateJournal
from peers.ours import REPO, SERVER, OurServer, clients_conf, fetch
from peers.upstream import MANDOS_CTL, KeySet, run_upstream_client, section_secret
from server.config import ConfigError, load_configuration, read_client_file
from tests.conftest import Keys

KEY_A, KEY_B, KEY_C = "A" * 64, "B" * 64, "C" * 64


def blob(name: str) -> bytes:
    return f"the blob of {name}".encode()


def section(name: str, key_id: str, secret: bytes | None = None, **options: str) -> str:
    encoded = base64.b64encode(blob(name) if secret is None else secret).decode()
    lines = [f"[{name}]", f"key_id = {key_id}", f"secret = {encoded}"]
    lines += [f"{key} = {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> Path:
    """Write ``text`` atomically, as configuration management does: a temporary name that the
    server ignores, then a rename into place."""
    path.parent.mkdir(exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.rename(path)
    return path


@pytest.fixture
def configdir(tmp_path: Path) -> Path:
    (tmp_path / "clients.conf").write_text("[DEFAULT]\ntimeout = PT1H\nchecker = /bin/true\n")
    return tmp_path


# --- the loader ------------------------------------------------------------------------------


def test_read_after_clients_conf_in_name_order(configdir: Path) -> None:
    """clients.conf's [DEFAULT] applies everywhere, a file's own [DEFAULT] only in that file;
    only *.conf names that do not start with a dot are read (links to files too)."""
    (configdir / "clients.conf").write_text(
        "[DEFAULT]\ntimeout = PT1H\ninterval = PT7M\n\n" + section("first", KEY_A))
    clientsd = configdir / "clients.d"
    write(clientsd / "b.conf", section("bee", KEY_B))
    write(clientsd / "a.conf", "[DEFAULT]\ninterval = PT3M\n\n" + section("ay", KEY_C))
    outside = configdir / "elsewhere.conf"
    outside.write_text(section("linked", "D" * 64))
    (clientsd / "c.conf").symlink_to(outside)
    for ignored in ("b.conf~", ".b.conf.swp", ".#b.conf", "4913", "b.conf.dpkg-old", "README"):
        (clientsd / ignored).write_text(section("ignored", "E" * 64))
    (clientsd / "d.conf").mkdir()

    clients = load_configuration(configdir).clients

    assert list(clients) == ["first", "ay", "bee", "linked"]
    assert clients["ay"].interval == datetime.timedelta(minutes=3)
    assert clients["bee"].interval == clients["first"].interval == datetime.timedelta(minutes=7)
    assert all(c.timeout == datetime.timedelta(hours=1) for c in clients.values())
    assert clients["linked"].secret == blob("linked")


def test_relative_secfile_is_relative_to_the_configuration_directory(configdir: Path) -> None:
    (configdir / "foo.blob").write_bytes(b"raw blob")
    write(configdir / "clients.d" / "foo.conf", f"[foo]\nkey_id = {KEY_A}\nsecfile = foo.blob\n")
    assert load_configuration(configdir).clients["foo"].secret == b"raw blob"


def test_absent_clients_d_is_no_clients_more(configdir: Path) -> None:
    (configdir / "clients.conf").write_text(section("foo", KEY_A))
    assert list(load_configuration(configdir).clients) == ["foo"]


def test_start_up_problems_are_errors_with_file_and_line(configdir: Path) -> None:
    """At start-up a broken file stops the server, as a broken clients.conf always did."""
    broken = write(configdir / "clients.d" / "foo.conf",
                   section("foo", KEY_A, interval="PT1H") + "timeout = soon\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:5: \[foo\] timeout: invalid duration"):
        load_configuration(configdir)
    write(broken, "[foo]\nkey_id = a\n  b\nsecret = AAAA\ngarbage\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:5: neither 'key = value'"):
        load_configuration(configdir)
    broken.write_bytes(b"[foo]\nkey_id = \xff\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:2: not UTF-8 text$"):
        load_configuration(configdir)


def test_a_value_from_clients_conf_defaults_is_found_there(configdir: Path) -> None:
    (configdir / "clients.conf").write_text("[DEFAULT]\n\ninterval = sometimes\n")
    path = write(configdir / "clients.d" / "foo.conf", section("foo", KEY_A))
    with pytest.raises(ConfigError) as caught:
        load_configuration(configdir)
    assert str(caught.value).startswith(
        f"{path}:1: [foo] interval (set in [DEFAULT] of {configdir / 'clients.conf'}:3): "
        "invalid duration 'sometimes'"), caught.value


@pytest.mark.parametrize(("later", "message"), [
    (section("foo", KEY_B), r"\[foo\]: .*clients.d/a.conf has a client of that name"),
    (section("bar", KEY_A.lower()), r"\[bar\] key_id: the same as \[foo\] in .*a.conf"),
    (f"[bar]\nfingerprint = {KEY_C}\nsecret = AAAA\n",
     r"\[bar\] fingerprint: the same as \[foo\] in .*a.conf"),
])
def test_duplicates_at_start_up(configdir: Path, later: str, message: str) -> None:
    write(configdir / "clients.d" / "a.conf", section("foo", KEY_A, fingerprint=KEY_C))
    path = write(configdir / "clients.d" / "b.conf", later)
    with pytest.raises(ConfigError, match=rf"^{path}: {message}$"):
        load_configuration(configdir)


def test_reload_keeps_a_broken_files_previous_contents(configdir: Path) -> None:
    clientsd = configdir / "clients.d"
    foo = write(clientsd / "foo.conf", section("foo", KEY_A))
    write(clientsd / "bar.conf", section("bar", KEY_B))
    first = load_configuration(configdir)

    write(foo, section("foo", KEY_A, interval="PT5M") + "timeout = soon\n")
    write(clientsd / "bar.conf", section("bar", KEY_B, interval="PT9M"))
    write(clientsd / "new.conf", "[new]\nkey_id = 00\n")  # no secret: refused, none before
    second = load_configuration(configdir, first)

    assert [(p.path.name, p.message.split(": ", 1)[0]) for p in second.problems] == [
        ("foo.conf", f"{foo}:5"), ("new.conf", f"{clientsd / 'new.conf'}:1")]
    assert second.problems[0].message.endswith("; refused, keeping its previous contents")
    assert second.problems[1].message.endswith("; refused, none of its clients are in force")
    clients = second.clients
    assert list(clients) == ["bar", "foo"]
    assert clients["foo"] == first.clients["foo"]
    assert clients["bar"].interval == datetime.timedelta(minutes=9)

    foo.unlink()  # a removed file takes its clients with it
    assert list(load_configuration(configdir, second).clients) == ["bar"]


def test_reload_refuses_the_later_duplicate(configdir: Path) -> None:
    clientsd = configdir / "clients.d"
    write(clientsd / "b.conf", section("foo", KEY_A))
    first = load_configuration(configdir)

    write(clientsd / "c.conf", section("foo", KEY_B))  # later: refused, b.conf stays
    second = load_configuration(configdir, first)
    assert [p.message for p in second.problems] == [
        f"{clientsd / 'c.conf'}: [foo]: {clientsd / 'b.conf'} has a client of that name; "
        "refused, none of its clients are in force"]
    assert second.clients["foo"].key_id == KEY_A

    # Earlier in name order: a.conf wins, and b.conf's contents, old and new, clash with it.
    write(clientsd / "a.conf", section("foo", KEY_C))
    third = load_configuration(configdir, second)
    assert [p.path.name for p in third.problems] == ["b.conf", "c.conf"]
    assert third.clients["foo"].key_id == KEY_C


def test_reload_with_clients_conf_broken_or_missing(configdir: Path) -> None:
    """clients.conf refused keeps its contents and its [DEFAULT]; clients.d changes apply."""
    conf = configdir / "clients.conf"
    conf.write_text("[DEFAULT]\ninterval = PT4M\n\n" + section("foo", KEY_A))
    write(configdir / "clients.d" / "bar.conf", section("bar", KEY_B))
    first = load_configuration(configdir)
    conf.write_text("[foo\n")
    write(configdir / "clients.d" / "bar.conf", section("bar", KEY_B, timeout="PT2M"))
    second = load_configuration(configdir, first)
    assert [p.path for p in second.problems] == [conf]
    assert second.clients["foo"] == first.clients["foo"]
    assert second.clients["bar"].interval == datetime.timedelta(minutes=4)
    assert second.clients["bar"].timeout == datetime.timedelta(minutes=2)
    conf.unlink()
    third = load_configuration(configdir, second)
    assert "is missing (to remove every client in it, leave it empty)" in \
        third.problems[0].message
    assert list(third.clients) == ["foo", "bar"]


def test_reload_of_clients_d_only_keeps_clients_conf_as_read(configdir: Path) -> None:
    (configdir / "clients.conf").write_text(section("foo", KEY_A))
    first = load_configuration(configdir)
    (configdir / "clients.conf").write_text("")
    write(configdir / "clients.d" / "bar.conf", section("bar", KEY_B))
    assert list(load_configuration(configdir, first, clients_conf=False).clients) == \
        ["foo", "bar"]
    assert list(load_configuration(configdir, first).clients) == ["bar"]


def test_a_change_in_clients_d_reads_only_the_files_that_changed(configdir: Path) -> None:
    """After a change in clients.d an unchanged file is not read again (its secfile neither),
    and an unchanged broken one is not reported again; SIGHUP reads and reports all."""
    clientsd = configdir / "clients.d"
    (configdir / "a.blob").write_bytes(b"first")
    write(clientsd / "a.conf", f"[a]\nkey_id = {KEY_A}\nsecfile = a.blob\n")
    first = load_configuration(configdir)
    (configdir / "a.blob").write_bytes(b"second")
    write(clientsd / "bad.conf", "[bad]\nkey_id = 00\n")
    second = load_configuration(configdir, first, clients_conf=False)
    assert [p.path.name for p in second.problems] == ["bad.conf"]
    assert second.clients["a"].secret == b"first"
    write(clientsd / "b.conf", section("b", KEY_B))
    third = load_configuration(configdir, second, clients_conf=False)
    assert third.problems == () and list(third.clients) == ["a", "b"]
    assert third.clients["a"].secret == b"first"
    fourth = load_configuration(configdir, third)
    assert [p.path.name for p in fourth.problems] == ["bad.conf"]
    assert fourth.clients["a"].secret == b"second"


#: What a generated file may hold: clients sharing names, key ids and fingerprints, values
#: that are refused, syntax errors, a [DEFAULT] with a bad value.
PIECES = (
    *(section(name, key) for name in ("x", "y") for key in (KEY_A, KEY_B)),
    section("z", KEY_C, fingerprint=KEY_A), f"[w]\nfingerprint = {KEY_A}\nsecret = AAAA\n",
    section("y", KEY_C, timeout="soon"), "[v]\nkey_id = 00\n", "garbage line\n",
    "[DEFAULT]\ninterval = PT9M\n", "[DEFAULT]\ninterval = never\n",
)
FILES = ("clients.conf", "clients.d/a.conf", "clients.d/b.conf", "clients.d/c.conf")
#: One reload's changes (for some files, new contents or None: removed), and whether it is a
#: SIGHUP's (else only clients.d is read, as after a change there).
steps = st.lists(st.tuples(st.dictionaries(st.sampled_from(FILES), st.one_of(
    st.none(), st.lists(st.sampled_from(PIECES), max_size=3).map("\n".join))),
    st.booleans()), min_size=1, max_size=6)


@pytest.mark.slow  # 10 s: not for the unit tier
def test_any_sequence_of_changes() -> None:
    """Files written, broken, removed, made to clash, reload after reload: a reload never
    raises; names, key ids and fingerprints stay unique; a file is in force with its new
    contents unless refused, then with its previous ones or not at all; a refusal is one
    line; clients.conf's [DEFAULT] reaches the files of clients.d."""
    reloads: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(steps)
    def check(changes: list[tuple[dict[str, str | None], bool]]) -> None:
        one_sequence(changes, reloads)

    check()
    print(f"400 sequences: {dict(reloads)}")
    assert reloads["clashes"] and reloads["refused files"] > reloads["clashes"]
    assert reloads["files reused unread"]


def one_sequence(changes: list[tuple[dict[str, str | None], bool]],
                 reloads: Counter[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="mandos-test-clientsd-") as name:
        configdir = Path(name)
        (configdir / "clients.conf").write_text(section("first", "D" * 64))
        configuration = load_configuration(configdir)
        for change, sighup in changes:
            for relative, text in change.items():
                path = configdir / relative
                if text is None:
                    path.unlink(missing_ok=True)
                else:
                    write(path, text)
            previous = {file.path: file for file in configuration.files}
            configuration = load_configuration(configdir, configuration, clients_conf=sighup)
            refused = {problem.path for problem in configuration.problems}
            refused |= set(configuration.unusable)  # said so before, unchanged since
            reloads["reloads"] += 1
            reloads["refused files"] += len(refused)
            reloads["clashes"] += sum("the same as" in p.message or "has a client" in p.message
                                      for p in configuration.problems)
            reloads["clients in force"] += len(configuration.clients)
            reloads["files reused unread"] += sum(
                not sighup and file is previous.get(file.path) and file.path not in refused
                for file in configuration.files[1:])
            assert all("\n" not in problem.message for problem in configuration.problems)
            in_force = [file.path for file in configuration.files]
            assert in_force[0] == configdir / "clients.conf"
            if not sighup:
                assert configuration.files[0] is previous[in_force[0]]
            assert in_force[1:] == sorted(in_force[1:])
            seen: set[tuple[str, str]] = set()
            for file in configuration.files:
                for client in file.clients.values():
                    for identity in (("name", client.name), ("key_id", client.key_id),
                                     ("fingerprint", client.fingerprint)):
                        assert identity[1] == "" or identity not in seen, (identity, file.path)
                        seen.add(identity)
                if file.path in refused:
                    assert file is previous[file.path]
                elif file.path.exists() and (sighup or file is not configuration.files[0]):
                    fresh = read_client_file(file.path, configdir, configuration.files[0])
                    assert file.clients == fresh.clients
            for relative in FILES[1:]:
                path = configdir / relative
                if path.exists() and path not in refused:
                    assert path in in_force
                if not path.exists():
                    assert path not in in_force


# --- our server ------------------------------------------------------------------------------


def keyed_section(name: str, keys: KeySet, secret: bytes | None = None, **options: str) -> str:
    return section(name, keys.key_id, secret, **options)


def test_a_dropped_file_is_served_without_sighup(keys: Keys) -> None:
    """Without clients.d at start; the directory made, a file dropped (inotify sees both);
    rewritten as editors do; removed (its client goes); the directory removed."""
    with OurServer(clients_conf(keyed_section("foo", keys.foo))) as server:
        assert server.journal is not None
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""
        clientsd = server.configdir / "clients.d"
        path = write(clientsd / "bar.conf", keyed_section("bar", keys.bar))
        loaded = server.journal.wait_for("config-loaded", count=2)[-1]
        assert "foo, bar" in loaded["MESSAGE"], loaded
        assert fetch(keys.bar, "127.0.0.1", server.port) == blob("bar")

        # vim: the old file renamed to a backup, the new one written, the backup removed.
        path.rename(clientsd / "bar.conf~")
        path.write_text(keyed_section("bar", keys.bar, approval_delay="PT1S"))
        (clientsd / "bar.conf~").unlink()
        server.journal.wait_for("config-loaded", count=3)
        # sed -i: a temporary file renamed over it.
        (clientsd / "sedX1b2c3").write_text(keyed_section("bar", keys.bar))
        (clientsd / "sedX1b2c3").rename(path)
        server.journal.wait_for("config-loaded", count=4)
        assert fetch(keys.bar, "127.0.0.1", server.port) == blob("bar")

        path.unlink()
        loaded = server.journal.wait_for("config-loaded", count=5)[-1]
        assert "1 clients (foo)" in loaded["MESSAGE"], loaded
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""
        write(path, keyed_section("bar", keys.bar))
        server.journal.wait_for("config-loaded", count=6)
        path.unlink()
        clientsd.rmdir()
        server.journal.wait_for("config-loaded", count=7)
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""
        assert fetch(keys.foo, "127.0.0.1", server.port) == blob("foo")
        assert not server.journal.find("config-reload-failed")
        assert server.stop() == 0


@pytest.mark.parametrize(("files", "message"), [
    ({"a.conf": "[foo]\nkey_id = 00\n"}, "a.conf:1: [foo] secret: missing"),
    ({"a.conf": section("foo", KEY_A), "b.conf": section("bar", KEY_A)},
     "b.conf: [bar] key_id: the same as [foo] in "),
])
def test_a_broken_file_stops_the_start_with_one_line(tmp_path: Path, files: dict[str, str],
                                                     message: str) -> None:
    for name, text in files.items():
        write(tmp_path / "clients.d" / name, text)
    result = subprocess.run(
        [*SERVER, f"--configdir={tmp_path}", f"--statedir={tmp_path}", "--no-zeroconf",
         "--port=0", f"--journal-socket={tmp_path / 'none'}"],
        capture_output=True, text=True, timeout=30, cwd=REPO, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"mandos-server: {tmp_path / 'clients.d'}/{message}"), \
        result.stderr


def test_sighup_reads_what_inotify_cannot_see(keys: Keys, tmp_path: Path) -> None:
    """A link in clients.d to a file elsewhere: a change there takes a SIGHUP, which reads
    clients.conf and clients.d again (clients.conf's [DEFAULT] applies to clients.d too)."""
    target = tmp_path / "bar.conf"
    target.write_text("")
    with OurServer(clients_conf(keyed_section("foo", keys.foo))) as server:
        assert server.journal is not None
        clientsd = server.configdir / "clients.d"
        clientsd.mkdir()
        (clientsd / "bar.conf").symlink_to(target)
        server.journal.wait_for("config-loaded", count=2)
        target.write_text(keyed_section("bar", keys.bar))
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""  # unseen
        server.write_clients(clients_conf(keyed_section("foo", keys.foo),
                                          defaults="checker = /bin/true\nenabled = no\n"))
        server.signal(signal.SIGHUP)
        loaded = server.journal.wait_for("config-loaded", count=3)[-1]
        assert "foo, bar" in loaded["MESSAGE"], loaded
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""  # disabled by the [DEFAULT]
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""
        server.write_clients(clients_conf(keyed_section("foo", keys.foo)))
        server.signal(signal.SIGHUP)
        server.journal.wait_for("config-loaded", count=4)
        assert fetch(keys.bar, "127.0.0.1", server.port) == blob("bar")
        assert server.stop() == 0


def test_a_broken_file_keeps_its_previous_contents(keys: Keys,
                                                   private_journal: PrivateJournal) -> None:
    """A real journald gets one err entry naming the file and the line; the file's clients
    stay as they were, another file's change applies."""
    clients = clients_conf(keyed_section("foo", keys.foo))
    server = OurServer(clients, extra_args=[f"--journal-socket={private_journal.socket_path}"])
    try:
        clientsd = server.configdir / "clients.d"
        bar = write(clientsd / "bar.conf", keyed_section("bar", keys.bar))
        server.start()
        private_journal.wait_for(MANDOS_EVENT="server-started")
        assert fetch(keys.bar, "127.0.0.1", server.port) == blob("bar")

        write(bar, keyed_section("bar", keys.bar) + "approval_delay = later\n")
        failed = private_journal.wait_for(MANDOS_EVENT="config-reload-failed")[0]
        assert failed["PRIORITY"] == "3"
        assert failed["MESSAGE"].startswith(f"{bar}:4: [bar] approval_delay: "), failed
        assert failed["MESSAGE"].endswith("; refused, keeping its previous contents"), failed
        assert fetch(keys.bar, "127.0.0.1", server.port) == blob("bar")

        write(bar, keyed_section("bar", keys.bar) + "approval_delay = soon\n")
        write(clientsd / "foo.conf", "")  # an empty file: no client, and nothing to refuse
        server.write_clients("")
        server.signal(signal.SIGHUP)  # clients.conf emptied: foo goes
        private_journal.wait_for(MANDOS_EVENT="config-reload-failed", count=2)
        private_journal.wait_for("--grep=^Reloaded ", MANDOS_EVENT="config-loaded")
        assert fetch(keys.foo, "127.0.0.1", server.port) == b""
        assert fetch(keys.bar, "127.0.0.1", server.port) == blob("bar")
        assert server.stop() == 0
    finally:
        server.close()


def test_duplicates_across_files_are_refused(keys: Keys) -> None:
    with OurServer(clients_conf(keyed_section("foo", keys.foo))) as server:
        assert server.journal is not None
        clientsd = server.configdir / "clients.d"
        write(clientsd / "foo.conf", keyed_section("foo", keys.bar))
        failed = server.journal.wait_for("config-reload-failed")[0]
        assert failed["MESSAGE"] == (
            f"{clientsd / 'foo.conf'}: [foo]: {server.configdir / 'clients.conf'} has a client "
            "of that name; refused, none of its clients are in force"), failed
        write(clientsd / "bar.conf", keyed_section("bar", keys.foo))
        _, bar, foo = server.journal.wait_for("config-reload-failed", count=3)
        assert bar["MESSAGE"] == (
            f"{clientsd / 'bar.conf'}: [bar] key_id: the same as [foo] in "
            f"{server.configdir / 'clients.conf'}; refused, none of its clients are in "
            "force"), bar
        assert foo["MESSAGE"].startswith(f"{clientsd / 'foo.conf'}: [foo]: "), foo
        assert not server.journal.find("config-loaded")[1:], "nothing changed"
        assert fetch(keys.foo, "127.0.0.1", server.port) == blob("foo")
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""
        assert server.stop() == 0


def test_a_client_removed_over_dbus_stays_away_until_its_file_changes(
        keys: Keys, private_bus: PrivateSystemBus) -> None:
    """RemoveClient (upstream's mandos-ctl --remove) lasts through a change of another file
    in clients.d; a change of the client's own file brings it back, as SIGHUP does."""

    def names() -> list[str]:
        result = subprocess.run([MANDOS_CTL, "-j"], env=private_bus.environment(),
                                capture_output=True, text=True, timeout=30, check=True)
        return sorted(json.loads(result.stdout))

    server = OurServer(clients_conf(keyed_section("foo", keys.foo)), use_dbus=True)
    try:
        clientsd = server.configdir / "clients.d"
        bar = write(clientsd / "bar.conf", keyed_section("bar", keys.bar))
        server.start(env={"DBUS_SYSTEM_BUS_ADDRESS": private_bus.address})
        assert server.journal is not None
        subprocess.run([MANDOS_CTL, "--remove", "bar"], env=private_bus.environment(),
                       timeout=30, check=True)
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""
        write(clientsd / "other.conf", section("other", KEY_A))
        server.journal.wait_for("config-loaded", count=2)
        assert names() == ["foo", "other"]
        assert fetch(keys.bar, "127.0.0.1", server.port) == b""
        write(bar, keyed_section("bar", keys.bar, interval="PT1H"))
        server.journal.wait_for("config-loaded", count=3)
        assert names() == ["bar", "foo", "other"]
        assert fetch(keys.bar, "127.0.0.1", server.port) == blob("bar")
        assert server.stop() == 0
    finally:
        server.close()


def test_unlocks_go_on_while_files_are_rewritten(keys: Keys, upstream_keys: KeySet) -> None:
    """Three clients unlock in a loop, each from its own thread, while their files are
    rewritten again and again (changed settings, the same contents, a fourth file coming and
    going, now and then a SIGHUP): every single request gets its blob.  Then upstream's
    mandos-client unlocks with the password inside foo's blob."""
    password_blob = section_secret(keys.foo_section)
    members = {"foo": (keys.foo, password_blob), "bar": (keys.bar, blob("bar")),
               "baz": (upstream_keys, blob("baz"))}
    rounds = 40
    with OurServer(clients_conf()) as server:
        assert server.journal is not None
        clientsd = server.configdir / "clients.d"

        def rewrite(number: int) -> None:
            for name, (keyset, secret) in members.items():
                options = {} if number % 3 == 0 else {"interval": f"{1 + number % 5}h",
                                                      "host": f"host{number}.example"}
                write(clientsd / f"{name}.conf", keyed_section(name, keyset, secret, **options))
            spare = clientsd / "spare.conf"
            if number % 2:
                spare.unlink()
            else:
                write(spare, section("spare", KEY_A))

        rewrite(0)
        server.signal(signal.SIGHUP)
        server.journal.wait_for("config-loaded", count=2)
        stop = threading.Event()
        results: dict[str, list[bytes]] = {name: [] for name in members}
        failures: list[str] = []

        def unlock(name: str, keyset: KeySet, expected: bytes) -> None:
            while not stop.is_set():
                try:
                    got = fetch(keyset, "127.0.0.1", server.port)
                except Exception as error:  # every failure counts
                    failures.append(f"{name}: {type(error).__name__}: {error}")
                    continue
                results[name].append(got)
                if got != expected:
                    failures.append(f"{name}: {len(got)} bytes, not its blob")

        threads = [threading.Thread(target=unlock, args=(name, keyset, secret))
                   for name, (keyset, secret) in members.items()]
        for thread in threads:
            thread.start()
        try:
            reloads = 2
            for number in range(1, rounds + 1):
                rewrite(number)
                if number % 10 == 0:
                    server.signal(signal.SIGHUP)
                reloads = len(server.journal.wait_for("config-loaded", count=reloads + 1))
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert failures == []
        counts = {name: len(got) for name, got in results.items()}
        assert all(counts.values()), counts
        # The server logs each secret-sent after the send: the last may still be on its way.
        sent = len(server.journal.wait_for("secret-sent", count=sum(counts.values())))
        assert sent == sum(counts.values()), (sent, counts)
        assert not server.journal.find("config-reload-failed")
        assert run_upstream_client(keys.foo, server.connect, 20).stdout == keys.password
        assert server.stop() == 0
    print(f"{sum(counts.values())} unlocks ({counts}) during {reloads} reloads, none lost")
