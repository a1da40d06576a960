"""`starcoder2 bench`: speed and memory of our runtime beside transformers and llama.cpp, same weights.

What it measures
----------------
The protocol of ../shared/reference/performance.md, on the StarCoder2-3B shape with random weights
(speed does not depend on weight values; `--preset`, `--layers` scale it, `--model` takes any
checkpoint), for each variant in --variants, each in its own subprocess so that its peak RSS
(`ru_maxrss`) belongs to it alone:

- ours-bf16 / ours-fp32 / ours-int8 / ours-int4: `api.load_for_inference`, what `starcoder2.load`
  does: load in bf16 or fp32 (int8/int4: streaming `quantize_model`, activations in the machine's
  "auto" dtype: bf16 where it is fast, else fp32), `use_native_kernels(model)` (the AVX-512 or AVX2
  decode kernels; for int8/int4 this swaps the lm_head). Also ours-bf16-torch and ours-fp32-torch
  (torch's kernels only).
- transformers-bf16 (and -fp32): `Starcoder2ForCausalLM.from_pretrained(path, dtype=...)`.
- llama-f16 / llama-bf16 / llama-q8_0 / llama-q4_0: llama.cpp through `llama_cpp`
  (llama-cpp-python), the same weights converted to GGUF (see `convert_to_gguf`; skipped with a note
  when llama-cpp-python or the converter is missing).

Per variant (median and min-max over --reps reps, after one warm-up):
- load: wall time of the load call (quantization included: it happens at load), peak RSS of the
  worker (load + every run), RSS right after load. bf16 weights stay private mmaps of the
  safetensors file, so a bf16 load is lazy and its pages fault in during the warm-up.
- TTFT-512: submit a 512-token prompt, time until the first token exists (ours: through the Engine,
  prefill into the KV cache + sampling; transformers: `generate(max_new_tokens=1)`; llama.cpp:
  `eval` + `sample`).
- prefill-512: one forward pass over 512 tokens, logits of the last position only, no KV cache for
  ours/transformers (as in performance.md). tok/s = 512 / wall time.
- decode: a 128-token prompt, 64 new tokens, greedy, batch 1; tok/s = 63 / (time of token 64 - time
  of token 1). Ours runs it through the Engine (max_batch=1), which the server uses.
- batch-8: 8 different 128-token prompts, 32 new tokens each, max_batch=8 Engine (transformers:
  one `generate` over the (8, 128) batch; not measured for llama.cpp, whose Python API decodes one
  sequence). Aggregate tok/s = (all generated tokens - 8) / (time of the last token - time the last
  request got its first token), i.e. tokens 2..32 of every request over the batched decode time.
- the bandwidth limit: the machine's read bandwidth, measured at the start of the run (`measure_bandwidth`:
  the best of a few 1 GiB reads with torch and with the native kernel's streaming loop) / weight bytes
  read per token, counted from the loaded model's parameters and buffers (the GGUF file size for
  llama.cpp). performance.md's 34.4 GB/s was measured on the AVX-512 machines.
- scenarios, on the first unquantized ours variant of the run (ours-bf16 or ours-fp32): (a) editor keystroke: a 1,500-token prompt cold, then the same prompt
  plus 12 tokens with the prefix cache on (`Engine(prefix_cache_tokens=...)`): both TTFTs and their
  ratio (target >= 10x). (b) prompt-lookup speculation on an edit task: a ~300-token piece of code
  followed by its own first 16 tokens, 64 new tokens with `num_draft=8` vs 0: both decode rates,
  their ratio (target >= 2x), drafted/accepted tokens, and whether the greedy outputs are identical
  (they must be; a mismatch makes the exit status 1). With random weights the model does not copy
  the code, so few drafts are accepted: the ratio shows the verification overhead, not an editor's
  gain; run it with `--model` on trained weights for that.
- Contention: the machine is shared, so every rep records `foreign_cpu_s`, CPU seconds other
  processes used meanwhile (/proc/stat busy time minus this process's own CPU time). A measurement
  with foreign CPU above 25 % of its wall time is marked "!".

How to run
----------
    starcoder2 bench --layers 2 --reps 1                       # scaled-down smoke run (~2 min)
    starcoder2 bench --json docs/bench_3b.json --plot docs/bench_3b.png   # full 3B, ~30 min, 2 cores busy
    starcoder2 bench --model PATH --variants ours-bf16,ours-int8
Markdown tables go to stdout, progress to stderr. The random 3B checkpoint (6.1 GB) is written once
under --workdir. Exit status 1 when a worker failed or speculation changed a greedy output.

What it leaves out
------------------
Quality (the weights are random; see the quantization tests), tokenizer speed (prompts are token
ids), contexts beyond 1,600 tokens, GPUs, cold page cache, llama.cpp at batch 8, statistical rigour
(a shared 2-core VM varies by +-10-15 %: compare variants of the same run, check foreign CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "
DISTURBED = 0.25  # foreign CPU s per wall s above which a measurement is marked "!"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PKG_PARENT = Path(__file__).resolve().parent.parent
MEASUREMENTS = ("ttft", "prefill", "decode", "batch", "keystroke", "speculation")
LLAMA_SKIPPED = "llama.cpp peer skipped: llama-cpp-python not installed (pip install llama-cpp-python, ~10 min build)"


@dataclass(frozen=True)
class Variant:
    peer: str  # ours | transformers | llama
    dtype: str  # fp32 | bf16 | f16: activations / storage
    quant: str | None = None  # ours: int8 | int4; llama: q8_0 | q4_0
    native: bool = True  # ours: use_native_kernels
    label: str = ""  # bits, for matching ours with llama.cpp at the same size


VARIANTS = {
    "ours-bf16": Variant("ours", "bf16", label="16-bit"),
    "ours-fp32": Variant("ours", "fp32", label="32-bit"),
    "ours-int8": Variant("ours", "auto", "int8", label="8-bit"),
    "ours-int4": Variant("ours", "auto", "int4", label="4-bit"),
    "ours-bf16-torch": Variant("ours", "bf16", native=False, label="16-bit"),
    "ours-fp32-torch": Variant("ours", "fp32", native=False, label="32-bit"),
    "transformers-bf16": Variant("transformers", "bf16", label="16-bit"),
    "transformers-fp32": Variant("transformers", "fp32", label="32-bit"),
    "llama-f32": Variant("llama", "f32", label="32-bit"),
    "llama-f16": Variant("llama", "f16", label="16-bit"),
    "llama-bf16": Variant("llama", "bf16"),  # the BF16 target peer; not matched by bits
    "llama-q8_0": Variant("llama", "f16", "q8_0", label="8-bit"),
    "llama-q4_0": Variant("llama", "f16", "q4_0", label="4-bit"),
}
# bf16 where the CPU multiplies it fast (AVX512_BF16/AMX); elsewhere bf16 matmuls are emulated (~0.6 GFLOP/s
# measured on an AVX2 EPYC), so fp32 is the float baseline there
DEFAULT_VARIANTS = {True: "ours-bf16,ours-int8,ours-int4,transformers-bf16,llama-f16,llama-q8_0,llama-q4_0",
                    False: "ours-fp32,ours-int8,ours-int4,transformers-fp32,llama-f32,llama-q8_0,llama-q4_0"}


def default_variants() -> str:
    from .device import fast_bf16
    return DEFAULT_VARIANTS[fast_bf16()]


def activation_dtype(v: Variant) -> str:
    """fp32 | bf16 | f16...: a variant's activation dtype, "auto" resolved for this machine."""
    if v.dtype != "auto":
        return v.dtype
    from .device import fast_bf16
    return "bf16" if fast_bf16() else "fp32"


