"""authorized_hosts options beyond workers=: from=, max-channels; and editing the file.

The parser half checks OpenSSH's ``from=`` semantics (CIDR, wildcards,
``!`` negation, IPv4-mapped peers) and ``max-channels=N``; the editing half
checks `format_entry`, `add_entry` and `remove_entries`, which the
``buildbot-sshmux authorize|revoke`` commands are built on.
"""

from __future__ import annotations

import stat

from twisted.trial.unittest import TestCase

from buildbot_sshmux.master.authorized_hosts import (
    HostEntry,
    LineError,
    add_entry,
    address_matches,
    format_entry,
    load,
    parse_line,
    parse_lines,
    remove_entries,
)
from buildbot_sshmux.wire.keys import fingerprint, generate, generate_ed25519, public_line

from .tmpdirs import scratch_dir

KEY_A = generate_ed25519()
KEY_A2 = generate_ed25519()
KEY_B = generate_ed25519()
KEY_ECDSA = generate("ecdsa")
LINE_A = public_line(KEY_A)
LINE_B = public_line(KEY_B)


def entry_with_from(patterns: str) -> HostEntry:
    entry = parse_line(f'host="h",from="{patterns}" {LINE_A}', "hosts:1")
    assert entry is not None
    return entry


class FromOptionTests(TestCase):
    def assertAllows(self, patterns: str, *addresses: str) -> None:
        entry = entry_with_from(patterns)
        for address in addresses:
            self.assertTrue(entry.allows_address(address), f"from={patterns!r} should allow {address}")

    def assertRefuses(self, patterns: str, *addresses: str) -> None:
        entry = entry_with_from(patterns)
        for address in addresses:
            self.assertFalse(entry.allows_address(address), f"from={patterns!r} should refuse {address}")

    def test_patterns_are_parsed_in_order(self) -> None:
        entry = entry_with_from("10.0.0.0/8, 192.0.2.*,!10.9.9.9")
        self.assertEqual(entry.from_patterns, ("10.0.0.0/8", "192.0.2.*", "!10.9.9.9"))

    def test_no_from_allows_any_address(self) -> None:
        entry = parse_line(f'host="h" {LINE_A}')
        assert entry is not None
        self.assertEqual(entry.from_patterns, ())
        for address in ("10.1.2.3", "2001:db8::1", "::ffff:192.0.2.1", "203.0.113.9"):
            self.assertTrue(entry.allows_address(address), address)

    def test_ipv4_cidr(self) -> None:
        self.assertAllows("10.0.0.0/8", "10.0.0.1", "10.255.255.255")
        self.assertRefuses("10.0.0.0/8", "11.0.0.1", "9.255.255.255", "192.0.2.1")
        self.assertAllows("192.0.2.128/25", "192.0.2.128", "192.0.2.200")
        self.assertRefuses("192.0.2.128/25", "192.0.2.127", "192.0.2.1")

    def test_host_cidr_matches_exactly_one_address(self) -> None:
        self.assertAllows("192.0.2.7/32", "192.0.2.7")
        self.assertRefuses("192.0.2.7/32", "192.0.2.8")

    def test_ipv6_cidr(self) -> None:
        self.assertAllows("2001:db8::/32", "2001:db8::1", "2001:db8:ffff::42")
        self.assertRefuses("2001:db8::/32", "2001:db9::1", "::1")

    def test_cidr_of_the_other_family_never_matches(self) -> None:
        self.assertRefuses("2001:db8::/32", "10.0.0.1")
        self.assertRefuses("10.0.0.0/8", "2001:db8::1")

    def test_wildcards(self) -> None:
        self.assertAllows("192.0.2.*", "192.0.2.1", "192.0.2.254")
        self.assertRefuses("192.0.2.*", "192.0.3.1")
        self.assertAllows("192.0.2.?", "192.0.2.1")
        self.assertRefuses("192.0.2.?", "192.0.2.12")
        self.assertAllows("2001:db8::*", "2001:db8::1")
        self.assertAllows("*", "10.1.2.3", "2001:db8::1")

    def test_exact_address_pattern(self) -> None:
        self.assertAllows("192.0.2.7", "192.0.2.7")
        self.assertRefuses("192.0.2.7", "192.0.2.70", "192.0.2.8")

    def test_names_are_not_resolved(self) -> None:
        self.assertRefuses("*.example.org", "192.0.2.1", "2001:db8::1")

    def test_any_positive_pattern_allows(self) -> None:
        self.assertAllows("10.0.0.0/8,192.0.2.0/24", "10.1.1.1", "192.0.2.3")
        self.assertRefuses("10.0.0.0/8,192.0.2.0/24", "198.51.100.1")

    def test_negation_refuses_even_when_a_positive_pattern_matches(self) -> None:
        for patterns in ("10.0.0.0/8,!10.0.0.5", "!10.0.0.5,10.0.0.0/8"):
            self.assertRefuses(patterns, "10.0.0.5")
            self.assertAllows(patterns, "10.0.0.6")

    def test_negated_cidr_and_wildcard(self) -> None:
        self.assertRefuses("10.0.0.0/8,!10.9.0.0/16", "10.9.1.1")
        self.assertAllows("10.0.0.0/8,!10.9.0.0/16", "10.8.1.1")
        self.assertRefuses("*,!192.0.2.*", "192.0.2.44")
        self.assertAllows("*,!192.0.2.*", "192.0.3.44")

    def test_negation_alone_does_not_allow_the_other_addresses(self) -> None:
        # The parser refuses such a line; the matcher on its own is just as strict.
        self.assertFalse(address_matches("10.0.0.6", ("!10.0.0.5",)))

    def test_ipv4_mapped_ipv6_peer_is_matched_as_ipv4(self) -> None:
        self.assertAllows("10.0.0.0/8", "::ffff:10.1.2.3")
        self.assertAllows("10.1.2.*", "::ffff:10.1.2.3")
        self.assertAllows("10.1.2.3", "::ffff:10.1.2.3")
        self.assertRefuses("10.0.0.0/8", "::ffff:192.0.2.1")
        self.assertRefuses("10.0.0.0/8,!10.1.2.3", "::ffff:10.1.2.3")

    def assertLineError(self, line: str, *fragments: str) -> None:
        with self.assertRaises(LineError) as caught:
            parse_line(line)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_only_negated_patterns_is_a_line_error(self) -> None:
        self.assertLineError(f'host="h",from="!10.0.0.5" {LINE_A}', "only negated")
        self.assertLineError(f'host="h",from="!10.0.0.0/8,!192.0.2.*" {LINE_A}', "only negated")

    def test_bad_cidr_is_a_line_error(self) -> None:
        for bad in ("10.0.0.0/33", "300.1.2.3/8", "10.0.0.0/x", "2001:db8::/129", "!10.0.0.0/99"):
            self.assertLineError(f'host="h",from="10.0.0.0/8,{bad}" {LINE_A}', bad, "CIDR")

    def test_empty_from_is_a_line_error(self) -> None:
        self.assertLineError(f'host="h",from="" {LINE_A}', "from")
        self.assertLineError(f'host="h",from=" , " {LINE_A}', "from")
        self.assertLineError(f'host="h",from="10.0.0.0/8,!" {LINE_A}', "empty pattern")

    def test_a_bad_from_line_is_reported_with_file_and_line_and_skipped(self) -> None:
        lines = [
            f'host="a",from="10.0.0.0/33" {LINE_A}',
            f'host="x",from="!10.0.0.1" {public_line(KEY_A2)}',
            f'host="b",from="192.0.2.0/24" {LINE_B}',
        ]
        entries, errors = parse_lines(lines, "/srv/master/sshmux/authorized_hosts")
        self.assertEqual([e.name for e in entries], ["b"])
        self.assertEqual(len(errors), 2)
        self.assertTrue(errors[0].startswith("/srv/master/sshmux/authorized_hosts:1: "), errors[0])
        self.assertIn("10.0.0.0/33", errors[0])
        self.assertTrue(errors[1].startswith("/srv/master/sshmux/authorized_hosts:2: "), errors[1])
        self.assertIn("negated", errors[1])


