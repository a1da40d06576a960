"""Checkpoints in the Hugging Face layout: resolve, load (meta device + safetensors), save.

A checkpoint directory holds `config.json`, `model.safetensors` or `model-XXXXX-of-YYYYY.safetensors`
shards with `model.safetensors.index.json`, `tokenizer.json` (+ `tokenizer_config.json`), and
optionally `generation_config.json`. Tensor names map to ours through `HF_TO_NATIVE`, a table.

Loading builds the model on the meta device (no memory), then reads the files tensor by tensor (plain
reads into memory the caller may choose, e.g. huge pages) and fills it with
`load_state_dict(assign=True)`, casting each tensor as it goes: peak memory is the model in the
target dtype plus one tensor, and no file mapping stays counted in RSS. Nothing is unpickled.
Saving writes into a temporary directory beside the target and renames it, so a crash never leaves
a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .device import dtype_name
from .model import StarCoder2

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")

# HF name -> native name ("{}" is the layer index). None: accepted and ignored.
HF_TO_NATIVE: dict[str, str | None] = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "model.norm.bias": "norm.bias",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,  # non-persistent buffer in old files
    **{f"model.layers.{{}}.{name}": f"layers.{{}}.{name}" for name in (
        "input_layernorm.weight", "input_layernorm.bias",
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
        "post_attention_layernorm.weight", "post_attention_layernorm.bias",
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")},
    # buffers of pre-quantized checkpoints (infer/quantize.py QuantizedLinear: scales, int4 minima, AWQ)
    **{f"model.layers.{{}}.{proj}.{buf}": f"layers.{{}}.{proj}.{buf}"
       for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.c_fc",
                    "mlp.c_proj") for buf in ("scale", "lo", "in_scale")},
}
QUANT_CONFIG_KEY = "quantization_config"  # in config.json of a pre-quantized checkpoint
_LAYER = re.compile(r"\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or matched to the model. The message names the problem."""


def hf_to_native(name: str) -> str | None:
    """Map one HF tensor name; raises KeyError for a name the table does not know."""
    m = _LAYER.search(name)
    key = name if m is None else name[:m.start()] + ".{}." + name[m.end():]
    target = HF_TO_NATIVE[key]
    return None if target is None else target.format(m.group(1)) if m else target


def native_to_hf(name: str) -> str:
    m = _LAYER.search(name)
    key = name if m is None else name[:m.start()] + ".{}." + name[m.end():]
    for hf, native in HF_TO_NATIVE.items():
        if native == key:
            return hf.format(m.group(1)) if m else hf
    raise KeyError(name)


# ---- resolving a path or a model id ------------------------------------------------------------


def hf_cache_dir() -> Path:
    """The hub cache transformers/huggingface_hub use: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve(path_or_id: str | os.PathLike, revision: str = "main") -> Path:
    """A local directory as is, or a hub id (`bigcode/starcoder2-3b`) from the local HF cache, offline."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    model_id = str(path_or_id)
    cache = hf_cache_dir()
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", model_id):
        repo = cache / ("models--" + model_id.replace("/", "--"))
        ref = repo / "refs" / revision
        snapshots = repo / "snapshots"
        candidates = [snapshots / ref.read_text().strip()] if ref.is_file() else []
        if snapshots.is_dir():  # any snapshot, newest first, when the ref is missing
            candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for snap in candidates:
            if (snap / "config.json").is_file():
                return snap
        raise CheckpointError(
            f"model {model_id!r} is not a directory and not in the Hugging Face cache ({repo}); "
            f"download it where the hub is reachable (`hf download {model_id}`) and copy the cache or the "
            f"folder here, then pass --model PATH or set HF_HOME")
    raise CheckpointError(f"no checkpoint directory at {path}")


# ---- loading ------------------------------------------------------------------------------------


def read_config(path: Path) -> ModelConfig:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} is not a StarCoder2 checkpoint: it has no config.json")
    try:
        with open(cfg, encoding="utf-8") as f:
            return ModelConfig.from_hf(json.load(f))
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg}: not a usable StarCoder2 config: {e}") from None


def read_quantization_config(path: Path) -> dict | None:
    """config.json's `quantization_config` (a pre-quantized checkpoint), or None for float weights."""
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            qc = json.load(f).get(QUANT_CONFIG_KEY)
    except (OSError, json.JSONDecodeError):
        return None  # read_config reports a bad config.json
    return qc if isinstance(qc, dict) else None


