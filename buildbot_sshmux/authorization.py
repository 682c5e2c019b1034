"""Per-host authorization of worker names, checked before any PB password."""

from __future__ import annotations

from typing import Any

from twisted.cred import error, portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb

from buildbot_sshmux.authorized_hosts import HostEntry

log = Logger()


class ChannelClosedWhileAttaching(pb.Error):
    """A login that completed after its channel had closed (nobody to answer)."""


class HostPortal(portal.Portal):
    """The master's PB portal as one host sees it: only its allowed worker names.

    A login as any other name fails with ``UnauthorizedLogin`` (the worker
    backs off and retries) before the master's checker sees the password.
    """

    def __init__(self, wrapped: portal.Portal, entry: HostEntry, peer: str = "") -> None:
        # A Portal subclass so that PB adapts it to IPBRoot; the checkers and
        # realm stay the wrapped (master's) portal's.
        self.wrapped = wrapped
        self.entry = entry
        self.peer = peer  # "host:port" of the SSH connection, for the log
        self.worker_name: str | None = None

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> defer.Deferred[Any]:
        username = credentials.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if not self.entry.may_attach(username):
            log.warn(
                "host {host} ({fingerprint}){where} may not attach worker {worker!r}"
                " (allowed: {allowed}); login refused",
                host=self.entry.name,
                fingerprint=self.entry.fingerprint,
                where=f" from {self.peer}" if self.peer else "",
                worker=username,
                allowed=",".join(self.entry.workers),
            )
            return defer.fail(error.UnauthorizedLogin())
        d = self.wrapped.login(credentials, mind, *interfaces)

        def logged_in(result: Any) -> Any:
            self.worker_name = username
            return result

        d.addCallback(logged_in)
        return d.addCallback(self._logout_if_gone, mind, username)

    def _logout_if_gone(self, result: Any, mind: Any, username: str) -> Any:
        # Twisted PB registers the logout with the broker only once the login
        # completes; if the channel closed meanwhile (the link cut while the
        # worker attached) the logout would never run and Buildbot would keep
        # the worker "connected" to a dead broker, refusing it ever after.
        broker = getattr(mind, "broker", None)
        if broker is None or not broker.disconnected:
            return result
        log.info(
            "host {host}: the channel of worker {worker!r} closed while it attached; detaching it",
            host=self.entry.name,
            worker=username,
        )
        _interface, _avatar, logout = result
        logout()
        raise ChannelClosedWhileAttaching(f"worker {username!r}: the channel closed while it attached")

    def listCredentialsInterfaces(self) -> list[Any]:
        return self.wrapped.listCredentialsInterfaces()