class MaxChannelsTests(TestCase):
    def max_channels(self, value: str) -> int | None:
        entry = parse_line(f'host="h",max-channels={value} {LINE_A}')
        assert entry is not None
        return entry.max_channels

    def test_default_is_no_limit(self) -> None:
        entry = parse_line(f'host="h" {LINE_A}')
        assert entry is not None
        self.assertIsNone(entry.max_channels)

    def test_unquoted(self) -> None:
        self.assertEqual(self.max_channels("3"), 3)
        self.assertEqual(self.max_channels("1"), 1)
        self.assertEqual(self.max_channels("250"), 250)

    def test_quoted(self) -> None:
        self.assertEqual(self.max_channels('"3"'), 3)
        self.assertEqual(self.max_channels('"64"'), 64)

    def test_unquoted_value_before_other_options(self) -> None:
        entry = parse_line(f'max-channels=7,host="h",workers="a-*" {LINE_A}')
        assert entry is not None
        self.assertEqual((entry.max_channels, entry.name, entry.workers), (7, "h", ("a-*",)))

    def test_bad_values_are_line_errors(self) -> None:
        # "²" and "１" are str.isdigit() but not ASCII digits: a line error, never a crash.
        for bad in ("0", "-1", "abc", "2.5", "1e3", '"0"', '""', '" 3"', '"two"', '"²"', '"１"'):
            with self.assertRaises(LineError, msg=bad) as caught:
                parse_line(f'host="h",max-channels={bad} {LINE_A}')
            self.assertIn("max-channels", str(caught.exception), bad)

    def test_empty_unquoted_value_is_a_line_error(self) -> None:
        self.assertRaises(LineError, parse_line, f'host="h",max-channels= {LINE_A}')
        self.assertRaises(LineError, parse_line, f'host="h",max-channels,workers="*" {LINE_A}')

    def test_given_twice_is_a_line_error(self) -> None:
        self.assertRaises(LineError, parse_line, f'host="h",max-channels=2,max-channels=3 {LINE_A}')

    def test_a_bad_value_never_stops_the_other_lines(self) -> None:
        lines = [f'host="a",max-channels="²" {LINE_A}', f'host="b",max-channels=2 {LINE_B}']
        entries, errors = parse_lines(lines, "hosts")
        self.assertEqual([(e.name, e.max_channels) for e in entries], [("b", 2)])
        self.assertEqual(len(errors), 1)
        self.assertTrue(errors[0].startswith("hosts:1: "), errors[0])


