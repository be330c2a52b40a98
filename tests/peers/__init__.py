"""Real peers for the tests: upstream Mandos programs, a private D-Bus, network namespaces, a
private journald and the real ``systemd-ask-password``, each started and cleaned up by a context
manager so that no test leaves a process, namespace, mount or temporary directory behind."""