def scenario_variant(variants: list[str]) -> str | None:
    """The variant the engine scenarios run on: the first unquantized ours variant."""
    return next((v for v in variants if VARIANTS[v].peer == "ours" and VARIANTS[v].quant is None), None)


@dataclass
class Protocol:
    """Everything a worker needs besides the variant and the checkpoint (sent to it as JSON)."""

    reps: int = 3
    threads: int = 2
    prefill_len: int = 512
    prompt_len: int = 128
    new_tokens: int = 64
    batch: int = 8
    batch_new_tokens: int = 32
    keystroke_len: int = 1500
    keystroke_extra: int = 12
    spec_len: int = 300
    spec_repeat: int = 16
    num_draft: int = 8
    skip: list[str] = field(default_factory=list)
    bandwidth_gbs: float = 34.4  # read bandwidth for the limit row; the parent measures it
    scenarios: str | None = None  # the variant that also runs the engine scenarios


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- contention accounting ----------------------------------------------------------------------


def _proc_stat() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ... (guest time is already inside user)
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK, (v[7] if len(v) > 7 else 0) / CLK_TCK


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Meter:
    """Wall time, own CPU, foreign CPU (other processes) and steal over a with-block."""

    def __enter__(self) -> Meter:
        self.busy0, self.steal0 = _proc_stat()
        self.own0, self.t0 = _own_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        busy1, steal1 = _proc_stat()
        self.own = _own_cpu() - self.own0
        self.foreign = (busy1 - self.busy0) - self.own  # 10 ms ticks: may dip slightly below 0
        self.steal = steal1 - self.steal0

    def record(self, **extra) -> dict:
        return {"wall_s": self.wall, "own_cpu_s": self.own, "foreign_cpu_s": self.foreign,
                "steal_s": self.steal, **extra}


def _rss_now_gib() -> float:
    with open("/proc/self/status") as f:
        return next((int(ln.split()[1]) / 2**20 for ln in f if ln.startswith("VmRSS:")), float("nan"))


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- model shape and checkpoint -----------------------------------------------------------------


def bench_config(preset_name: str = "3b", layers: int | None = None):
    from .config import preset

    cfg = preset(preset_name)
    return cfg if layers is None else cfg.replace(num_layers=layers)


def checkpoint_dir(workdir: Path, cfg) -> Path:
    """Keyed by the shape; the 3B name matches what benchmarks/bench_core.py always wrote."""
    key = hashlib.sha1(json.dumps(cfg.to_hf(), sort_keys=True).encode()).hexdigest()[:10]
    return workdir / f"sc2-3b-L{cfg.num_layers}-h{cfg.hidden_size}-v{cfg.vocab_size}-{key}-bf16-random"


