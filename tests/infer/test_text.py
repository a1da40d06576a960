"""Returned text: stop strings never appear, even across tokens; special tokens never appear."""

import random

import pytest

from starcoder2.infer.text import TextStream


def _run(tok, ids, stop):
    s = TextStream(tok, stop)
    out = []
    for i in ids:
        out.append(s.push(i))
        if s.stopped:
            break
    out.append(s.flush())
    return "".join(out), s.stopped


@pytest.mark.parametrize("stop, expected", [
    (["\ndef "], "x = 1\nif x:\n    y = 2"),
    (["y ="], "x = 1\nif x:\n    "),
    (["zzz"], "x = 1\nif x:\n    y = 2\ndef f(): pass"),
    (["if", "x:"], "x = 1\n"),
])
def test_stop_strings_cut_exactly(tiny_tokenizer, stop, expected):
    text = "x = 1\nif x:\n    y = 2\ndef f(): pass"
    ids = tiny_tokenizer.encode(text)
    got, stopped = _run(tiny_tokenizer, ids, stop)
    assert got == expected
    assert stopped == (expected != text)


def test_stop_string_split_over_single_byte_tokens(tiny_tokenizer):
    # encode character by character so the stop string spans many tokens
    text = "abc<STOP>def"
    ids = [i for ch in text for i in tiny_tokenizer.encode(ch)]
    assert _run(tiny_tokenizer, ids, ["<STOP>"]) == ("abc", True)


def test_special_tokens_and_partial_utf8_never_leak(tiny_tokenizer):
    eos = tiny_tokenizer.eos_id
    text = "π = 3.14159  # 🐍 ünïcödé"
    ids = tiny_tokenizer.encode(text)
    ids = ids[:3] + [tiny_tokenizer.token_id("<file_sep>")] + ids[3:] + [eos]
    s = TextStream(tiny_tokenizer)
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_held_back_text_is_released_when_no_stop_follows(tiny_tokenizer):
    rng = random.Random(0)
    text = "".join(rng.choice("ab\n") for _ in range(200))
    got, stopped = _run(tiny_tokenizer, tiny_tokenizer.encode(text), ["ab\nb\na\nab\nabb\n"])
    assert not stopped or "ab\nb\na\nab\nabb\n" in text
    if not stopped:
        assert got == text
