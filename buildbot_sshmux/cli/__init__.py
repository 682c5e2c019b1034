"""Command-line entry points: ``ssh-worker`` (worker hosts) and ``buildbot-sshmux`` (masters)."""

from __future__ import annotations

import argparse
import sys

from buildbot_sshmux.errors import SSHMuxError


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen command; a user error is one line and exit 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SSHMuxError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
