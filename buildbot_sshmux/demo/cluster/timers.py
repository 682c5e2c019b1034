"""Buildbot's multi-master timers, shortened: the README's recipe ("Shortening the timers").

A master writes a heartbeat every 60 s and a master silent for
``EXPIRE_MINUTES`` (10) is marked inactive, its builds finished as RETRY and
(SSHMuxService) its build requests released: a crashed master's builds run
again 9 to 11 minutes later.  Buildbot has no setting for either; `snippet`
is master.cfg text (``c`` is the config dict) that sets both, the same on
every master.  The demo and the cluster tests use 2 s and 12 s.
"""

from __future__ import annotations

HEARTBEAT = 2  # seconds (Buildbot: 60)
EXPIRE_MINUTES = 0.2  # 12 s (Buildbot: 10 minutes)

SNIPPET = """
# Shortened timers (README, "Several masters"): Buildbot reads EXPIRE_MINUTES at
# each expiry check; the heartbeat's interval is set before the master starts it.
from buildbot.data import masters as _masters
from buildbot.util import service as _service

_masters.EXPIRE_MINUTES = {expire_minutes!r}


class MasterHeartbeat(_service.BuildbotService):
    name = "master-heartbeat"

    def reconfigService(self, seconds=60):
        self.master.masterHeartbeatService.step = seconds


c["services"].append(MasterHeartbeat(seconds={heartbeat!r}))
"""


def snippet(expire_minutes: float = EXPIRE_MINUTES, heartbeat: float = HEARTBEAT) -> str:
    """master.cfg text: a master silent ``expire_minutes`` is inactive; a heartbeat every ``heartbeat`` s."""
    return SNIPPET.format(expire_minutes=expire_minutes, heartbeat=heartbeat)


def expiry_seconds(expire_minutes: float = EXPIRE_MINUTES) -> float:
    return expire_minutes * 60
