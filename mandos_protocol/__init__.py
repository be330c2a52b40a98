"""What the Mandos client and server share: the wire protocol, TLS with raw public keys, key ids
and durations.  No I/O policy, no configuration, no logging set-up lives here."""
