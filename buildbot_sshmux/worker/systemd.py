"""systemd's readiness protocol (sd_notify(3)), spoken directly: one datagram
to ``$NOTIFY_SOCKET``.  Outside systemd (no such variable) it does nothing."""

from __future__ import annotations

import os
import socket


def notifying() -> bool:
    """Whether systemd waits for our notifications (``$NOTIFY_SOCKET`` is set)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*fields: str) -> bool:
    """Send ``READY=1``, ``STATUS=...``, ``RELOADING=1``, ``STOPPING=1``...; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(address)
            s.sendall("\n".join(fields).encode("utf-8"))
        except OSError:
            return False
    return True


def under_journal() -> bool:
    """Whether stdout is the journal (systemd sets ``$JOURNAL_STREAM`` to its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in stream.split(":"))
        st = os.fstat(1)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)
