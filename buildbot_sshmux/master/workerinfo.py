"""Worker pages say how a worker came in: its SSH host, key and address.

Once Buildbot has attached a worker that logged in over an SSH channel, its
worker info (the data API's ``workerinfo``, shown on the worker's page in the
web UI) gains ``ssh_host``, ``ssh_key`` (the host key's fingerprint) and
``ssh_address``: what the master verified, not what the worker says of itself.
"""

from __future__ import annotations

from typing import Any

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
        if workerid is None or master.masterid is None:
            return
        current = yield master.data.get(("workers", workerid))
        info = dict((current or {}).get("workerinfo") or {})
        info.update(ssh_host=entry.name, ssh_key=entry.fingerprint, ssh_address=peer)
        yield master.data.updates.workerConnected(
            workerid=workerid, masterid=master.masterid, workerinfo=info
        )
    except Exception as e:  # the worker is attached either way
        log.warn("worker {worker}: its SSH origin could not be added to its worker info ({error})",
                 worker=worker_name, error=e)  # fmt: skip
