"""A twisted.web `Site` for our local pages (control socket, metrics): no access log.

A status call or a scrape is not an event, so no request is logged.  And
`HTTPFactory.startFactory` would keep a one-second timer ticking for the
access log's date for as long as the site listens, waking an idle
launcher or master every second for nothing: this site does not start it.
"""

from __future__ import annotations

from typing import Any

from twisted.web import server


class QuietSite(server.Site):
    noisy = False

    def startFactory(self) -> None:
        """Nothing to open: no access log, so no log file and no date timer."""

    def log(self, request: Any) -> None:
        """A request is not logged."""
