"""The Mandos client side: a systemd password agent that answers disk-unlock requests with a
password fetched from a Mandos server (``mandos-password-agent``), and the key generator
(``mandos-keygen``).

It runs in the initramfs, so it imports only the standard library, ``inotify_simple``,
``python-gnupg``, ``sdnotify`` only when resident (``--watch``) and, only when it has to browse,
``zeroconf``.
"""
