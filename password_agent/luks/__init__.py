# SPDX-License-Identifier: GPL-3.0-or-later
"""``mandos-luks``: enrol a LUKS2 volume for Mandos, prove it unlocks, rotate and remove it.

A binding is a keyslot opened by a random key that only the Mandos server hands out
(OpenPGP-encrypted to the client's key), plus a LUKS2 token of type ``mandos`` naming that
keyslot and the client's key_id.  Runs on the installed system only (it needs
``cryptography`` through keygen), so the initramfs leaves the whole subpackage out.

``cli`` is the command; ``cryptsetup`` runs the tool; ``header`` reads the bindings;
``bindings`` does bind, unbind and rotate; ``proof`` fetches the secret as the agent does and
checks it against the keyslots.
"""
