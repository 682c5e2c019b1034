"""Command-line entry points: ``ssh-worker`` (worker hosts) and ``buildbot-sshmux`` (masters)."""

from __future__ import annotations

import argparse
import re
import sys

from buildbot_sshmux.errors import SSHMuxError


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


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen command; a user error is one line and exit 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SSHMuxError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
