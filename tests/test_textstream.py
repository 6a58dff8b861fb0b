"""Token pieces to client text: UTF-8 reassembly and stop strings held back while streaming."""

from models.textstream import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.push(p) for p in pieces]


def test_without_stops_text_passes_through() -> None:
    s = TextStream()
    assert feed(s, [b"Hel", b"lo"]) == ["Hel", "lo"]
    assert s.finish() == ""


def test_a_character_split_across_tokens_waits_for_its_last_byte() -> None:
    s = TextStream()
    snow = "☃".encode()
    assert feed(s, [snow[:1], snow[1:2], snow[2:] + b"!"]) == ["", "", "☃!"]


def test_stop_string_is_never_sent_even_when_split_across_tokens() -> None:
    s = TextStream(("###",))
    out = feed(s, [b"abc #", b"#", b"# tail"])
    assert "".join(out) == "abc "
    assert s.stopped
    assert s.push(b"more") == ""


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    s = TextStream(("END",))
    assert s.push(b"the E") == "the "
    assert s.push(b"N") == ""
    assert s.push(b"D?") == "" and s.stopped
    s2 = TextStream(("END",))
    assert s2.push(b"the E") == "the "
    assert s2.push(b"ast") == "East"


def test_finish_releases_what_was_held() -> None:
    s = TextStream(("STOP",))
    assert s.push(b"go ST") == "go "
    assert s.finish() == "ST"


def test_earliest_of_several_stops_wins() -> None:
    s = TextStream(("b", "a"))
    assert s.push(b"xxab") == "xx"
    assert s.stopped
