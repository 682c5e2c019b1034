"""A worker host that asks the master for lots of data, then stops reading.

Run as a child process by ``test_stalled_peer`` so that its own memory is
not counted in the master's::

    python stalled_client.py SSH_PORT PB_PORT IDENTITY HOST_KEY_LINE CHANNELS CALLS

It logs in with this package's `MasterLink`, opens CHANNELS PB channels
(`ChannelEndpoint`), finishes each PB handshake and prints ``READY``.  On a
``GO`` line on stdin it pauses its TCP transport (the socket is no longer
read: no data, no window adjustment, no keepalive answer reaches it) and
sends CALLS PB calls per channel on an object id the master does not have:
each ~37-byte call makes the master answer with a ~740-byte error, and the
answers have nowhere to go.  It prints ``SENT calls bytes`` and waits for
stdin to close.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, stdio, task
from twisted.protocols.basic import LineReceiver
from twisted.spread import pb

from buildbot_sshmux.wire.keys import load_private_key
from buildbot_sshmux.worker.link import ChannelEndpoint, HostKeyPins, MasterLink

BATCH = 32 * 1024


class Client(LineReceiver):
    delimiter = b"\n"

    def __init__(self, link: MasterLink, brokers: list[Any], calls: int) -> None:
        self.link = link
        self.brokers = brokers
        self.calls = calls
        self.sent = {id(b): 0 for b in brokers}
        self.total_bytes = 0
        self.loop = task.LoopingCall(self.top_up)

    def lineReceived(self, line: bytes) -> None:
        if line.strip() == b"GO":
            self.link._transport.transport.pauseProducing()
            self.loop.start(0.01)

    def connectionLost(self, reason: Any = None) -> None:
        reactor.stop()

    def batch(self, broker: Any, count: int) -> bytes:
        args, kw = broker.serialize(()), broker.serialize({})
        out = io.BytesIO()
        for _ in range(count):
            self.sent[id(broker)] += 1
            call = (b"message", 10_000_000 + self.sent[id(broker)], b"no-such-object", b"x", 1, args, kw)
            broker._encode(call, out.write)
        return out.getvalue()

    def top_up(self) -> None:
        busy = False
        for broker in self.brokers:
            channel = broker.transport
            left = self.calls - self.sent[id(broker)]
            if left <= 0:
                continue
            busy = True
            # This side holds little: only what the master's window will take soon.
            while left > 0 and channel.pending < 64 * 1024 and channel.remoteWindowLeft > channel.pending:
                data = self.batch(broker, min(left, BATCH // 37))
                self.total_bytes += len(data)
                channel.write(data)
                left = self.calls - self.sent[id(broker)]
        if not busy:
            self.loop.stop()
            self.sendLine(f"SENT {sum(self.sent.values())} {self.total_bytes}".encode())


async def main(ssh_port: int, pb_port: int, identity: str, host_key: str, channels: int, calls: int) -> None:
    link = MasterLink(
        reactor, "127.0.0.1", ssh_port, load_private_key(Path(identity)), HostKeyPins.from_config([host_key])
    )
    link.startService()
    await link.when_ready()
    brokers = []
    for i in range(channels):
        factory = pb.PBClientFactory()
        broker = await ChannelEndpoint(link, pb_port, f"stalled-{i}").connect(factory)
        await factory.getRootObject()
        brokers.append(broker)
    client = Client(link, brokers, calls)
    stdio.StandardIO(client)
    client.sendLine(b"READY")


def run() -> None:
    ssh_port, pb_port, identity, host_key, channels, calls = sys.argv[1:7]

    def start() -> None:
        d = defer.ensureDeferred(
            main(int(ssh_port), int(pb_port), identity, host_key, int(channels), int(calls))
        )

        def failed(f: Any) -> None:
            print(f"FAILED {f.getErrorMessage()}", flush=True)
            reactor.stop()

        d.addErrback(failed)

    reactor.callWhenRunning(start)
    reactor.run()


if __name__ == "__main__":
    run()
