"""GGUF export, checked by reading the file back with gguf's reader: tensors (names, shapes, types,
values within each format's error, Q8_0 blocks decoded independently of gguf), metadata against the
config and tokenizer, the vocabulary rebuilt into a tokenizer that must encode as ours does, and,
where llama-cpp-python is installed, llama.cpp's greedy output against ours."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from starcoder2.checkpoint import CheckpointError, load_model, save_model
from starcoder2.cli import main
from starcoder2.config import tiny
from starcoder2.gguf_export import FIM_TOKENS, export_gguf, gguf_name, tensor_type
from starcoder2.model import StarCoder2
from starcoder2.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
CODE = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # 1234567\n\tx = 3.14\n"


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def _q8_0_decode(raw: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """Q8_0 bytes -> floats, written from the format (34-byte blocks: f16 scale d, 32 int8 q; w = d * q)."""
    N, K = shape
    blocks = torch.from_numpy(raw.reshape(N, K // 32, 34).copy())
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # (N, K/32, 1)
    q = blocks[..., 2:].contiguous().view(torch.int8).float()  # (N, K/32, 32)
    return (d * q).reshape(N, K)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(tiny_checkpoint, out / f"tiny-{t}.gguf", t, progress=False) for t in ("f16", "bf16", "q8_0")}


def test_names_cover_every_tensor_once():
    cfg = tiny().replace(tie_word_embeddings=False)
    names = [gguf_name(n) for n in StarCoder2(cfg).state_dict()]
    assert len(set(names)) == len(names)
    # every name is one llama.cpp knows for the starcoder2 architecture
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.STARCODER2]}
    assert {re.sub(r"\.\d+\.", ".{bid}.", n.rsplit(".", 1)[0]) for n in names} <= known


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_tensors_read_back_within_the_format_error(exported, tiny_checkpoint, outtype):
    model, _ = load_model(tiny_checkpoint)
    reader = gguf.GGUFReader(exported[outtype])
    tensors = _tensors(reader)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: reuses token_embd
    assert set(tensors) == {gguf_name(n) for n in state}
    for name, w in state.items():
        t = tensors[gguf_name(name)]
        assert tuple(t.shape[::-1]) == tuple(w.shape), name  # GGUF lists dimensions innermost first
        deq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().reshape(w.shape)
        if w.ndim == 1:
            assert t.tensor_type == Q.F32 and torch.equal(deq, w), name
        elif outtype == "f16":
            assert t.tensor_type == Q.F16 and torch.equal(deq, w.half().float()), name
        elif outtype == "bf16":
            assert t.tensor_type == Q.BF16 and torch.equal(deq, w.bfloat16().float()), name
        else:
            assert t.tensor_type == Q.Q8_0
            ours = _q8_0_decode(np.asarray(t.data), tuple(w.shape))
            assert torch.equal(ours, deq), name  # gguf's reader agrees with the format as documented
            # round to nearest with d = max|w| / 127 per block, d stored in f16: error <= d/2 + 127 |d - f16(d)|
            d = w.view(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
            err = (ours - w).view(w.shape[0], -1, 32).abs()
            assert (err <= d * (0.5 + 127 * 2**-11) + 1e-9).all(), name
            assert (err > 0).any()  # it really is quantized


def test_metadata_equals_config_and_tokenizer(exported, tiny_checkpoint):
    config = load_model(tiny_checkpoint)[1]
    tok = Tokenizer.from_dir(tiny_checkpoint)
    r = gguf.GGUFReader(exported["q8_0"])
    assert _field(r, "general.architecture") == "starcoder2"
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    expect = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
              "feed_forward_length": config.intermediate_size, "block_count": config.num_layers,
              "attention.head_count": config.num_heads, "attention.head_count_kv": config.num_kv_heads}
    for key, value in expect.items():
        assert _field(r, f"starcoder2.{key}") == value, key
    assert _field(r, "starcoder2.rope.freq_base") == pytest.approx(config.rope_theta, rel=1e-7)
    assert _field(r, "starcoder2.attention.layer_norm_epsilon") == pytest.approx(config.norm_eps, rel=1e-7)
    assert "starcoder2.attention.key_length" not in r.fields  # head_dim = hidden / heads

    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "starcoder"
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == config.vocab_size > tok.vocab_size  # padded to the embeddings
    spec = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    added = {a["id"] for a in spec["added_tokens"]}
    for text, i in spec["model"]["vocab"].items():
        assert tokens[i] == text and types[i] == (gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL)
    for i in tok.special_ids:
        assert types[i] == gguf.TokenType.CONTROL
    assert all(tokens[i] == f"[PAD{i}]" and types[i] == gguf.TokenType.UNUSED
               for i in range(tok.vocab_size, config.vocab_size))
    assert len(_field(r, "tokenizer.ggml.merges")) == len(spec["model"]["merges"])
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_id
    assert _field(r, "tokenizer.ggml.bos_token_id") == tok.token_id("<|endoftext|>")
    for key, text in FIM_TOKENS.items():
        assert _field(r, f"tokenizer.ggml.{key}_token_id") == tok.token_id(text), key
    assert _field(r, "tokenizer.ggml.add_bos_token") is False


def test_vocabulary_rebuilt_from_the_file_encodes_like_ours(exported, tiny_checkpoint):
    """tokens + merges + the `starcoder` pre-tokenizer (digits alone, then GPT-2's byte-level split),
    the way llama.cpp reads them, give our ids: the order of tokens and merges is right."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    r = gguf.GGUFReader(exported["f16"])
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.NORMAL}
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    rebuilt = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    rebuilt.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    rebuilt.decoder = decoders.ByteLevel()
    ours = Tokenizer.from_dir(tiny_checkpoint)
    for text in (CODE, "import os\nprint(os.getcwd())  # ünïcödé 🚀\n", "x=12345;  y = x**2\n"):
        assert rebuilt.encode(text).ids == ours.encode(text)


