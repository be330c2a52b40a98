# SPDX-License-Identifier: GPL-3.0-or-later
"""What the agent's decryption accepts from a server, with the real gpg.

Before the TLS handshake nothing says who sent a blob: any Zeroconf responder on the LAN can
answer.  A compressed OpenPGP message of a few hundred bytes used to inflate into the agent's
memory (a 263 KB zlib blob took it from 13 to 414 MiB).  Each blob here is decrypted by a
:class:`~password_agent.decrypt.Decryptor` in a child process whose peak memory
(``ru_maxrss``) is measured before and after; only a message encrypted to our key, of a sane
size, may give a password.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.agent import processes_left
from tests.conftest import UpstreamClient

pytestmark = pytest.mark.interop

#: Zeros inflated by the bombs (compressed to a few hundred bytes).
BOMB_BYTES = 100 * 1024 * 1024
#: How much the decryption may add to the process's peak memory (the start-up's peak, which
#: byte-compiling in a fresh clone doubles, does not count): a bomb would add 100 MiB.
GROWTH_LIMIT_KIB = 16 * 1024

_DECRYPT_IN_CHILD = """
import json, resource, sys
from pathlib import Path
from password_agent.decrypt import Decryptor
from password_agent.errors import AgentError
pubkey, seckey, run, blob = sys.argv[1:]
with Decryptor(Path(pubkey), Path(seckey), Path(run)) as decryptor:
    decryptor.wait_ready()
    ready_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        plaintext = decryptor.decrypt(Path(blob).read_bytes())
        outcome = {"plaintext": bytes(plaintext).decode(errors="replace")}
    except AgentError as error:
        outcome = {"error": str(error)}
outcome["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome["growth_kib"] = outcome["maxrss_kib"] - ready_kib
print(json.dumps(outcome))
"""


class Forger:
    """A scratch GnuPG home that knows our public key and one key of its own: what a rogue
    server can make."""

    def __init__(self, home: Path, client: UpstreamClient) -> None:
        self.home = home
        home.mkdir(mode=0o700)
        self.gpg("--import", str(client.keys.pubkey))
        listing = self.gpg("--list-keys", "--with-colons").decode()
        #: Our key's fingerprint (the first fpr record is the primary key's).
        self.ours = next(line.split(":")[9] for line in listing.splitlines()
                         if line.startswith("fpr:"))
        self.gpg("--quick-generate-key", "--passphrase", "", "other@example.invalid",
                 "future-default", "default", "never")

    def gpg(self, *arguments: str, stdin: bytes | None = None,
            source: list[str] | None = None) -> bytes:
        """gpg's output for ``arguments``, its input ``stdin`` or the output of ``source``."""
        argv = ["gpg", "--homedir", str(self.home), "--batch", "--quiet", "--yes",
                "--pinentry-mode", "loopback", "--trust-model", "always", *arguments]
        if source is None:
            return subprocess.run(argv, input=stdin, capture_output=True, check=True).stdout
        feeder = subprocess.Popen(source, stdout=subprocess.PIPE)
        try:
            return subprocess.run(argv, stdin=feeder.stdout, capture_output=True,
                                  check=True).stdout
        finally:
            assert feeder.stdout is not None
            feeder.stdout.close()
            feeder.wait()

    def from_zeros(self, *arguments: str) -> bytes:
        """``arguments`` applied to BOMB_BYTES zeros."""
        return self.gpg(*arguments, source=["head", "-c", str(BOMB_BYTES), "/dev/zero"])


def _decrypt(client: UpstreamClient, work: Path, name: str, blob: bytes) -> dict[str, object]:
    path = work / f"{name}.gpg"
    path.write_bytes(blob)
    run = work / f"run-{name}"
    run.mkdir(mode=0o700)
    result = subprocess.run(
        [sys.executable, "-c", _DECRYPT_IN_CHILD, str(client.keys.pubkey),
         str(client.keys.seckey), str(run), str(path)],
        capture_output=True, timeout=60, check=True)
    outcome: dict[str, object] = json.loads(result.stdout)
    assert list(run.iterdir()) == []  # the GnuPG home is gone
    return outcome


@pytest.fixture(scope="module")
def forged(upstream_client: UpstreamClient, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, bytes]]:
    forger = Forger(tmp_path_factory.mktemp("forger") / "home", upstream_client)
    try:
        yield _forge(forger)
    finally:  # the forger's own key generation and signing started a gpg-agent
        subprocess.run(["gpgconf", "--homedir", str(forger.home), "--kill", "gpg-agent"],
                       check=False, capture_output=True)
    assert processes_left(str(forger.home)) == []


def _forge(forger: Forger) -> dict[str, bytes]:
    ours = ["--recipient", forger.ours]
    return {
        "stored bzip2 bomb": forger.from_zeros("--store", "-z", "9", "--compress-algo",
                                               "bzip2"),
        "stored zlib bomb": forger.from_zeros("--store", "-z", "9", "--compress-algo",
                                              "zlib"),
        "stored zip bomb": forger.from_zeros("--store", "-z", "9", "--compress-algo", "zip"),
        "bomb encrypted to our key": forger.from_zeros("--encrypt", *ours, "-z", "9",
                                                       "--compress-algo", "bzip2"),
        "stored literal": forger.gpg("--store", stdin=b"not encrypted"),
        "signed, not encrypted": forger.gpg(
            "--sign", "--local-user", "other@example.invalid", stdin=b"signed only"),
        "symmetric": forger.gpg("--symmetric", "--passphrase", "guess", stdin=b"symmetric"),
        "encrypted to another key": forger.gpg(
            "--encrypt", "--recipient", "other@example.invalid", stdin=b"for another key"),
        "garbage": b"\x85\x01\x0c" + bytes(range(256)) * 4,
        "empty": b"",
    }


CASES = ["stored bzip2 bomb", "stored zlib bomb", "stored zip bomb",
         "bomb encrypted to our key", "stored literal", "signed, not encrypted",
         "symmetric", "encrypted to another key", "garbage", "empty"]


@pytest.mark.parametrize("case", CASES)
def test_a_blob_that_is_no_password_for_us_is_refused_in_bounded_memory(
        case: str, forged: dict[str, bytes], upstream_client: UpstreamClient,
        tmp_path: Path) -> None:
    blob = forged[case]
    assert len(blob) < 200_000  # the bombs are tiny on the wire
    outcome = _decrypt(upstream_client, tmp_path, "blob", blob)
    print(f"{case}: {len(blob)} bytes on the wire, peak {outcome['maxrss_kib']} KiB "
          f"(+{outcome['growth_kib']} KiB in the decryption), {outcome.get('error')}")
    assert int(str(outcome["growth_kib"])) < GROWTH_LIMIT_KIB, outcome
    assert "plaintext" not in outcome, outcome
    assert str(outcome["error"]).startswith("refusing the server's blob")


def test_the_servers_real_blob_still_decrypts(upstream_client: UpstreamClient,
                                              tmp_path: Path) -> None:
    outcome = _decrypt(upstream_client, tmp_path, "real", upstream_client.secret)
    assert outcome.get("plaintext") == upstream_client.password.decode(), outcome
