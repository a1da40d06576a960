#!/usr/bin/env python
"""Core CPU benchmark: our StarCoder2 vs transformers' Starcoder2ForCausalLM, same weights, same protocol.

What it measures
----------------
The protocol of ../shared/reference/performance.md, on the real StarCoder2-3B shape
(`starcoder2.config.preset("3b")`) with random weights (speed does not depend on weight values),
for each precision in --dtypes (fp32, bf16) and each peer in --peers (ours, transformers):

- load: both peers load the SAME on-disk checkpoint, a random-weight bf16 checkpoint written once with
  our `save_model` and cached under --workdir (keyed by the model shape). Ours: `checkpoint.load_model`;
  transformers: `Starcoder2ForCausalLM.from_pretrained(path, dtype=...)`. Reported: wall time of the
  load call, and the peak RSS (`ru_maxrss`) of the whole worker process (load + all runs). The page
  cache is warmed (the files are read once) before the first worker, so every peer loads warm.
  Note: in bf16 (= the stored dtype) BOTH peers end up with weights that are private mmaps of the
  safetensors file, so their bf16 "load" is lazy: pages fault in during the warm-up, which is not
  timed, and "RSS after load" is small. fp32 loads cast, so they read everything inside the load.
  Peak RSS counts the file pages a process touched while they were mapped.
- prefill: a 512-token random prompt as one forward pass, logits of the last position only, no KV cache.
  Ours: `model.hidden_states(ids)` then `model.logits(h[:, -1])`; transformers:
  `model(ids, logits_to_keep=1, use_cache=False)`. Reported as tok/s = 512 / wall time.
- decode: a 128-token random prompt, then 64 new tokens, greedy, KV cache on, batch 1, no stop ids.
  tok/s = 63 / (time of token 64 - time of token 1), so the prefill that yields token 1 is left out.
  Ours: the real user path, `infer.generate.generate_tokens` with `SamplingParams(max_new_tokens=64)`,
  timestamped at each yielded token. transformers: `model.generate(max_new_tokens=64,
  min_new_tokens=64, do_sample=False, eos_token_id=None)` with a `BaseStreamer` whose `put` timestamps
  each token (its first `put` is the prompt).
- Each (peer, dtype) runs in its own subprocess (this script re-invoked with `--worker PEER DTYPE`,
  answering with one JSON line on stdout), so `ru_maxrss` belongs to that run alone. Inside a worker:
  `torch.set_num_threads(--threads)` (2), one warm-up (a full prefill, an 8-token decode), then
  --reps reps (3) of decode and of prefill; the table shows median and min-max.
- Contention: the machine is shared, so every rep (and the load) records `foreign_cpu_s`, the CPU
  seconds other processes used meanwhile: busy time from /proc/stat (user+nice+system+irq+softirq)
  minus this process's own CPU time (getrusage). Hypervisor steal is recorded apart (`steal_s`).
  A rep whose foreign CPU exceeds 25 % of its wall time is marked with "!" in the table.
- Extras (JSON and a third table): time to first token for the 128-token prompt, end-to-end tok/s
  (prefill + 64 tokens), ours' prefill-512 through the KV-cache path (`infer.generate.prefill`, what
  `generate_tokens` runs; --no-cache-prefill skips it, saving ~2 min of the full run), and whether the two peers' greedy tokens agree (same weights and prompt;
  random weights give near-flat logits, so bf16 ties can diverge: a sanity signal, not a test).
- The decode bandwidth limit is 34.4 GB/s (performance.md) divided by the weight bytes read per token,
  num_params x bytes per element: 12.12 GB fp32 and 6.06 GB bf16 for the 3B shape.

How to run
----------
    .venv/bin/python benchmarks/bench_core.py                          # full 3B, fp32+bf16, ~15+ min, 2 cores busy
    .venv/bin/python benchmarks/bench_core.py --dtypes bf16 --json out.json
    .venv/bin/python benchmarks/bench_core.py --layers 2 --reps 1      # scaled-down smoke run (~1 min)

Options: --dtypes fp32,bf16  --peers ours,transformers  --layers N (override num_layers; the checkpoint
cache is keyed by the shape)  --reps N  --threads N  --workdir DIR (default /tmp/sc2-bench)  --json OUT
--no-cache-prefill. Exit status 1 if any worker failed (its row then says FAILED).
The 3B checkpoint takes 6.1 GB of disk (written once, ~1-2 min); the fp32 workers need 12-17 GiB of RAM
each (one at a time: the 12.1 GB fp32 weights plus the mapped bf16 shard being read).
Progress goes to stderr, the Markdown tables to stdout.

What it leaves out
------------------
- Quality: the weights are random. Tokenizer speed: prompts are random token ids.
- Batch > 1, long contexts (only <= 640 tokens; the 4096 sliding window is never reached), fp16,
  quantized formats, llama.cpp (see performance.md for its numbers), GPUs, cold-page-cache loads.
- transformers' random-init time (performance.md reports it); here both peers load the same file.
- Statistical rigour: 3 reps on a shared 2-core VM vary by +-10-15 %; compare peers from the same run
  and look at foreign_cpu_s before trusting small differences.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BANDWIDTH_GBS = 34.4  # torch `sum` over 1 GiB, 2 threads (performance.md)
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
PEER_NAMES = {"ours": "ours (starcoder2)", "transformers": "transformers"}
RESULT_TAG = "BENCH_RESULT "
CLK_TCK = os.sysconf("SC_CLK_TCK")
DISTURBED = 0.25  # foreign CPU s per wall s above which a rep is marked "!"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- contention accounting ----------------------------------------------------------------------


def _proc_stat() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    assert fields[0] == "cpu"
    v = [int(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is already inside user)
    busy = v[0] + v[1] + v[2] + v[5] + v[6]
    steal = v[7] if len(v) > 7 else 0
    return busy / CLK_TCK, steal / CLK_TCK


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Meter:
    """Wall time, own CPU time, foreign CPU time (other processes) and steal over a with-block."""

    def __enter__(self) -> Meter:
        self.busy0, self.steal0 = _proc_stat()
        self.own0 = _own_cpu()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        busy1, steal1 = _proc_stat()
        self.own = _own_cpu() - self.own0
        self.foreign = (busy1 - self.busy0) - self.own  # /proc/stat ticks are 10 ms: may dip slightly below 0
        self.steal = steal1 - self.steal0

    def record(self) -> dict:
        return {"wall_s": self.wall, "own_cpu_s": self.own, "foreign_cpu_s": self.foreign, "steal_s": self.steal}


def _rss_now_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- model shape and checkpoint -----------------------------------------------------------------


def bench_config(layers: int | None):
    from starcoder2.config import preset

    cfg = preset("3b")
    return cfg if layers is None else cfg.replace(num_layers=layers)


def checkpoint_dir(workdir: Path, cfg) -> Path:
    key = hashlib.sha1(json.dumps(cfg.to_hf(), sort_keys=True).encode()).hexdigest()[:10]
    return workdir / f"sc2-3b-L{cfg.num_layers}-h{cfg.hidden_size}-v{cfg.vocab_size}-{key}-bf16-random"


def make_checkpoint(path: Path, layers: int | None, threads: int) -> None:
    """Worker: a random-weight bf16 checkpoint, built on meta, materialised once, saved with save_model."""
    import torch

    from starcoder2.checkpoint import save_model
    from starcoder2.model import StarCoder2

    torch.set_num_threads(threads)
    cfg = bench_config(layers)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = StarCoder2(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    log(f"  initialised {cfg.num_params / 1e9:.3f} B params in {time.perf_counter() - t0:.1f} s; saving to {path}")
    save_model(model, path, dtype=torch.bfloat16)
    log(f"  checkpoint written in {time.perf_counter() - t0:.1f} s total")


def ensure_checkpoint(args, cfg) -> Path:
    from starcoder2.checkpoint import read_config

    path = checkpoint_dir(Path(args.workdir), cfg)
    if (path / "config.json").is_file():
        try:
            if read_config(path).to_hf() == cfg.to_hf():
                log(f"using cached checkpoint {path}")
                return path
        except Exception as e:  # noqa: BLE001 - a broken cache entry is rebuilt
            log(f"cached checkpoint {path} unusable ({e}); rebuilding")
    log(f"creating random-weight bf16 checkpoint ({cfg.num_layers} layers, {cfg.num_params / 1e9:.3f} B params)")
    cmd = [sys.executable, __file__, "--make-checkpoint", str(path), "--threads", str(args.threads)]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    subprocess.run(cmd, check=True)
    return path


def warm_page_cache(path: Path) -> None:
    t0, n = time.perf_counter(), 0
    for f in sorted(path.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(64 << 20):
                    n += len(chunk)
    log(f"page cache warmed: read {n / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")


# ---- worker: one peer, one dtype ----------------------------------------------------------------


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


class _Ours:
    def __init__(self, path: Path, dtype):
        from starcoder2.checkpoint import load_model

        self.model, self.cfg = load_model(path, dtype)

    def prefill_last_logits(self, ids: list[int]):
        import torch

        with torch.inference_mode():
            h = self.model.hidden_states(torch.tensor([ids]))
            return self.model.logits(h[:, -1])

    def prefill_cache_path(self, ids: list[int]):
        """The prefill `generate_tokens` runs: chunked, into a KVCache row."""
        from starcoder2.infer.generate import prefill
        from starcoder2.kv_cache import KVCache

        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.cfg, 1, len(ids) + 1, dtype=dtype)
        return prefill(self.model, ids, cache, 0)

    def decode(self, ids: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
        """Timestamps (perf_counter) of each new token, and the tokens."""
        from starcoder2.infer.generate import SamplingParams, generate_tokens

        stamps, toks = [], []
        for _row, tok in generate_tokens(self.model, [ids], SamplingParams(max_new_tokens=new_tokens)):
            stamps.append(time.perf_counter())
            toks.append(tok)
        return stamps, toks


class _Transformers:
    def __init__(self, path: Path, dtype):
        from transformers import Starcoder2ForCausalLM

        self.model = Starcoder2ForCausalLM.from_pretrained(str(path), dtype=dtype).eval()

    def prefill_last_logits(self, ids: list[int]):
        import torch

        with torch.inference_mode():
            return self.model(torch.tensor([ids]), logits_to_keep=1, use_cache=False).logits[:, -1]

    def decode(self, ids: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
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

        s = Stamps()
        x = torch.tensor([ids])
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                                streamer=s)
        return s.stamps, s.toks


def run_worker(args) -> dict:
    import torch

    peer, dname = args.worker
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
    path = Path(args.ckpt)
    t_imp = time.perf_counter()
    if peer == "transformers":
        import transformers  # noqa: F401 - import time is not load time
    import_s = time.perf_counter() - t_imp
    out: dict = {"peer": peer, "dtype": dname, "threads": torch.get_num_threads(), "import_s": import_s}

    log(f"[{peer} {dname}] loading {path.name}")
    with Meter() as m:
        runner = _Ours(path, dtype) if peer == "ours" else _Transformers(path, dtype)
    out["load"] = m.record()
    out["rss_after_load_gib"] = _rss_now_gib()
    log(f"[{peer} {dname}] loaded in {m.wall:.2f} s (RSS {out['rss_after_load_gib']:.2f} GiB)")

    cfg = bench_config(args.layers)
    decode_ids = random_ids(args.prompt_len, cfg.vocab_size, seed=1)
    prefill_ids = random_ids(args.prefill_len, cfg.vocab_size, seed=2)
    n = args.new_tokens

    log(f"[{peer} {dname}] warm-up: prefill-{args.prefill_len}, decode 8 tokens")
    runner.prefill_last_logits(prefill_ids)
    if peer == "ours" and args.cache_prefill:
        runner.prefill_cache_path(prefill_ids)
    runner.decode(decode_ids, 8)

    out["decode"], out["prefill"], out["prefill_cache_path"] = [], [], []
    for r in range(args.reps):
        log(f"[{peer} {dname}] rep {r + 1}/{args.reps}: decode {args.prompt_len}+{n}")
        with Meter() as m:
            t0 = time.perf_counter()
            stamps, toks = runner.decode(decode_ids, n)
        if len(stamps) != n:
            raise RuntimeError(f"{peer} produced {len(stamps)} tokens, expected {n}")
        rec = m.record()
        rec.update(tok_s=(n - 1) / (stamps[-1] - stamps[0]), ttft_s=stamps[0] - t0,
                   e2e_tok_s=n / (stamps[-1] - t0), tokens=toks)
        out["decode"].append(rec)
        log(f"[{peer} {dname}]   decode {rec['tok_s']:.3f} tok/s, ttft {rec['ttft_s']:.2f} s, "
            f"foreign CPU {rec['foreign_cpu_s']:.2f} s")

        log(f"[{peer} {dname}] rep {r + 1}/{args.reps}: prefill-{args.prefill_len}")
        with Meter() as m:
            runner.prefill_last_logits(prefill_ids)
        rec = m.record()
        rec["tok_s"] = args.prefill_len / m.wall
        out["prefill"].append(rec)
        log(f"[{peer} {dname}]   prefill {rec['tok_s']:.2f} tok/s, foreign CPU {rec['foreign_cpu_s']:.2f} s")

        if peer == "ours" and args.cache_prefill:
            with Meter() as m:
                runner.prefill_cache_path(prefill_ids)
            rec = m.record()
            rec["tok_s"] = args.prefill_len / m.wall
            out["prefill_cache_path"].append(rec)
            log(f"[{peer} {dname}]   prefill via KV-cache path {rec['tok_s']:.2f} tok/s")

    out["peak_rss_gib"] = _peak_rss_gib()
    return out


def spawn_worker(args, peer: str, dname: str, ckpt: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", peer, dname, "--ckpt", str(ckpt), "--reps", str(args.reps),
           "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len)]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    if not args.cache_prefill:
        cmd.append("--no-cache-prefill")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TQDM_DISABLE="1")
    log(f"worker {peer} {dname}: starting")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr passes through
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["worker_wall_s"] = time.perf_counter() - t0
            return res
    log(f"worker {peer} {dname}: FAILED (exit {proc.returncode})")
    return {"peer": peer, "dtype": dname, "error": f"worker exited {proc.returncode} without a result",
            "stdout_tail": proc.stdout[-2000:]}


# ---- report -------------------------------------------------------------------------------------


def _stats(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def _fmt_rate(recs: list[dict], digits: int) -> str:
    lo, med, hi = _stats([r["tok_s"] for r in recs])
    flag = " !" if any(r["foreign_cpu_s"] > DISTURBED * r["wall_s"] for r in recs) else ""
    return f"**{med:.{digits}f}** ({lo:.{digits}f}-{hi:.{digits}f}){flag}"


def limit_tok_s(cfg, dname: str) -> float:
    return BANDWIDTH_GBS * 1e9 / (cfg.num_params * DTYPE_BYTES[dname])


def report(results: list[dict], cfg, args) -> str:
    lines = []
    shape = (f"StarCoder2-3B shape{' with ' + str(cfg.num_layers) + ' layers (scaled down)' if args.layers else ''}: "
             f"{cfg.num_params:,} params, hidden {cfg.hidden_size}, {cfg.num_layers} layers, random weights")
    lines += [f"### Core benchmark: {shape}", "",
              f"{args.threads} threads, batch 1, greedy, KV cache on; decode = {args.prompt_len}-token prompt + "
              f"{args.new_tokens} tokens (rate over tokens 2..{args.new_tokens}); prefill = {args.prefill_len} tokens, "
              f"last-position logits; {args.reps} rep{'s' if args.reps != 1 else ''} after a warm-up; median (min-max). "
              f"Bandwidth limit = {BANDWIDTH_GBS} GB/s / weight bytes. "
              f"\"!\" = a rep had foreign CPU > {DISTURBED:.0%} of its wall time.", ""]
    lines += ["| peer | dtype | load s | peak RSS GiB | prefill-512 tok/s | decode tok/s | decode % of bandwidth limit "
              "(limit tok/s) | foreign CPU s/rep (max) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {PEER_NAMES[r['peer']]} | {r['dtype']} | FAILED: {r['error']} | | | | | |")
            continue
        lim = limit_tok_s(cfg, r["dtype"])
        med = statistics.median(x["tok_s"] for x in r["decode"])
        foreign = max(x["foreign_cpu_s"] for x in r["decode"] + r["prefill"])
        lines.append(f"| {PEER_NAMES[r['peer']]} | {r['dtype']} | {r['load']['wall_s']:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{_fmt_rate(r['prefill'], 2)} | {_fmt_rate(r['decode'], 3)} | {100 * med / lim:.0f} % "
                     f"({lim:.2f}) | {foreign:.2f} |")

    by = {(r["peer"], r["dtype"]): r for r in results if "error" not in r}
    dtypes = [d for d in args.dtypes if ("ours", d) in by and ("transformers", d) in by]
    if dtypes:
        lines += ["", "Ratios ours / transformers (speed: > 1 means ours is faster; load time and RSS: < 1 means "
                  "ours is lower):", "",
                  "| dtype | load time | peak RSS | prefill-512 tok/s | decode tok/s | greedy tokens agree |",
                  "|---|---|---|---|---|---|"]
        for d in dtypes:
            o, t = by[("ours", d)], by[("transformers", d)]
            med = lambda rr, k: statistics.median(x["tok_s"] for x in rr[k])  # noqa: E731
            agree = sum(a == b for a, b in zip(o["decode"][0]["tokens"], t["decode"][0]["tokens"]))
            lines.append(f"| {d} | {o['load']['wall_s'] / t['load']['wall_s']:.2f}x | "
                         f"{o['peak_rss_gib'] / t['peak_rss_gib']:.2f}x | "
                         f"{med(o, 'prefill') / med(t, 'prefill'):.2f}x | {med(o, 'decode') / med(t, 'decode'):.2f}x | "
                         f"{agree}/{len(o['decode'][0]['tokens'])} |")

    lines += ["", "Extras (medians): time to first token for the decode prompt, end-to-end rate (prefill + all "
              "tokens), RSS right after load, ours' prefill through the KV-cache path that generate_tokens uses:", "",
              "| peer | dtype | TTFT-128 s | end-to-end tok/s | RSS after load GiB | load foreign CPU s | "
              "prefill-512 via KV cache tok/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            continue
        cp = _fmt_rate(r["prefill_cache_path"], 2) if r.get("prefill_cache_path") else "-"
        lines.append(f"| {PEER_NAMES[r['peer']]} | {r['dtype']} | "
                     f"{statistics.median(x['ttft_s'] for x in r['decode']):.2f} | "
                     f"{statistics.median(x['e2e_tok_s'] for x in r['decode']):.3f} | "
                     f"{r['rss_after_load_gib']:.2f} | {r['load']['foreign_cpu_s']:.2f} | {cp} |")
    return "\n".join(lines)


def environment() -> dict:
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpu": cpu, "nproc": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": tf_version,
            "git_commit": commit, "loadavg": open("/proc/loadavg").read().split()[:3]}


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
    p.add_argument("--peers", default="ours,transformers", help="comma-separated: ours,transformers")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (scaled-down run)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/sc2-bench", help="checkpoint cache directory")
    p.add_argument("--json", default=None, metavar="OUT", help="write the raw results here")
    p.add_argument("--no-cache-prefill", dest="cache_prefill", action="store_false",
                   help="skip the extra measurement of ours' prefill through the KV-cache path")
    p.add_argument("--prompt-len", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--prefill-len", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("PEER", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--make-checkpoint", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    for d in args.dtypes:
        if d not in DTYPE_BYTES:
            p.error(f"unknown dtype {d!r}; choose from fp32, bf16")
    for x in args.peers:
        if x not in PEER_NAMES:
            p.error(f"unknown peer {x!r}; choose from ours, transformers")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_checkpoint:
        make_checkpoint(Path(args.make_checkpoint), args.layers, args.threads)
        return 0
    if args.worker:
        res = run_worker(args)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    cfg = bench_config(args.layers)
    env = environment()
    log(f"{env['cpu']}, {env['nproc']} CPUs, torch {env['torch']}, transformers {env['transformers']}, "
        f"loadavg {' '.join(env['loadavg'])}")
    ckpt = ensure_checkpoint(args, cfg)
    warm_page_cache(ckpt)
    results = []
    for d in args.dtypes:
        for peer in args.peers:
            results.append(spawn_worker(args, peer, d, ckpt))
    table = report(results, cfg, args)
    print(table)
    if args.json:
        payload = {"environment": env, "config": cfg.to_dict(), "checkpoint": str(ckpt),
                   "bandwidth_gbs": BANDWIDTH_GBS,
                   "limits_tok_s": {d: limit_tok_s(cfg, d) for d in args.dtypes},
                   "args": {k: v for k, v in vars(args).items() if k not in ("worker", "ckpt", "make_checkpoint")},
                   "results": results, "table": table}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        log(f"raw results written to {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
