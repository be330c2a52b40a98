# SPDX-License-Identifier: GPL-3.0-or-later
"""The protocol line, the default priority and key ids, checked against upstream's own
behaviour (its server source and its keygen's certtool) rather than against our own reading."""

from __future__ import annotations

import ast
import base64
import hashlib
import subprocess
from pathlib import Path

import pytest

from mandos_protocol import wire
from mandos_protocol.errors import ProtocolError
from peers import upstream

#: A key pair made by upstream's mandos-keygen, and the key_id it printed for it.
KEYGEN_TLS_PUBKEY = "MCowBQYDK2VwAyEAjhOKA05WKaF5meNzEMm7ol0ZQVKEiGZvXDosj4zNem8="
KEYGEN_KEY_ID = "2f8d2fd53351c275e1cc4a4ef2056d7930b4ce1d1f5ecba4ece96012244e30fc"


def test_protocol_line_is_what_upstreams_client_sends() -> None:
    assert wire.PROTOCOL_LINE == b"1\r\n"
    assert wire.parse_protocol_line(wire.PROTOCOL_LINE) == 1


@pytest.mark.parametrize(("line", "version"), [
    (b"1\r\n", 1), (b"0\r\n", 0), (b"1\n", 1), (b"1", 1), (b"  1  \r\n", 1),
    (b"1 trailing words\r\n", 1), (b"01\r\n", 1), (b"+1\r\n", 1),
])
def test_accepted_protocol_lines(line: bytes, version: int) -> None:
    # Upstream takes int(line.split()[0]): whitespace and trailing words do not matter.
    assert wire.parse_protocol_line(line) == version


@pytest.mark.parametrize("line", [
    b"2\r\n", b"10\r\n", b"", b"\r\n", b"   \n", b"garbage\r\n", b"1.0\r\n", b"one\r\n",
    b"\xff\xfe\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
])
def test_rejected_protocol_lines(line: bytes) -> None:
    with pytest.raises(ProtocolError) as error:
        wire.parse_protocol_line(line)
    assert "protocol" in str(error.value)


def test_rejection_message_is_bounded() -> None:
    with pytest.raises(ProtocolError) as error:
        wire.parse_protocol_line(b"x" * 10_000 + b"\r\n")
    assert len(str(error.value)) < 100


def _gnutls_lists(priority: str) -> dict[str, list[str]]:
    """What ``gnutls-cli --list`` says a priority string enables: {"Groups": [...], ...}."""
    listing = subprocess.run(["gnutls-cli", "--list", "--priority", priority], check=True,
                             capture_output=True, text=True, timeout=30).stdout
    return {name: [item.strip() for item in items.split(",")]
            for name, _, items in (line.partition(": ") for line in listing.splitlines())
            if name in {"Protocols", "Ciphers", "MACs", "Groups", "PK-signatures"}}


@pytest.mark.interop
def test_default_priority_is_upstreams_with_x25519_first() -> None:
    """Upstream's server default, read from its source (the raw-public-key branch), enables
    the same protocols, ciphers, MACs, groups and signatures as ours, which only puts X25519
    first (the cheaper key share) and turns off the middlebox compatibility mode."""
    source = Path(upstream.MANDOS).read_text()
    strings = [node.value for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    upstreams = [text for text in strings if "+CTYPE-RAWPK" in text]
    assert len(upstreams) == 1
    assert wire.DEFAULT_PRIORITY.startswith(upstreams[0] + ":")
    theirs, ours = _gnutls_lists(upstreams[0]), _gnutls_lists(wire.DEFAULT_PRIORITY)
    assert {name: sorted(items) for name, items in theirs.items()} == {
        name: sorted(items) for name, items in ours.items()}
    assert ours["Groups"][0] == "GROUP-X25519" != theirs["Groups"][0]
    assert wire.DEFAULT_PRIORITY.endswith(":%DISABLE_TLS13_COMPAT_MODE")


def test_key_id_of_a_keygen_key_is_what_keygen_printed() -> None:
    der = base64.b64decode(KEYGEN_TLS_PUBKEY)
    assert wire.key_id(der) == KEYGEN_KEY_ID.upper()
    assert wire.key_id(der) == wire.normalize_key_id(KEYGEN_KEY_ID)


@pytest.mark.interop
def test_key_id_matches_certtool(tmp_private: Path) -> None:
    """The same tool upstream's keygen uses, on a fresh Ed25519 key."""
    private, public = tmp_private / "key.pem", tmp_private / "pub.pem"
    subprocess.run(["certtool", "--generate-privkey", "--key-type=ed25519", "--no-text",
                    f"--outfile={private}"], check=True, capture_output=True)
    subprocess.run(["certtool", "--load-privkey", str(private), "--pubkey-info", "--no-text",
                    f"--outfile={public}"], check=True, capture_output=True)
    expected = subprocess.run(
        ["certtool", "--key-id", "--hash=sha256", f"--load-pubkey={public}"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    der = upstream._spki_der_from_pem(public.read_bytes())
    assert wire.key_id(der) == expected.upper()


def test_empty_key_id() -> None:
    assert hashlib.sha256(b"").hexdigest().upper() == wire.EMPTY_KEY_ID
    assert wire.EMPTY_KEY_ID.startswith("E3B0C442") and wire.EMPTY_KEY_ID.endswith("B855")
    assert wire.key_id(b"") == wire.EMPTY_KEY_ID


@pytest.mark.parametrize(("a", "b", "equal"), [
    (KEYGEN_KEY_ID, KEYGEN_KEY_ID.upper(), True),
    (KEYGEN_KEY_ID, " ".join(KEYGEN_KEY_ID[i:i + 4] for i in range(0, 64, 4)), True),
    ("ab cd", "ABCD", True),
    ("  ABCD  ", "abcd", True),
    ("ABCD", "ABCE", False),
    ("ABCD", "ABCD00", False),
    ("AB\tCD", "ABCD", False),  # upstream removes spaces only
    ("", "", True),
])
def test_key_ids_compare_ignoring_case_and_spaces(a: str, b: str, equal: bool) -> None:
    assert (wire.normalize_key_id(a) == wire.normalize_key_id(b)) is equal


def test_normalize_key_id_is_upstreams_upper_replace() -> None:
    text = "2f8d 2fd5 3351\u00a0c275"
    assert wire.normalize_key_id(text) == text.upper().replace(" ", "")
