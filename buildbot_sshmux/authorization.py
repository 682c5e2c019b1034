"""Per-host authorization of worker names, checked before any PB password."""

from __future__ import annotations

from typing import Any

from twisted.cred import error, portal
from twisted.internet import defer
from twisted.logger import Logger

from buildbot_sshmux.authorized_hosts import HostEntry

log = Logger()


class HostPortal(portal.Portal):
    """The master's PB portal as one host sees it: only its allowed worker names.

    A login as any other name fails with ``UnauthorizedLogin`` (the worker
    backs off and retries) before the master's checker sees the password.
    """

    def __init__(self, wrapped: portal.Portal, entry: HostEntry) -> None:
        # A Portal subclass so that PB adapts it to IPBRoot; the checkers and
        # realm stay the wrapped (master's) portal's.
        self.wrapped = wrapped
        self.entry = entry
        self.worker_name: str | None = None

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> defer.Deferred[Any]:
        username = credentials.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if not self.entry.may_attach(username):
            log.warn(
                "host {host} ({fingerprint}) may not attach worker {worker!r}"
                " (allowed: {allowed}); login refused",
                host=self.entry.name,
                fingerprint=self.entry.fingerprint,
                worker=username,
                allowed=",".join(self.entry.workers),
            )
            return defer.fail(error.UnauthorizedLogin())
        d = self.wrapped.login(credentials, mind, *interfaces)

        def logged_in(result: Any) -> Any:
            self.worker_name = username
            return result

        return d.addCallback(logged_in)

    def listCredentialsInterfaces(self) -> list[Any]:
        return self.wrapped.listCredentialsInterfaces()
