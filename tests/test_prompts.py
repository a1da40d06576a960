"""Prompt builders: exact FIM/repository layouts, truncation near the cursor, stop ids, cursor split."""

from __future__ import annotations

import inspect

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from starcoder2.prompts import default_stop_ids, fim_prompt, repo_prompt, split_at_cursor
from starcoder2.tokenizer import Tokenizer, TokenizerError

PREFIX = "import os\n\ndef read(path):\n    with open(path) as f:\n        "
SUFFIX = "\n    return data\n\n\ndef write(path, data):\n    pass\n"
REPO_SENTINELS = ("<repo_name>", "<file_sep>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>")
FILES = [
    ("utils/a.py", "A = 1\n" * 5),
    ("utils/b.py", "def b():\n    return 'b'\n" * 3),
    ("pkg/c.py", "class C:\n    x = 3\n"),
]


def ids_of(tok: Tokenizer, *tokens: str) -> list[int]:
    out = [tok.token_id(t) for t in tokens]
    assert None not in out
    return out  # type: ignore[return-value]


def test_psm_layout(tokenizer: Tokenizer):
    pre, suf, mid = ids_of(tokenizer, "<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    expected = [pre, *tokenizer.encode(PREFIX), suf, *tokenizer.encode(SUFFIX), mid]
    assert fim_prompt(tokenizer, PREFIX, SUFFIX) == expected
    assert fim_prompt(tokenizer, PREFIX, SUFFIX, mode="psm") == expected


def test_spm_layout_follows_megatron(tokenizer: Tokenizer):
    pre, suf, mid = ids_of(tokenizer, "<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    expected = [pre, suf, *tokenizer.encode(SUFFIX), mid, *tokenizer.encode(PREFIX)]
    assert fim_prompt(tokenizer, PREFIX, SUFFIX, mode="spm") == expected


def test_unknown_fim_mode(tokenizer: Tokenizer):
    with pytest.raises(ValueError, match="unknown FIM mode"):
        fim_prompt(tokenizer, "a", "b", mode="pms")


def test_user_text_cannot_inject_sentinels(tokenizer: Tokenizer):
    ids = fim_prompt(tokenizer, "x = '<fim_middle>'", "<|endoftext|><file_sep>")
    assert ids.count(tokenizer.fim_middle_id) == 1 and ids[-1] == tokenizer.fim_middle_id
    assert tokenizer.eos_id not in ids and tokenizer.file_sep_id not in ids
    ids = repo_prompt(tokenizer, [("<file_sep>", "<repo_name>")], "<fim_suffix>", "p", "s", repo_name="<file_sep>")
    assert ids.count(tokenizer.file_sep_id) == 2 and ids.count(tokenizer.repo_name_id) == 1
    assert ids.count(tokenizer.fim_suffix_id) == 1


def test_repo_fim_layout(tokenizer: Tokenizer):
    enc = tokenizer.encode
    name, sep, pre, suf, mid = ids_of(tokenizer, *REPO_SENTINELS)
    expected = [name, *enc("octo/repo")]
    for path, code in FILES:
        expected += [sep, *enc(f"{path}\n{code}")]
    expected += [sep, pre, *enc(f"src/main.py\n{PREFIX}"), suf, *enc(SUFFIX), mid]
    assert repo_prompt(tokenizer, FILES, "src/main.py", PREFIX, SUFFIX, repo_name="octo/repo") == expected


def test_repo_completion_layout_without_suffix_or_name(tokenizer: Tokenizer):
    enc = tokenizer.encode
    (sep,) = ids_of(tokenizer, "<file_sep>")
    expected = [sep, *enc(f"{FILES[0][0]}\n{FILES[0][1]}"), sep, *enc(f"src/main.py\n{PREFIX}")]
    ids = repo_prompt(tokenizer, FILES[:1], "src/main.py", PREFIX)
    assert ids == expected
    assert tokenizer.repo_name_id not in ids and tokenizer.fim_prefix_id not in ids
    # No current path: the current file is its code alone; no context files: just the current file.
    assert repo_prompt(tokenizer, [], None, PREFIX) == [sep, *enc(PREFIX)]
    assert tokenizer.decode(repo_prompt(tokenizer, FILES, "m.py", "x", repo_name="r"), skip_special=False) == (
        "<repo_name>r"
        + "".join(f"<file_sep>{path}\n{code}" for path, code in FILES)
        + "<file_sep>m.py\nx"
    )


def _split_psm(tok: Tokenizer, ids: list[int]) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) of a PSM prompt whose text holds no sentinels."""
    assert ids[0] == tok.fim_prefix_id and ids[-1] == tok.fim_middle_id
    i = ids.index(tok.fim_suffix_id)
    return ids[1:i], ids[i + 1 : -1]


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_fim_truncation_keeps_tokens_nearest_the_cursor(tokenizer: Tokenizer, mode: str):
    prefix, suffix = PREFIX * 4, SUFFIX * 3
    p_ids, s_ids = tokenizer.encode(prefix), tokenizer.encode(suffix)
    full = len(p_ids) + len(s_ids) + 3
    for budget in range(3, full + 5):
        ids = fim_prompt(tokenizer, prefix, suffix, mode=mode, max_tokens=budget)
        assert len(ids) == min(budget, full)  # ASCII text: no edge tokens are dropped
        if mode == "spm":  # reorder to PSM to reuse the checks
            i = ids.index(tokenizer.fim_middle_id)
            ids = [ids[0], *ids[i + 1 :], ids[1], *ids[2:i], ids[i]]
        kept_p, kept_s = _split_psm(tokenizer, ids)
        assert kept_p == p_ids[len(p_ids) - len(kept_p) :]  # the end of the prefix
        assert kept_s == s_ids[: len(kept_s)]  # the start of the suffix
        if budget < full:
            assert len(kept_p) >= min(len(p_ids), (budget - 3) * 3 // 4)


def test_fim_truncation_gives_spare_budget_to_the_other_side(tokenizer: Tokenizer):
    p_ids, s_ids = tokenizer.encode(PREFIX * 20), tokenizer.encode("\n")
    kept_p, kept_s = _split_psm(tokenizer, fim_prompt(tokenizer, PREFIX * 20, "\n", max_tokens=103))
    assert kept_s == s_ids and kept_p == p_ids[-(100 - len(s_ids)) :]
    kept_p, kept_s = _split_psm(tokenizer, fim_prompt(tokenizer, "x", SUFFIX * 20, max_tokens=103))
    assert kept_p == tokenizer.encode("x") and len(kept_p) + len(kept_s) == 100


def test_truncation_does_not_leave_broken_characters(tokenizer: Tokenizer):
    prefix, suffix = "😀中" * 40, "文🎉" * 40
    for budget in range(3, 80):
        ids = fim_prompt(tokenizer, prefix, suffix, max_tokens=budget)
        assert len(ids) <= budget
        kept_p, kept_s = _split_psm(tokenizer, ids)
        p_text, s_text = tokenizer.decode(kept_p), tokenizer.decode(kept_s)
        assert "\ufffd" not in p_text + s_text
        assert prefix.endswith(p_text) and suffix.startswith(s_text)


def test_fim_budget_too_small(tokenizer: Tokenizer):
    with pytest.raises(ValueError, match="max_tokens=2"):
        fim_prompt(tokenizer, "a", "b", max_tokens=2)
    sentinels = ids_of(tokenizer, "<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    assert fim_prompt(tokenizer, "a", "b", max_tokens=3) == sentinels


def test_repo_truncation_drops_earliest_files_first(tokenizer: Tokenizer):
    enc = tokenizer.encode
    (sep,) = ids_of(tokenizer, "<file_sep>")
    args = dict(files=FILES, current_path="src/main.py", prefix=PREFIX, suffix=SUFFIX, repo_name="octo/repo")
    full = repo_prompt(tokenizer, **args)
    last_file = 1 + len(enc(f"{FILES[-1][0]}\n{FILES[-1][1]}"))
    without_context = len(full) - sum(1 + len(enc(f"{p}\n{c}")) for p, c in FILES)
    # Room for the current file and the last context file only: the first two files are dropped.
    ids = repo_prompt(tokenizer, **args, max_tokens=without_context + last_file + 1)
    assert ids == repo_prompt(tokenizer, **{**args, "files": FILES[-1:]})

    fixed = 1 + len(enc("octo/repo")) + 4 + len(enc("src/main.py\n"))
    for budget in range(len(full) + 3, fixed - 1, -1):
        ids = repo_prompt(tokenizer, **args, max_tokens=budget)
        assert len(ids) <= budget
        if budget >= len(full):
            assert ids == full
        kept = [f for f, (p, c) in enumerate(FILES) if _contains(ids, [sep, *enc(f"{p}\n{c}")])]
        assert kept == list(range(len(FILES) - len(kept), len(FILES)))  # a tail of the file list
        if budget >= without_context:  # the current file fits whole: only whole context files go
            assert ids == repo_prompt(tokenizer, **{**args, "files": [FILES[f] for f in kept]})
            if len(kept) < len(FILES):  # and as many as fit are kept
                path, code = FILES[len(FILES) - len(kept) - 1]
                assert len(ids) + 1 + len(enc(f"{path}\n{code}")) > budget
        else:
            assert not kept
        # The repository name and the current path survive every cut.
        text = tokenizer.decode(ids, skip_special=False)
        assert text.startswith("<repo_name>octo/repo<file_sep>")
        assert "<file_sep><fim_prefix>src/main.py\n" in text


def test_repo_truncation_cuts_prefix_and_suffix_last(tokenizer: Tokenizer):
    enc = tokenizer.encode
    name, sep, pre, suf, mid = ids_of(tokenizer, *REPO_SENTINELS)
    prefix, suffix = PREFIX * 10, SUFFIX * 10
    ids = repo_prompt(tokenizer, FILES, "m.py", prefix, suffix, repo_name="r", max_tokens=60)
    head = [name, *enc("r"), sep, pre, *enc("m.py\n")]
    assert len(ids) == 60 and ids[: len(head)] == head
    i = ids.index(suf)
    kept_p, kept_s = ids[len(head) : i], ids[i + 1 : -1]
    assert ids[-1] == mid
    assert kept_p == enc(prefix)[-len(kept_p) :] and kept_s == enc(suffix)[: len(kept_s)]
    assert len(kept_p) >= (60 - len(head) - 2) * 3 // 4

    ids = repo_prompt(tokenizer, FILES, "m.py", prefix, max_tokens=30)  # plain completion
    head = [sep, *enc("m.py\n")]
    assert len(ids) == 30 and ids == head + enc(prefix)[-(30 - len(head)) :]


def test_repo_budget_too_small(tokenizer: Tokenizer):
    fixed = 1 + len(tokenizer.encode("octo/repo")) + 4 + len(tokenizer.encode("src/main.py\n"))
    with pytest.raises(ValueError, match="cannot hold"):
        repo_prompt(tokenizer, FILES, "src/main.py", PREFIX, SUFFIX, repo_name="octo/repo", max_tokens=fixed - 1)
    ids = repo_prompt(tokenizer, FILES, "src/main.py", PREFIX, SUFFIX, repo_name="octo/repo", max_tokens=fixed)
    assert len(ids) == fixed


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def _tokenizer_without_fim() -> Tokenizer:
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator([inspect.getsource(inspect)], trainer=trainer)
    return Tokenizer(hf)


def test_missing_sentinels_are_reported():
    tok = _tokenizer_without_fim()
    with pytest.raises(TokenizerError, match="FIM"):
        fim_prompt(tok, "a", "b")
    with pytest.raises(ValueError, match="<file_sep>"):
        repo_prompt(tok, [], "a.py", "x")
    assert default_stop_ids(tok) == [tok.eos_id]


def test_default_stop_ids(tokenizer: Tokenizer):
    names = ("<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<repo_name>")
    expected = ids_of(tokenizer, *names)
    assert default_stop_ids(tokenizer) == expected == [0, 6, 1, 3, 2, 4, 5]


@pytest.mark.parametrize(
    ("text", "line", "column", "expected"),
    [
        ("abc\ndef\n", 1, 1, ("", "abc\ndef\n")),
        ("abc\ndef\n", 1, 3, ("ab", "c\ndef\n")),
        ("abc\ndef\n", 2, None, ("abc\ndef", "\n")),
        ("abc\ndef\n", 2, 4, ("abc\ndef", "\n")),
        ("abc\ndef\n", 3, None, ("abc\ndef\n", "")),  # the empty line after the final newline
        ("abc\r\ndef", 1, None, ("abc", "\r\ndef")),
        ("", 1, None, ("", "")),
        ("😀x\ny", 1, 2, ("😀", "x\ny")),  # columns count code points
    ],
)
def test_split_at_cursor(text: str, line: int, column: int | None, expected: tuple[str, str]):
    assert split_at_cursor(text, line, column) == expected


@pytest.mark.parametrize(
    ("line", "column", "message"),
    [(0, 1, "line 0 is out of range"), (4, None, "line 4"), (1, 0, "column 0"), (2, 5, "columns run from 1 to 4")],
)
def test_split_at_cursor_errors(line: int, column: int | None, message: str):
    with pytest.raises(ValueError, match=message):
        split_at_cursor("abc\ndef\n", line, column)
