"""Command-line entry points: ``ssh-worker`` (worker hosts) and ``buildbot-sshmux`` (masters)."""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from typing import Any

from buildbot_sshmux.errors import SSHMuxError

# Twisted 24.11's Conch names TripleDES, which cryptography 48+ deprecates: a
# warning on every command that a user can do nothing about (Twisted 25 is quiet).
warnings.filterwarnings("ignore", message=r".*TripleDES", module=r"twisted\.conch\.ssh\.transport")


def plain(doc: str | None) -> str:
    """A docstring as help text: without its reStructuredText quotes (``name``)."""
    return re.sub(r"``?([^`]+)``?", r"\1", doc or "")


def add_version(parser: argparse.ArgumentParser, *distributions: str) -> None:
    """``--version``: this package's, and the versions of what it runs on."""
    from importlib import metadata

    from buildbot_sshmux import __version__

    found = []
    for name in ("twisted", *distributions):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    text = f"%(prog)s {__version__} ({', '.join(found)}; Python {sys.version.split()[0]})"
    parser.add_argument("--version", action="version", version=text)


class IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser whose positionals may sit before, between and after its options.

    So that an optional positional followed by a required one (``[BASEDIR]
    PUBKEY``) can be left out: argparse's own parser gives the first run of
    positionals to as many positionals as it can, and ``BASEDIR --host H KEY``
    would leave ``KEY`` unrecognized.  (parse_known_intermixed_args calls
    parse_known_args itself: that inner call is argparse's own.)
    """

    _intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def intermixed(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make a parser from ``add_parser`` an `IntermixedParser` (add_parser takes no class)."""
    parser.__class__ = IntermixedParser
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen command; a user error is one line and exit 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SSHMuxError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
