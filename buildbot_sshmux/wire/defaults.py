"""Default values both ends and the CLIs agree on, written once."""

from __future__ import annotations

SSH_PORT = 2222
"""SSHMuxService's port, and the port of a launcher address that names none."""

PB_PORT = 9989
"""Buildbot's customary PB port: where a worker session's channel is addressed."""

SSH_USERNAME = "buildbot-worker"
"""The SSH user name a launcher logs in as (the master authenticates the key, not the name)."""

IDENTITY_FILE = "id_ed25519"
"""A worker host's private key file, relative to the launcher config."""

WORKER_KEEPALIVE = 600
"""Seconds between a worker session's PB keepalives, as ``buildbot-worker create-worker``."""

EXAMPLE_HOST = "buildmaster.example.org"
"""The placeholder host name in examples and generated configs."""

MASTER_CONTROL_SOCKET = "sshmux/control.sock"
"""Where a master's SSHMuxService answers ``buildbot-sshmux status``, relative to its basedir."""
