"""List the Python files the password agent needs in the initramfs, as ``SOURCE<TAB>TARGET`` lines.

Run by module-setup.sh with the same interpreter the initramfs runs (/usr/bin/python3, never a
shim from PATH).  Instead of copying the whole standard library (+15 MB, about a second more of
boot), it imports the agent, exercises the calls that import more modules at run time (name
resolution imports ``encodings.idna``, python-gnupg starts gpg through ``subprocess`` and
threads, ctypes looks for libgnutls), and lists the file behind every module that got loaded:

- standard library files keep their path, so the interpreter finds its prefix as usual;
- everything else (our packages, inotify_simple, python-gnupg, sdnotify) goes to one private
  directory that the agent's unit puts on PYTHONPATH.

Usage: python-files.py [--zeroconf] PRIVATE_DIR [SEARCH_PATH ...]; SEARCH_PATH entries are put
in front of sys.path, so the packages can come from a virtualenv or a source tree.  With
--zeroconf, the agent's Zeroconf browsing (python-zeroconf, asyncio) comes along.
"""

import importlib
import importlib.util
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile

#: What the agent imports to run; ``python3 -m password_agent`` runs MAIN_MODULE, which is
#: found but not executed here.  ``mandos_protocol.notify`` (with sdnotify) is imported only
#: with ``--watch``, as the initramfs runs it.  BROWSE_MODULE (Zeroconf) is imported only when
#: wanted.
ENTRY_MODULES = ("password_agent.cli", "password_agent.agent", "mandos_protocol.notify")
MAIN_MODULE = "password_agent.__main__"
BROWSE_MODULE = "password_agent.browse"
#: Never ship these, even if the tracing run imported them: the agent has no use for them
#: (keygen needs cryptography and runs on the installed system) or they drag in large
#: libraries for nothing (_hashlib and _ssl need libcrypto/libssl, about 5 MB; hashlib and hmac
#: fall back to the built-in SHA-2 implementations).
EXCLUDED = ("password_agent.keygen", "cryptography", "_hashlib", "_ssl", "ssl", "sitecustomize",
            "usercustomize", "_distutils_hack")
#: Loaded at interpreter start-up or by the C locale, whatever the tracing run's environment.
ALWAYS = ("encodings.aliases", "encodings.utf_8", "encodings.ascii", "encodings.latin_1",
          "encodings.idna", "stringprep")


def excluded(name: str) -> bool:
    return name.startswith("__editable__") or any(
        name == prefix or name.startswith(prefix + ".") for prefix in EXCLUDED)


def exercise(zeroconf: bool) -> None:
    """Run what imports more modules lazily, the way the agent runs it at boot."""
    for name in ENTRY_MODULES + ALWAYS + ((BROWSE_MODULE,) if zeroconf else ()):
        importlib.import_module(name)
    socket.getaddrinfo("127.0.0.1", 7, socket.AF_UNSPEC, socket.SOCK_STREAM)
    from mandos_protocol.gnutls import Priority

    Priority().close()
    import gnupg

    with tempfile.TemporaryDirectory() as home:
        gpg = gnupg.GPG(gnupghome=home)
        gpg.decrypt(b"not an OpenPGP message")
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


def search_root(path: str, roots: list[str]) -> str | None:
    """The sys.path entry ``path`` was found under (longest match)."""
    matches = [root for root in roots if path.startswith(root.rstrip("/") + "/")]
    return max(matches, key=len) if matches else None


def main() -> int:
    arguments = sys.argv[1:]
    zeroconf = arguments[:1] == ["--zeroconf"]
    if zeroconf:
        arguments.pop(0)
    private = arguments[0]
    sys.path[:0] = [os.path.abspath(p) for p in arguments[1:]]
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    exercise(zeroconf)
    main_spec = importlib.util.find_spec(MAIN_MODULE)
    roots = [os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)]
    lines = {f"{stdlib}/os.py\t{stdlib}/os.py"}  # the interpreter's prefix landmark
    specs = [(MAIN_MODULE, main_spec)] + [
        (name, getattr(module, "__spec__", None)) for name, module in list(sys.modules.items())]
    for name, spec in specs:
        origin = getattr(spec, "origin", None)
        if excluded(name) or not origin or not os.path.isabs(origin):
            continue  # built-in, frozen, or not wanted
        origin = os.path.realpath(origin)
        if origin.startswith(stdlib + "/") and "-packages/" not in origin:
            lines.add(f"{origin}\t{origin}")
            continue
        root = search_root(origin, roots)
        if root is None:
            print(f"python-files: cannot place {origin} (module {name})", file=sys.stderr)
            return 1
        target = os.path.join(private, os.path.relpath(origin, root))
        lines.add(f"{origin}\t{target}")
    sys.stdout.write("".join(line + "\n" for line in sorted(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