def make_checkpoint(path: Path, cfg, threads: int) -> None:
    """Worker: a random-weight bf16 checkpoint, built on meta, materialised once, saved with save_model."""
    import torch

    from .checkpoint import save_model
    from .model import StarCoder2

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = StarCoder2(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    log(f"  initialised {cfg.num_params / 1e9:.3f} B params in {time.perf_counter() - t0:.1f} s; saving to {path}")
    save_model(model, path, dtype=torch.bfloat16)
    log(f"  checkpoint written in {time.perf_counter() - t0:.1f} s total")


def ensure_checkpoint(workdir: Path, cfg, threads: int) -> Path:
    from .checkpoint import read_config

    path = checkpoint_dir(workdir, cfg)
    if (path / "config.json").is_file():
        try:
            if read_config(path).to_hf() == cfg.to_hf():
                log(f"using cached checkpoint {path}")
                return path
        except Exception as e:  # noqa: BLE001 - a broken cache entry is rebuilt
            log(f"cached checkpoint {path} unusable ({e}); rebuilding")
    log(f"creating random-weight bf16 checkpoint ({cfg.num_layers} layers, {cfg.num_params / 1e9:.3f} B params)")
    subprocess.run([sys.executable, "-m", "starcoder2.bench", "--make-checkpoint", str(path),
                    "--config-json", json.dumps(cfg.to_hf()), "--threads", str(threads)],
                   check=True, env=_worker_env(threads))
    return path


def measure_bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """Memory read bandwidth, GB/s: the best of `reps` reads of a 1 GiB buffer by torch's `sum` and,
    where the CPU has them, by the native float kernel (a GEMV over the buffer), in ordinary and (where
    Linux gives them) huge pages, as our loaded weights are. The best rate any reader reaches is a
    lower bound of what the hardware gives, so the limit row never flatters us."""
    import torch

    from .infer.hugepages import hugepage_buffer

    torch.set_num_threads(threads)
    nbytes = int(gib * 2**30)
    gbs = 0.0
    for alloc in (lambda: torch.empty(nbytes, dtype=torch.uint8), lambda: hugepage_buffer(nbytes)):
        if (buf := alloc()) is not None:
            gbs = max(gbs, _read_bandwidth(buf.view(torch.float32).fill_(1.0), reps))  # written: resident
        del buf
    return gbs


def _read_bandwidth(buf, reps: int) -> float:
    """Best read rate of the fp32 buffer by torch's sum and by the native GEMV, GB/s."""
    import torch

    from .kernels import native

    def rate(fn, nbytes: int) -> float:
        fn()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return nbytes / best / 1e9

    gbs = rate(buf.sum, buf.nbytes)
    k = native()
    if k is not None:
        dt = torch.bfloat16 if k.isa == "avx512" else torch.float32
        w, x = buf.view(dt).view(-1, 4096), torch.ones(1, 4096, dtype=dt)  # (N, 4096) weights, one row of x
        if k.float_ok(x.dtype, w.dtype):
            gbs = max(gbs, rate(lambda: k.linear(x, w, None), w.nbytes))
    return gbs


def warm_page_cache(path: Path) -> None:
    t0, n = time.perf_counter(), 0
    for f in sorted(path.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(64 << 20):
                    n += len(chunk)
    log(f"page cache warmed: read {n / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")


# ---- prompts ------------------------------------------------------------------------------------


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    import torch

    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def code_ids(path: Path, vocab: int, n: int) -> list[int]:
    """n tokens of real Python source: the checkpoint's tokenizer when it has one, else UTF-8 bytes + 1."""
    import inspect
    import textwrap

    from .tokenizer import Tokenizer, TokenizerError

    text = inspect.getsource(textwrap.TextWrapper)
    try:
        ids = Tokenizer.from_dir(path).encode(text)
    except TokenizerError:
        ids = [1 + b % (vocab - 1) for b in text.encode()]
    if len(ids) < n:
        raise ValueError(f"the code sample has only {len(ids)} tokens; --spec-len {n} is too long")
    return ids[:n]


def model_weight_bytes(model, tied: bool) -> int:
    """Bytes of the parameters and buffers read per decoded token (shared tensors once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    if not tied:  # an untied embedding is read one row per token, not whole
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.embed_tokens
        emb = emb.weight
        total -= emb.numel() * emb.element_size()
    return total


# ---- runners: one per peer; each yields the same measurements -----------------------------------


class _Ours:
    def __init__(self, path: Path, v: Variant):
        import torch

        from .api import load_for_inference
        from .infer.quantize import NativeLinear

        dtype = None if v.dtype == "auto" else v.dtype
        # exactly what starcoder2.load(...) does: streaming quantization, native kernels where the CPU has them
        self.model, self.cfg = load_for_inference(path, dtype, "cpu", v.quant, native=v.native)
        self.native_layers = sum(isinstance(m, NativeLinear) for m in self.model.modules())
        self.weight_bytes = model_weight_bytes(self.model, self.cfg.tie_word_embeddings)

    def engine(self, max_batch: int, max_len: int, **kw):
        from .infer.engine import Engine

        return Engine(self.model, max_batch=max_batch, max_seq_len=max_len + 2, **kw)

    @staticmethod
    def run(engine, ids: list[int], n: int):
        """One request to completion; (request, perf_counter stamp of each token)."""
        from .infer.generate import SamplingParams

        stamps: list[float] = []
        req = engine.submit(ids, SamplingParams(max_new_tokens=n),
                            on_event=lambda e: e.token is not None and stamps.append(time.perf_counter()))
        while not req.finished:
            engine.step()
        return req, stamps

    def ttft(self, ids: list[int]) -> float:
        req, _ = self.run(self.engine(1, len(ids) + 1), ids, 1)
        return req.t_first - req.t_submit

    def prefill(self, ids: list[int]) -> None:
        import torch

        with torch.inference_mode():
            self.model.logits(self.model.hidden_states(torch.tensor([ids]))[:, -1])

    def decode(self, ids: list[int], n: int) -> tuple[float, list[float], list[int]]:
        req, stamps = self.run(self.engine(1, len(ids) + n), ids, n)
        return req.t_submit, stamps, req.output

    def batch(self, prompts: list[list[int]], n: int) -> dict:
        from .infer.generate import SamplingParams

        engine = self.engine(len(prompts), max(map(len, prompts)) + n)
        reqs = [engine.submit(p, SamplingParams(max_new_tokens=n)) for p in prompts]
        while engine.has_work():
            engine.step()
        tokens = sum(len(r.output) for r in reqs)
        t_first, t_end = max(r.t_first for r in reqs), max(r.t_done for r in reqs)
        return {"tok_s": (tokens - len(reqs)) / (t_end - t_first), "tokens": tokens,
                "ttft_max_s": t_first - reqs[0].t_submit}

    def keystroke(self, base: list[int], extra: list[int]) -> dict:
        """A long prompt cold, then extended by a few tokens with the prefix cache on."""
        engine = self.engine(1, len(base) + len(extra) + 1, prefix_cache_tokens=max(4096, 2 * len(base)))
        cold, _ = self.run(engine, base, 1)
        warm, _ = self.run(engine, base + extra, 1)
        c, w = cold.t_first - cold.t_submit, warm.t_first - warm.t_submit
        return {"cold_ttft_s": c, "warm_ttft_s": w, "ratio": c / w, "cached_tokens": warm.cached_tokens,
                "prompt_tokens": len(base) + len(extra)}

    def speculation(self, prompt: list[int], n: int, num_draft: int, source: list[int]) -> dict:
        """Greedy decode of an edit-like prompt with prompt-lookup drafts vs without."""
        plain, ps = self.run(self.engine(1, len(prompt) + n), prompt, n)
        engine = self.engine(1, len(prompt) + n, num_draft=num_draft)
        spec, ss = self.run(engine, prompt, n)
        rate = lambda st: (len(st) - 1) / (st[-1] - st[0])  # noqa: E731 - tokens 2..n
        diverge = next((i for i, (a, b) in enumerate(zip(plain.output, spec.output)) if a != b), None)
        copied = next((i for i, (a, b) in enumerate(zip(plain.output, source)) if a != b), len(plain.output))
        return {"plain_tok_s": rate(ps), "spec_tok_s": rate(ss), "ratio": rate(ss) / rate(ps),
                "identical": plain.output == spec.output, "first_difference": diverge,
                "drafted": engine.stats["draft_tokens"], "accepted": engine.stats["accepted_tokens"],
                "copied_from_source": copied, "tokens": len(plain.output)}


class _Transformers:
    def __init__(self, path: Path, v: Variant):
        import torch
        from transformers import Starcoder2ForCausalLM

        dtype = torch.float32 if v.dtype == "fp32" else torch.bfloat16
        self.model = Starcoder2ForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        self.weight_bytes = model_weight_bytes(self.model, self.model.config.tie_word_embeddings)

    def _generate(self, prompts: list[list[int]], n: int) -> tuple[float, list[float], list[int]]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self):
                self.prompt_seen, self.stamps, self.toks = False, [], []

            def put(self, value):
                now = time.perf_counter()
                if not self.prompt_seen:  # generate() first puts the prompt
                    self.prompt_seen = True
                    return
                self.stamps.append(now)
                self.toks.extend(int(t) for t in value.reshape(-1))

            def end(self):
                pass

        s, x = Stamps(), torch.tensor(prompts)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, eos_token_id=None, pad_token_id=0, streamer=s)
        return t0, s.stamps, s.toks

    def ttft(self, ids: list[int]) -> float:
        t0, stamps, _ = self._generate([ids], 1)
        return stamps[0] - t0

    def prefill(self, ids: list[int]) -> None:
        import torch

        with torch.inference_mode():
            self.model(torch.tensor([ids]), logits_to_keep=1, use_cache=False)

    def decode(self, ids: list[int], n: int) -> tuple[float, list[float], list[int]]:
        return self._generate([ids], n)

    def batch(self, prompts: list[list[int]], n: int) -> dict:
        t0, stamps, toks = self._generate(prompts, n)
        return {"tok_s": len(prompts) * (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": len(toks),
                "ttft_max_s": stamps[0] - t0}


class _LlamaCpp:
    """llama.cpp through llama-cpp-python 0.3.x, greedy."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)
        self.weight_bytes = gguf.stat().st_size

    def ttft(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self.prefill(ids)
        self.llm.sample(temp=0.0, repeat_penalty=1.0)
        return time.perf_counter() - t0

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()  # forget the previous tokens: no prefix reuse
        self.llm.eval(ids)

    def decode(self, ids: list[int], n: int) -> tuple[float, list[float], list[int]]:
        self.llm.reset()
        stamps, toks = [], []
        t0 = time.perf_counter()
        for tok in self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            toks.append(int(tok))
            if len(toks) == n:
                break
        return t0, stamps, toks

    batch = None  # one sequence at a time through the Python API


# ---- worker: one variant ------------------------------------------------------------------------


def run_worker(variant: str, ckpt: Path, proto: Protocol, gguf: Path | None) -> dict:
    import torch

    from .checkpoint import read_config

    torch.set_num_threads(proto.threads)
    v, cfg, name = VARIANTS[variant], read_config(ckpt), variant
    out: dict = {"variant": variant, **asdict(v), "threads": torch.get_num_threads()}
    log(f"[{name}] loading {gguf.name if gguf else ckpt.name}")
    with Meter() as m:
        if v.peer == "ours":
            runner = _Ours(ckpt, v)
            out["native_layers"] = runner.native_layers
        elif v.peer == "transformers":
            runner = _Transformers(ckpt, v)
        else:
            runner = _LlamaCpp(gguf, proto.threads, max(proto.prefill_len, proto.prompt_len + proto.new_tokens) + 16)
    out["load"], out["rss_after_load_gib"] = m.record(), _rss_now_gib()
    out["weight_bytes"] = runner.weight_bytes
    out["limit_tok_s"] = proto.bandwidth_gbs * 1e9 / runner.weight_bytes
    log(f"[{name}] loaded in {m.wall:.2f} s (RSS {out['rss_after_load_gib']:.2f} GiB, "
        f"weights {runner.weight_bytes / 1e9:.2f} GB)")

    V, skip = cfg.vocab_size, set(proto.skip)
    prefill_ids = random_ids(proto.prefill_len, V, seed=2)
    decode_ids = random_ids(proto.prompt_len, V, seed=1)
    batch_ids = [random_ids(proto.prompt_len, V, seed=10 + i) for i in range(proto.batch)]
    do_batch = "batch" not in skip and runner.batch is not None

    log(f"[{name}] warm-up: prefill-{proto.prefill_len}, decode 8 tokens")
    runner.prefill(prefill_ids)
    runner.decode(decode_ids, 8)

    for key in ("ttft", "prefill", "decode", "batch"):
        out[key] = []
    for r in range(proto.reps):
        tag = f"[{name}] rep {r + 1}/{proto.reps}:"
        if "ttft" not in skip:
            with Meter() as m:
                ttft = runner.ttft(prefill_ids)
            out["ttft"].append(m.record(ttft_s=ttft))
            log(f"{tag} TTFT-{proto.prefill_len} {ttft:.3f} s")
        if "prefill" not in skip:
            with Meter() as m:
                runner.prefill(prefill_ids)
            out["prefill"].append(m.record(tok_s=proto.prefill_len / m.wall))
            log(f"{tag} prefill {proto.prefill_len / m.wall:.2f} tok/s")
        if "decode" not in skip:
            n = proto.new_tokens
            with Meter() as m:
                t0, stamps, toks = runner.decode(decode_ids, n)
            if len(stamps) != n:
                raise RuntimeError(f"{name} produced {len(stamps)} tokens, expected {n}")
            out["decode"].append(m.record(tok_s=(n - 1) / (stamps[-1] - stamps[0]), ttft_s=stamps[0] - t0,
                                          e2e_tok_s=n / (stamps[-1] - t0), tokens=toks))
            log(f"{tag} decode {out['decode'][-1]['tok_s']:.3f} tok/s, foreign CPU {m.foreign:.2f} s")
        if do_batch:
            with Meter() as m:
                res = runner.batch(batch_ids, proto.batch_new_tokens)
            out["batch"].append(m.record(**res))
            log(f"{tag} batch-{proto.batch} aggregate {res['tok_s']:.3f} tok/s")

    if variant == proto.scenarios:
        out["scenarios"] = run_scenarios(runner, ckpt, cfg, proto, name)
    out["peak_rss_gib"] = _peak_rss_gib()
    return out


def run_scenarios(runner: _Ours, ckpt: Path, cfg, proto: Protocol, name: str) -> dict:
    res: dict = {}
    if "keystroke" not in proto.skip:
        base = random_ids(proto.keystroke_len, cfg.vocab_size, seed=3)
        extra = random_ids(proto.keystroke_extra, cfg.vocab_size, seed=4)
        res["keystroke"] = []
        for r in range(proto.reps):
            with Meter() as m:
                k = runner.keystroke(base, extra)  # a fresh engine: the first prompt is cold
            res["keystroke"].append(m.record(**k))
            log(f"[{name}] keystroke rep {r + 1}: cold {k['cold_ttft_s']:.3f} s, cached {k['warm_ttft_s']:.3f} s "
                f"({k['cached_tokens']} tokens reused)")
    if "speculation" not in proto.skip:
        code = code_ids(ckpt, cfg.vocab_size, proto.spec_len)
        prompt, source = code + code[:proto.spec_repeat], code[proto.spec_repeat:]
        runner.speculation(prompt, 8, proto.num_draft, source)  # warm-up of the verify path
        res["speculation"] = []
        for r in range(proto.reps):
            with Meter() as m:
                s = runner.speculation(prompt, proto.new_tokens, proto.num_draft, source)
            res["speculation"].append(m.record(**s))
            log(f"[{name}] speculation rep {r + 1}: plain {s['plain_tok_s']:.3f} tok/s, num_draft="
                f"{proto.num_draft} {s['spec_tok_s']:.3f} tok/s, accepted {s['accepted']}/{s['drafted']}, "
                f"identical={s['identical']}")
    return res


# ---- llama.cpp: GGUF conversion ----------------------------------------------------------------

_CONVERT = r"""
import sys
conv, hf_dir, out, outtype = sys.argv[1:5]
sys.path.insert(0, conv.rsplit("/", 1)[0])
import convert_hf_to_gguf as c  # puts its own gguf-py first on sys.path (PyPI gguf is too old)
try:  # llama.cpp >= 2026: the model classes live in the conversion package
    from conversion.base import TextModel as base
except ImportError:
    base = getattr(c, "TextModel", None) or c.Model
orig = base.get_vocab_base_pre
def pre(self, tokenizer):  # our stand-in BPE's pre-tokenizer hash is unknown to the converter
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        return "starcoder"
base.get_vocab_base_pre = pre
sys.argv = [conv, hf_dir, "--outfile", out, "--outtype", outtype]
c.main()
"""


def convert_to_gguf(ckpt: Path, workdir: Path, variants: list[str], src: str | None,
                    threads: int) -> tuple[dict[str, Path], list[str]]:
    """GGUF files for the llama.cpp variants, cached under workdir: {variant: path}, notes.

    Follows performance.md (run with llama-cpp-python 0.3.36's vendored tree): `convert_hf_to_gguf.py` from a llama.cpp tree (`--llama-cpp-src`, e.g.
    the `vendor/llama.cpp` of the llama-cpp-python sdist, whose own gguf-py it uses), with the
    pre-tokenizer reported as "starcoder"; Q8_0/Q4_0 by `llama_cpp.llama_model_quantize` from the
    BF16 file. The converter needs a tokenizer: a checkpoint without one gets a small BPE trained on
    stdlib sources, in a staging folder that links the weights.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        return {}, [LLAMA_SKIPPED]
    conv = Path(src or "") / "convert_hf_to_gguf.py"
    if not src or not conv.is_file():
        return {}, ["llama.cpp peer skipped: no converter: pass --llama-cpp-src DIR (or set LLAMA_CPP_SRC), a "
                    "llama.cpp tree with convert_hf_to_gguf.py and gguf-py, e.g. vendor/llama.cpp of the "
                    "llama-cpp-python sdist"]
    import ctypes

    import llama_cpp

    out_dir = workdir / f"{ckpt.name}-gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = ckpt
    if not (ckpt / "tokenizer.json").is_file():
        hf_dir = out_dir / "hf"
        hf_dir.mkdir(exist_ok=True)
        for f in ckpt.iterdir():
            if not (hf_dir / f.name).exists():
                (hf_dir / f.name).symlink_to(f.resolve())
        if not (hf_dir / "tokenizer.json").is_file():
            import inspect
            import textwrap

            from .tokenizer import train_bpe

            train_bpe([inspect.getsource(m) for m in (argparse, textwrap, json)], vocab_size=2048).save(hf_dir)
    env = dict(_worker_env(threads), PYTHONPATH=str(conv.parent / "gguf-py"))
    paths, notes = {}, []

    def base(outtype: str) -> Path:
        path = out_dir / f"model-{outtype}.gguf"
        if not path.is_file():
            log(f"converting {ckpt.name} to GGUF {outtype.upper()}")
            subprocess.run([sys.executable, "-c", _CONVERT, str(conv), str(hf_dir), str(path), outtype],
                           check=True, env=env)
        return path

    for name in variants:
        v = VARIANTS[name]
        try:
            if v.quant is None:
                paths[name] = base(v.dtype)
                continue
            path = out_dir / f"model-{v.quant}.gguf"
            if not path.is_file():
                log(f"quantizing GGUF to {v.quant.upper()}")
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{v.quant.upper()}")
                params.nthread = threads
                rc = llama_cpp.llama_model_quantize(str(base("bf16")).encode(), str(path).encode(),
                                                    ctypes.byref(params))
                if rc != 0:
                    raise RuntimeError(f"llama_model_quantize returned {rc}")
            paths[name] = path
        except (subprocess.CalledProcessError, RuntimeError, OSError, AttributeError) as e:
            notes.append(f"{name} skipped: GGUF conversion failed: {e}")
    return paths, notes


# ---- parent: spawn workers ----------------------------------------------------------------------


def _worker_env(threads: int) -> dict:
    path = os.pathsep.join(p for p in (str(PKG_PARENT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")


def spawn_worker(variant: str, ckpt: Path, proto: Protocol, gguf: Path | None) -> dict:
    cmd = [sys.executable, "-m", "starcoder2.bench", "--worker", variant, "--ckpt", str(ckpt),
           "--protocol", json.dumps(asdict(proto))]
    if gguf is not None:
        cmd += ["--gguf", str(gguf)]
    log(f"worker {variant}: starting")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=_worker_env(proto.threads))
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["worker_wall_s"] = time.perf_counter() - t0
            return res
    log(f"worker {variant}: FAILED (exit {proc.returncode})")
    return {"variant": variant, **asdict(VARIANTS[variant]), "error": f"worker exited {proc.returncode} without a result",
            "stdout_tail": proc.stdout[-2000:]}


# ---- report -------------------------------------------------------------------------------------


def _med(recs: list[dict] | None, key: str = "tok_s") -> float | None:
    return statistics.median(r[key] for r in recs) if recs else None


def summarize(r: dict) -> dict:
    s = {"load_s": r["load"]["wall_s"], "peak_rss_gib": r["peak_rss_gib"], "rss_after_load_gib": r["rss_after_load_gib"],
         "weight_bytes": r["weight_bytes"], "limit_tok_s": r["limit_tok_s"], "ttft_512_s": _med(r["ttft"], "ttft_s"),
         "prefill_tok_s": _med(r["prefill"]), "decode_tok_s": _med(r["decode"]), "batch_tok_s": _med(r["batch"])}
    s["decode_pct_of_limit"] = s["decode_tok_s"] and 100 * s["decode_tok_s"] / s["limit_tok_s"]
    s["batch_over_decode"] = s["batch_tok_s"] and s["decode_tok_s"] and s["batch_tok_s"] / s["decode_tok_s"]
    sc = r.get("scenarios", {})
    if sc.get("keystroke"):
        s["keystroke"] = {k: _med(sc["keystroke"], k) for k in ("cold_ttft_s", "warm_ttft_s", "ratio")}
    if sc.get("speculation"):
        s["speculation"] = {k: _med(sc["speculation"], k) for k in ("plain_tok_s", "spec_tok_s", "ratio")}
        s["speculation"]["identical"] = all(x["identical"] for x in sc["speculation"])
    return s


def _cell(recs: list[dict], key: str = "tok_s", digits: int = 2, unit: str = "") -> str:
    if not recs:
        return "-"
    xs = [r[key] for r in recs]
    flag = " !" if any(r["foreign_cpu_s"] > DISTURBED * r["wall_s"] for r in recs) else ""
    rng = f" ({min(xs):.{digits}f}-{max(xs):.{digits}f})" if len(xs) > 1 else ""
    return f"**{statistics.median(xs):.{digits}f}{unit}**{rng}{flag}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(results: list[dict], meta: dict) -> tuple[str, list[str]]:
    """Markdown tables, and the target checks that failed (for the exit status)."""
    p = meta["protocol"]
    ok = {r["variant"]: r for r in results if "error" not in r}
    S = {k: summarize(r) for k, r in ok.items()}
    L = [f"### starcoder2 bench: {meta['shape']}", "",
         f"{p['threads']} threads; {p['reps']} rep(s) after a warm-up, median (min-max). TTFT and prefill: "
         f"{p['prefill_len']}-token prompt. Decode: batch 1, {p['prompt_len']}-token prompt + {p['new_tokens']} "
         f"tokens, rate over tokens 2..{p['new_tokens']}. Batch-{p['batch']}: {p['batch']} different "
         f"{p['prompt_len']}-token prompts x {p['batch_new_tokens']} tokens through the Engine, aggregate rate "
         f"over tokens 2..{p['batch_new_tokens']}. Limit = {p['bandwidth_gbs']:.1f} GB/s (measured) / weight bytes. \"!\" = foreign "
         f"CPU > {DISTURBED:.0%} of wall time.", "",
         "| variant | load s | peak RSS GiB | TTFT-512 s | prefill-512 tok/s | decode tok/s | % of limit | "
         "batch-8 tok/s | batch-8 / decode | weights GB | foreign CPU s (max) |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            L.append(f"| {r['variant']} | FAILED: {r['error']} |" + " |" * 9)
            continue
        s = S[r["variant"]]
        recs = r["ttft"] + r["prefill"] + r["decode"] + r["batch"]
        foreign = max((x["foreign_cpu_s"] for x in recs), default=0.0)
        pct = f"{s['decode_pct_of_limit']:.0f} %" if s["decode_pct_of_limit"] else "-"
        L.append(f"| {r['variant']} | {s['load_s']:.2f} | {s['peak_rss_gib']:.2f} | {_cell(r['ttft'], 'ttft_s', 3)} | "
                 f"{_cell(r['prefill'])} | {_cell(r['decode'], digits=3)} | {pct} | {_cell(r['batch'])} | "
                 f"{_ratio(s['batch_tok_s'], s['decode_tok_s'])} | {s['weight_bytes'] / 1e9:.3g} | {foreign:.2f} |")
    limits = " / ".join(f"{k} {s['limit_tok_s']:.2f}" for k, s in S.items())
    L.append(f"| *bandwidth limit* | | | | | *{limits}* | 100 % | | | | |")

    # ratios against transformers in the same activation dtype (bf16 for int8/int4) and llama.cpp at the same bits
    llama = {VARIANTS[k].label: s for k, s in S.items() if VARIANTS[k].peer == "llama" and VARIANTS[k].label}
    if any(k.startswith("transformers") for k in S) or llama:
        L += ["", "Ratios (speed: > 1 = this variant is faster; TTFT and RSS: < 1 = lower). transformers in the same "
              "activation dtype; llama.cpp at the same bits: ours-fp32 vs F32, ours-bf16 vs F16, ours-int8 vs "
              "Q8_0, ours-int4 vs Q4_0. Greedy agreement: decode tokens equal to transformers' (random weights "
              "give near-flat logits, so bf16 near-ties may diverge: a sanity signal, not a test).", "",
              "| variant | vs transformers: TTFT | prefill | decode | batch-8 | peak RSS | greedy agree | "
              "vs llama.cpp: TTFT | prefill | decode | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, s in S.items():
            if VARIANTS[k].peer != "ours":
                continue
            tk = f"transformers-{activation_dtype(VARIANTS[k])}"
            t, q = S.get(tk, {}), llama.get(VARIANTS[k].label, {})
            agree = "-"
            if tk in ok and ok[k]["decode"] and ok[tk]["decode"]:
                a, b = ok[k]["decode"][0]["tokens"], ok[tk]["decode"][0]["tokens"]
                agree = f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"
            cells = [_ratio(s[m], t.get(m)) for m in ("ttft_512_s", "prefill_tok_s", "decode_tok_s", "batch_tok_s",
                                                      "peak_rss_gib")]
            cells += [agree] + [_ratio(s[m], q.get(m)) for m in ("ttft_512_s", "prefill_tok_s", "decode_tok_s",
                                                                 "peak_rss_gib")]
            L.append(f"| {k} | " + " | ".join(cells) + " |")

    sc = ok.get(p["scenarios"], {}).get("scenarios", {})
    if sc:
        L += ["", f"Engine scenarios ({p['scenarios']}):", "", "| scenario | without | with | ratio | target | detail |",
              "|---|---|---|---|---|---|"]
        if sc.get("keystroke"):
            k = sc["keystroke"]
            L.append(f"| editor keystroke: {k[0]['prompt_tokens'] - p['keystroke_extra']} tokens cold, then + "
                     f"{p['keystroke_extra']} with the prefix cache | TTFT {_cell(k, 'cold_ttft_s', 3, ' s')} | "
                     f"TTFT {_cell(k, 'warm_ttft_s', 3, ' s')} | {_cell(k, 'ratio', 1, 'x')} | >= 10x | "
                     f"{k[0]['cached_tokens']} prompt tokens reused |")
        if sc.get("speculation"):
            x = sc["speculation"]
            diff = [y["first_difference"] for y in x if not y["identical"]]
            same = f"**DIFFERENT** (first at token {diff[0]})" if diff else "identical"
            L.append(f"| prompt-lookup speculation, num_draft={p['num_draft']}: {p['spec_len']} code tokens + their "
                     f"first {p['spec_repeat']}, {p['new_tokens']} new | {_cell(x, 'plain_tok_s', 3, ' tok/s')} | "
                     f"{_cell(x, 'spec_tok_s', 3, ' tok/s')} | {_cell(x, 'ratio', 2, 'x')} | >= 2x | greedy outputs {same}; "
                     f"accepted {x[0]['accepted']}/{x[0]['drafted']} drafted; the model repeated "
                     f"{x[0]['copied_from_source']}/{x[0]['tokens']} tokens of the code |")

    checks = target_checks(S, meta["scaled"], p["scenarios"])
    if checks:
        scaled = " (scaled-down shape: absolute numbers are not the 3B's)" if meta["scaled"] else ""
        L += ["", f"Targets of issue 3{scaled}:", "", "| target | measured | met |", "|---|---|---|"]
        L += [f"| {t} | {m} | {'yes' if met else 'no'} |" for t, m, met in checks]
    changed = any(not x["identical"] for x in sc.get("speculation", []))
    failed = ["speculation changed the greedy output"] if changed else []
    return "\n".join(L), failed


# ours variant -> (llama.cpp peer, bound) for decode, llama.cpp peer at the same bits for prefill (issue 3)
DECODE_TARGETS = {"ours-bf16": ("llama-bf16", 0.95, "llama-f16"), "ours-fp32": ("llama-f32", 0.95, "llama-f32"),
                  "ours-int8": ("llama-q8_0", 1.3, "llama-q8_0"),
                  "ours-int4": ("llama-q4_0", 1.0, "llama-q4_0")}


def target_checks(S: dict, scaled: bool, scenarios: str | None = "ours-bf16") -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of issue 3 this run measured."""
    out = []

    def add(target: str, value: float | None, bound: float, fmt: str = "{:.2f}x") -> None:
        if value:
            out.append((target, fmt.format(value), value >= bound))

    def over(a: dict, key: str, peer: str) -> float | None:
        return a[key] / S[peer][key] if peer in S and a[key] and S[peer][key] else None

    for k, (dec_peer, bound, same_bits) in DECODE_TARGETS.items():
        if (s := S.get(k)) is None:
            continue
        if k in ("ours-bf16", "ours-fp32"):
            add(f"{k} decode >= 85 % of the bandwidth limit", s["decode_pct_of_limit"], 85, "{:.0f} %")
        add(f"{k} decode >= {bound}x {dec_peer}", over(s, "decode_tok_s", dec_peer), bound)
        tk = f"transformers-{activation_dtype(VARIANTS[k])}"
        add(f"{k} prefill >= 1.0x {tk}", over(s, "prefill_tok_s", tk), 1.0)
        add(f"{k} prefill >= 1.0x {same_bits}", over(s, "prefill_tok_s", same_bits), 1.0)
        add(f"{k} batch-8 aggregate >= 5x batch-1 decode", s["batch_over_decode"], 5.0)
        if k == "ours-int4" and not scaled:
            gb = s["peak_rss_gib"] * 2**30 / 1e9
            out.append(("ours-int4 peak RSS <= 2.5 GB", f"{gb:.2f} GB", gb <= 2.5))
    bf = S.get(scenarios or "", {})
    add("keystroke TTFT >= 10x lower with the prefix cache", bf.get("keystroke", {}).get("ratio"), 10.0, "{:.1f}x")
    add("prompt-lookup speculation >= 2x decode tok/s", bf.get("speculation", {}).get("ratio"), 2.0)
    return out


def plot(results: list[dict], out: Path, title: str) -> str:
    """A bar chart per metric; returns a note (written, or why it was skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib); {out} not written"
    S = {r["variant"]: summarize(r) for r in results if "error" not in r}
    names = list(S)
    metrics = [("decode_tok_s", "decode tok/s (batch 1)"), ("prefill_tok_s", "prefill-512 tok/s"),
               ("batch_tok_s", "batch-8 aggregate tok/s"), ("peak_rss_gib", "peak RSS GiB")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2))
    colors = {"ours": "tab:blue", "transformers": "tab:orange", "llama": "tab:green"}
    for ax, (key, label) in zip(axes, metrics):
        vals = [S[n][key] or 0.0 for n in names]
        ax.bar(names, vals, color=[colors[VARIANTS[n].peer] for n in names])
        if key == "decode_tok_s":  # the bandwidth limit of each variant
            ax.scatter(names, [S[n]["limit_tok_s"] for n in names], marker="_", s=400, color="black", label="limit")
            ax.legend()
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return f"plot written to {out}"


def environment() -> dict:
    import torch

    versions = {}
    for mod, dist in (("transformers", "transformers"), ("llama_cpp", "llama_cpp_python")):
        try:  # the installed version, without importing the package
            versions[mod] = importlib.metadata.version(dist) if importlib.util.find_spec(mod) else None
        except importlib.metadata.PackageNotFoundError:
            versions[mod] = "unknown"
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    try:
        commit = subprocess.run(["git", "-C", str(PKG_PARENT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpu": cpu, "nproc": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, **versions, "git_commit": commit,
            "loadavg": open("/proc/loadavg").read().split()[:3]}


# ---- main ---------------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Speed and memory of ours (bf16, int8, int4) beside "
                                "transformers and llama.cpp on the same weights; Markdown to stdout.",
                                epilog="variants: " + ", ".join(VARIANTS))
    p.add_argument("--model", "-m", help="checkpoint directory or hub id (default: the 3B shape, random weights)")
    p.add_argument("--preset", default="3b", help="shape of the random-weight model: 3b (default), 7b, 15b, small, tiny")
    p.add_argument("--layers", type=int, help="override the number of layers (scaled-down run)")
    p.add_argument("--variants", help="comma-separated (default: " + DEFAULT_VARIANTS[True] + " where bf16 is "
                   "fast, else " + DEFAULT_VARIANTS[False] + ")")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT", help="write the raw results here")
    p.add_argument("--plot", metavar="OUT.png", help="write a bar chart here (needs matplotlib)")
    p.add_argument("--workdir", default="/tmp/sc2-bench", help="random checkpoints and GGUF files are cached here")
    p.add_argument("--skip", default="", help=f"comma-separated measurements to leave out: {','.join(MEASUREMENTS)}")
    p.add_argument("--llama-cpp-src", default=os.environ.get("LLAMA_CPP_SRC"),
                   help="llama.cpp tree with convert_hf_to_gguf.py (default: $LLAMA_CPP_SRC)")
    for f in Protocol.__dataclass_fields__.values():  # protocol sizes: for tests and experiments
        if f.type == "int" and f.name not in ("reps", "threads"):
            p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default, help=argparse.SUPPRESS)
    for name in ("--worker", "--ckpt", "--protocol", "--gguf", "--make-checkpoint", "--config-json"):
        p.add_argument(name, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    """The parent: checkpoint, GGUF files, one worker per variant, tables, JSON, plot."""
    from .checkpoint import read_config, resolve

    variants = [v.strip() for v in (args.variants or default_variants()).split(",") if v.strip()]
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for s in skip:
        if s not in MEASUREMENTS:
            raise ValueError(f"unknown measurement {s!r} in --skip; choose from {', '.join(MEASUREMENTS)}")
    if args.reps < 1 or args.new_tokens < 2 or args.batch_new_tokens < 2:
        raise ValueError("--reps must be >= 1 and the token counts >= 2")
    proto = Protocol(reps=args.reps, threads=args.threads, skip=skip,
                     **{k: getattr(args, k) for k, f in Protocol.__dataclass_fields__.items()
                        if f.type == "int" and k not in ("reps", "threads")})
    workdir = Path(args.workdir)
    if args.model and (args.layers is not None or args.preset != "3b"):
        raise ValueError("use either --model or --preset/--layers")
    ckpt = resolve(args.model) if args.model else None
    env = environment()
    log(f"{env['cpu']}, {env['nproc']} CPUs, torch {env['torch']}, transformers {env['transformers']}, "
        f"llama_cpp {env['llama_cpp']}, loadavg {' '.join(env['loadavg'])}")
    if ckpt is not None:
        cfg = read_config(ckpt)
        shape = f"{ckpt}: {cfg.num_params:,} params, {cfg.num_layers} layers, hidden {cfg.hidden_size}"
    else:
        cfg = bench_config(args.preset, args.layers)
        ckpt = ensure_checkpoint(workdir, cfg, args.threads)
        shape = (f"StarCoder2-{args.preset} shape{f' with {args.layers} layers (scaled down)' if args.layers else ''}: "
                 f"{cfg.num_params:,} params, hidden {cfg.hidden_size}, {cfg.num_layers} layers, random weights")
    scaled = bool(args.model or args.layers is not None or args.preset != "3b")

    notes: list[str] = []
    if "transformers" in {VARIANTS[v].peer for v in variants} and env["transformers"] is None:
        notes.append("transformers peer skipped: transformers is not installed (pip install 'starcoder2[bench]')")
        variants = [v for v in variants if VARIANTS[v].peer != "transformers"]
    llama = [v for v in variants if VARIANTS[v].peer == "llama"]
    ggufs: dict[str, Path] = {}
    if llama:
        ggufs, llama_notes = convert_to_gguf(ckpt, workdir, llama, args.llama_cpp_src, args.threads)
        notes += llama_notes
        variants = [v for v in variants if VARIANTS[v].peer != "llama" or v in ggufs]
    for n in notes:
        log(n)

    proto.scenarios = scenario_variant(variants)
    proto.bandwidth_gbs = measure_bandwidth(args.threads)
    log(f"read bandwidth {proto.bandwidth_gbs:.1f} GB/s")
    warm_page_cache(ckpt)
    results = [spawn_worker(v, ckpt, proto, ggufs.get(v)) for v in variants]
    meta = {"shape": shape, "scaled": scaled, "protocol": asdict(proto)}
    table, failed = report(results, meta)
    if args.plot:
        notes.append(plot(results, Path(args.plot), shape))
        log(notes[-1])
    print(table + "".join(f"\n\nNote: {n}" for n in notes))
    if args.json:
        payload = {"environment": env, "config": cfg.to_dict(), "checkpoint": str(ckpt), "bandwidth_gbs": proto.bandwidth_gbs,
                   **meta, "notes": notes, "summary": {r["variant"]: summarize(r) for r in results if "error" not in r},
                   "results": results, "table": table}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        log(f"raw results written to {args.json}")
    errors = [r["variant"] for r in results if "error" in r]
    if errors or failed:
        raise ValueError("; ".join(([f"worker(s) failed: {', '.join(errors)}"] if errors else []) + failed))
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.make_checkpoint:
        from .config import ModelConfig

        make_checkpoint(Path(args.make_checkpoint), ModelConfig.from_hf(json.loads(args.config_json)), args.threads)
        return 0
    if args.worker:
        proto = Protocol(**json.loads(args.protocol))
        res = run_worker(args.worker, Path(args.ckpt), proto, Path(args.gguf) if args.gguf else None)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    try:
        return run(args)
    except ValueError as e:
        print(f"starcoder2 bench: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