def weight_files(path: Path) -> list[Path]:
    index = path / SAFE_INDEX
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that are missing: {', '.join(missing)}")
        return files
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path} has only pickle weights (.bin/.pt), which are never loaded for safety; "
                              "convert them to safetensors first")
    raise CheckpointError(f"{path} has no {SAFE_SINGLE} and no {SAFE_INDEX}")


_SAFE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
Alloc = Callable[[torch.Size, torch.dtype], torch.Tensor]  # (shape, dtype) -> uninitialised CPU tensor


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype of the first tensor of the checkpoint (what `convert --dtype keep` keeps)."""
    with _open(weight_files(path)[0]) as f:
        code = f.get_slice(next(iter(f.keys()))).get_dtype()
    return _SAFE_DTYPES.get(code, torch.float32)


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def _header(file: Path) -> tuple[int, dict]:
    """(offset of the data section, the JSON header) of a safetensors file."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def _read(fh, data_start: int, meta: dict, out: torch.Tensor | None, what: str) -> torch.Tensor:
    """One tensor's bytes by plain file reads (no memory map: its memory is freed with the tensor, and
    nothing file-backed stays counted in RSS), into `out` (cast there if its dtype differs) or new memory."""
    start, end = meta["data_offsets"]
    stored = _SAFE_DTYPES[meta["dtype"]]
    direct = out is not None and out.dtype == stored and out.is_contiguous()
    buf = out if direct else torch.empty(meta["shape"], dtype=stored)
    fh.seek(data_start + start)
    if end > start and fh.readinto(memoryview(buf.view(-1).view(torch.uint8).numpy())) != end - start:
        raise CheckpointError(f"{what}: cannot read (truncated file?)")
    if out is None or out is buf:
        return buf
    return out.copy_(buf)


