"""`wire.proxy`: the HTTP CONNECT tunnel, over in-memory transports."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from buildbot_sshmux.wire.proxy import (
    HTTPConnectEndpoint,
    ProxyRefused,
    ProxyURL,
    _TunnelFactory,
    proxy_from_environment,
)


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class TunnelTests(TestCase):
    def tunnel(
        self, url: str = "http://proxy.example.org:3128"
    ) -> tuple[Any, StringTransport, Clock, Recorder]:
        clock = Clock()
        endpoint = HTTPConnectEndpoint(clock, ProxyURL.parse(url), "master.example.org", 2222, timeout=30)
        inner = Recorder()
        factory = _TunnelFactory(endpoint, protocol.Factory.forProtocol(lambda: inner))
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        transport.protocol = proto  # what the reactor's transports have
        return factory, transport, clock, inner

    def test_connect_then_the_bytes_pass_both_ways(self) -> None:
        factory, transport, _clock, inner = self.tunnel()
        self.assertEqual(
            transport.value(),
            b"CONNECT master.example.org:2222 HTTP/1.1\r\nHost: master.example.org:2222\r\n\r\n",
        )
        transport.clear()
        proto = transport.protocol
        proto.dataReceived(b"HTTP/1.1 200 Connection established\r\n")
        self.assertFalse(factory.connected.called)
        proto.dataReceived(b"Proxy-agent: tinyproxy\r\n\r\nSSH-2.0-x\r\n")
        self.assertIs(self.successResultOf(factory.connected), inner)
        self.assertEqual(inner.received, b"SSH-2.0-x\r\n")
        proto.dataReceived(b"more")
        self.assertEqual(inner.received, b"SSH-2.0-x\r\nmore")

    def test_a_user_is_sent_as_basic_auth_and_never_shown(self) -> None:
        _factory, transport, _clock, _inner = self.tunnel("http://ci%40x:s3cr%3At@proxy.example.org:8080")
        token = base64.b64encode(b"ci@x:s3cr:t").decode()
        self.assertIn(f"Proxy-Authorization: Basic {token}\r\n".encode(), transport.value())
        url = ProxyURL.parse("http://ci:s3cret@proxy.example.org:8080")
        self.assertNotIn("s3cret", repr(url) + url.display)

    def refusal(self, reply: bytes) -> str:
        factory, transport, _clock, _inner = self.tunnel()
        transport.protocol.dataReceived(reply)
        failure = self.failureResultOf(factory.connected, ProxyRefused)
        self.assertTrue(transport.disconnecting)
        return str(failure.value)

    def test_refusals_name_the_proxy_and_its_answer(self) -> None:
        message = self.refusal(b"HTTP/1.1 403 Access violation\r\n\r\n")
        self.assertEqual(
            message,
            "proxy http://proxy.example.org:3128 did not open a tunnel to master.example.org:2222:"
            " it answered 'HTTP/1.1 403 Access violation'",
        )
        self.assertIn(
            "check the user and password", self.refusal(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n")
        )
        self.assertIn("is not HTTP", self.refusal(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"))
        self.assertIn("no end of headers in 16 KiB", self.refusal(b"x" * 20000))

    def test_silence_and_a_closed_connection_are_refusals_too(self) -> None:
        factory, _transport, clock, _inner = self.tunnel()
        clock.advance(30)
        self.assertIn(
            "no answer within 30 s", str(self.failureResultOf(factory.connected, ProxyRefused).value)
        )
        factory, transport, _clock, _inner = self.tunnel()
        transport.protocol.connectionLost(protocol.connectionDone)
        self.assertIn(
            "closed the connection", str(self.failureResultOf(factory.connected, ProxyRefused).value)
        )


class ProxyURLTests(TestCase):
    def test_forms(self) -> None:
        self.assertEqual(ProxyURL.parse("http://p:8080"), ProxyURL("p", 8080))
        self.assertEqual(ProxyURL.parse("http://p"), ProxyURL("p", 3128))
        for bad in ["https://p:1", "socks5://p:1", "http://p:1/x", "p:8080", "http://p:99999"]:
            with self.assertRaises(ValueError, msg=bad):
                ProxyURL.parse(bad)

    def test_the_environment_as_curl_reads_it(self) -> None:
        self.patch(
            __import__("os"), "environ", {"HTTPS_PROXY": "http://p:1", "no_proxy": "localhost,.internal"}
        )
        self.assertEqual(proxy_from_environment("master.example.org"), "http://p:1")
        self.assertIsNone(proxy_from_environment("m.internal"))
        self.assertIsNone(proxy_from_environment("localhost"))
