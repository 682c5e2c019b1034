"""The authorized_hosts parser: OpenSSH authorized_keys lines naming worker hosts."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master.authorized_hosts import HostEntry, LineError, load, parse_line, parse_lines
from buildbot_sshmux.wire.keys import fingerprint, generate_ed25519, public_line

from .tmpdirs import scratch_dir

KEY = generate_ed25519()
KEY2 = generate_ed25519()
LINE = public_line(KEY)  # "ssh-ed25519 AAAA..."
LINE2 = public_line(KEY2)
BLOB = LINE.split()[1]


class ParseLineTests(TestCase):
    def parse(self, line: str) -> HostEntry:
        entry = parse_line(line, "hosts:1")
        assert entry is not None
        return entry

    def test_host_and_workers_options(self) -> None:
        entry = self.parse(f'host="debian-sid",workers="*-debian-sid,tools-*" {LINE} admin@example')
        self.assertEqual(entry.name, "debian-sid")
        self.assertEqual(entry.workers, ("*-debian-sid", "tools-*"))
        self.assertEqual(entry.key, KEY.public())
        self.assertEqual(entry.fingerprint, fingerprint(KEY))
        self.assertEqual(entry.source, "hosts:1")

    def test_name_defaults_to_the_comments_first_word(self) -> None:
        entry = self.parse(f"{LINE} fedora-40 the fedora box")
        self.assertEqual(entry.name, "fedora-40")
        self.assertEqual(entry.workers, ("*",))

    def test_host_option_wins_over_the_comment(self) -> None:
        self.assertEqual(self.parse(f'host="a" {LINE} b').name, "a")

    def test_blank_and_comment_lines_are_nothing(self) -> None:
        for line in ["", "   ", "\t", "# a comment", "   # indented comment"]:
            self.assertIsNone(parse_line(line), repr(line))

    def test_quoted_options_may_hold_commas_and_spaces(self) -> None:
        entry = self.parse(f'workers="a-*, b-*",host="my host" {LINE}')
        self.assertEqual(entry.name, "my host")
        self.assertEqual(entry.workers, ("a-*", "b-*"))

    def test_escaped_quote_inside_a_value(self) -> None:
        entry = self.parse(f'host="say \\"hi\\"" {LINE}')
        self.assertEqual(entry.name, 'say "hi"')

    def test_option_names_are_case_insensitive(self) -> None:
        self.assertEqual(self.parse(f'HOST="x" {LINE}').name, "x")

    def test_tab_separates_options_from_the_key(self) -> None:
        self.assertEqual(self.parse(f'host="x"\t{LINE}').name, "x")

    def assertLineError(self, line: str, *fragments: str) -> None:
        with self.assertRaises(LineError) as caught:
            parse_line(line)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_unknown_option(self) -> None:
        self.assertLineError(f'host="x",command="/bin/sh" {LINE}', "unknown option", "command")

    def test_bad_base64(self) -> None:
        self.assertLineError("ssh-ed25519 AAAA!!!notbase64 x", "bad ssh-ed25519 key")

    def test_truncated_key_blob(self) -> None:
        self.assertLineError(f"ssh-ed25519 {BLOB[:20]} x", "bad ssh-ed25519 key")

    def test_missing_name(self) -> None:
        self.assertLineError(LINE, "no host name")

    def test_empty_host_option_is_a_missing_name(self) -> None:
        self.assertLineError(f'host="" {LINE}', "no host name")

    def test_key_type_mismatch(self) -> None:
        rsa_word_ed25519_blob = f"ssh-rsa {BLOB} x"
        self.assertLineError(rsa_word_ed25519_blob, "ssh-ed25519", "ssh-rsa")

    def test_unsupported_key_type(self) -> None:
        self.assertLineError(f"ssh-dss {BLOB} x", "unsupported key type")

    def test_missing_key_blob(self) -> None:
        self.assertLineError("ssh-ed25519", "expected")

    def test_unquoted_option_value_runs_to_the_comma(self) -> None:
        entry = parse_line(f"max-channels=5,host=x {LINE}")
        assert entry is not None
        self.assertEqual((entry.name, entry.max_channels), ("x", 5))

    def test_empty_unquoted_option_value(self) -> None:
        self.assertLineError(f"host= {LINE}", "needs a value")

    def test_unterminated_quote(self) -> None:
        self.assertLineError(f'host="x {LINE}', "unterminated")

    def test_option_given_twice(self) -> None:
        self.assertLineError(f'host="a",host="b" {LINE}', "twice")

    def test_empty_workers_allows_nothing_so_is_an_error(self) -> None:
        self.assertLineError(f'host="x",workers=" , " {LINE}', "workers")


class MayAttachTests(TestCase):
    def entry(self, *patterns: str) -> HostEntry:
        return HostEntry(name="h", key=KEY.public(), workers=patterns)

    def test_globs(self) -> None:
        entry = self.entry("*-debian-sid", "tools-?")
        self.assertTrue(entry.may_attach("libxml2-debian-sid"))
        self.assertTrue(entry.may_attach("tools-1"))
        self.assertFalse(entry.may_attach("tools-12"))
        self.assertFalse(entry.may_attach("libxml2-fedora"))
        self.assertFalse(entry.may_attach("debian-sid-libxml2"))

    def test_default_allows_any_name(self) -> None:
        self.assertTrue(HostEntry(name="h", key=KEY.public()).may_attach("anything"))

    def test_globs_are_case_sensitive(self) -> None:
        self.assertFalse(self.entry("*-debian").may_attach("GLIB-DEBIAN"))

    def test_bracket_classes(self) -> None:
        entry = self.entry("w[0-9]")
        self.assertTrue(entry.may_attach("w7"))
        self.assertFalse(entry.may_attach("wx"))


class ParseLinesTests(TestCase):
    def test_a_bad_line_does_not_stop_the_others(self) -> None:
        lines = [
            "# worker hosts",
            f'host="one" {LINE}',
            f'host="bad",frobnicate="1" {LINE}',
            "",
            f'host="two",workers="x-*" {LINE2}',
            "ssh-ed25519 not-base64 three",
            f"ssh-ed25519 {BLOB[:20]} truncated",
        ]
        entries, errors = parse_lines(lines, "/etc/sshmux/authorized_hosts")
        self.assertEqual([e.name for e in entries], ["one", "two"])
        self.assertEqual(
            [e.source for e in entries], ["/etc/sshmux/authorized_hosts:2", "/etc/sshmux/authorized_hosts:5"]
        )
        self.assertEqual(len(errors), 3)
        self.assertTrue(errors[0].startswith("/etc/sshmux/authorized_hosts:3: "), errors[0])
        self.assertIn("frobnicate", errors[0])
        self.assertTrue(errors[1].startswith("/etc/sshmux/authorized_hosts:6: "), errors[1])
        self.assertTrue(errors[2].startswith("/etc/sshmux/authorized_hosts:7: "), errors[2])

    def test_load_reads_a_file_and_names_it_in_errors(self) -> None:
        path = scratch_dir(self) / "authorized_hosts"
        path.write_text(f'host="one" {LINE}\nhost="x",bogus="1" {LINE2}\n', encoding="utf-8")
        entries, errors = load(path)
        self.assertEqual([e.name for e in entries], ["one"])
        self.assertEqual(len(errors), 1)
        self.assertIn(f"{path}:2:", errors[0])
        self.assertIn("bogus", errors[0])

    def test_load_of_a_missing_file_raises_oserror(self) -> None:
        self.assertRaises(OSError, load, scratch_dir(self) / "absent")

    def test_all_good(self) -> None:
        entries, errors = parse_lines([f'host="a" {LINE}', f'host="b" {LINE2}'], "f")
        self.assertEqual(errors, [])
        self.assertEqual([e.key for e in entries], [KEY.public(), KEY2.public()])


class CorruptKeyTests(TestCase):
    """Whatever the key data, a line is an entry or a LineError, never a crash."""

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.data())
    def test_corrupt_blob_is_a_line_error(self, data: st.DataObject) -> None:
        blob = bytearray(KEY.public().blob())
        how = data.draw(st.sampled_from(["truncate", "flip", "append"]))
        if how == "truncate":
            blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        elif how == "flip":
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        else:
            blob += data.draw(st.binary(min_size=1, max_size=8))
        line = f"ssh-ed25519 {base64.b64encode(bytes(blob)).decode()} corrupt-host"
        try:
            parse_line(line)
        except LineError:
            pass
        # The next line still loads (another key: a blob with trailing bytes may
        # still be KEY's, and a key's second line is ignored).
        entries, errors = parse_lines([line, f'host="good" {LINE2}'], "f")
        self.assertEqual(entries[-1].name, "good")


class DuplicateKeyTests(TestCase):
    def test_a_key_on_a_second_line_is_reported_and_ignored(self) -> None:
        entries, errors = parse_lines(
            [f'host="first" {LINE}', f'host="other" {LINE2}', f'host="second",workers="x" {LINE}'], "hosts"
        )
        self.assertEqual([e.name for e in entries], ["first", "other"])
        [error] = errors
        self.assertIn("hosts:3: the key SHA256:", error)
        self.assertIn("is on line 1 already", error)
