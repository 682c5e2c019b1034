"""Per-host authorization of worker names, checked before any PB password."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred import error, portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb
from zope.interface import implementer

from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.wire.peerlog import short_repr

log = Logger()

_ANONYMOUS = object()  # credentials without a username


def worker_name(credentials: Any) -> str | None:
    """The worker name a PB login offers, or None if it offers none usable
    (an anonymous login, a name that is not text or not UTF-8)."""
    username = getattr(credentials, "username", None)
    if isinstance(username, bytes):
        try:
            return username.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return username if isinstance(username, str) else None


@implementer(portal.IRealm)
class _NoticingRealm:
    """A realm that says when it is asked for an avatar: the checker has
    accepted the credentials."""

    def __init__(self, realm: portal.IRealm, accepted: Callable[[], None]) -> None:
        self.realm = realm
        self.accepted = accepted

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        self.accepted()
        return self.realm.requestAvatar(avatarId, mind, *interfaces)


class RefusedLogin(error.UnauthorizedLogin, pb.Error):
    """A refused PB login, as a `pb.Error`: PB logs any other exception it
    sends back with a traceback, one per refused login; the worker still
    sees an UnauthorizedLogin (a PB failure carries its classes' names)."""


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
        self.worker_name: str | None = None  # once the login has completed
        # Once the master's checker has accepted the worker's password: Buildbot
        # attaches the worker (asks for its info, environment included) before
        # the login completes, so that exchange is no longer bounded as a login.
        self.authenticated = False

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> defer.Deferred[Any]:
        username = worker_name(credentials)
        if username is None:
            offered = getattr(credentials, "username", _ANONYMOUS)
            log.warn(
                "host {host} ({fingerprint}){where} offered no usable worker name ({name}); login refused",
                host=self.entry.name,
                fingerprint=self.entry.fingerprint,
                where=f" from {self.peer}" if self.peer else "",
                name="an anonymous login" if offered is _ANONYMOUS else short_repr(offered),
            )
            return defer.fail(RefusedLogin())
        if not self.entry.may_attach(username):
            log.warn(
                "host {host} ({fingerprint}){where} may not attach worker {worker}"
                " (allowed: {allowed}); login refused",
                host=self.entry.name,
                fingerprint=self.entry.fingerprint,
                where=f" from {self.peer}" if self.peer else "",
                worker=short_repr(username),
                allowed=",".join(self.entry.workers),
            )
            return defer.fail(RefusedLogin())
        checked = portal.Portal(_NoticingRealm(self.wrapped.realm, self._accepted))
        checked.checkers = self.wrapped.checkers
        d = checked.login(credentials, mind, *interfaces)

        def logged_in(result: Any) -> Any:
            self.worker_name = username
            return result

        def refused(failure: Any) -> Any:
            self.authenticated = self.worker_name is not None
            if failure.check(error.UnauthorizedLogin) and not failure.check(RefusedLogin):
                raise RefusedLogin(*failure.value.args)  # Buildbot has logged its one line
            return failure

        d.addCallbacks(logged_in, refused)
        return d.addCallback(self._logout_if_gone, mind, username)

    def _accepted(self) -> None:
        self.authenticated = True

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
