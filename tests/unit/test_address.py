"""`parse_address`: the one parser of HOST[:PORT] (launcher config and both CLIs)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from buildbot_sshmux.wire.address import parse_address
from buildbot_sshmux.wire.defaults import SSH_PORT


class ParseAddressTests(TestCase):
    def test_forms(self) -> None:
        cases = {
            "master.example.org:2222": ("master.example.org", 2222),
            "master.example.org": ("master.example.org", SSH_PORT),
            "192.0.2.1:2222": ("192.0.2.1", 2222),
            "[2001:db8::1]:2222": ("2001:db8::1", 2222),
            "[2001:db8::1]": ("2001:db8::1", SSH_PORT),
            "2001:db8::1": ("2001:db8::1", SSH_PORT),
            " master:2222 ": ("master", 2222),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_address(text), expected, text)

    def test_a_port_may_be_required(self) -> None:
        with self.assertRaises(ValueError) as caught:
            parse_address("master.example.org", default_port=None)
        self.assertIn("has no port", str(caught.exception))
        self.assertEqual(parse_address("m:1", default_port=None), ("m", 1))

    def test_malformed(self) -> None:
        for text in ["master:port", "master:0", "master:65536", ":2222", "[2001:db8::1", "[::1]x", ""]:
            with self.assertRaises(ValueError, msg=text):
                parse_address(text)
