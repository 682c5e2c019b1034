"""QuietSite: our local pages keep no timer and log no request."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from buildbot_sshmux.wire.quietsite import QuietSite


class Status(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b'{"ok": true}'


def root() -> resource.Resource:
    page = resource.Resource()
    page.putChild(b"status", Status())
    return page


class QuietSiteTests(TestCase):
    def test_a_listening_site_keeps_no_timer(self) -> None:
        clock = Clock()
        site = QuietSite(root(), reactor=clock)
        site.doStart()
        self.addCleanup(site.doStop)
        self.assertEqual(clock.getDelayedCalls(), [])
        # What it saves: twisted.web's Site ticks every second for its access log.
        stock_clock = Clock()
        stock = server.Site(root(), reactor=stock_clock)
        stock.doStart()
        self.addCleanup(stock.doStop)
        self.assertEqual([call.getTime() for call in stock_clock.getDelayedCalls()], [1.0])

    def test_it_still_serves_and_logs_nothing(self) -> None:
        site = QuietSite(root(), reactor=Clock())
        site.doStart()
        self.addCleanup(site.doStop)
        logged: list[object] = []
        site._logFormatter = lambda timestamp, request: logged.append(request) or ""  # type: ignore[method-assign]
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /status HTTP/1.1\r\nHost: local\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"), transport.value()[:80])
        self.assertTrue(transport.value().endswith(b'{"ok": true}'))
        self.assertEqual(logged, [])
        channel.connectionLost(None)
