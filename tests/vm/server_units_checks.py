# SPDX-License-Identifier: GPL-3.0-or-later
"""The checks that tests/vm/test_server_units.py runs inside its VM, where systemd is PID 1 and
runs our units/mandos.socket and units/mandos.service as shipped, and the booted system's
password agent units, units/mandos-password-agent.path and .service.

Run as root by ``mandos-vmtest.service`` (after ``mandos.socket``) with the path of a JSON
settings file.  It prints one line per check on the console, ``VMTEST <check> ok: <detail>``
or ``VMTEST <check> FAIL: <detail>``, in the order of :data:`CHECKS`, then ``VMTEST done``;
the test asserts on those lines.  The first request goes to the socket, so it is systemd that
starts the server.  The agent's checks ask with the real ``systemd-ask-password``, so it is the
``.path`` unit that starts the agent, which asks that server.  Standard library only (it runs
on the host's /usr/bin/python3 through 9p).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKS = (
    "sysusers",             # systemd-sysusers made _mandos from our sysusers file
    "client-password",      # upstream's mandos-client got the password via the socket
    "service-running",      # active/running, our STATUS= line, no restart; the socket running
    "main-process",         # runs as _mandos, only CAP_NET_RAW, no_new_privs, seccomp
    "bus-name",             # se.recompile.Mandos is owned by the main process, as _mandos
    "bus-policy",           # another user may neither own nor call it
    "journal-secret-sent",  # the secret-sent entry with our structured fields
    "checker-succeeded",    # the default checker (fping) succeeded inside the sandbox
    "ctl-ours",             # our mandos-ctl lists the client over the system bus
    "ctl-upstream",         # upstream's mandos-ctl too
    "agent-ordering",       # the agent's start waits for nothing that waits for local-fs.target
    "agent-exposure",       # systemd-analyze security rates the agent's sandbox at most 2.5
    "agent-password",       # systemd-ask-password got the password from our agent (.path unit)
    "agent-exited",         # the agent exited, Result=success, once nothing was pending
    "agent-journal",        # the agent logged its answer, and no sandbox denial
    "agent-run-directory",  # /run/mandos-password-agent holds only `answered`; no gpg-agent left
    "agent-record-key",     # `answered` holds one hash and no key; the key is in root's keyring
    "agent-secret-sent",    # the server's secret-sent entry for the agent's fetch
    "agent-not-twice",      # a second request with the same Id is left to the human
    "agent-confined",       # meanwhile the agent ran as root with no capability, under seccomp
    "reload",               # systemctl reload (ExecReload=, SIGHUP) re-reads clients.conf
    "watchdog",             # WATCHDOG=1 reaches systemd (WatchdogSec=)
    "stop-clean",           # systemctl stop: Result=success
    "fleet",                # with etcd = and mandos-server-etcd, it joins an etcd in the VM
    "state-file",           # /var/lib/mandos/clients.json: 0600, owned by _mandos
    "no-sandbox-denials",   # nothing the service logged looks like a sandbox denial
)
DONE = "VMTEST done"
UNIT = "mandos.service"
USER = "_mandos"
BUS_NAME = "se.recompile.Mandos"
AGENT_UNIT = "mandos-password-agent.service"
AGENT_PATH_UNIT = "mandos-password-agent.path"
#: The request the agent answers: a disk unlock, as systemd-cryptsetup asks.
ASK_ID = "cryptsetup:vmtest"
#: The agent unit's RuntimeDirectory=.
AGENT_RUN_DIRECTORY = Path("/run/mandos-password-agent")
#: The highest ``systemd-analyze security`` exposure allowed to the agent's unit (security
#: review, finding 9: it runs GnuTLS and gpg over what the network sends).
AGENT_MAX_EXPOSURE = 2.5
#: The first line of the record of answers sent (password_agent/answered.py), whose key is in
#: root's kernel keyring under the name ``mandos-password-agent:<path>``.
RECORD_HEADER = "# mandos-password-agent answered v2:"
#: The one capability the service keeps, for fping (units/mandos.service says why).
CAP_NET_RAW = 1 << 13
#: The etcd that check_fleet starts in the VM (Debian's etcd-server, from the host's root).
ETCD_URL = "http://127.0.0.1:2379"
ETCD_PEER_URL = "http://127.0.0.1:2380"
#: What a sandbox denial looks like in a log line (EPERM from the seccomp filter or a missing
#: capability, EACCES, a read-only file system, SIGSYS).
DENIAL = re.compile(r"Operation not permitted|Permission denied|Bad system call|SIGSYS|"
                    r"status=31|Read-only file system|EPERM|EACCES|EROFS|Traceback|core dump",
                    re.IGNORECASE)


class CheckFailed(Exception):
    """A check did not hold; the message says what was seen."""


def run(argv: list[str], *, timeout: float = 30.0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


def show(unit: str, *properties: str) -> dict[str, str]:
    output = run(["systemctl", "show", unit, *(f"--property={name}" for name in properties)])
    return dict(line.partition("=")[::2] for line in output.stdout.splitlines())


def journal(*matches: str) -> list[dict[str, Any]]:
    output = run(["journalctl", "--no-pager", "-o", "json", *matches]).stdout
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def poll(condition: Callable[[], Any], timeout: float) -> Any:
    """The first true value of ``condition()`` within ``timeout`` seconds, else the last."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def show_until(unit: str, properties: tuple[str, ...],
               predicate: Callable[[dict[str, str]], bool], timeout: float) -> dict[str, str]:
    """The unit's ``properties`` once ``predicate`` holds for them, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        state = show(unit, *properties)
        if predicate(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Checks:
    """One method per check, ``check_<name>``, returning what it saw; they run in the order of
    :data:`CHECKS` and the later ones use what the earlier found (the main PID)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.client: str = settings["client"]
        self.main_pid = 0
        self.watchdog_stamp = ""
        #: When the agent's request was made (CLOCK_REALTIME µs, as the journal's timestamps).
        self.asked_at = 0
        #: The agent's /proc status while it waited for the human (check_agent_not_twice).
        self.agent_status: dict[str, list[str]] = {}

    def user(self) -> pwd.struct_passwd:
        return pwd.getpwnam(USER)

    def check_sysusers(self) -> str:
        user = self.user()
        return f"{USER} is {user.pw_uid}:{user.pw_gid} ({user.pw_gecos}, {user.pw_dir})"

    def check_client_password(self) -> str:
        keys = Path(self.settings["keydir"])
        hooks = Path(tempfile.mkdtemp(prefix="hooks-"))
        try:
            result = run([self.settings["mandos_client"], f"--connect={self.settings['connect']}",
                          "--interface=none", f"--network-hook-dir={hooks}",
                          f"--pubkey={keys / 'pubkey.txt'}", f"--seckey={keys / 'seckey.txt'}",
                          f"--tls-pubkey={keys / 'tls-pubkey.pem'}",
                          f"--tls-privkey={keys / 'tls-privkey.pem'}"], timeout=60)
        finally:
            shutil.rmtree(hooks, ignore_errors=True)
        expected = Path(self.settings["password_file"]).read_text()
        require(result.returncode == 0 and result.stdout == expected,
                f"mandos-client exited {result.returncode}, "
                f"{'right' if result.stdout == expected else 'wrong'} password; "
                f"stderr: {result.stderr[-500:]!r}")
        return f"{len(expected)}-byte password matches"

    def check_service_running(self) -> str:
        wanted = f"last secret sent to {self.client}"
        properties = ("ActiveState", "SubState", "MainPID", "StatusText", "NRestarts", "Result",
                      "WatchdogTimestampMonotonic")
        state = show_until(UNIT, properties, lambda s: wanted in s.get("StatusText", ""), 15)
        socket = show("mandos.socket", "ActiveState", "SubState")
        require(state.get("ActiveState") == "active" and state.get("SubState") == "running"
                and state.get("NRestarts") == "0" and state.get("Result") == "success"
                and wanted in state.get("StatusText", ""), f"{UNIT}: {state}")
        require(socket == {"ActiveState": "active", "SubState": "running"},
                f"mandos.socket: {socket}")
        self.main_pid = int(state["MainPID"])
        self.watchdog_stamp = state["WatchdogTimestampMonotonic"]
        return f"StatusText={state['StatusText']}; MainPID={self.main_pid}"

    def check_main_process(self) -> str:
        require(self.main_pid > 0, "no main process")
        fields = process_status(self.main_pid)
        user = self.user()
        require(fields["Uid"] == [str(user.pw_uid)] * 4 and fields["Gid"] == [str(user.pw_gid)] * 4,
                f"runs as {fields['Uid']}:{fields['Gid']}, not {USER}")
        require(all(int(fields[name][0], 16) & ~CAP_NET_RAW == 0
                    for name in ("CapEff", "CapPrm", "CapBnd")),
                f"has capabilities beyond CAP_NET_RAW: {fields}")
        require(fields["NoNewPrivs"] == ["1"] and fields["Seccomp"] == ["2"],
                f"not confined: {fields}")
        command = Path(f"/proc/{self.main_pid}/cmdline").read_bytes().replace(b"\0", b" ")
        return (f"{USER}, capabilities {fields['CapEff'][0]} (bounding {fields['CapBnd'][0]}), "
                f"no_new_privs, seccomp filter: {command.decode()}")

    def bus_call(self, method: str) -> str:
        result = run(["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                      "/org/freedesktop/DBus", f"org.freedesktop.DBus.{method}",
                      f"string:{BUS_NAME}"])
        match = re.search(r"uint32 (\d+)", result.stdout)
        require(match is not None, f"{method}: {result.stdout}{result.stderr}")
        assert match is not None
        return match.group(1)

    def check_bus_name(self) -> str:
        uid = self.bus_call("GetConnectionUnixUser")
        pid = self.bus_call("GetConnectionUnixProcessID")
        require(uid == str(self.user().pw_uid) and pid == str(self.main_pid),
                f"{BUS_NAME} is owned by uid {uid}, pid {pid}")
        return f"owned by pid {pid}, uid {uid}"

    def check_bus_policy(self) -> str:
        calls = ((BUS_NAME, "/", "org.freedesktop.DBus.Peer.Ping"),
                 ("org.freedesktop.DBus", "/org/freedesktop/DBus",
                  "org.freedesktop.DBus.RequestName", f"string:{BUS_NAME}", "uint32:0"))
        for destination, path, method, *arguments in calls:
            result = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "dbus-send", "--system", "--print-reply", f"--dest={destination}",
                          path, method, *arguments])
            require(result.returncode != 0 and "AccessDenied" in result.stderr,
                    f"nobody's {method}: exit {result.returncode}: "
                    f"{result.stdout}{result.stderr}")
        return "nobody is denied Ping and RequestName"

    def check_journal_secret_sent(self) -> str:
        entries = poll(lambda: journal("MANDOS_EVENT=secret-sent"), 10)
        key_id = self.settings["key_id"].upper()
        wanted = [entry for entry in entries
                  if entry.get("MANDOS_CLIENT") == self.client
                  and str(entry.get("MANDOS_KEY_ID", "")).upper() == key_id
                  and entry.get("MESSAGE_ID") == self.settings["secret_sent_id"]
                  and entry.get("_SYSTEMD_UNIT") == UNIT
                  and entry.get("_UID") == str(self.user().pw_uid)]
        require(len(wanted) == 1, f"secret-sent entries: {entries}")
        entry = wanted[0]
        return (f"MESSAGE={entry.get('MESSAGE')!r} MANDOS_PEER={entry.get('MANDOS_PEER')} "
                f"MESSAGE_ID={entry['MESSAGE_ID']}")

    def check_checker_succeeded(self) -> str:
        succeeded = poll(lambda: journal("MANDOS_EVENT=checker-succeeded",
                                         f"MANDOS_CLIENT={self.client}"), 30)
        failed = [entry.get("MESSAGE") for entry in
                  journal("MANDOS_EVENT=checker-failed", f"MANDOS_CLIENT={self.client}")]
        require(bool(succeeded) and not failed,
                f"succeeded {len(succeeded)} times; failures: {failed}")
        return f"{succeeded[0].get('MESSAGE')!r} ({succeeded[0].get('MANDOS_COMMAND')})"

    def listing(self, argv: list[str]) -> str:
        result = run(argv)
        lines = result.stdout.splitlines()
        require(result.returncode == 0 and len(lines) == 2
                and lines[1].split()[:2] == [self.client, "Yes"],
                f"{' '.join(argv)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return " | ".join(" ".join(line.split()) for line in lines)

    def check_ctl_ours(self) -> str:
        return self.listing(["/usr/bin/mandos-ctl"])

    def check_ctl_upstream(self) -> str:
        return self.listing([self.settings["mandos_ctl"]])

    def ask(self, timeout: int) -> subprocess.CompletedProcess[str]:
        """The request of :func:`ask_argv`, waited for."""
        return run(ask_argv(timeout), timeout=timeout + 10)

    def agent_state(self) -> dict[str, str]:
        """The agent service's state once it is no longer running (or after 20 s)."""
        return show_until(AGENT_UNIT, ("ActiveState", "SubState", "Result", "ExecMainCode",
                                       "ExecMainStatus"),
                          lambda s: s.get("ActiveState") in ("inactive", "failed"), 20)

    def check_agent_ordering(self) -> str:
        """What systemd makes of the unit, implicit dependencies included: a volume that
        local-fs.target waits for is unlocked at boot, so the agent must be able to start
        before it (PrivateTmp= once made it wait for systemd-tmpfiles-setup.service)."""
        result = run(["systemctl", "list-dependencies", "--after", "--all", "--plain",
                      "--no-pager", AGENT_UNIT])
        closure = {line.split()[-1] for line in result.stdout.splitlines()[1:] if line.strip()}
        blocking = sorted(closure & {"local-fs.target", "systemd-tmpfiles-setup.service",
                                     "sysinit.target", "basic.target"})
        require(result.returncode == 0 and bool(closure) and not blocking,
                f"{AGENT_UNIT} starts after {blocking or result.stderr.strip()}")
        after = show(AGENT_UNIT, "After")["After"]
        return f"After={after}; {len(closure)} units before it, none waits for local-fs.target"

    def check_agent_exposure(self) -> str:
        """The unit as systemd loaded it (the test's drop-in included) rated by systemd's
        own scale, the one the server's unit is held to offline."""
        result = run(["systemd-analyze", "security", "--no-pager", AGENT_UNIT], timeout=60)
        match = re.search(rf"Overall exposure level for {re.escape(AGENT_UNIT)}: "
                          r"(\d+\.\d+)", result.stdout)
        require(result.returncode == 0 and match is not None
                and float(match.group(1)) <= AGENT_MAX_EXPOSURE,
                f"systemd-analyze security exited {result.returncode}: "
                f"{result.stdout[-2000:]}{result.stderr[-500:]}")
        assert match is not None
        exposed = [" ".join(line.split()) for line in result.stdout.splitlines()
                   if line.startswith("\N{BALLOT X}")]
        return f"exposure {match.group(1)} (at most {AGENT_MAX_EXPOSURE}); open: {exposed}"

    def check_agent_password(self) -> str:
        path_unit = show(AGENT_PATH_UNIT, "ActiveState", "SubState", "WantedBy")
        require(path_unit.get("ActiveState") == "active" and path_unit.get("SubState")
                == "waiting" and "sysinit.target" in path_unit.get("WantedBy", "").split(),
                f"{AGENT_PATH_UNIT} before the request: {path_unit}")
        before = show(AGENT_UNIT, "ActiveState", "ExecMainStartTimestampMonotonic")
        require(before == {"ActiveState": "inactive", "ExecMainStartTimestampMonotonic": "0"},
                f"{AGENT_UNIT} before the request: {before}")
        self.asked_at = time.time_ns() // 1000
        start = time.monotonic()
        result = self.ask(60)
        seconds = time.monotonic() - start
        expected = Path(self.settings["password_file"]).read_text() + "\n"
        started = show(AGENT_UNIT, "ExecMainStartTimestampMonotonic")
        require(result.returncode == 0 and result.stdout == expected,
                f"systemd-ask-password exited {result.returncode} after {seconds:.1f} s, "
                f"{'right' if result.stdout == expected else 'wrong'} password; "
                f"stderr: {result.stderr[-500:]!r}")
        require(started.get("ExecMainStartTimestampMonotonic", "0") != "0",
                f"{AGENT_UNIT} never started: {started}")
        return (f"{len(expected) - 1}-byte password matches, answered in {seconds:.1f} s; "
                f"{AGENT_PATH_UNIT} was active/waiting, WantedBy={path_unit['WantedBy']}")

    def check_agent_exited(self) -> str:
        state = self.agent_state()
        path_unit = show_until(AGENT_PATH_UNIT, ("ActiveState", "SubState"),
                               lambda s: s.get("SubState") == "waiting", 5)
        # Its own entries name each run: exactly one (no restart loop while the file was there).
        runs = {entry.get("_SYSTEMD_INVOCATION_ID")
                for entry in journal(f"_SYSTEMD_UNIT={AGENT_UNIT}")}
        require(state == {"ActiveState": "inactive", "SubState": "dead", "Result": "success",
                          "ExecMainCode": "1", "ExecMainStatus": "0"},
                f"{AGENT_UNIT}: {state}")
        require(path_unit == {"ActiveState": "active", "SubState": "waiting"},
                f"{AGENT_PATH_UNIT} after the answer: {path_unit}")
        require(len(runs) == 1, f"{AGENT_UNIT} ran {len(runs)} times")
        return (", ".join(f"{key}={value}" for key, value in state.items())
                + f"; {AGENT_PATH_UNIT} {path_unit['ActiveState']}/{path_unit['SubState']}")

    def check_agent_journal(self) -> str:
        entries = journal(f"--unit={AGENT_UNIT}")
        messages = [str(entry.get("MESSAGE")) for entry in entries]
        answered = [message for message in messages
                    if re.search(rf"answered ask\.\S+ \(Id {re.escape(ASK_ID)}\)", message)]
        denials = [message for message in messages if DENIAL.search(message)]
        warnings = [str(entry.get("MESSAGE")) for entry in entries
                    if int(entry.get("PRIORITY", 6)) <= 4]
        require(len(answered) == 1 and not denials,
                f"answers logged: {answered}; denials: {denials}; journal: {messages}")
        return f"{answered[0]!r}; {len(warnings)} warnings, none a denial: {warnings[:5]}"

    def check_agent_run_directory(self) -> str:
        directory = AGENT_RUN_DIRECTORY
        names = sorted(path.name for path in directory.iterdir())
        answered = directory / "answered"
        modes = {path: stat.S_IMODE(path.stat().st_mode) for path in (directory, answered)
                 if path.exists()}
        password = Path(self.settings["password_file"]).read_text()
        require(names == ["answered"] and modes == {directory: 0o700, answered: 0o600},
                f"{directory}: {names}, modes {modes}")
        require(password not in answered.read_text(), f"{answered} holds the password")
        gpg_agents = [f"{process.name}: {(process / 'cmdline').read_bytes()!r}"
                      for process in Path("/proc").iterdir() if process.name.isdigit()
                      and _comm(process) == "gpg-agent"]
        require(not gpg_agents, f"gpg-agent left running: {gpg_agents}")
        return f"{directory} (0700) holds only answered (0600, no password); no gpg-agent"

    def check_agent_record_key(self) -> str:
        """The record holds the hash of the one answer and no key (finding 7 of the security
        review): the key is in root's user keyring, which the sandboxed agent could reach."""
        answered = AGENT_RUN_DIRECTORY / "answered"
        lines = answered.read_text().splitlines()
        digests = [line for line in lines[1:] if re.fullmatch(r"[0-9a-f]{64}", line)]
        require(lines[:1] != [] and lines[0].startswith(RECORD_HEADER)
                and len(digests) == 1 == len(lines) - 1 and "key=" not in "".join(lines),
                f"{answered}: {lines}")
        description = f"mandos-password-agent:{answered}"
        keys = [line.split() for line in Path("/proc/keys").read_text().splitlines()
                if line.endswith(f" {description}: 32")]
        # serial flags usage expiry permissions uid gid type description: size
        require(len(keys) == 1 and keys[0][4:8] == ["3f010000", "0", "0", "user"],
                f"keys named {description}: {keys}")
        return (f"{answered}: header and {len(digests)} hash, no key; key {keys[0][0]} in "
                f"root's keyring, expires in {keys[0][3]}, permissions {keys[0][4]}")

    def check_agent_secret_sent(self) -> str:
        def sent() -> list[dict[str, Any]]:
            return [entry for entry in journal("MANDOS_EVENT=secret-sent",
                                               f"MANDOS_CLIENT={self.client}")
                    if int(entry["__REALTIME_TIMESTAMP"]) >= self.asked_at]

        entries = poll(sent, 10)
        require(len(entries) == 1 and entries[0].get("_SYSTEMD_UNIT") == UNIT,
                f"secret-sent entries since the request: {entries}")
        entry = entries[0]
        return f"MESSAGE={entry.get('MESSAGE')!r} MANDOS_PEER={entry.get('MANDOS_PEER')}"

    def check_agent_not_twice(self) -> str:
        """A second request with the same Id: the agent fetches and decrypts, then leaves it
        to the human.  Once it said so, the requester gives up (SIGTERM: systemd-ask-password
        removes its request), with no password; what the agent's process was meanwhile is
        kept for :meth:`check_agent_confined`."""
        since = time.time_ns() // 1000
        start = time.monotonic()

        def refused() -> list[str]:
            return [str(entry.get("MESSAGE")) for entry in journal(f"_SYSTEMD_UNIT={AGENT_UNIT}")
                    if int(entry["__REALTIME_TIMESTAMP"]) >= since
                    and f"already sent for Id {ASK_ID}" in str(entry.get("MESSAGE"))]

        # Up to 60 s: started by the .path unit under TCG on a loaded host, the agent took
        # over 10 s to reach its refusal (start, fetch, decryption) while the request lasted.
        with subprocess.Popen(ask_argv(60), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as asking:
            try:
                messages = poll(refused, 60)
                seconds = time.monotonic() - start
                pid = int(show(AGENT_UNIT, "MainPID").get("MainPID", "0"))
                with contextlib.suppress(OSError, ValueError):
                    self.agent_status = process_status(pid)
                asking.terminate()
                stdout, stderr = asking.communicate(timeout=20)
            finally:
                if asking.poll() is None:
                    asking.kill()
        state = self.agent_state()
        require(len(messages) == 1, f"refusals logged: {messages}")
        require(asking.returncode != 0 and stdout == "",
                f"systemd-ask-password exited {asking.returncode} with "
                f"{'a' if stdout else 'no'} password; stderr: {stderr[-300:]!r}")
        require(state.get("ActiveState") == "inactive" and state.get("Result") == "success",
                f"{AGENT_UNIT} after the second request: {state}")
        return (f"refused after {seconds:.1f} s: {messages[0]!r}; systemd-ask-password, "
                f"stopped then, got no password (exit {asking.returncode}, "
                f"{stderr.strip()!r}); the agent exited with Result={state['Result']}")

    def check_agent_confined(self) -> str:
        """The sandboxed agent as it waited for the second request to go: root (its keys and
        the requests are root's) without a single capability, no_new_privs, seccomp."""
        fields = self.agent_status
        require(bool(fields), "the agent's process was not seen while the request waited")
        require(fields["Uid"] == ["0"] * 4, f"runs as {fields['Uid']}")
        require(all(int(fields[name][0], 16) == 0
                    for name in ("CapEff", "CapPrm", "CapBnd", "CapAmb")),
                f"has capabilities: {fields}")
        require(fields["NoNewPrivs"] == ["1"] and fields["Seccomp"] == ["2"],
                f"not confined: {fields}")
        return (f"root, capabilities {fields['CapEff'][0]} (bounding {fields['CapBnd'][0]}), "
                "no_new_privs, seccomp filter")

    def check_reload(self) -> str:
        def reloaded() -> list[dict[str, Any]]:
            return [entry for entry in journal("MANDOS_EVENT=config-loaded", f"--unit={UNIT}")
                    if str(entry.get("MESSAGE")).startswith("Reloaded ")]

        result = run(["systemctl", "reload", UNIT])
        entries = poll(reloaded, 10)
        state = show(UNIT, "ActiveState", "SubState", "MainPID")
        require(result.returncode == 0 and len(entries) == 1 and state == {
            "ActiveState": "active", "SubState": "running", "MainPID": str(self.main_pid)},
            f"systemctl reload exited {result.returncode} ({result.stderr.strip()}); "
            f"{len(entries)} reloads logged; {state}")
        return str(entries[0].get("MESSAGE"))

    def check_watchdog(self) -> str:
        """A WATCHDOG=1 after the one systemd noted at start-up (the server pings every
        WatchdogSec/2, 15 s)."""
        properties = ("WatchdogUSec", "WatchdogTimestampMonotonic")

        def pinged(state: dict[str, str]) -> bool:
            return state.get("WatchdogTimestampMonotonic") not in ("", "0", self.watchdog_stamp)

        state = show_until(UNIT, properties, pinged, 25)
        require(state.get("WatchdogUSec") == "30s" and pinged(state),
                f"no watchdog ping since {self.watchdog_stamp}: {state}")
        since = (int(state["WatchdogTimestampMonotonic"]) - int(self.watchdog_stamp)) / 1e6
        return f"WatchdogUSec={state['WatchdogUSec']}; a ping {since:.1f} s after the first seen"

    def check_stop_clean(self) -> str:
        result = run(["systemctl", "stop", UNIT])
        state = show(UNIT, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        require(result.returncode == 0 and state == {
            "ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0",
            "NRestarts": "0"}, f"systemctl stop exited {result.returncode}: {state}")
        return ", ".join(f"{key}={value}" for key, value in state.items())

    def etcdctl(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return run(["etcdctl", f"--endpoints={ETCD_URL}", *arguments],
                   env={**os.environ, "ETCDCTL_API": "3"})

    def check_fleet(self) -> str:
        """The fleet's etcd client (grpcio, compiled) under the unit's sandbox: with
        mandos-server-etcd installed and ``etcd =`` in mandos.conf, the server joins an etcd
        started in the VM and registers there.  Its unit is stopped again afterwards."""
        data = Path(tempfile.mkdtemp(prefix="etcd-", dir="/var/tmp"))
        conf = Path("/etc/mandos/mandos.conf")
        original = conf.read_text()
        try:
            started = run(["systemd-run", "--unit=vmtest-etcd", "/usr/bin/etcd", "--name=vm",
                           f"--data-dir={data}", f"--listen-client-urls={ETCD_URL}",
                           f"--advertise-client-urls={ETCD_URL}",
                           f"--listen-peer-urls={ETCD_PEER_URL}",
                           f"--initial-advertise-peer-urls={ETCD_PEER_URL}",
                           f"--initial-cluster=vm={ETCD_PEER_URL}"])
            require(started.returncode == 0, f"systemd-run etcd: {started.stderr.strip()}")
            healthy = poll(lambda: self.etcdctl("endpoint", "health").returncode == 0, 60)
            require(healthy, "etcd not healthy: " + " | ".join(
                str(entry.get("MESSAGE")) for entry in journal("--unit=vmtest-etcd")[-5:]))
            conf.write_text(f"{original}etcd = {ETCD_URL}\n")
            since = time.time_ns() // 1000

            def in_sync() -> list[str]:
                return [str(entry.get("MESSAGE")) for entry in
                        journal("MANDOS_EVENT=fleet", f"_SYSTEMD_UNIT={UNIT}")
                        if int(entry["__REALTIME_TIMESTAMP"]) >= since
                        and "in sync with etcd" in str(entry.get("MESSAGE"))]

            result = run(["systemctl", "start", UNIT], timeout=90)
            synced = poll(in_sync, 60)
            servers = self.etcdctl("get", "--prefix", "--keys-only", "/mandos/servers/")
            keys = servers.stdout.split()
            state = show(UNIT, "ActiveState", "SubState", "StatusText")
            require(result.returncode == 0 and len(synced) == 1 and len(keys) == 1,
                    f"systemctl start exited {result.returncode} ({result.stderr.strip()}); "
                    f"{state}; in sync: {synced}; servers in etcd: {keys} "
                    f"{servers.stderr.strip()}")
            return f"{synced[0]!r}; in etcd: {keys[0]}; StatusText={state.get('StatusText')}"
        finally:
            run(["systemctl", "stop", UNIT])
            conf.write_text(original)
            run(["systemctl", "stop", "vmtest-etcd"])
            shutil.rmtree(data, ignore_errors=True)

    def check_state_file(self) -> str:
        user = self.user()
        directory = Path("/var/lib/mandos")
        state = directory / "clients.json"
        found = []
        for path, mode in ((directory, 0o700), (state, 0o600)):
            info = path.stat()
            found.append(f"{path} {stat.S_IMODE(info.st_mode):04o} {info.st_uid}:{info.st_gid}")
            require(stat.S_IMODE(info.st_mode) == mode and info.st_uid == user.pw_uid,
                    f"{found[-1]}, wanted {mode:04o} owned by {USER} ({user.pw_uid})")
        require(self.client in state.read_text(), f"{state} does not name {self.client}")
        return "; ".join(found)

    def check_no_sandbox_denials(self) -> str:
        entries = journal(f"--unit={UNIT}")
        warnings = [str(entry.get("MESSAGE")) for entry in entries
                    if int(entry.get("PRIORITY", 6)) <= 4]
        kernel = [str(entry.get("MESSAGE")) for entry in journal("--dmesg")
                  if re.search(r"audit.*(type=1326|seccomp)|apparmor=\"DENIED\"",
                               str(entry.get("MESSAGE")))]
        # Everything the unit logged: a traceback on stderr is not a warning.
        denials = [str(entry.get("MESSAGE")) for entry in entries
                   if DENIAL.search(str(entry.get("MESSAGE")))] + kernel
        require(not denials, f"denials: {denials}")
        return f"{len(warnings)} warnings, none a denial: {warnings[:5]}"


def ask_argv(timeout: int) -> list[str]:
    """A disk-unlock request through the agent directory, as systemd-cryptsetup makes it
    (``--no-tty``: never the terminal; stdin is not one anyway)."""
    return ["systemd-ask-password", "--no-tty", f"--id={ASK_ID}", f"--timeout={timeout}",
            "Passphrase:"]


def process_status(pid: int) -> dict[str, list[str]]:
    """What confines process ``pid``: its ids, capability sets, no_new_privs and seccomp mode
    (/proc/PID/status)."""
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: status[name].split() for name in ("Uid", "Gid", "CapEff", "CapPrm",
                                                    "CapBnd", "CapAmb", "NoNewPrivs",
                                                    "Seccomp")}


def _comm(process: Path) -> str:
    """A process's command name, or "" if it is gone."""
    try:
        return (process / "comm").read_text().strip()
    except OSError:
        return ""


def main() -> int:
    settings = json.loads(Path(sys.argv[1]).read_text())
    checks = Checks(settings)
    failures = 0
    with open("/dev/console", "w") as console:
        for name in CHECKS:
            try:
                line = f"VMTEST {name} ok: {getattr(checks, 'check_' + name.replace('-', '_'))()}"
            except Exception as error:  # one check's trouble is reported, the rest still run
                failures += 1
                line = f"VMTEST {name} FAIL: {type(error).__name__}: {error}"
            line = " ".join(line.split())[:3000]
            print(line, file=console, flush=True)
            print(line, flush=True)
        if failures:  # what the server and the agent said, for the test's failure message
            for unit in (UNIT, AGENT_UNIT):
                for entry in journal(f"--unit={unit}", "--lines=30"):
                    print(f"VMTEST journal: {unit}: {entry.get('MESSAGE')}", file=console,
                          flush=True)
        print(DONE, file=console, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
