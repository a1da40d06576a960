import numpy as np
import pytest

from starcoder2.data.fim import FIMConfig, FIMTokens, apply_fim, permute


@pytest.fixture(scope="module")
def t(tiny_tokenizer):
    return FIMTokens.from_tokenizer(tiny_tokenizer)


def _text(tok, ids):
    return tok.decode(ids, skip_special=True)


def test_permute_layouts_keep_the_text(tiny_tokenizer, t):
    tok = tiny_tokenizer
    ids = tok.encode("def add(a, b):\n    return a + b\n")
    seen = set()
    for seed in range(40):
        out = permute(ids, tok, t, rate=1.0, spm_rate=0.5, rng=np.random.default_rng(seed))
        assert out[0] == t.prefix and out.count(t.middle) == 1 and out.count(t.suffix) == 1
        if out[1] == t.suffix:  # SPM: <pre><suf> suffix <mid> prefix middle
            seen.add("spm")
            m = out.index(t.middle)
            suffix, rest = out[2:m], out[m + 1 :]
            assert _text(tok, rest) + _text(tok, suffix) == _text(tok, ids)
        else:  # PSM: <pre> prefix <suf> suffix <mid> middle
            seen.add("psm")
            s, m = out.index(t.suffix), out.index(t.middle)
            pre, suf, mid = out[1:s], out[s + 1 : m], out[m + 1 :]
            assert _text(tok, pre) + _text(tok, mid) + _text(tok, suf) == _text(tok, ids)
    assert seen == {"psm", "spm"}


def test_rates(tiny_tokenizer, t):
    ids = tiny_tokenizer.encode("x = 1\ny = 2\n" * 40)  # long: an empty PSM prefix (looks like SPM) is rare
    n = 2000
    rng = np.random.default_rng(0)
    outs = [permute(ids, tiny_tokenizer, t, 0.5, 0.25, rng) for _ in range(n)]
    fim = [o for o in outs if o[0] == t.prefix]
    assert abs(len(fim) / n - 0.5) < 0.05
    assert abs(sum(o[1] == t.suffix for o in fim) / len(fim) - 0.25) < 0.05
    assert all(o == ids for o in outs if o[0] != t.prefix)


def test_window_length_kept_and_documents_separate(tiny_tokenizer, t):
    tok = tiny_tokenizer
    doc_a = tok.encode("import os\nprint(os.getcwd())\n")
    doc_b = [tok.file_sep_id, *tok.encode("a.py\nx = 1\n"), tok.file_sep_id, *tok.encode("b.py\ny = 2\n")]
    window = np.array(doc_a + [t.eod] + doc_b + [t.eod] + doc_a * 3)  # a tail long enough to absorb growth
    for seed in range(30):
        out = apply_fim(window, tok, t, FIMConfig(rate=1.0, fragment_rate=1.0), np.random.default_rng(seed))
        assert len(out) == len(window)
        assert (out == t.eod).sum() == 2  # end-of-document ids survive
        assert (out == tok.file_sep_id).sum() == 2  # FIM is applied per file inside the repository
    off = apply_fim(window, tok, t, FIMConfig(rate=0.0), np.random.default_rng(0))
    np.testing.assert_array_equal(off, window)


def test_short_result_is_padded(tiny_tokenizer, t):
    # re-encoding pieces can shorten the window; the tail is then <fim_pad>
    tok = tiny_tokenizer
    window = np.array(tok.encode("return self.value\n" * 3))
    for seed in range(20):
        out = apply_fim(window, tok, t, FIMConfig(rate=1.0, split_token=None), np.random.default_rng(seed))
        assert len(out) == len(window)
        body = out[out != t.pad]
        assert np.all(out[len(body):] == t.pad)
