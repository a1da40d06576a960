#!/usr/bin/env python
"""Server load benchmark: a live `starcoder2 serve` (a subprocess, as users run it) under C concurrent
streaming clients, for C in 1, 4, 16, each for a fixed duration.

Each client loops: a streaming OpenAI `/v1/completions` request (greedy, `max_tokens` new tokens,
a different ~`--prompt-chars` code prompt each time, cut from this repository's own sources), read
to `data: [DONE]`. Per configuration: requests, errors (non-200, an error event, a missing [DONE],
a transport error), time to first token p50/p95 (request sent -> first text chunk, queueing
included), per-request decode tok/s p50 ((tokens - 1) / (last chunk - first chunk)), aggregate
tok/s (completion tokens / wall time), and the server's RSS after warm-up and after each
configuration (memory growth under load).

    .venv/bin/python benchmarks/bench_server.py                                  # embedded model, 60 s each
    .venv/bin/python benchmarks/bench_server.py --models embedded,3b --duration-3b 20
    .venv/bin/python benchmarks/bench_server.py --clients 16 --duration 60 --json /tmp/load.json --plot ''

Models: `embedded` (the 7.9M-parameter model inside the package) and `3b` (the StarCoder2-3B shape
with random bf16 weights, built once by starcoder2/bench.py under --workdir, 6.1 GB). The llama.cpp
peer (`python -m llama_cpp.server`, the same weights written as GGUF by starcoder2.gguf_export, f16
for the embedded model, bf16 for 3B, same threads) runs only when llama-cpp-python and its [server]
extra are importable; otherwise its rows say why they were skipped. --json keeps the rows of models
not run this time from the existing file, so models can be run separately.
Caveats: the clients run in this process on the same machine, so on a 2-core box they take CPU
from the server; random 3B weights never stop early, so every request runs to max_tokens.
Writes a Markdown table to stdout, JSON (--json) and a plot (--plot).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from starcoder2 import bench  # noqa: E402 - after the path fix-up


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def code_prompts(n: int, chars: int, seed: int = 0) -> list[str]:
    """n prompts of about `chars` characters, cut at line starts from this repository's sources."""
    text = "".join(p.read_text() for p in sorted((REPO / "starcoder2").rglob("*.py")))
    starts = [i + 1 for i, ch in enumerate(text[:-chars]) if ch == "\n"]
    rng = random.Random(seed)
    return [text[s:s + chars] for s in rng.sample(starts, n)]