def test_untied_head_and_bias_free_models_export(tmp_path, tiny_tokenizer):
    torch.manual_seed(1)
    model = StarCoder2(tiny().replace(tie_word_embeddings=False, use_bias=False, vocab_size=600))
    model.init_weights()
    tiny_tokenizer.save(tmp_path / "tok")
    ckpt = save_model(model, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    tensors = _tensors(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf", "f16", progress=False)))
    head = tensors["output.weight"]
    assert torch.equal(torch.from_numpy(np.array(head.data)).float(), model.lm_head.weight.detach().half().float())
    # llama.cpp's starcoder2 graph requires every bias: zeros are written, which change nothing
    for name in ("blk.0.attn_q.bias", "blk.1.ffn_up.bias", "blk.1.attn_output.bias"):
        assert not np.asarray(tensors[name].data).any()


def test_q8_0_falls_back_to_f16_when_rows_are_not_blocks_of_32():
    assert tensor_type((8, 48), "q8_0") == Q.F16
    assert tensor_type((8, 64), "q8_0") == Q.Q8_0
    assert tensor_type((64,), "q8_0") == Q.F32


def test_cli_writes_atomically_and_rejects_bad_options(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.gguf"
    assert main(["convert", str(tiny_checkpoint), "--to", "gguf", "--outtype", "bf16", "--out", str(out)]) == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]

    # a failure part-way leaves the previous file untouched and no temporary file behind
    before = out.read_bytes()
    import starcoder2.gguf_export as ge
    calls = []

    def failing(t, qtype):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full")
        return encode(t, qtype)

    encode = ge.encode_tensor
    monkeypatch.setattr(ge, "encode_tensor", failing)
    assert main(["convert", str(tiny_checkpoint), "--to", "gguf", "--out", str(out)]) == 1
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    monkeypatch.undo()
    capsys.readouterr()

    for argv, msg in ((["--to", "gguf", "--quantize", "int8"], "--outtype q8_0"),
                      (["--outtype", "q8_0"], "--outtype is for --to gguf"),
                      (["--to", "gguf", "--model", str(tiny_checkpoint)], "once")):
        assert main(["convert", str(tiny_checkpoint), "--out", str(tmp_path / "x.gguf"), *argv]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1


def test_bad_sources_are_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="outtype"):
        export_gguf(tiny_checkpoint, tmp_path / "m.gguf", "q4_k")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    spec = json.loads((broken / "tokenizer.json").read_text())
    spec["model"]["type"] = "WordPiece"
    (broken / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="byte-level BPE"):
        export_gguf(broken, tmp_path / "m.gguf")
    shutil.copy(tiny_checkpoint / "tokenizer.json", broken / "tokenizer.json")
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError):
        export_gguf(broken, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


# ---- llama.cpp itself -----------------------------------------------------------------------------

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python not installed (optional peer; see README)")


@pytest.fixture(scope="module")
def embedded_ggufs(tmp_path_factory):
    from starcoder2.api import default_model_path
    out = tmp_path_factory.mktemp("emb")
    return {t: export_gguf(default_model_path(), out / f"emb-{t}.gguf", t, progress=False) for t in ("f16", "q8_0")}


def _llama(path):
    from llama_cpp import Llama
    # one thread: llama.cpp's threads spin-wait at barriers, which is very slow on shared, busy cores
    return Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1, seed=0,
                 logits_all=True, verbose=False)


@pytest.fixture(scope="module")
def embedded_fp32():
    import starcoder2
    return starcoder2.load(dtype="fp32")


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_us(embedded_ggufs, embedded_fp32):
    ours = embedded_fp32.tokenizer
    llm = _llama(embedded_ggufs["f16"])
    for text in (CODE, "import numpy as np\n\nclass A:\n    x: int = 42  # ünï 🚀\n"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text)
    assert llm.token_eos() == ours.eos_id and llm.detokenize(ours.encode(CODE)).decode() == CODE


# max |logit difference| to ours on the same weights: llama.cpp multiplies with f16 activations (F16)
# or 8-bit activations (Q8_0); a wrong tensor, norm or RoPE layout gives differences of order 1-10
LOGIT_TOL = {"f16": 0.02, "q8_0": 0.25}


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llama_cpp_logits_and_greedy_output_equal_ours(embedded_ggufs, embedded_fp32, outtype):
    """The same weights (ours as the GGUF stores them), a prompt + completion well inside the
    sliding window (512 for the embedded model), which llama.cpp's starcoder2 does not implement.
    Greedy tokens must agree up to the first step where they part, and there our top-2 margin must
    be within twice the tolerance: a near tie that rounding may legitimately flip."""
    sc = copy.copy(embedded_fp32)
    if outtype == "q8_0":  # give our model the weights llama.cpp multiplies by (as the file stores them)
        sc.model = copy.deepcopy(sc.model)
        with torch.no_grad():
            for name, p in sc.model.named_parameters():
                if tensor_type(tuple(p.shape), "q8_0") == Q.Q8_0:
                    q = gguf.quants.quantize(p.numpy(), Q.Q8_0)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(q, Q.Q8_0)).view_as(p))
    llm, tol, decided = _llama(embedded_ggufs[outtype]), LOGIT_TOL[outtype], 0
    for prompt in ("def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n    \"\"\"Return"):
        ids = sc.tokenizer.encode(prompt)
        ours = [t for t in sc.generate(ids, max_new_tokens=24) if t != sc.tokenizer.eos_id]
        full = ids + ours
        llm.reset()
        llm.eval(full)
        theirs_logits = torch.from_numpy(np.array(llm.scores[: len(full)]))
        with torch.no_grad():
            ours_logits = sc.model(torch.tensor([full]))[0].float()
        assert (theirs_logits - ours_logits).abs().max() < tol

        # llama.cpp's own greedy decode (its KV cache, one token per step) must follow ours up to the
        # first step where they part, and that step must be a near tie the tolerance lets flip
        theirs = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if len(theirs) == len(ours):
                break
            theirs.append(tok)
        k = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), len(ours))
        if k < len(ours):
            top2 = ours_logits[len(ids) - 1 + k].topk(2).values
            assert top2[0] - top2[1] < 2 * tol, (prompt, k, sc.tokenizer.decode(theirs), sc.tokenizer.decode(ours))
        print(f"{outtype} {prompt!r}: greedy equal for {k}/{len(ours)} tokens")
        decided += k
    assert decided >= 20  # enough steps were decisive for the comparison to mean something
