# SPDX-License-Identifier: GPL-3.0-or-later
"""The LUKS2 header as ``mandos-luks`` sees it: which keyslots and tokens are in use, and the
bindings, from ``cryptsetup luksDump --dump-json-metadata``.

A binding is a token ``{"type": "mandos", "keyslots": ["N"], "key_id": ..., "name": ...}``.
A rotation under way marks its new binding with ``"replaces_keyslot": "M"``, the keyslot of the
binding it replaces, until ``rotate --finish`` removes that one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from password_agent.errors import AgentError
from password_agent.luks import cryptsetup

TOKEN_TYPE = "mandos"
#: LUKS2 has at most 32 keyslots and 32 tokens.
MAX_KEYSLOTS = 32
MAX_TOKENS = 32


@dataclass(frozen=True)
class Binding:
    """One ``mandos`` token: the keyslot it names and the client it belongs to."""

    token_id: int
    #: None when the keyslot is gone (removed by hand, or an unbind cut short).
    keyslot: int | None
    key_id: str
    name: str
    #: While a rotation is under way: the keyslot of the binding this one replaces.
    replaces: int | None = None

    def token_json(self) -> bytes:
        token: dict[str, object] = {"type": TOKEN_TYPE,
                                    "keyslots": [] if self.keyslot is None else
                                    [str(self.keyslot)],
                                    "key_id": self.key_id, "name": self.name}
        if self.replaces is not None:
            token["replaces_keyslot"] = str(self.replaces)
        return json.dumps(token).encode()

    def describe(self) -> str:
        slot = "no keyslot" if self.keyslot is None else f"keyslot {self.keyslot}"
        text = f"{slot}, token {self.token_id}, client {self.name}, key_id {self.key_id}"
        if self.replaces is not None:
            text += f", rotation replacing keyslot {self.replaces} under way"
        return text


@dataclass(frozen=True)
class Header:
    device: str
    keyslots: frozenset[int]
    token_ids: frozenset[int]
    bindings: tuple[Binding, ...]

    def free_keyslot(self) -> int:
        return self._first_free("keyslot", self.keyslots, MAX_KEYSLOTS,
                                "cryptsetup luksKillSlot or mandos-luks unbind")

    def free_token(self) -> int:
        return self._first_free("token", self.token_ids, MAX_TOKENS, "cryptsetup token remove")

    def _first_free(self, what: str, used: frozenset[int], limit: int, remover: str) -> int:
        for number in range(limit):
            if number not in used:
                return number
        raise AgentError(f"no free {what} in {self.device}: all {limit} are in use; "
                         f"remove one with {remover}")

    def bindings_of(self, key_id: str) -> list[Binding]:
        wanted = _normal(key_id)
        return [binding for binding in self.bindings if _normal(binding.key_id) == wanted]


def _normal(key_id: str) -> str:
    """key_ids compare ignoring case and spaces, as everywhere in Mandos."""
    return "".join(key_id.split()).upper()


def _slot(text: object) -> int | None:
    try:
        return int(str(text))
    except ValueError:
        return None


def read_header(device: str) -> Header:
    """The header of ``device``; :class:`AgentError` if it is not a LUKS2 volume."""
    if not Path(device).exists():
        raise AgentError(f"{device} does not exist")
    probe = cryptsetup.run(["isLuks", device])
    if probe.returncode != 0:
        reason = f" ({probe.complaint})" if probe.complaint else ""
        raise AgentError(f"{device} is not a LUKS volume{reason}")
    if cryptsetup.run(["isLuks", "--type", "luks2", device]).returncode != 0:
        raise AgentError(f"{device} is LUKS1, and Mandos bindings need LUKS2 tokens; convert "
                         "it with cryptsetup convert --type luks2 (see cryptsetup(8))")
    dump = cryptsetup.checked(["luksDump", "--dump-json-metadata", device],
                              f"reading the LUKS2 header of {device}")
    try:
        metadata = json.loads(dump.stdout)
        keyslots = frozenset(int(slot) for slot in metadata["keyslots"])
        tokens = metadata.get("tokens", {})
        bindings = tuple(sorted(
            (Binding(token_id=int(token_id),
                     keyslot=next((_slot(s) for s in token.get("keyslots", [])), None),
                     key_id=str(token.get("key_id", "")), name=str(token.get("name", "")),
                     replaces=_slot(token["replaces_keyslot"])
                     if "replaces_keyslot" in token else None)
             for token_id, token in tokens.items() if token.get("type") == TOKEN_TYPE),
            key=lambda binding: binding.token_id))
        return Header(device, keyslots, frozenset(int(token) for token in tokens), bindings)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise AgentError(f"cannot read the LUKS2 header of {device}: unexpected metadata "
                         f"({error})") from None