class FormatEntryTests(TestCase):
    def round_trip(self, line: str) -> HostEntry:
        entry = parse_line(line, "x:1")
        assert entry is not None
        return entry

    def test_all_options_round_trip(self) -> None:
        line = format_entry(
            "debian-sid",
            KEY_A,
            ("*-debian-sid", "tools-?"),
            ("10.0.0.0/8", "2001:db8::/32", "!10.9.9.9"),
            4,
            "admin@example",
        )
        entry = self.round_trip(line)
        self.assertEqual(entry.name, "debian-sid")
        self.assertEqual(entry.key, KEY_A.public())
        self.assertEqual(entry.workers, ("*-debian-sid", "tools-?"))
        self.assertEqual(entry.from_patterns, ("10.0.0.0/8", "2001:db8::/32", "!10.9.9.9"))
        self.assertEqual(entry.max_channels, 4)
        self.assertTrue(line.endswith(" admin@example"), line)

    def test_defaults_round_trip(self) -> None:
        entry = self.round_trip(format_entry("fedora-40", KEY_ECDSA))
        self.assertEqual(entry.name, "fedora-40")
        self.assertEqual(entry.key, KEY_ECDSA.public())
        self.assertEqual(entry.workers, ("*",))
        self.assertEqual(entry.from_patterns, ())
        self.assertIsNone(entry.max_channels)

    def test_private_key_is_written_as_its_public_half(self) -> None:
        line = format_entry("h", KEY_A)
        self.assertIn(LINE_A, line)
        self.assertEqual(self.round_trip(line).fingerprint, fingerprint(KEY_A))

    def test_name_with_spaces_round_trips(self) -> None:
        entry = self.round_trip(format_entry("build box 7", KEY_A, ("w-*",)))
        self.assertEqual(entry.name, "build box 7")

    def test_quotes_and_newlines_are_refused(self) -> None:
        for kwargs in (
            {"name": 'a"b'},
            {"name": "a\nb"},
            {"name": "h", "workers": ('x"y',)},
            {"name": "h", "from_patterns": ('10.0.0.1"',)},
        ):
            self.assertRaises(LineError, format_entry, key=KEY_A, **kwargs)

    def test_values_the_parser_would_refuse_are_refused(self) -> None:
        self.assertRaises(LineError, format_entry, "h", KEY_A, from_patterns=("!10.0.0.1",))
        self.assertRaises(LineError, format_entry, "h", KEY_A, from_patterns=("10.0.0.0/40",))
        self.assertRaises(LineError, format_entry, "h", KEY_A, max_channels=0)


