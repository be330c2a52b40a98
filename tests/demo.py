# SPDX-License-Identifier: GPL-3.0-or-later
"""``./dev demo``: the main job, end to end, on loopback.

1. ``mandos-keygen`` makes a fresh key set and the ``clients.conf`` section for a password;
2. ``mandos-server`` serves that section on 127.0.0.1;
3. the real ``systemd-ask-password --no-tty --id=cryptsetup:demo`` asks for a disk password, in a
   private mount namespace whose ``/run/systemd/ask-password`` is a temporary directory (the
   host's own password requests are never touched);
4. ``mandos-password-agent`` answers it, inside that namespace, with the password it fetched
   from the server and decrypted with gpg;
5. the requester prints what it got, and the demo compares it with the password it started with.

Everything is torn down at the end, also on failure.  Needs root (namespaces).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peers.ask import AskNamespace, AskPassword
from peers.ours import OurServer, clients_conf


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def keygen(*arguments: str) -> str:
    result = subprocess.run([sys.executable, "-m", "password_agent.keygen", *arguments],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo: mandos-keygen failed: {result.stderr.strip()}")
    return result.stdout


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it makes a private mount namespace)")
    work = Path(tempfile.mkdtemp(prefix="mandos-demo-"))
    password = f"demo-{secrets.token_hex(6)}".encode()
    try:
        keys = work / "keys"
        keys.mkdir(mode=0o700)
        step(f"mandos-keygen --dir {keys} --name demo")
        keygen("--dir", str(keys), "--name", "demo")
        private = work / "private"
        private.mkdir(mode=0o700)
        passfile = private / "password"
        passfile.write_bytes(password)
        step("mandos-keygen --passfile … --no-ssh  (the clients.conf section for the server)")
        section = keygen("--dir", str(keys), "--name", "demo", "--passfile", str(passfile),
                         "--no-ssh")
        passfile.unlink()
        print("    " + "\n    ".join(section.strip().splitlines()[:4]) + "\n    …")

        with OurServer(clients_conf(section)) as server, AskNamespace() as namespace:
            step(f"mandos-server listening on {server.connect}")
            step("systemd-ask-password --no-tty --id=cryptsetup:demo "
                 "'Please enter passphrase for disk demo:'")
            with AskPassword.start(namespace, "Please enter passphrase for disk demo:",
                                   id="cryptsetup:demo", timeout=60) as ask:
                ask.wait_ask_file()
                step(f"mandos-password-agent --connect {server.connect} --keydir {keys}")
                started = time.monotonic()
                agent = subprocess.run(
                    namespace.wrap([sys.executable, "-m", "password_agent",
                                    "--connect", server.connect, "--keydir", str(keys),
                                    "--run-directory", str(work / "run"),
                                    "--kernel-cmdline", "/dev/null", "--timeout", "30"]),
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                    timeout=60)
                status, answer = ask.wait()
                elapsed = time.monotonic() - started
            for line in agent.stderr.strip().splitlines():
                print(f"    agent: {line}")
            assert server.journal is not None
            if agent.returncode == 0:  # the entry comes after the send: wait for it to arrive
                server.journal.wait_for("secret-sent")
            for entry in server.journal.entries:
                print(f"    journal: MANDOS_EVENT={entry.get('MANDOS_EVENT')} "
                      f"{entry.get('MESSAGE')}")
        if agent.returncode != 0 or status != 0:
            raise SystemExit(f"demo: FAILED (agent exit {agent.returncode}, requester exit "
                             f"{status}: {ask.stderr.decode(errors='replace').strip()})")
        got = answer.rstrip(b"\n")
        step(f"systemd-ask-password printed {got.decode(errors='replace')!r} "
             f"after {elapsed:.2f} s")
        if got != password:
            raise SystemExit("demo: FAILED: that is not the password the demo started with")
        print("demo: OK, the request was answered with the right password")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
