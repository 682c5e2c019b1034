"""Buildbot workers over one authenticated SSH connection per worker host.

The master side (`SSHMuxService`) needs `buildbot`; the worker side
(`ssh-worker`) needs only `buildbot-worker`.  Importing this package pulls in
neither: `SSHMuxService` is imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SSHMuxService"]
__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    if name == "SSHMuxService":
        from buildbot_sshmux.master.service import SSHMuxService

        return SSHMuxService
    raise AttributeError(name)
