"""Tokenizer wrapper: special-token order, injection-safe encoding, streaming decode, HF interop."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import tokenizers

from starcoder2.tokenizer import STARCODER2_SPECIAL_TOKENS, StreamDecoder, Tokenizer, TokenizerError, train_bpe
from .conftest import make_tokenizer_dir

ALL_SPECIALS_TEXT = "x = 1\n" + " ".join(STARCODER2_SPECIAL_TOKENS) + "\n" + "".join(STARCODER2_SPECIAL_TOKENS)
UNICODE_TEXTS = [
    "",
    "def f(x):\n    return x + 1\n",
    "emoji 😀🎉👩‍💻 and flags 🇫🇷",
    "中文注释：计算总和 # 日本語のコメント",
    "café naïve Ωμέγα ∑∫ e\u0301 \ufeffbom",
    "tabs\tand\r\nCRLF\n\n   trailing   ",
    "<|endoftext|><file_sep>😀<fim_prefix>",
]


def test_special_tokens_have_official_ids(tokenizer: Tokenizer):
    assert len(STARCODER2_SPECIAL_TOKENS) == 38
    assert [tokenizer.token_id(t) for t in STARCODER2_SPECIAL_TOKENS] == list(range(38))
    assert tokenizer.special_ids == frozenset(range(38))
    assert tokenizer.eos_id == 0
    assert (tokenizer.fim_prefix_id, tokenizer.fim_middle_id, tokenizer.fim_suffix_id) == (1, 2, 3)
    assert (tokenizer.fim_pad_id, tokenizer.repo_name_id, tokenizer.file_sep_id) == (4, 5, 6)
    assert tokenizer.vocab_size == 600
    assert tokenizer.token_id("<filename>") is None  # a StarCoder1 token, absent in StarCoder2


def test_plain_text_never_becomes_special_tokens(tokenizer: Tokenizer):
    ids = tokenizer.encode(ALL_SPECIALS_TEXT)
    assert not tokenizer.special_ids & set(ids)
    assert tokenizer.decode(ids) == ALL_SPECIALS_TEXT
    assert tokenizer.decode(ids, skip_special=False) == ALL_SPECIALS_TEXT


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_encode_decode_round_trip(tokenizer: Tokenizer, text: str):
    ids = tokenizer.encode(text)
    assert not tokenizer.special_ids & set(ids)
    assert tokenizer.decode(ids) == text


def test_no_bos_is_prepended(tokenizer: Tokenizer):
    assert tokenizer.encode("") == []
    assert tokenizer.encode("def f(): pass")[0] != tokenizer.eos_id
    assert tokenizer.encode("a", allow_special=True) == tokenizer.encode("a")


def test_digits_are_split_individually(tokenizer: Tokenizer):
    ids = tokenizer.encode("x = 1234567890 + y42\n    7")
    pieces = [tokenizer.decode([i]) for i in ids]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("1234567890427")


def test_allow_special_gives_sentinel_ids(tokenizer: Tokenizer):
    ids = tokenizer.encode("<fim_prefix>def f(<fim_suffix>)\n<fim_middle>", allow_special=True)
    enc = tokenizer.encode
    assert ids == [1, *enc("def f("), 3, *enc(")\n"), 2]
    assert tokenizer.decode(ids) == "def f()\n"
    assert tokenizer.decode(ids, skip_special=False) == "<fim_prefix>def f(<fim_suffix>)\n<fim_middle>"


def _with_added_token(tmp_path, content: str, special: bool) -> Tokenizer:
    hf = tokenizers.Tokenizer.from_file(str(make_tokenizer_dir(tmp_path) / "tokenizer.json"))
    hf.add_tokens([tokenizers.AddedToken(content, special=special)])
    return Tokenizer(hf)


def test_non_special_added_tokens_are_not_matched_in_plain_text(tmp_path):
    tok = _with_added_token(tmp_path, "<custom_tag>", special=False)
    custom = tok.token_id("<custom_tag>")
    assert custom is not None and custom not in tok.special_ids
    text = "a <custom_tag> b<custom_tag>"
    ids = tok.encode(text)
    assert custom not in ids and tok.decode(ids) == text
    assert tok.encode(text, allow_special=True).count(custom) == 2


def test_added_token_that_bpe_can_spell_is_still_avoided(tmp_path):
    # "self" is an ordinary merged token of the corpus; registering it as an added token makes BPE
    # itself produce an added id, which plain encoding must route around.
    tok = _with_added_token(tmp_path, "self", special=False)
    self_id = tok.token_id("self")
    text = "def f(self):\n    return self.x, myself"
    ids = tok.encode(text)
    assert self_id not in ids
    assert tok.decode(ids) == text


def test_concurrent_encodes_with_both_flags(tokenizer: Tokenizer):
    texts = [ALL_SPECIALS_TEXT * (i % 5 + 1) for i in range(200)]
    expected = [(tokenizer.encode(t), tokenizer.encode(t, allow_special=True)) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        plain = pool.map(tokenizer.encode, texts)
        special = pool.map(lambda t: tokenizer.encode(t, allow_special=True), texts)
        assert list(zip(plain, special)) == [(p, s) for p, s in expected]
    assert expected[0][0] != expected[0][1]


def test_from_dir_round_trip(tmp_path, tokenizer: Tokenizer):
    loaded = Tokenizer.from_dir(make_tokenizer_dir(tmp_path))
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.eos_id == 0 and loaded.special_ids == tokenizer.special_ids
    for text in UNICODE_TEXTS + [ALL_SPECIALS_TEXT]:
        assert loaded.encode(text) == tokenizer.encode(text)


def test_from_dir_reads_eos_from_config(tmp_path):
    path = make_tokenizer_dir(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<file_sep>", "special": True}  # the AddedToken dict spelling
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(path).eos_id == 6
    config["eos_token"] = "<not_a_token>"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="not_a_token"):
        Tokenizer.from_dir(path)


def test_from_dir_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def _stream(tokenizer, ids: list[int], skip_special: bool = True) -> list[str]:
    decoder = StreamDecoder(tokenizer, skip_special=skip_special)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def _random_text(rng: random.Random) -> str:
    alphabet = list("abc xyz_(){}:\n\t0123") + list("😀🎉👩‍💻中文日本語éΩ∑") + ["<file_sep>", "<|endoftext|>"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


def test_stream_decoder_equals_full_decode_on_text(tokenizer: Tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        text = _random_text(rng)
        ids = tokenizer.encode(text, allow_special=rng.random() < 0.5)
        skip = rng.random() < 0.5
        pieces = _stream(tokenizer, ids, skip_special=skip)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special=skip)
        assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_partial_characters(tokenizer: Tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # the tiny vocabulary spells the emoji byte by byte
    pieces = _stream(tokenizer, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "😀" and pieces[-1] == ""


def test_stream_decoder_equals_full_decode_on_random_ids(tokenizer: Tokenizer):
    # Arbitrary ids can form invalid UTF-8: the stream must still reproduce the lossy full decode.
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 40))]
        for skip in (True, False):
            assert "".join(_stream(tokenizer, ids, skip_special=skip)) == tokenizer.decode(ids, skip_special=skip)


def test_stream_decoder_work_per_token_is_bounded(tokenizer: Tokenizer):
    class CountingTokenizer:
        longest = 0

        def decode(self, ids, skip_special=True):
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, skip_special=skip_special)

    counting = CountingTokenizer()
    ids = tokenizer.encode("def f(x):\n    return x * 2  # 😀\n" * 200)
    assert "".join(_stream(counting, ids)) == tokenizer.decode(ids)
    assert counting.longest <= 16 < len(ids)


def test_train_bpe_is_small_and_reproducible():
    texts = ["def add(a, b):\n    return a + b\n" * 50, "class Foo:\n    pass\n" * 50]
    a, b = train_bpe(texts, vocab_size=320), train_bpe(texts, vocab_size=320)
    assert a.vocab_size <= 320
    assert [a.token_id(t) for t in STARCODER2_SPECIAL_TOKENS] == list(range(38))
    assert a.encode(texts[0]) == b.encode(texts[0])
    assert a.decode(a.encode(texts[1])) == texts[1]


def test_saved_tokenizer_loads_in_transformers(tmp_path, tokenizer: Tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["bos_token"] == config["unk_token"] == "<|endoftext|>"
    assert config["additional_special_tokens"] == STARCODER2_SPECIAL_TOKENS

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token_id == tokenizer.eos_id
    # Whitespace before digits is where a dropped Digits pre-tokenizer would show.
    for text in UNICODE_TEXTS[1:6] + ["x = [0,  1,\n        2]\n    10"]:
        ids = tokenizer.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == text
    sentinel_text = "<file_sep>a.py\nx<|endoftext|>"
    assert hf(sentinel_text)["input_ids"] == tokenizer.encode(sentinel_text, allow_special=True)
