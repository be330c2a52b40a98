# SPDX-License-Identifier: GPL-3.0-or-later
"""List the Python files the password agent needs in the initramfs, as ``SOURCE<TAB>TARGET`` lines.

Run by module-setup.sh with the same interpreter the initramfs runs (/usr/bin/python3, never a
shim from PATH).  Instead of copying the whole standard library (+15 MB, about a second more of
boot), it traces the agent: a child interpreter, started with the unit's flags (``-S``, no site
module) so that nothing this script imports for itself counts, imports the agent and exercises
the calls that import more modules at run time (name resolution imports ``encodings.idna``,
python-gnupg starts gpg through ``subprocess`` and threads, ctypes looks for libgnutls).  Then
it lists the file behind every module that got loaded:

- standard library files keep their path, so the interpreter finds its prefix as usual;
- everything else (our packages, inotify_simple, python-gnupg, sdnotify) goes to one private
  directory that the agent's unit puts on PYTHONPATH;
- a module compiled with Cython (python-zeroconf's speed-ups, from a virtualenv) is listed as
  the pure Python source beside it: the agent browses a few seconds at most, and the compiled
  modules would weigh some 4 MB unpacked.

module-setup.sh compiles the ``.py`` files to byte-code and ships that alone.

Usage: python-files.py [--zeroconf] PRIVATE_DIR [SEARCH_PATH ...]; SEARCH_PATH entries are put
in front of sys.path, so the packages can come from a virtualenv or a source tree.  With
--zeroconf, the agent's Zeroconf browsing (python-zeroconf, asyncio) comes along.
"""

import importlib.machinery
import os
import subprocess
import sys

#: What the agent imports to run; ``python3 -m password_agent`` runs MAIN_MODULE, which is
#: found but not executed here.  ``mandos_protocol.notify`` (with sdnotify) is imported only
#: with ``--watch``, as the initramfs runs it.  BROWSE_MODULE (Zeroconf) is imported only when
#: wanted.
ENTRY_MODULES = ("password_agent.cli", "password_agent.agent", "mandos_protocol.notify")
MAIN_MODULE = "password_agent.__main__"
BROWSE_MODULE = "password_agent.browse"
#: Never ship these, even if the tracing run imported them: the agent has no use for them
#: (keygen and mandos-luks need cryptography and run on the installed system) or they drag in large
#: libraries for nothing (_hashlib and _ssl need libcrypto/libssl, about 5 MB; hashlib and hmac
#: fall back to the built-in SHA-2 implementations).
EXCLUDED = ("password_agent.keygen", "password_agent.luks", "cryptography", "_hashlib", "_ssl",
            "ssl", "sitecustomize", "usercustomize", "_distutils_hack")
#: Nor these, which their only importer (shutil, for its archive formats) does without.
UNUSED = ("bz2", "_bz2", "lzma", "_lzma", "_compression")
#: Loaded at interpreter start-up or by the C locale, whatever the tracing run's environment.
ALWAYS = ("encodings.aliases", "encodings.utf_8", "encodings.ascii", "encodings.latin_1",
          "encodings.idna", "stringprep")


def excluded(name: str) -> bool:
    return name.startswith("__editable__") or any(
        name == prefix or name.startswith(prefix + ".") for prefix in EXCLUDED + UNUSED)


def exercise(zeroconf: bool) -> None:
    """In the child: run what imports more modules lazily, the way the agent runs it at boot,
    then print ``NAME<TAB>ORIGIN`` for every module loaded (and for MAIN_MODULE)."""
    import importlib.util
    import socket
    import tempfile

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
    specs = [(MAIN_MODULE, importlib.util.find_spec(MAIN_MODULE))] + [
        (name, getattr(module, "__spec__", None)) for name, module in list(sys.modules.items())]
    for name, spec in specs:
        origin = getattr(spec, "origin", None)
        if origin and os.path.isabs(origin):  # not built-in or frozen
            sys.stdout.write(f"{name}\t{origin}\n")


def trace(zeroconf: bool, path: list[str]) -> dict[str, str]:
    """The modules the agent loads, by name, with their files: from a child interpreter that
    runs with the unit's flags, ``path`` in front of its sys.path."""
    command = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--exercise"]
    output = subprocess.run(command + (["--zeroconf"] if zeroconf else []) + path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            check=True).stdout
    return dict(line.split("\t", 1) for line in output.splitlines())


def pure_python(origin: str) -> str:
    """The source beside a Cython-compiled module, if there is one, else ``origin``."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if origin.endswith(suffix) and os.path.isfile(origin[:-len(suffix)] + ".py"):
            return origin[:-len(suffix)] + ".py"
    return origin


def search_root(path: str, roots: list[str]) -> str | None:
    """The sys.path entry ``path`` was found under (longest match)."""
    matches = [root for root in roots if path.startswith(root.rstrip("/") + "/")]
    return max(matches, key=len) if matches else None


def main() -> int:
    arguments = sys.argv[1:]
    child = arguments[:1] == ["--exercise"]
    if child:
        arguments.pop(0)
    zeroconf = arguments[:1] == ["--zeroconf"]
    if zeroconf:
        arguments.pop(0)
    if child:
        sys.path[:0] = arguments
        exercise(zeroconf)
        return 0
    private = arguments[0]
    # The search path, then this interpreter's site directories (the child has no site module).
    path = list(dict.fromkeys(
        [os.path.abspath(p) for p in arguments[1:]] + [p for p in sys.path if "-packages" in p]))
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    modules = trace(zeroconf, path)
    roots = [os.path.realpath(p) for p in path if os.path.isdir(p)]
    lines = {f"{stdlib}/os.py\t{stdlib}/os.py"}  # the interpreter's prefix landmark
    for name, found in modules.items():
        if excluded(name):
            continue
        origin = os.path.realpath(found)
        if origin.startswith(stdlib + "/") and "-packages/" not in origin:
            lines.add(f"{origin}\t{origin}")
            continue
        root = search_root(origin, roots)
        if root is None:
            print(f"python-files: cannot place {origin} (module {name})", file=sys.stderr)
            return 1
        origin = pure_python(origin)
        target = os.path.join(private, os.path.relpath(origin, root))
        lines.add(f"{origin}\t{target}")
    sys.stdout.write("".join(line + "\n" for line in sorted(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
