"""Errors a user can meet, each one sentence: what is wrong and what to do."""

from __future__ import annotations


class SSHMuxError(Exception):
    """Base class of the errors this package reports to users."""


class KeyFileError(SSHMuxError):
    """A key file is missing, unreadable, malformed or too open."""


class ConfigError(SSHMuxError):
    """A launcher configuration file is wrong."""


class HostKeyMismatch(SSHMuxError):
    """The master offered a host key that is not pinned."""

    def __init__(self, address: str, expected: list[str], offered: str) -> None:
        self.address = address
        self.expected = expected
        self.offered = offered
        super().__init__(
            f"host key of {address} is {offered}, expected "
            f"{' or '.join(expected)}: refusing to connect; if the master's key was "
            f"rotated on purpose, update host_key/known_hosts in the launcher config"
        )


class ChannelRefused(SSHMuxError):
    """The master refused to open a channel for a worker session."""


class HostCertificateRefused(SSHMuxError):
    """The master offered a host certificate that this launcher does not accept."""

    def __init__(self, address: str, certificate: str, why: str) -> None:
        self.address = address
        super().__init__(
            f"host certificate of {address} ({certificate}) is refused: {why}; refusing to connect"
        )
