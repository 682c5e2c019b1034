"""Per-host authorization of worker names, checked before any PB password."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred import checkers, error, portal
from twisted.cred.credentials import IAnonymous
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


class RefusedLogin(error.UnauthorizedLogin, pb.Error):
    """A refused PB login, as a `pb.Error`: PB logs any other exception it
    sends back with a traceback, one per refused login; the worker still
    sees an UnauthorizedLogin (a PB failure carries its classes' names)."""


class ChannelClosedWhileAttaching(pb.Error):
    """A login that completed after its channel had closed (nobody to answer)."""


class WorkerLogin:
    """One channel's PB login, as its host may make it: only the worker names
    its ``authorized_hosts`` entry allows.

    ``portal`` is a plain Twisted ``Portal`` for the channel's
    ``PBServerFactory``: its checker refuses any other name with
    ``UnauthorizedLogin`` (the worker backs off and retries) before the
    master's checker sees the password, and its realm is the master's.
    """

    def __init__(
        self,
        master_portal: portal.Portal,
        entry: HostEntry,
        peer: str = "",
        on_refused: Callable[[str | None, str], object] | None = None,
    ) -> None:
        self.master_portal = master_portal  # Buildbot's (its Dispatcher's) portal
        self.entry = entry
        self.peer = peer  # "host:port" of the SSH connection, for the log
        self.on_refused = on_refused  # told (worker name or None, reason) of each refused login
        self.worker_name: str | None = None  # once the login has completed
        self.refused: tuple[str | None, str] | None = None  # the last refusal: (worker name, reason)
        # Once the master's checker has accepted the worker's password: Buildbot
        # attaches the worker (asks for its info, environment included) before
        # the login completes, so that exchange is no longer bounded as a login.
        self.authenticated = False
        self.portal = portal.Portal(_HostRealm(self), [_HostChecker(self)])
        self.on_attached: Callable[[str, HostEntry, str], object] | None = None

    def note_refused(self, worker: str | None, reason: str) -> None:
        """A login on this channel was refused (``reason``: a key of `stats.REASONS`)."""
        self.refused = (worker, reason)
        if self.on_refused is not None:
            self.on_refused(worker, reason)

    def refuse(self, credentials: Any) -> str | None:
        """Why this host may not log in with ``credentials`` (a reason of
        `stats.REASONS`), logged and counted; None if it may."""
        username = worker_name(credentials)
        where = f" from {self.peer}" if self.peer else ""
        if username is None:
            offered = getattr(credentials, "username", _ANONYMOUS)
            name = "an anonymous login" if offered is _ANONYMOUS else short_repr(offered)
            log.warn(
                "host {host} ({fingerprint}){where} offered no usable worker name ({name}); login refused",
                host=self.entry.name,
                fingerprint=self.entry.fingerprint,
                where=where,
                name=name,
            )
            self.note_refused(None, "no_worker_name")
            return "no_worker_name"
        if not self.entry.may_attach(username):
            log.warn(
                "host {host} ({fingerprint}){where} may not attach worker {worker}"
                " (allowed: {allowed}); login refused",
                host=self.entry.name,
                fingerprint=self.entry.fingerprint,
                where=where,
                worker=short_repr(username),
                allowed=self.entry.workers_text,
            )
            self.note_refused(username, "worker_not_allowed")
            return "worker_not_allowed"
        return None


@implementer(checkers.ICredentialsChecker)
class _HostChecker:
    """The host's rule on worker names, then the master's own checker."""

    def __init__(self, login: WorkerLogin) -> None:
        self.login = login
        # The master's, and IAnonymous: refused here with one line, where Portal
        # would log UnhandledCredentials with a traceback.
        interfaces = login.master_portal.listCredentialsInterfaces()
        self.credentialInterfaces = (*interfaces, *([] if IAnonymous in interfaces else [IAnonymous]))

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        if self.login.refuse(credentials) is not None:
            return defer.fail(RefusedLogin())
        master_checkers = self.login.master_portal.checkers
        checker = next(c for i, c in master_checkers.items() if i.providedBy(credentials))
        d = defer.maybeDeferred(checker.requestAvatarId, credentials)

        def refused(failure: Any) -> Any:
            if failure.check(error.UnauthorizedLogin) and not failure.check(RefusedLogin):
                self.login.note_refused(worker_name(credentials), "bad_credentials")
                raise RefusedLogin(*failure.value.args)  # Buildbot has logged its one line
            return failure

        return d.addErrback(refused)


@implementer(portal.IRealm)
class _HostRealm:
    """The master's realm, noting when the password was accepted and when the login completed."""

    def __init__(self, login: WorkerLogin) -> None:
        self.login = login

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> defer.Deferred[Any]:
        login = self.login
        login.authenticated = True
        d = defer.maybeDeferred(login.master_portal.realm.requestAvatar, avatarId, mind, *interfaces)

        def attached(result: Any) -> Any:
            login.worker_name = worker_name_of(avatarId)
            result = self._logout_if_gone(result, mind, login.worker_name)
            if login.on_attached is not None:  # Buildbot has attached it: say how it came in
                login.on_attached(login.worker_name, login.entry, login.peer)
            return result

        def refused(failure: Any) -> Any:
            login.authenticated = False  # e.g. Buildbot refuses a worker attached already
            login.note_refused(worker_name_of(avatarId), "master_refused")
            return failure

        return d.addCallbacks(attached, refused)

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
            host=self.login.entry.name,
            worker=username,
        )
        _interface, _avatar, logout = result
        logout()
        raise ChannelClosedWhileAttaching(f"worker {username!r}: the channel closed while it attached")


def worker_name_of(avatar_id: Any) -> str:
    """The worker name an avatar id stands for (Buildbot's checker returns the name, as bytes)."""
    return avatar_id.decode("utf-8", "replace") if isinstance(avatar_id, bytes) else str(avatar_id)
