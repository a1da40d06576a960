"""Export a checkpoint to GGUF, the file format of llama.cpp (and of Ollama, Tabby, LM Studio, ...).

    starcoder2 convert MODEL --to gguf --out model-f16.gguf [--outtype f16|bf16|q8_0]
    export_gguf("path/to/checkpoint", "model.gguf", outtype="q8_0")       # Python

The file is what llama.cpp's own `convert_hf_to_gguf.py` writes for `Starcoder2ForCausalLM`
(architecture `starcoder2`), produced from our checkpoint reader and the `gguf` package, so that no
llama.cpp source tree is needed:
- metadata: context_length, embedding_length, feed_forward_length, block_count, attention.head_count
  / head_count_kv, rope.freq_base, attention.layer_norm_epsilon (key/value_length only when head_dim
  is not hidden / heads);
- tensors: `TENSOR_NAMES` below; 1-D tensors (norms, biases) in F32, matrices in the chosen type. A
  tied LM head is not written: llama.cpp reuses `token_embd` when `output` is absent. llama.cpp's
  starcoder2 graph requires every bias, so a `use_bias=false` model gets zero biases (same output);
- tokenizer: `gpt2` (byte-level BPE) with the pre-tokenizer `starcoder` (llama.cpp's name for
  StarCoder2's split: each digit alone, then GPT-2's regex; there is no "starcoder2" pre-tokenizer),
  tokens, token types, merges, bos/eos/unk/pad and the FIM / repository token ids, add_bos false.

Not representable: the sliding window. llama.cpp's starcoder2 attends to the whole context, so
outputs agree with ours only while prompt + completion fit in the window (4,096 tokens for the
released models); llama.cpp's converter writes no window key either.

Q8_0 is llama.cpp's 8-bit format (blocks of 32 weights, one f16 scale each), made with
`gguf.quants` (the reference rounding of ggml). A matrix whose rows are not a multiple of 32 falls
back to F16, as in llama.cpp's converter. The file is written tensor by tensor (peak memory: one
tensor) into a temporary file beside the target, then renamed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, load_state, read_config, read_quantization_config, read_tensor
from .config import ModelConfig
from .tokenizer import _token_content

ARCH = "starcoder2"
OUTTYPES = ("f16", "bf16", "q8_0")
TOKENIZER_PRE = "starcoder"

# native name -> GGUF name ("{}" is the layer index); the names of llama.cpp's LLM_ARCH_STARCODER2.
TENSOR_NAMES: dict[str, str] = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    "layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.input_layernorm.bias": "blk.{}.attn_norm.bias",
    "layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.self_attn.o_proj.bias": "blk.{}.attn_output.bias",
    "layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.post_attention_layernorm.bias": "blk.{}.ffn_norm.bias",
    "layers.{}.mlp.c_fc.weight": "blk.{}.ffn_up.weight",
    "layers.{}.mlp.c_fc.bias": "blk.{}.ffn_up.bias",
    "layers.{}.mlp.c_proj.weight": "blk.{}.ffn_down.weight",
    "layers.{}.mlp.c_proj.bias": "blk.{}.ffn_down.bias",
}
_LAYER = re.compile(r"\.(\d+)\.")
# GGUF FIM keys -> StarCoder2 token text (reference §6.2).
FIM_TOKENS = {"fim_pre": "<fim_prefix>", "fim_suf": "<fim_suffix>", "fim_mid": "<fim_middle>",
              "fim_pad": "<fim_pad>", "fim_rep": "<repo_name>", "fim_sep": "<file_sep>"}


def gguf_name(native: str) -> str:
    m = _LAYER.search(native)
    key = native if m is None else native[:m.start()] + ".{}." + native[m.end():]
    return TENSOR_NAMES[key].format(m.group(1)) if m else TENSOR_NAMES[key]


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF export needs the gguf package: pip install 'starcoder2[gguf]'") from None
    return gguf


# ---- tokenizer ----------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp's `gpt2` model reads it. Lists have config.vocab_size entries."""

    tokens: list[str]
    token_types: list[int]  # gguf.TokenType: NORMAL 1, CONTROL 3, USER_DEFINED 4, UNUSED 5
    merges: list[str]  # "left right", in rank order
    special_ids: dict[str, int]  # bos / eos / unk / pad / fim_* -> id
    pre: str


