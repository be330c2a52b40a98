# SPDX-License-Identifier: GPL-3.0-or-later
"""The manual pages in ``man/`` against the code they describe.

Each console script in setup.cfg has ``man/<script>.8``; its OPTIONS section documents exactly
the options that the command's argparse parser and its subcommands' accept (one ``.TP`` tag
per entry), and so does its SYNOPSIS; its NAME line names the command; groff renders it
without a warning; and setup.cfg installs it under ``share/man/man8``.  Options hidden from
``--help`` (``help=argparse.SUPPRESS``, test hooks such as the server's ``--journal-socket``)
are not documented, so they are not expected.
"""

from __future__ import annotations

import argparse
import configparser
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mandos_protocol.version import VERSION

ROOT = Path(__file__).resolve().parent.parent
MAN_DIRECTORY = ROOT / "man"

#: An option as it appears in rendered text: a dash or two, not inside a word.
_OPTION = re.compile(r"(?<![\w-])--?[A-Za-z0-9][\w-]*")
#: Font changes (\fB, \fI, \fR, \fP, \f(CW) and zero-width escapes that only style the text.
_FONT = re.compile(r"\\f(\(..|\[[^]]*\]|.)")
_ZERO_WIDTH = re.compile(r"\\[&:%]")


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    return parser


def _console_scripts() -> dict[str, str]:
    """Command name -> ``module:function``, as setup.cfg installs them."""
    text = _setup_cfg()["options.entry_points"]["console_scripts"]
    scripts = {}
    for line in text.strip().splitlines():
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


COMMANDS = sorted(_console_scripts())


def _parser(command: str) -> argparse.ArgumentParser:
    """The command's own parser, built by the ``build_parser()`` beside its ``main``."""
    module_name = _console_scripts()[command].partition(":")[0]
    module = importlib.import_module(module_name)
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def _accepted_options(command: str) -> set[str]:
    """The options of the command and of its subcommands (``mandos-luks bind`` ...)."""
    parsers, options = [_parser(command)], set[str]()
    while parsers:
        for action in parsers.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
            elif action.help != argparse.SUPPRESS:
                options.update(action.option_strings)
    return options


def _page(command: str) -> Path:
    return MAN_DIRECTORY / f"{command}.8"


def _plain(line: str) -> str:
    """A roff input line as text: macro name, quotes and font escapes dropped, ``\\-`` as
    ``-``."""
    if line.startswith("."):
        line = line.partition(" ")[2].replace('"', "")
    line = _FONT.sub("", line)
    line = _ZERO_WIDTH.sub("", line)
    return line.replace("\\-", "-").replace("\\ ", " ").replace("\\e", "\\")


def _sections(page: Path) -> dict[str, list[str]]:
    """The input lines of each ``.SH`` section, by section name."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in page.read_text(encoding="ascii").splitlines():
        if line.startswith(".SH "):
            current = sections.setdefault(line[4:].strip().strip('"'), [])
        elif current is not None:
            current.append(line)
    return sections


def _option_tags(lines: list[str]) -> list[str]:
    """The options named in the tags of the ``.TP`` entries (not those mentioned in the
    descriptions)."""
    tags = [lines[index + 1] for index, line in enumerate(lines[:-1]) if line == ".TP"]
    return [option for tag in tags for option in _OPTION.findall(_plain(tag))]


@pytest.mark.parametrize("command", COMMANDS)
def test_options_section_documents_exactly_the_parser_options(command: str) -> None:
    documented = _option_tags(_sections(_page(command))["OPTIONS"])
    accepted = _accepted_options(command)
    assert len(documented) == len(set(documented)), f"documented twice in {command}.8"
    assert not accepted - set(documented), f"{command}.8 lacks {sorted(accepted - set(documented))}"
    assert not set(documented) - accepted, \
        f"{command}.8 documents {sorted(set(documented) - accepted)}, which {command} lacks"


@pytest.mark.parametrize("command", COMMANDS)
def test_synopsis_names_exactly_the_parser_options(command: str) -> None:
    synopsis = " ".join(_plain(line) for line in _sections(_page(command))["SYNOPSIS"])
    assert set(_OPTION.findall(synopsis)) == _accepted_options(command)


@pytest.mark.parametrize("command", COMMANDS)
def test_title_and_name_line_name_the_command(command: str) -> None:
    page = _page(command)
    first = page.read_text(encoding="ascii").splitlines()[0]
    assert first.split()[:3] == [".TH", command.upper(), "8"]
    metadata = _setup_cfg()["metadata"]
    assert f'"{metadata["name"]} {VERSION}"' in first  # the release it documents
    name_line = next(line for line in _sections(page)["NAME"] if line.strip())
    assert name_line.startswith(f"{command} \\- ")


@pytest.mark.peers
@pytest.mark.parametrize("command", COMMANDS)
def test_page_renders_without_warnings(command: str) -> None:
    groff = shutil.which("groff")
    assert groff is not None  # conftest fails the run without it
    page = _page(command)
    page.read_bytes().decode("ascii")  # plain ASCII: special characters as roff escapes
    result = subprocess.run([groff, "-man", "-ww", "-z", "-Tutf8", str(page)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stderr) == (0, "")


def test_setup_installs_every_page_and_nothing_else() -> None:
    listed = _setup_cfg()["options.data_files"]["share/man/man8"].split()
    assert sorted(listed) == [f"man/{command}.8" for command in COMMANDS]
    assert sorted(MAN_DIRECTORY.glob("*.8")) == [_page(command) for command in COMMANDS]
