# SPDX-License-Identifier: GPL-3.0-or-later
"""Bind, unbind and rotate: the changes ``mandos-luks`` makes to a LUKS2 header.

Each change keeps the volume openable at every step: a keyslot is added before its token is
recorded (and removed again if recording fails), a binding's keyslot is removed only while
another keyslot remains, and a rotation removes the old keyslot only after the secret the
servers now hand out was seen to open the new one (:mod:`proof`).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, replace

from password_agent.agent import AgentConfig
from password_agent.errors import AgentError
from password_agent.keygen.cli import ClientKeys, client_section
from password_agent.keygen.password import SshHostKey
from password_agent.luks import cryptsetup
from password_agent.luks.header import Binding, Header
from password_agent.luks.proof import Proof, prove

#: Random bytes in a new key: 384 bits, more than any LUKS volume key.  Base64 makes it text,
#: as systemd's password agents pass passwords (a NUL byte would cut it short).
KEY_BYTES = 48


@dataclass(frozen=True)
class Enrolment:
    """A binding just recorded, and the clients.conf section whose secret opens it."""

    binding: Binding
    section: str


def new_key() -> bytearray:
    """A fresh random key, as text; the caller zeroes it."""
    raw = bytearray(os.urandom(KEY_BYTES))
    try:
        return bytearray(base64.b64encode(raw))
    finally:
        raw[:] = bytes(len(raw))


def _passphrase_options(key_file: str | None) -> list[str]:
    return [] if key_file is None else ["--key-file", key_file]


def add_binding(header: Header, keys: ClientKeys, name: str, key_file: str | None,
                host_key: SshHostKey | None, replaces: int | None = None) -> Enrolment:
    """A new keyslot opened by a new key, its token, and the section with the key encrypted
    to the client's key.  ``key_file`` (else standard input or the terminal, read by
    cryptsetup) holds an existing passphrase."""
    if keys.key_id is None:
        raise AgentError("the key directory has no tls-pubkey.pem, so the binding would have "
                         "no key_id; make the keys with mandos-keygen (or let bind make them "
                         "in an empty --keydir)")
    if replaces is None and (bound := header.bindings_of(keys.key_id)):
        raise AgentError(f"{header.device} is bound to these keys already (keyslot "
                         f"{bound[0].keyslot}); rotate replaces its key, unbind removes it")
    slot, token = header.free_keyslot(), header.free_token()
    binding = Binding(token_id=token, keyslot=slot, key_id=keys.key_id, name=name,
                      replaces=replaces)
    key = new_key()
    try:
        section = client_section(keys, name, key, host_key)  # before the header changes
        result = cryptsetup.run(["luksAddKey", *cryptsetup.MINIMAL_PBKDF, "--new-key-slot",
                                 str(slot), "--new-keyfile", "/dev/fd/{fd}",
                                 *_passphrase_options(key_file), header.device],
                                fd_data=key, ask_user=True)
    finally:
        key[:] = bytes(len(key))
    if result.returncode == cryptsetup.WRONG_PASSPHRASE:
        raise AgentError(f"wrong passphrase: it opens no keyslot of {header.device}; "
                         "nothing changed")
    if result.returncode != 0:
        reason = result.complaint or f"exit status {result.returncode}"
        raise AgentError(f"adding keyslot {slot} to {header.device} failed: {reason}")
    try:
        _write_token(header.device, binding)
    except AgentError:
        cryptsetup.run(["luksKillSlot", "--batch-mode", header.device, str(slot)])
        raise
    return Enrolment(binding, section)


def _write_token(device: str, binding: Binding, *, replace_token: bool = False) -> None:
    cryptsetup.checked(["token", "import", "--json-file", "-", "--token-id",
                        str(binding.token_id), *(["--token-replace"] if replace_token else []),
                        device], f"recording token {binding.token_id} in {device}",
                       stdin_data=binding.token_json())


def _remove_token(device: str, binding: Binding) -> None:
    cryptsetup.checked(["token", "remove", "--token-id", str(binding.token_id), device],
                       f"removing token {binding.token_id} from {device}")


def choose(header: Header, keyslot: int | None) -> Binding:
    """The binding at ``keyslot``, or the only binding of the header."""
    if keyslot is not None:
        for binding in header.bindings:
            if binding.keyslot == keyslot:
                return binding
        raise AgentError(f"keyslot {keyslot} of {header.device} is no Mandos binding; see "
                         "mandos-luks list")
    if not header.bindings:
        raise AgentError(f"{header.device} has no Mandos binding")
    if len(header.bindings) > 1:
        slots = ", ".join(str(binding.keyslot) for binding in header.bindings)
        raise AgentError(f"{header.device} has {len(header.bindings)} Mandos bindings "
                         f"(keyslots {slots}); choose one with --key-slot")
    return header.bindings[0]


def unbind(header: Header, binding: Binding, key_file: str | None) -> None:
    """Remove ``binding``'s keyslot (with a passphrase of another keyslot, which cryptsetup
    asks for) and its token; never the last keyslot."""
    slot = binding.keyslot
    if slot is not None and slot in header.keyslots:
        if header.keyslots == {slot}:
            raise AgentError(f"keyslot {slot} is the last keyslot of {header.device}: removing "
                             "it would leave the volume unopenable for good; add a passphrase "
                             "first (cryptsetup luksAddKey)")
        result = cryptsetup.run(["luksKillSlot", *_passphrase_options(key_file),
                                 header.device, str(slot)], ask_user=True)
        if result.returncode == cryptsetup.WRONG_PASSPHRASE:
            raise AgentError(f"wrong passphrase: give one of another keyslot of "
                             f"{header.device} than keyslot {slot}; nothing changed")
        if result.returncode != 0:
            reason = result.complaint or f"exit status {result.returncode}"
            raise AgentError(f"removing keyslot {slot} from {header.device} failed: {reason}")
    _remove_token(header.device, binding)


def start_rotation(header: Header, keys: ClientKeys, name: str | None, key_file: str | None,
                   host_key: SshHostKey | None) -> Enrolment:
    """A new binding beside the current one of ``keys``, marked as replacing it."""
    assert keys.key_id is not None
    current = header.bindings_of(keys.key_id)
    pending = [binding for binding in current if binding.replaces is not None]
    if pending:
        raise AgentError(f"a rotation of {header.device} is under way already (new keyslot "
                         f"{pending[0].keyslot}): install its section and run mandos-luks "
                         f"rotate --finish, or drop it with mandos-luks unbind --key-slot "
                         f"{pending[0].keyslot}")
    if not current:
        raise AgentError(f"{header.device} has no Mandos binding for key_id {keys.key_id}; "
                         "bind it first (mandos-luks bind)")
    if len(current) > 1 or current[0].keyslot is None:
        raise AgentError(f"{header.device} has {len(current)} Mandos bindings for key_id "
                         f"{keys.key_id}; unbind all but one before rotating")
    old = current[0]
    return add_binding(header, keys, name or old.name, key_file, host_key,
                       replaces=old.keyslot)


def finish_rotation(header: Header, key_id: str, config: AgentConfig, timeout: float
                    ) -> Proof:
    """If the servers' secret opens the rotation's new keyslot: remove the old keyslot and
    token, and unmark the new binding.  Otherwise change nothing and say why."""
    pending = [binding for binding in header.bindings_of(key_id)
               if binding.replaces is not None]
    if not pending:
        raise AgentError(f"no rotation of {header.device} is under way; start one with "
                         "mandos-luks rotate DEVICE")
    new = pending[0]
    # The binding replaced; without a keyslot if a --finish cut short removed that already.
    old = [binding for binding in header.bindings_of(key_id) if binding != new
           and binding.keyslot in (new.replaces, None)]
    proof = prove(header.device, [new, *old], config, timeout)
    if proof.binding is None:
        raise AgentError("the rotation stays under way, both keyslots kept: "
                         + "; ".join(proof.problems or ["no server answered"]))
    if proof.binding != new:
        raise AgentError(f"{proof.server} still hands out the old secret (keyslot "
                         f"{new.replaces}): install the section rotate printed, reload the "
                         "server, then run mandos-luks rotate --finish again; both keyslots "
                         "kept")
    if new.replaces in header.keyslots:
        # The new secret opens the new keyslot: no passphrase needed to drop the old one.
        cryptsetup.checked(["luksKillSlot", "--batch-mode", header.device,
                            str(new.replaces)],
                           f"removing the old keyslot {new.replaces} from {header.device}")
    for binding in old:
        _remove_token(header.device, binding)
    _write_token(header.device, replace(new, replaces=None), replace_token=True)
    return proof