def read_vocab(path: Path, vocab_size: int) -> GGUFVocab:
    """tokenizer.json (+ tokenizer_config.json) -> the GGUF vocabulary, padded to `vocab_size` ids
    with unused `[PAD{i}]` entries as llama.cpp's converter does."""
    gguf = _gguf()
    file = path / "tokenizer.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read the tokenizer: {e}") from None
    model = spec.get("model") or {}
    pre_steps = _flatten_pre(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in [p.get("type") for p in pre_steps]:
        raise ValueError(f"{file}: GGUF export supports byte-level BPE tokenizers only (StarCoder2's kind)")
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in pre_steps)
    pre = TOKENIZER_PRE if digits else "gpt-2"  # llama.cpp's names for the two splits

    vocab: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        vocab[i] = a["content"]
    if max(vocab) >= vocab_size:
        raise ValueError(f"{file}: token id {max(vocab)} is outside the model's {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    # tokenizers writes merges as "a b" strings (old files) or [a, b] pairs (new files)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config: dict = {}
    if (path / "tokenizer_config.json").is_file():
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = {t: i for i, t in vocab.items()}
    special: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        text = _token_content(config.get(f"{key}_token"))
        if text is None and key in ("bos", "eos"):
            text = "<|endoftext|>"  # StarCoder2's BOS and EOS (reference §6.2)
        if text is not None and text in ids:
            special[key] = ids[text]
    if "eos" not in special:
        raise ValueError(f"{file}: no EOS token (tokenizer_config.json eos_token, or <|endoftext|>)")
    for key, text in FIM_TOKENS.items():
        if text in ids:
            special[key] = ids[text]
    return GGUFVocab(tokens, [int(t) for t in types], merges, special, pre)


def _flatten_pre(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [q for p in pre.get("pretokenizers", []) for q in _flatten_pre(p)]
    return [pre]


# ---- tensors ------------------------------------------------------------------------------------


def tensor_type(shape: tuple[int, ...], outtype: str):
    """The GGMLQuantizationType a tensor of `shape` is stored in: vectors (norms, biases) in F32."""
    Q = _gguf().GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    if outtype == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.BF16 if outtype == "bf16" else Q.F16


def encode_tensor(t: torch.Tensor, qtype) -> np.ndarray:
    """One tensor -> the array to write. For BF16 and Q8_0 it holds the raw bytes: (N, 2K) and
    (N, K/32*34) uint8 for an (N, K) matrix."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    t = t.detach().to("cpu", torch.float32).contiguous()
    if qtype == Q.F32:
        return t.numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if qtype == Q.BF16:  # torch rounds to nearest even, as ggml's fp32 -> bf16 does
        return t.to(torch.bfloat16).view(torch.uint8).numpy()
    return gguf.quants.quantize(t.numpy(), qtype)


def _tensor_info(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], np.dtype, int]:
    """(array shape, array dtype, bytes) of what `encode_tensor` returns, without encoding."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _tensor_plan(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(native name, shape) of every tensor the GGUF holds, in llama.cpp's order."""
    from .model import StarCoder2
    with torch.device("meta"):
        model = StarCoder2(config.replace(use_bias=True))  # llama.cpp requires the biases
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    head = [n for n in ("embed_tokens.weight",) if n in shapes]
    tail = [n for n in ("norm.weight", "norm.bias", "lm_head.weight") if n in shapes]
    body = [n for n in shapes if n not in head and n not in tail]
    return [(n, shapes[n]) for n in head + body + tail]


# ---- writing ------------------------------------------------------------------------------------


def _add_metadata(w, config: ModelConfig, vocab: GGUFVocab, outtype: str, name: str) -> None:
    gguf = _gguf()
    w.add_name(name)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_layers)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_eps(config.norm_eps)
    if config.head_dim != config.hidden_size // config.num_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    for key, i in vocab.special_ids.items():
        w.add_uint32(getattr(gguf.Keys.Tokenizer, {"bos": "BOS_ID", "eos": "EOS_ID", "unk": "UNK_ID",
                                                    "pad": "PAD_ID"}.get(key, f"{key.upper()}_ID")), i)
    w.add_add_bos_token(False)  # StarCoder2 prompts start without BOS (reference §6.3)
    w.add_add_eos_token(False)


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16",
                progress: bool = True) -> Path:
    """Write the checkpoint directory `src` as a GGUF file at `out` (atomically)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    gguf = _gguf()
    src, out = Path(src), Path(out)
    config = read_config(src)
    if read_quantization_config(src) is not None:
        raise ValueError(f"{src} is a pre-quantized checkpoint; export the float checkpoint it came from")
    vocab = read_vocab(src, config.vocab_size)
    # every tensor's presence and shape is checked before anything is written; none is read yet
    stored = load_state(src, config, torch.float32, torch.device("cpu"), defer=lambda _: True)
    plan = _tensor_plan(config)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        _add_metadata(w, config, vocab, outtype, src.name)

        def load(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            # a bias of a use_bias=false model is all zeros: the same output in llama.cpp's graph
            return read_tensor(src, name) if name in stored else torch.zeros(shape)

        types = [tensor_type(shape, outtype) for _, shape in plan]
        for (name, shape), qtype in zip(plan, types):
            w.add_tensor_info(gguf_name(name), *_tensor_info(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = tqdm(list(zip(plan, types)), desc=f"GGUF {outtype.upper()}", unit="tensor", disable=not progress)
        for (name, shape), qtype in bar:
            w.write_tensor_data(encode_tensor(load(name, shape), qtype))
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes a private file
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
