from vlmserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher


class ByteTokenizer:
    """Each token is one UTF-8 byte: the hardest case for incremental decoding."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_never_emits_a_broken_character():
    text = "héllo 🙂 wörld"
    ids = list(text.encode())
    detok = IncrementalDetokenizer(ByteTokenizer(), prompt_token_ids=list(b"ab"))
    pieces = [detok.push([i]) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_token_boundaries_is_never_released():
    matcher = StopStringMatcher(("STOP",))
    out = "".join(matcher.push(piece) for piece in ["hello S", "T", "O", "P and more"])
    assert out == "hello "
    assert matcher.matched == "STOP"


def test_partial_stop_prefix_is_released_at_the_end():
    matcher = StopStringMatcher(("STOP",))
    out = matcher.push("the ST")
    assert out == "the"
    assert out + matcher.flush() == "the ST"


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(("world", "lo"))
    assert matcher.push("hello world") == "hel"
    assert matcher.matched == "lo"


def test_no_stop_strings_releases_everything():
    matcher = StopStringMatcher(())
    assert matcher.push("abc") == "abc"
    assert matcher.flush() == ""
