# SPDX-License-Identifier: GPL-3.0-or-later
"""Real peers for the tests and the benchmarks: upstream Mandos programs, a private D-Bus,
network namespaces, a private journald, the real ``systemd-ask-password``, etcd, Prometheus and
the VM lab (:mod:`peers.vm`), each started and cleaned up by a context manager so that no test
leaves a process, namespace, mount or temporary directory behind.  A package of its own,
beside ``tests/``, so that ``bench/`` uses the same peers without importing the test suite."""