def staged_3b(ckpt: Path, workdir: Path) -> Path:
    """The random 3B checkpoint has no tokenizer, and a server needs one: a folder linking its files,
    plus the embedded model's tokenizer padded with plain added tokens ("\u2047{id}") up to the 3B
    vocabulary, so that every id the random weights produce decodes to text."""
    import tokenizers

    from starcoder2.api import EMBEDDED_MODEL_DIR
    from starcoder2.checkpoint import read_config

    out = workdir / f"{ckpt.name}-served"
    if (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    tok = tokenizers.Tokenizer.from_file(str(EMBEDDED_MODEL_DIR / "tokenizer.json"))
    vocab = read_config(ckpt).vocab_size
    tok.add_tokens([tokenizers.AddedToken(f"\u2047{i}", normalized=False) for i in range(tok.get_vocab_size(), vocab)])
    assert tok.get_vocab_size() == vocab, (tok.get_vocab_size(), vocab)
    (out / "tokenizer_config.json").write_text((EMBEDDED_MODEL_DIR / "tokenizer_config.json").read_text())
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(out / "tokenizer.json")
    return out


# ---- servers -------------------------------------------------------------------------------------

class Server:
    """A server subprocess on 127.0.0.1; `base` is its URL, `rss()` its resident memory."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str], log_path: Path):
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.base + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {self.log.name}")

    def rss_mib(self) -> float:
        return sum(p.memory_info().rss for p in [self.ps, *self.ps.children(recursive=True)]) / 2**20

    def prefix_cache_mib(self) -> float | None:
        """KV held by our server's prefix cache (/metrics); None for other servers."""
        try:
            text = httpx.get(self.base + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return None
        line = next((ln for ln in text.splitlines() if ln.startswith("starcoder2_prefix_cache_bytes ")), None)
        return None if line is None else round(float(line.split()[1]) / 2**20, 1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start_ours(model: Path, dtype: str, threads: int, max_batch: int, max_seq_len: int, logdir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "starcoder2.cli", "serve", "--port", str(port), "--dtype", dtype,
           "--max-batch", str(max_batch), "--max-queue", "64", "--max-seq-len", str(max_seq_len),
           "--model-name", "bench", "--model", str(model)]
    server = Server(cmd, port, bench._worker_env(threads), logdir / f"serve-{port}.log")
    server.wait_ready("/health", timeout=600)
    return server


def llama_gguf(src: Path, workdir: Path, outtype: str) -> Path:
    """The checkpoint as GGUF for llama.cpp (cached under workdir)."""
    from starcoder2.gguf_export import export_gguf

    out = workdir / f"{src.name}-{outtype}.gguf"
    if not out.is_file():
        log(f"writing {out}")
        export_gguf(src, out, outtype=outtype)
    return out


def start_llama(gguf: Path, threads: int, n_ctx: int, logdir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
           str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--model_alias", "bench",
           "--interrupt_requests", "False"]  # its default cancels a running request when another arrives
    server = Server(cmd, port, bench._worker_env(threads), logdir / f"llama-{port}.log")
    server.wait_ready("/v1/models", timeout=600)
    return server


# ---- load ----------------------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: {"ok", "ttft", "tokens", "decode_s"} (times in seconds)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    t_first = t_last = None
    chunks, usage, done = 0, None, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "error": f"HTTP {r.status_code}: {r.text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"ok": False, "error": str(event["error"])[:200]}
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        now = time.perf_counter()
                        t_first = t_first or now
                        t_last = now
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
    if not done:
        return {"ok": False, "error": "stream ended without [DONE]"}
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ok": True, "ttft": (t_first or time.perf_counter()) - t0, "tokens": tokens,
            "decode_s": (t_last - t_first) if t_first and t_last else 0.0}


async def run_load(base: str, clients: int, duration: float, prompts: list[str], max_tokens: int) -> dict:
    """`clients` loops of requests until `duration` has passed; requests in flight then finish."""
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def loop(k: int) -> None:
            i = k
            while time.perf_counter() - t0 < duration:
                results.append(await one_request(client, prompts[i % len(prompts)], max_tokens))
                i += clients

        await asyncio.gather(*(loop(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft"] for r in ok)
    decode = [(r["tokens"] - 1) / r["decode_s"] for r in ok if r["tokens"] > 1 and r["decode_s"] > 0]
    errors = [r["error"] for r in results if not r["ok"]]

    def pct(values: list[float], q: float) -> float | None:
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {"clients": clients, "wall_s": round(wall, 2), "requests": len(results), "errors": len(errors),
            "first_errors": errors[:3], "ttft_p50_ms": _ms(pct(ttft, 0.5)), "ttft_p95_ms": _ms(pct(ttft, 0.95)),
            "decode_tok_s_p50": round(statistics.median(decode), 1) if decode else None,
            "aggregate_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "completion_tokens": sum(r["tokens"] for r in ok)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def measure(server: Server, name: str, peer: str, args, duration: float, max_tokens: int,
            prompts: list[str]) -> list[dict]:
    asyncio.run(run_load(server.base, 2, min(10.0, duration), prompts, max_tokens))  # warm-up
    rss_start, cache_start = server.rss_mib(), server.prefix_cache_mib()
    rows = []
    for c in args.clients:
        log(f"[{name}/{peer}] {c} clients for {duration:.0f} s")
        row = asyncio.run(run_load(server.base, c, duration, prompts, max_tokens))
        row.update(model=name, server=peer, duration_s=duration, max_tokens=max_tokens,
                   rss_start_mib=round(rss_start, 1), prefix_cache_start_mib=cache_start,
                   prefix_cache_end_mib=server.prefix_cache_mib(),
                   rss_end_mib=round(server.rss_mib(), 1))
        log(f"  {row['requests']} requests, {row['errors']} errors, TTFT p50 {row['ttft_p50_ms']} ms, "
            f"{row['aggregate_tok_s']} tok/s, RSS {row['rss_start_mib']} -> {row['rss_end_mib']} MiB")
        rows.append(row)
    return rows


# ---- report --------------------------------------------------------------------------------------

COLUMNS = [("model", "model"), ("server", "server"), ("clients", "C"), ("duration_s", "s"),
           ("max_tokens", "new tok"), ("requests", "requests"),
           ("errors", "errors"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p95_ms", "TTFT p95 ms"),
           ("decode_tok_s_p50", "decode tok/s/req p50"), ("aggregate_tok_s", "aggregate tok/s"),
           ("rss_start_mib", "RSS start MiB"), ("rss_end_mib", "RSS end MiB"),
           ("prefix_cache_start_mib", "prefix cache start MiB"), ("prefix_cache_end_mib", "prefix cache end MiB")]


def table(rows: list[dict]) -> str:
    out = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['model']} | {r['server']} | {r['skipped']} |" + " |" * (len(COLUMNS) - 3))
            continue
        out.append("| " + " | ".join("-" if r.get(k) is None else str(r[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(out)


def plot(rows: list[dict], out: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed; {out} not written"
    measured = [r for r in rows if "skipped" not in r]
    series = sorted({(r["model"], r["server"]) for r in measured})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for model, peer in series:
        rs = sorted((r for r in measured if (r["model"], r["server"]) == (model, peer)), key=lambda r: r["clients"])
        cs = [r["clients"] for r in rs]
        label = f"{model} / {peer}"

        def ys(key: str) -> list[float]:  # a missing or zero value is a gap on the log axis
            return [r[key] or float("nan") for r in rs]

        line = axes[0].plot(cs, ys("ttft_p50_ms"), marker="o", label=f"{label} p50")[0]
        axes[0].plot(cs, ys("ttft_p95_ms"), marker="x", ls="--", color=line.get_color(), label=f"{label} p95")
        axes[1].plot(cs, ys("aggregate_tok_s"), marker="o", label=label)
        axes[2].plot(cs, ys("decode_tok_s_p50"), marker="o", label=label)
    for ax, title in zip(axes, ("time to first token (ms)", "aggregate tok/s", "decode tok/s per request (p50)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streaming clients")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return f"plot written to {out}"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)  # atomic


# ---- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="embedded", help="comma-separated: embedded,3b")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per concurrency level (embedded)")
    p.add_argument("--duration-3b", type=float, default=60.0, help="seconds per concurrency level (3b)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (embedded)")
    p.add_argument("--max-tokens-3b", type=int, default=16, help="new tokens per request (3b)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="the server's --max-seq-len (KV rows)")
    p.add_argument("--prompt-chars", type=int, default=600, help="characters per prompt (~150-200 tokens)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="server threads")
    p.add_argument("--dtype-3b", default="bf16")
    p.add_argument("--workdir", default="/tmp/sc2-bench", help="3B checkpoint and GGUF cache")
    p.add_argument("--json", default=str(REPO / "docs" / "bench_server.json"))
    p.add_argument("--plot", default=str(REPO / "docs" / "bench_server.png"), help="'' to skip")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = code_prompts(512, args.prompt_chars)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "embedded":
            from starcoder2.api import EMBEDDED_MODEL_DIR

            ckpt, dtype, duration, gguf_src = EMBEDDED_MODEL_DIR, "fp32", args.duration, EMBEDDED_MODEL_DIR
            max_tokens = args.max_tokens
        elif name == "3b":
            gguf_src = bench.ensure_checkpoint(workdir, bench.bench_config("3b"), args.threads)
            ckpt, dtype, duration = staged_3b(gguf_src, workdir), args.dtype_3b, args.duration_3b
            max_tokens = args.max_tokens_3b
        else:
            raise SystemExit(f"unknown model {name!r}: use embedded or 3b")
        log(f"[{name}] starting starcoder2 serve")
        server = start_ours(ckpt, dtype, args.threads, args.max_batch, args.max_seq_len, workdir)
        try:
            rows += measure(server, name, "starcoder2", args, duration, max_tokens, prompts)
        finally:
            server.stop()
        if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
            rows.append({"model": name, "server": "llama.cpp", "skipped": "skipped: llama-cpp-python[server] not "
                         "installed (pip install 'llama-cpp-python[server]')"})
            continue
        gguf = llama_gguf(Path(gguf_src), workdir, "f16" if name == "embedded" else "bf16")
        server = start_llama(gguf, args.threads, args.max_seq_len, workdir)
        try:
            rows += measure(server, name, "llama.cpp", args, duration, max_tokens, prompts)
        finally:
            server.stop()
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": args.threads, "prompt_chars": args.prompt_chars,
            "max_batch": args.max_batch, "max_seq_len": args.max_seq_len}
    if args.json:  # rows of models not run this time are kept from the existing file
        ran = {r["model"] for r in rows}
        old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        kept = [r for r in old.get("results", []) if r["model"] not in ran]
        rows = sorted(kept + rows, key=lambda r: (r["model"], r["server"], r.get("clients", 0)))
        if kept:  # the meta of the run those rows came from
            meta["kept_rows_from"] = {k: v for k, v in old.get("meta", {}).items() if k != "kept_rows_from"}
        write_json(Path(args.json), {"meta": meta, "results": rows})
        log(f"wrote {args.json}")
    print(table(rows))
    if args.plot:
        log(plot(rows, Path(args.plot)))
    return 1 if any(r.get("errors") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
