"""herd.generate: stop strings cut a text stream (the compiled decode step is exercised in test_engine.py)."""

import pytest

from herd.generate import StopStrings


@pytest.mark.parametrize("deltas, stops, want, hit", [
    (["Hello wor", "ld! more"], ["world"], "Hello ", "world"),
    (["abc", "de", "f"], ["xyz"], "abcdef", None),
    (["a<", "/s", "> tail"], ["</s>"], "a", "</s>"),
    (["a<", "b"], ["</s>"], "a<b", None),  # held back, then released
    (["xx END yy END"], ["END", "yy"], "xx ", "END"),
])
def test_stop_strings(deltas, stops, want, hit):
    cut = StopStrings(stops)
    text = ""
    for d in deltas:
        out, found = cut.feed(d)
        text += out
        if found:
            break
    text += cut.flush()
    assert text == want and cut.hit == hit


class _RescanStops:
    """The former StopStrings (re-scans the whole buffer; quadratic suffix/prefix overlap): the oracle."""

    def __init__(self, stops):
        self.stops, self.buf, self.hit = [s for s in stops if s], "", None

    def feed(self, text):
        if self.hit is not None:
            return "", True
        if not self.stops:
            return text, False
        self.buf += text
        found = [(self.buf.find(s), s) for s in self.stops if s in self.buf]
        if found:
            i, self.hit = min(found)
            out, self.buf = self.buf[:i], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.buf) - keep
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self):
        out, self.buf = ("" if self.hit is not None else self.buf), ""
        return out


def test_stop_strings_equal_the_rescanning_oracle():
    import random

    r = random.Random(0)
    for trial in range(3000):
        alphabet = "ab" if trial % 2 else "abc<"
        stops = ["".join(r.choice(alphabet) for _ in range(r.randint(1, 6))) for _ in range(r.randint(1, 4))]
        stream = "".join(r.choice(alphabet) for _ in range(r.randint(0, 40)))
        cuts = sorted(r.sample(range(len(stream) + 1), min(len(stream) + 1, r.randint(1, 8))))
        deltas = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        new, old = StopStrings(stops), _RescanStops(stops)
        for d in deltas:
            got, want = new.feed(d), old.feed(d)
            assert got == want and new.buf == old.buf, (stops, deltas)
        assert new.flush() == old.flush() and new.hit == old.hit


def test_stop_string_scan_is_linear_in_the_stream():
    # the worst case for a re-scan: long stops whose long prefixes keep matching, fed one character at a time
    stops = ["a" * 511 + "b", "a" * 300 + "c", "ab" * 256, "x" * 512]
    cut = StopStrings(stops)
    n = 20_000
    out = "".join(cut.feed("a")[0] for _ in range(n))
    assert cut.hit is None and len(out) + len(cut.buf) == n and len(cut.buf) == 511
    assert cut.work <= 3 * n * len(stops)  # amortized O(1) per character and stop (a re-scan: ~n x 512 x stops)
    out, hit = cut.feed("b")
    assert hit and cut.hit == stops[0] and out == ""  # the stop began in the held-back tail
