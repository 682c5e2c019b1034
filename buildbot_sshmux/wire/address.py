"""``HOST[:PORT]`` addresses, parsed one way everywhere (launcher config, CLIs)."""

from __future__ import annotations

from buildbot_sshmux.wire.defaults import SSH_PORT


def parse_address(address: str, default_port: int | None = SSH_PORT) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or a bare IPv6 address as (host, port).

    A missing port is ``default_port`` (SSHMuxService's default port, 2222),
    or a ValueError when None; a malformed one is a ValueError naming the address.
    """
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if not sep or (rest and port is None):
            raise ValueError(f"{address!r} is not HOST:PORT or [IPv6]:PORT")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:  # a name, or an IPv6 address without brackets (and so without a port)
        host, port = text, None
    if not host:
        raise ValueError(f"{address!r} has no host")
    if port is None or port == "":
        if default_port is None:
            raise ValueError(f"{address!r} has no port: give HOST:PORT")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: the port must be a number from 1 to 65535")
    return host, int(port)