def load_state(path: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
               defer: Callable[[str], bool] | None = None, like: torch.nn.Module | None = None,
               alloc: Alloc | None = None) -> dict[str, torch.Tensor]:
    """Read and check every tensor: native name -> tensor of the right shape, in `dtype` on `device`.
    Tensors whose native name `defer` accepts are checked but not read (left for `read_tensor`).
    `like` (a meta-device model) replaces the plain model as the source of names, shapes and
    dtypes: each tensor is then cast to its counterpart's dtype (pre-quantized checkpoints).
    `alloc` gives the memory CPU tensors are read into (e.g. huge pages, infer/hugepages.py)."""
    if like is None:
        with torch.device("meta"):
            like = StarCoder2(config).to(dtype)
    dtypes = {k: v.dtype for k, v in like.state_dict().items()}
    expected = {k: v.shape for k, v in like.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    cpu = device.type == "cpu"
    for file in weight_files(path):
        with _open(file) as f, open(file, "rb") as fh:  # _open checks the header; fh reads the data
            data_start, header = _header(file)
            for hf_name in f.keys():
                try:
                    name = hf_to_native(hf_name)
                except KeyError:
                    raise CheckpointError(f"{file.name}: unexpected tensor {hf_name!r}") from None
                if name is None:
                    continue
                if name not in expected:
                    if name == "lm_head.weight":
                        raise CheckpointError(f"{file.name}: has lm_head.weight but config.json says "
                                              "tie_word_embeddings=true")
                    raise CheckpointError(f"{file.name}: unexpected tensor {hf_name!r} (config has "
                                          f"{config.num_layers} layers)")
                shape = tuple(f.get_slice(hf_name).get_shape())
                if shape != tuple(expected[name]):
                    raise CheckpointError(f"{file.name}: tensor {hf_name!r} has shape {list(shape)}, "
                                          f"expected {list(expected[name])}")
                if defer is not None and defer(name):
                    state[name] = torch.empty(shape, dtype=dtypes[name], device="meta")
                    continue
                out = None  # elsewhere than the CPU: read in the stored dtype, then moved and cast
                if cpu:
                    out = alloc(torch.Size(shape), dtypes[name]) if alloc else torch.empty(shape, dtype=dtypes[name])
                t = _read(fh, data_start, header[hf_name], out, f"{file.name}: {hf_name!r}")
                state[name] = t if cpu else t.to(device=device, dtype=dtypes[name])
    missing = sorted(set(expected) - set(state))
    if missing:
        names = ", ".join(native_to_hf(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing: {names}")
    return state


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               defer: Callable[[str], bool] | None = None,
               prepare: Callable[[StarCoder2], None] | None = None,
               alloc: Alloc | None = None) -> tuple[StarCoder2, ModelConfig]:
    """Load a HF-layout directory into our model, in eval mode. Parameters named by `defer` stay on
    the meta device, for a caller that reads them one by one (`read_tensor`), e.g. to quantize.
    `prepare` changes the meta-device model (in `dtype`) before loading, e.g. swaps in quantized
    layers whose stored buffers the checkpoint holds; it is required for a pre-quantized checkpoint."""
    path = Path(path)
    config = read_config(path)
    qc = read_quantization_config(path)
    if qc is not None and prepare is None:
        raise CheckpointError(f"{path} holds pre-quantized {qc.get('mode', '')} weights: load it with "
                              "starcoder2.load / --model, or convert the float checkpoint it came from")
    with torch.device("meta"):
        model = StarCoder2(config).to(dtype)
        if prepare is not None:
            prepare(model)
    state = load_state(path, config, dtype, torch.device(device), defer, like=model, alloc=alloc)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()
    return model.eval(), config


def tensor_reader(path: str | os.PathLike, native_name: str) -> Callable[[tuple[int, int] | None], torch.Tensor]:
    """A reader of one tensor by native name, found once: reader() reads it whole, reader((a, b))
    rows [a, b) of its first axis, each with plain file reads into fresh memory (no memory map), so
    that memory is freed with the tensor: what streaming quantization at load needs."""
    path, hf_name = Path(path), native_to_hf(native_name)
    files = weight_files(path)
    index = path / SAFE_INDEX
    if index.is_file():
        files = [path / json.loads(index.read_text())["weight_map"][hf_name]]
    for file in files:
        data_start, header = _header(file)
        if hf_name in header:
            break
    else:
        raise CheckpointError(f"{path}: no tensor {hf_name!r}")
    whole = header[hf_name]

    def read(rows: tuple[int, int] | None = None) -> torch.Tensor:
        meta = whole
        if rows is not None:  # rows are contiguous in the file: a sub-range of the tensor's bytes
            (a, b), shape, start = rows, whole["shape"], whole["data_offsets"][0]
            row = (whole["data_offsets"][1] - start) // max(shape[0], 1)
            meta = {**whole, "shape": [b - a, *shape[1:]], "data_offsets": [start + a * row, start + b * row]}
        with open(file, "rb") as fh:
            return _read(fh, data_start, meta, None, f"{file.name}: {hf_name!r}")

    return read


def read_tensor(path: str | os.PathLike, native_name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor by native name (only rows [a, b) of its first axis with `rows`): `tensor_reader`."""
    return tensor_reader(path, native_name)(rows)


# ---- saving -------------------------------------------------------------------------------------


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", size.upper())
    if not m:
        raise ValueError(f"bad size {size!r}; use e.g. 5GB or 500MB")
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)])


def hf_state_dict(model: StarCoder2, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF names -> contiguous CPU tensors; the tied head is left out, as transformers does."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t = t.detach().to("cpu", dtype=dtype or t.dtype).contiguous()
        out[native_to_hf(name)] = t
    return out


def save_model(model: StarCoder2, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
               max_shard_size: int | str = "5GB", tokenizer_dir: str | os.PathLike | None = None,
               generation_config: dict | None = None, quantization_config: dict | None = None) -> Path:
    """Write a HF-layout checkpoint atomically (temporary directory, then rename). A quantized
    model (infer/quantize.py) is saved with its `quantization_config` and dtype=None: every buffer as is."""
    out = Path(out_dir)
    limit = _parse_size(max_shard_size)
    state = hf_state_dict(model, dtype)
    stored = next(iter(state.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = model.config
        hf_config = config.to_hf(dtype_name(stored))
        if quantization_config is not None:
            hf_config[QUANT_CONFIG_KEY] = quantization_config
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = generation_config or {}
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, **gen}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFE_SINGLE), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for name, t in shard.items():
                    weight_map[name] = fname
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def swap_in(tmp: Path, out: Path) -> None:
    """Publish the finished directory `tmp` (from mkdtemp beside `out`) as `out`: ordinary permissions
    (mkdtemp makes it 0700), then a rename; an old `out` is removed only after the new one is in place."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~umask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