class AddEntryTests(TestCase):
    def setUp(self) -> None:
        self.path = scratch_dir(self) / "authorized_hosts"

    def test_creates_the_file_mode_0600(self) -> None:
        add_entry(self.path, format_entry("a", KEY_A))
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        entries, errors = load(self.path)
        self.assertEqual(errors, [])
        self.assertEqual([(e.name, e.key) for e in entries], [("a", KEY_A.public())])

    def test_keeps_existing_content_and_comments(self) -> None:
        before = f'# worker hosts of the CI\n\nhost="b",workers="b-*" {LINE_B}\n# end of B\n'
        self.path.write_text(before, encoding="utf-8")
        self.path.chmod(0o600)
        line = format_entry("a", KEY_A, ("a-*",))
        add_entry(self.path, line)
        self.assertEqual(self.path.read_text(encoding="utf-8"), before + line + "\n")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_file_without_a_final_newline_gets_one_before_the_new_line(self) -> None:
        self.path.write_text(f'host="b" {LINE_B}', encoding="utf-8")
        line = format_entry("a", KEY_A)
        add_entry(self.path, line)
        self.assertEqual(self.path.read_text(encoding="utf-8").splitlines(), [f'host="b" {LINE_B}', line])

    def test_refuses_a_key_already_there_naming_its_host_and_file_line(self) -> None:
        self.path.write_text(f'# hosts\nhost="old-name",workers="x-*" {LINE_A}\n', encoding="utf-8")
        before = self.path.read_text(encoding="utf-8")
        with self.assertRaises(LineError) as caught:
            add_entry(self.path, format_entry("new-name", KEY_A, ("y-*",)))
        message = str(caught.exception)
        self.assertIn("old-name", message)
        self.assertIn(f"{self.path}:2", message)
        self.assertIn(fingerprint(KEY_A), message)
        self.assertEqual(self.path.read_text(encoding="utf-8"), before)

    def test_the_same_line_twice_is_refused(self) -> None:
        line = format_entry("a", KEY_A)
        add_entry(self.path, line)
        self.assertRaises(LineError, add_entry, self.path, line)
        self.assertEqual(len(load(self.path)[0]), 1)

    def test_a_second_key_for_the_same_host_is_allowed_for_rotation(self) -> None:
        add_entry(self.path, format_entry("a", KEY_A, ("a-*",)))
        add_entry(self.path, format_entry("a", KEY_A2, ("a-*",)))
        entries, errors = load(self.path)
        self.assertEqual(errors, [])
        self.assertEqual([e.name for e in entries], ["a", "a"])
        self.assertEqual([e.key for e in entries], [KEY_A.public(), KEY_A2.public()])

    def test_refuses_an_unparsable_line(self) -> None:
        self.assertRaises(LineError, add_entry, self.path, f'host="a",bogus=1 {LINE_A}')
        self.assertFalse(self.path.exists())


class RemoveEntriesTests(TestCase):
    def setUp(self) -> None:
        self.path = scratch_dir(self) / "authorized_hosts"
        self.lines = [
            "# worker hosts",
            f'host="a",workers="a-*" {LINE_A}',
            f'host="b",workers="b-*" {LINE_B}',
            "",
            f'host="bad",frobnicate="1" {LINE_B}',
            "# rotation of a:",
            f'host="a",workers="a-*" {public_line(KEY_A2)}',
        ]
        self.path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        self.path.chmod(0o600)

    def remaining(self) -> list[str]:
        return self.path.read_text(encoding="utf-8").splitlines()

    def test_by_host_removes_all_its_keys(self) -> None:
        removed = remove_entries(self.path, host="a")
        self.assertEqual([e.key for e in removed], [KEY_A.public(), KEY_A2.public()])
        self.assertEqual([e.name for e in removed], ["a", "a"])
        self.assertEqual([e.source for e in removed], [f"{self.path}:2", f"{self.path}:7"])
        self.assertEqual(self.remaining(), [self.lines[i] for i in (0, 2, 3, 4, 5)])

    def test_by_fingerprint_removes_one_key(self) -> None:
        removed = remove_entries(self.path, key_fingerprint=fingerprint(KEY_A))
        self.assertEqual([(e.name, e.key) for e in removed], [("a", KEY_A.public())])
        self.assertEqual(self.remaining(), [self.lines[i] for i in (0, 2, 3, 4, 5, 6)])
        entries, _errors = load(self.path)
        self.assertEqual([e.key for e in entries], [KEY_B.public(), KEY_A2.public()])

    def test_comments_and_bad_lines_are_kept_untouched(self) -> None:
        remove_entries(self.path, host="b")
        remaining = self.remaining()
        self.assertIn("# worker hosts", remaining)
        self.assertIn("# rotation of a:", remaining)
        self.assertIn(self.lines[4], remaining, "the bad line must be kept as it was")
        self.assertNotIn(self.lines[2], remaining)

    def test_a_bad_line_is_never_removed_even_if_it_names_the_host(self) -> None:
        removed = remove_entries(self.path, host="bad")
        self.assertEqual(removed, [])
        self.assertEqual(self.remaining(), self.lines)

    def test_nothing_matching_changes_nothing(self) -> None:
        before = self.path.read_bytes()
        self.assertEqual(remove_entries(self.path, host="nobody"), [])
        self.assertEqual(remove_entries(self.path, key_fingerprint=fingerprint(KEY_ECDSA)), [])
        self.assertEqual(remove_entries(self.path), [])
        self.assertEqual(self.path.read_bytes(), before)

    def test_keeps_the_file_mode(self) -> None:
        remove_entries(self.path, host="a")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_removing_then_adding_back_works(self) -> None:
        remove_entries(self.path, key_fingerprint=fingerprint(KEY_B))
        add_entry(self.path, format_entry("b2", KEY_B, ("b-*",)))
        entries, _errors = load(self.path)
        self.assertIn(("b2", KEY_B.public()), [(e.name, e.key) for e in entries])
