"""The `starcoder2` command line: complete, infill, chat, serve, eval, compare, bench, index, data,
train, finetune, merge, convert, export, tokenizer, info (one `cmd_*` function per command).

Every command prints `--help`; every failure is one line on stderr and a non-zero exit status
(1 for bad input or a bad checkpoint, 130 when interrupted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="checkpoint directory or hub id in the local HF cache "
                   "(default: $STARCODER2_MODEL, else the embedded model)")
    p.add_argument("--dtype", default="auto", help="fp32 | bf16 | fp16 (default: bf16 where the hardware multiplies "
                   "bf16 fast, else fp32)")
    p.add_argument("--device", default="auto", help="cpu | cuda (default: cuda when present)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization at load")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format), merged into the weights at load")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); never printed")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


def _load(args: argparse.Namespace):
    from .api import load
    return load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, adapter=args.adapter)


def _stream_out(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_complete(args: argparse.Namespace) -> None:
    if args.file and args.prompt is not None:
        raise ValueError("give the prompt as an argument or with --file, not both")
    if args.file:
        prompt = _read_text(args.file)
    elif args.prompt is not None:
        prompt = args.prompt
    elif not sys.stdin.isatty():
        prompt = sys.stdin.read()
    else:
        raise ValueError("no prompt: pass it as an argument, with --file F, or on stdin")
    if not prompt:
        raise ValueError("the prompt is empty")
    sc = _load(args)
    if args.echo:
        sys.stdout.write(prompt)
    _stream_out(sc.stream_complete(prompt, allow_special=args.allow_special, **_sampling(args)))


def cmd_infill(args: argparse.Namespace) -> None:
    from .prompts import split_at_cursor
    if args.file:
        if args.prefix is not None or args.suffix is not None:
            raise ValueError("use either --file/--line or --prefix/--suffix")
        if args.line is None:
            raise ValueError("--file needs --line N (1-based) to place the cursor")
        prefix, suffix = split_at_cursor(_read_text(args.file), args.line, args.column)
    else:
        if args.prefix is None:
            raise ValueError("give --prefix (and --suffix), or --file F --line N")
        prefix, suffix = args.prefix, args.suffix or ""
    sc = _load(args)
    _stream_out(sc.stream_infill(prefix, suffix, mode=args.mode, **_sampling(args)))


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import read_config, resolve
    from .config import preset
    tokenizer = None
    if args.preset:
        if args.model:
            raise ValueError("use either --model or --preset")
        config, source = preset(args.preset), f"preset {args.preset}"
    else:
        from .api import default_model_path
        from .tokenizer import Tokenizer, TokenizerError
        path = resolve(args.model) if args.model else default_model_path()
        config, source = read_config(path), str(path)
        try:
            tokenizer = Tokenizer.from_dir(path)
        except TokenizerError:
            tokenizer = None
    n = config.num_params
    rows = [
        ("source", source),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)"),
        ("layers / hidden / mlp", f"{config.num_layers} / {config.hidden_size} / {config.intermediate_size}"),
        ("heads / kv heads / head dim", f"{config.num_heads} / {config.num_kv_heads} / {config.head_dim}"),
        ("context / sliding window", f"{config.max_position_embeddings} / {config.sliding_window}"),
        ("rope theta", f"{config.rope_theta}"),
        ("tied embeddings", str(config.tie_word_embeddings)),
        ("weights fp32 / bf16 / fp16", f"{_gb(4 * n)} / {_gb(2 * n)} / {_gb(2 * n)}"),
        ("kv cache per token (bf16)", f"{config.kv_bytes_per_token(2) / 1024:.1f} KiB"),
    ]
    window = min(config.sliding_window or config.max_position_embeddings, config.max_position_embeddings)
    rows.append(("kv cache per sequence (bf16)", f"{config.kv_bytes_per_token(2) * window / 2**20:.0f} MiB "
                 f"(at most {window} tokens kept)"))
    if tokenizer is not None:
        specials = sorted(tokenizer.special_ids)
        rows.append(("vocabulary", f"{tokenizer.vocab_size} ({len(specials)} special tokens)"))
        rows.append(("eos", f"{tokenizer.decode([tokenizer.eos_id], skip_special=False)!r} = {tokenizer.eos_id}"))
        rows.append(("special tokens", ", ".join(f"{i}:{tokenizer.decode([i], skip_special=False)}"
                                                 for i in specials)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoint import load_model, resolve, save_model, stored_dtype
    from .device import resolve_dtype
    if (args.source is None) == (args.model is None):
        raise ValueError("give the source checkpoint once: as MODEL or with --model")
    src = resolve(args.source or args.model)
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from the source checkpoint")
    if args.to == "gguf":
        if args.quantize:
            raise ValueError("--quantize writes a pre-quantized checkpoint; for an 8-bit GGUF use --outtype q8_0")
        from .gguf_export import export_gguf
        export_gguf(src, out, args.outtype or "f16")
    elif args.outtype:
        raise ValueError("--outtype is for --to gguf")
    elif args.quantize:
        from .api import load_for_inference
        from .infer.quantize import quantization_config
        dtype = resolve_dtype("bf16" if args.dtype == "keep" else args.dtype)  # the activation dtype
        model, _ = load_for_inference(src, dtype, "cpu", quantize=args.quantize, group_size=args.group_size,
                                      native=False, head=False)  # the head is quantized when loaded
        save_model(model, out, max_shard_size=args.max_shard_size, tokenizer_dir=src,
                   quantization_config=quantization_config(model))
    else:
        dtype = stored_dtype(src) if args.dtype == "keep" else resolve_dtype(args.dtype)
        model, _ = load_model(src, dtype)
        save_model(model, out, max_shard_size=args.max_shard_size, tokenizer_dir=src)
    print(f"wrote {out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import build_parser as bench_parser, run
    run(bench_parser("starcoder2 bench").parse_args(args.args))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .data.ingest import read_sources
    from .tokenizer import train_bpe

    if args.vocab_size < 300:
        raise ValueError("--vocab-size must be at least 300 (256 byte symbols plus the special tokens)")
    texts = [d.text for repo in read_sources(args.corpus, args.max_bytes) for d in repo.docs]
    if not texts:
        raise ValueError("the corpus holds no readable source files")
    print(f"training a {args.vocab_size}-token BPE on {len(texts):,} files "
          f"({sum(map(len, texts)) / 1e6:.1f} M characters)", file=sys.stderr)
    tok = train_bpe(texts, args.vocab_size, show_progress=not args.quiet)
    tok.save(args.out)
    print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json ({tok.vocab_size} ids)")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    import dataclasses

    from .data.pipeline import DataConfig, prepare
    from .tokenizer import Tokenizer

    config = DataConfig.from_file(args.config) if args.config else DataConfig()
    overrides = {k: v for k, v in (("seed", args.seed), ("workers", args.workers), ("holdout", args.holdout)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    if args.tasks:
        _data_prepare_distributed(args, config)
        return
    tok = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None
    prepare(args.sources, args.out, tokenizer=tok, config=config, jsonl=args.jsonl, progress=not args.quiet,
            log=lambda m: print(m, file=sys.stderr))
    if tok is not None:
        tok.save(Path(args.out) / "tokenizer")


def _data_prepare_distributed(args: argparse.Namespace, config) -> None:
    """`data prepare --tasks N`: the same stages as datatrove jobs (data/scaleout.py, docs/data.md)."""
    import importlib.util

    from .tokenizer import Tokenizer

    if importlib.util.find_spec("datatrove") is None:
        raise ValueError("--tasks needs datatrove: pip install 'starcoder2[scale]'")
    if not args.tokenizer:
        raise ValueError("--tasks needs --tokenizer")
    if args.jsonl:
        raise ValueError("--jsonl is written by the single-process run only (drop --tasks)")
    slurm = None
    if args.executor == "slurm":
        if not args.slurm_partition:
            raise ValueError("--executor slurm needs --slurm-partition")
        slurm = {"partition": args.slurm_partition, "time": args.slurm_time,
                 "cpus_per_task": args.slurm_cpus_per_task, "mem_per_cpu_gb": args.slurm_mem_per_cpu_gb,
                 "single_task": {"cpus_per_task": 1, "mem_per_cpu_gb": args.slurm_global_mem_gb}}
    from .data.scaleout import prepare_distributed

    Tokenizer.from_dir(args.tokenizer).save(Path(args.out) / "tokenizer")  # as the single-process run leaves it
    prepare_distributed(args.sources, args.out, tokenizer_dir=args.tokenizer, config=config, tasks=args.tasks,
                        workers=args.workers or -1, executor=args.executor, slurm_options=slurm,
                        log=lambda m: print(m, file=sys.stderr))


def cmd_train(args: argparse.Namespace) -> None:
    from .train.config import TrainConfig
    from .train.loop import train

    if args.config:
        config = TrainConfig.from_file(args.config)
    elif args.data and args.out:
        config = TrainConfig(data=args.data, out=args.out, model=args.preset or "small")
    else:
        raise ValueError("give --config FILE, or --data DIR and --out DIR (with --preset NAME)")
    overrides = {k: v for k, v in (("data", args.data), ("out", args.out), ("max_steps", args.max_steps),
                                   ("model", args.preset)) if v is not None}
    if overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    train(config, resume=args.resume, device=None if args.device == "auto" else args.device,
          progress=not args.quiet, log=lambda m: print(m, file=sys.stderr))


def cmd_export(args: argparse.Namespace) -> None:
    from .device import resolve_dtype
    from .train.loop import export_checkpoint
    path = export_checkpoint(args.checkpoint, args.out, resolve_dtype(args.dtype))
    print(f"wrote {path}")


def cmd_finetune(args: argparse.Namespace) -> None:
    import dataclasses

    from .api import default_model_path
    from .checkpoint import resolve
    from .data.fim import FIMConfig
    from .data.pipeline import DataConfig
    from .finetune import FinetuneConfig, finetune_repo

    import importlib.util
    if not args.full and importlib.util.find_spec("peft") is None:
        raise ValueError("finetune --lora needs peft: pip install 'starcoder2[finetune]' (or use --full)")
    path = resolve(args.model) if args.model else default_model_path()
    data_config = DataConfig.from_file(args.data_config) if args.data_config else DataConfig()
    data_config = dataclasses.replace(data_config, seed=args.seed)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    config = FinetuneConfig(model=str(path), out=args.out, method="full" if args.full else "lora", rank=args.rank,
                            alpha=args.alpha, dropout=args.dropout, targets=targets, base_name=args.model,
                            steps=args.steps, lr=args.lr, batch_size=args.batch, seq_len=args.seq_len,
                            grad_accum=args.grad_accum, eval_every=args.eval_every, save_every=args.save_every,
                            seed=args.seed, fim=FIMConfig(rate=args.fim_rate), dtype=args.dtype,
                            parallel=args.parallel, threads=args.threads,
                            activation_checkpointing=args.activation_checkpointing, keep_best=args.keep_best)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    device = None if args.device == "auto" else args.device
    if args.sft:
        from .finetune.sft import finetune_sft
        finetune_sft(config, args.sft, holdout=args.holdout, template_file=args.chat_template, resume=args.resume,
                     device=device, progress=not args.quiet, log=log)
    elif args.chat_template:
        raise ValueError("--chat-template goes with --sft")
    else:
        finetune_repo(config, args.repo, data_config, holdout=args.holdout, resume=args.resume, device=device,
                      progress=not args.quiet, log=log)
    result = Path(args.out) / ("final" if args.full else "adapter")
    if result.is_dir():  # rank 0 of a torchrun job; the other ranks print nothing
        print(f"wrote {result}")


def cmd_merge(args: argparse.Namespace) -> None:
    from .adapters import load_adapter, merge_adapter
    from .checkpoint import load_model, resolve, save_model, stored_dtype
    from .device import resolve_dtype
    src = resolve(args.model)
    out = Path(args.out)
    if out.resolve() in (src.resolve(), Path(args.adapter).resolve()):
        raise ValueError("--out must differ from the base checkpoint and the adapter")
    adapter = load_adapter(args.adapter)
    dtype = stored_dtype(src) if args.dtype == "keep" else resolve_dtype(args.dtype)
    model, _ = load_model(src, dtype)
    merge_adapter(model, adapter)
    # an adapter saved with its tokenizer (finetune does; an SFT run's carries its chat template) wins
    tokenizer_dir = args.adapter if (Path(args.adapter) / "tokenizer.json").is_file() else src
    save_model(model, out, max_shard_size=args.max_shard_size, tokenizer_dir=tokenizer_dir)
    print(f"wrote {out}")


def cmd_chat(args: argparse.Namespace) -> None:
    """A terminal chat: one line per user turn, the answer streamed; /reset forgets, Ctrl-D exits."""
    sc = _load(args)
    template = sc.chat_template()  # a base model fails here, with the reason
    system = [{"role": "system", "content": args.system}] if args.system else []
    if system:  # a template without a system role (StarCoder2-Instruct's) says so now, not mid-chat
        template.render([*system, {"role": "user", "content": "hi"}], add_generation_prompt=True)
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"starcoder2 chat with {sc.path.name}: /reset forgets the conversation, Ctrl-D exits", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D / end of input
            break
        text = line.rstrip("\n")
        if text.strip() in ("/reset", "/clear"):
            history = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if not text.strip():
            continue
        turn = [*history, {"role": "user", "content": text}]
        answer = []
        try:
            for piece in sc.stream_chat(turn, **_sampling(args)):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the conversation as it was
            print("\n(interrupted)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history = [*turn, {"role": "assistant", "content": "".join(answer)}]


def cmd_serve(args: argparse.Namespace) -> None:
    import importlib.util
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise ValueError("serve needs fastapi and uvicorn: pip install 'starcoder2[serve]'")
    api_key = args.api_key
    if args.api_key_file:
        api_key = _read_text(args.api_key_file).strip()
        if not api_key:
            raise ValueError(f"{args.api_key_file} holds no API key")
    settings = {k: v for k, v in (("max_batch", args.max_batch), ("max_queue", args.max_queue),
                                  ("max_seq_len", args.max_seq_len), ("model_name", args.model_name),
                                  ("cors_origins", args.cors_origin or None), ("repo", args.repo),
                                  ("repo_refresh_s", args.repo_refresh), ("num_draft", args.num_draft)) if v is not None}
    if args.repo and not Path(args.repo).is_dir():
        raise ValueError(f"--repo {args.repo}: not a directory")
    import uvicorn

    from .server import create_app
    lm = _load(args)
    draft = None
    if args.draft_model:
        from .api import load_for_inference
        from .checkpoint import resolve
        draft, _ = load_for_inference(resolve(args.draft_model), lm.model.norm.weight.dtype, lm.device)
        settings.setdefault("num_draft", 5)
    app = create_app(lm, draft_model=draft, api_key=api_key, **settings)
    print(f"starcoder2: serving {app.state.server.lm.path} on http://{args.host}:{args.port}"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout)


def cmd_eval(args: argparse.Namespace) -> None:
    if args.task == "perplexity":
        return _eval_perplexity(args)
    if args.task == "repo":
        return _eval_repo(args)
    if args.repo:
        raise ValueError(f"{args.task} takes no REPO argument (only `eval repo REPO` does)")
    from .eval.runner import EvalSettings, evaluate, markdown_table, write_json
    if args.samples and args.model:
        raise ValueError("--samples scores completions made elsewhere: give either --samples or --model")
    if args.greedy and (args.temperature or args.top_p is not None):
        raise ValueError("--greedy takes no --temperature or --top-p")
    sampling = args.n_samples is not None or args.temperature is not None
    temperature = (0.2 if args.temperature is None else args.temperature) if sampling else 0.0
    top_p = (0.95 if args.top_p is None else args.top_p) if sampling else 1.0
    settings = EvalSettings(n_samples=args.n_samples or 1, temperature=temperature, top_p=top_p,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                            workers=args.workers, timeout_s=args.timeout, code_checks=not args.no_code_checks,
                            sanitize=args.sanitize)
    lm = None if args.samples else _load(args)
    report = evaluate(args.task, lm=lm, samples=args.samples, data=args.data, limit=args.limit, settings=settings,
                      results=args.results, model_name=None if lm is None else str(lm.path),
                      progress=not args.quiet)
    if args.output:
        write_json(args.output, report)
    print(markdown_table(report))


def _add_eval_repo_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("eval repo REPO (repository-level completion, docs/repo.md)")
    g.add_argument("--n", type=int, default=20, help="cursor positions per kind (default 20)")
    g.add_argument("--modes", default="none,file,commented,native", help="context modes, comma-separated")
    g.add_argument("--kinds", default="single,multi,function", help="hole kinds, comma-separated")
    g.add_argument("--holdout", type=float, default=0.2, help="fraction of files cursors come from (default 0.2)")
    g.add_argument("--budget", type=int, default=2048, help="prompt tokens (default 2048)")
    g.add_argument("--test-cmd", help="shell command running the repository's tests in its copy, {python} = the "
                   "interpreter (default: pytest when the repository has tests)")
    g.add_argument("--no-tests", action="store_true", help="do not run the repository's tests")
    g.add_argument("--test-timeout", type=float, default=120.0, help="seconds per test run (default 120)")
    g.add_argument("--index", help="index database (default: the index's own location)")
    g.add_argument("--plot", help="write a bar chart (mode x kind) to this image")
    g.add_argument("--baseline", nargs="?", const="", metavar="MODEL",
                   help="before and after in one report: also evaluate MODEL (default: --model without --adapter) "
                   "on the same cursors, with the held-out loss of both")


def _eval_repo(args: argparse.Namespace) -> None:
    from .eval.repobench import (RepoBenchSettings, before_after, before_after_table, evaluate_repo, markdown_table,
                                 plot, plot_before_after)
    from .eval.runner import write_json
    if not args.repo:
        raise ValueError("eval repo needs the repository: starcoder2 eval repo PATH")
    if args.samples or args.n_samples or args.temperature:
        raise ValueError("eval repo decodes greedily from a model: "
                         "--samples, --n-samples and --temperature do not apply")
    settings = RepoBenchSettings(seed=args.seed, n=args.n, modes=tuple(filter(None, args.modes.split(","))),
                                 kinds=tuple(filter(None, args.kinds.split(","))), holdout=args.holdout,
                                 budget=args.budget, batch_size=args.batch_size, tests=not args.no_tests,
                                 test_cmd=args.test_cmd, test_timeout_s=args.test_timeout, workers=args.workers)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731

    def run(model_args: argparse.Namespace, results: str | None) -> dict:
        lm = _load(model_args)  # one model in memory at a time
        name = str(lm.path) + (f" + adapter {model_args.adapter}" if model_args.adapter else "")
        return evaluate_repo(args.repo, lm=lm, settings=settings, results=results, model_name=name,
                             index_path=args.index, progress=not args.quiet, log=log)

    before = None
    if args.baseline is not None:
        if not args.baseline and not args.adapter:
            raise ValueError("--baseline with no MODEL compares --model with and without --adapter: give --adapter "
                             "(or --baseline MODEL, e.g. the base of a full fine-tuning)")
        base = argparse.Namespace(**{**vars(args), "model": args.baseline or args.model, "adapter": None})
        before = run(base, f"{args.results}.baseline" if args.results else None)
    report = after = run(args, args.results)
    if before is not None:
        report = before_after(before, after)
    if args.output:
        write_json(args.output, report)
    if args.plot:
        plot([after], args.plot) if before is None else plot_before_after(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    print(markdown_table(report) if before is None else before_after_table(report))


def _eval_perplexity(args: argparse.Namespace) -> None:
    from .eval.runner import perplexity_table, write_json
    from .eval.tasks import perplexity
    if not args.data:
        raise ValueError("perplexity needs --data: a prepared data directory (its valid split) or a text file")
    lm = _load(args)
    result = perplexity(lm.model, lm.tokenizer, args.data, seq_len=args.seq_len, limit=args.limit)
    result.update(task="perplexity", model=str(lm.path))
    if args.output:
        write_json(args.output, result)
    print(perplexity_table(result))


def cmd_compare(args: argparse.Namespace) -> None:
    from .eval.compare import compare, markdown_table, plot
    from .eval.runner import write_json
    rows = compare(args.models, limit=args.limit, data=args.data, dtype=args.dtype, device=args.device,
                   speed_prompts=args.speed_prompts, speed_tokens=args.speed_tokens,
                   max_new_tokens=args.max_new_tokens, isolate=not args.in_process)
    print(markdown_table(rows))
    if args.output:
        write_json(args.output, rows)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def cmd_index(args: argparse.Namespace) -> None:
    from .repo import RepoIndex
    if args.k < 1:
        raise ValueError("-k must be at least 1")
    with RepoIndex.open(args.repo, db_path=args.db) as index:
        stats = index.update(show_progress=not args.quiet)
        print(f"indexed {index.root}: {stats.summary()}")
        for hit in index.search(args.query, k=args.k) if args.query else []:
            print(f"{hit.score:8.2f}  {hit.path}:{hit.start_line}-{hit.end_line}  {hit.kind} {hit.name or ''}".rstrip())


def build_parser() -> argparse.ArgumentParser:
    from .eval.tasks import TASK_NAMES
    parser = argparse.ArgumentParser(prog="starcoder2", description="Run, serve and train StarCoder2 code models.")
    parser.add_argument("--version", action="version", version=f"starcoder2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("complete", help="continue code from a prompt (streams to stdout)")
    p.add_argument("prompt", nargs="?", help="the prompt text (else --file, else stdin)")
    p.add_argument("--file", "-f", help="read the prompt from this file ('-' for stdin)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("--allow-special", action="store_true",
                   help="let special-token text in the prompt (e.g. <fim_prefix>) become special tokens")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix (FIM)")
    p.add_argument("--prefix")
    p.add_argument("--suffix")
    p.add_argument("--file", "-f", help="a source file to split at a cursor")
    p.add_argument("--line", type=int, help="cursor line in --file (1-based)")
    p.add_argument("--column", type=int, help="cursor column (1-based; default: end of the line)")
    p.add_argument("--mode", choices=["psm", "spm"], default="psm")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("info", help="parameters, memory per dtype, context and special tokens")
    p.add_argument("--model", "-m", help="checkpoint directory or hub id (default: the default model)")
    p.add_argument("--preset", help="describe a preset instead: tiny, small, 3b, 7b, 15b")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="re-save a checkpoint: Hugging Face layout (dtype, shards), pre-quantized "
                       "int8/int4, or GGUF for llama.cpp")
    p.add_argument("source", nargs="?", metavar="MODEL", help="source checkpoint directory or hub id")
    p.add_argument("--model", "-m", help="the source, as an option")
    p.add_argument("--out", "-o", required=True, help="output directory, or FILE.gguf (written atomically)")
    p.add_argument("--to", choices=["hf", "gguf"], default="hf", help="hf: safetensors directory (default); "
                   "gguf: one file for llama.cpp / Ollama")
    p.add_argument("--outtype", choices=["f16", "bf16", "q8_0"], help="GGUF tensor type (default f16)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="save pre-quantized weights that load without "
                   "quantizing (starcoder2's own format)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--dtype", default="keep", help="fp32 | bf16 | fp16 | keep (default: keep; with --quantize: "
                   "the activation dtype, default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="shard above this size (default 5GB)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tsub.add_parser("train", help="train a byte-level BPE with StarCoder2's special tokens")
    p.add_argument("corpus", nargs="+", help="directories, git repositories, files or JSONL (content/text field)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--max-bytes", type=int, default=1 << 20, help="skip files larger than this (default 1 MiB)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("data", help="data pipeline")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("prepare", help="sources -> filtered, deduplicated, redacted token shards")
    p.add_argument("sources", nargs="+", help="directories, git repositories, files or JSONL")
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--tokenizer", help="tokenizer directory (without it: stop before tokenization)")
    p.add_argument("--config", help="JSON or TOML with DataConfig fields")
    p.add_argument("--jsonl", help="also write the kept documents (text + metadata) to this JSONL file")
    p.add_argument("--seed", type=int)
    p.add_argument("--holdout", type=float, help="fraction of files held out as the valid split")
    p.add_argument("--workers", type=int, help="processes (default: every core); with --tasks: tasks at once")
    p.add_argument("--quiet", "-q", action="store_true")
    g = p.add_argument_group("scale-out on datatrove (docs/data.md)")
    g.add_argument("--tasks", type=int, help="run as datatrove jobs with this many tasks (default: one process)")
    g.add_argument("--executor", choices=("local", "slurm"), default="local", help="where the tasks run")
    g.add_argument("--slurm-partition", help="Slurm partition (required with --executor slurm)")
    g.add_argument("--slurm-time", default="24:00:00", help="time limit of each Slurm task")
    g.add_argument("--slurm-cpus-per-task", type=int, default=1)
    g.add_argument("--slurm-mem-per-cpu-gb", type=int, default=2, help="memory of the N-task steps, per CPU")
    g.add_argument("--slurm-global-mem-gb", type=int, default=64,
                   help="memory of the one-task steps (global dedup, merge)")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="pre-train or continue training (torchrun for several processes)")
    p.add_argument("--config", "-c", help="JSON or TOML with TrainConfig fields")
    p.add_argument("--preset", help="model preset (tiny, small, ...) when no --config")
    p.add_argument("--data", help="prepared data directory (overrides the config)")
    p.add_argument("--out", "-o", help="run directory (overrides the config)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="a training checkpoint (or run directory) -> Hugging Face layout")
    p.add_argument("checkpoint")
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--dtype", default="bf16")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", help="fine-tune on a repository: LoRA (PEFT adapter) or full (torchrun: DDP)")
    p.add_argument("--model", "-m", help="base checkpoint directory or hub id (default: the default model)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--repo", help="the repository (directory or git checkout) to train on")
    g.add_argument("--sft", metavar="DATA.jsonl", help="instruction-tune on JSONL ({instruction, response} or "
                   "{messages}): loss on responses only, packed, chat template saved with the result (docs/chat.md)")
    p.add_argument("--chat-template", metavar="T.jinja", help="with --sft: the Jinja chat template to train with "
                   "(default: the model's, else StarCoder2-Instruct's ### Instruction / ### Response format)")
    p.add_argument("--out", "-o", required=True, help="run directory: data/, checkpoints/, adapter/ or final/")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen base (the default)")
    g.add_argument("--full", action="store_true", help="train every weight (AdamW; needs ~16 bytes/param)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha; scale = alpha / r (default 32)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,c_fc,c_proj",
                   help="comma-separated linears to adapt (default: all six)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch per process (default 4)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps (default 50)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of files held out: those `eval repo "
                   "--holdout F --seed S` samples from, so before/after compare on unseen code (default 0.2; "
                   "--sft: of the examples)")
    p.add_argument("--fim-rate", type=float, default=0.5, help="fraction of documents FIM-transformed (default 0.5)")
    p.add_argument("--data-config", help="JSON or TOML with DataConfig fields (licence, PII, dedup; as data prepare)")
    p.add_argument("--dtype", default="auto", help="auto | bf16 | fp32: autocast dtype, and a LoRA base is stored in "
                   "it (default auto: bf16 where the hardware multiplies bf16 fast, else fp32)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="under torchrun (fsdp: --full only)")
    p.add_argument("--keep-best", action="store_true", help="also keep the adapter (or checkpoint) of the lowest "
                   "held-out loss in OUT/best/, with best.json naming its step")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in the "
                   "backward pass: less memory for long --seq-len (e.g. 2048 on 3B), about a third more time")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="fold a LoRA adapter into a base checkpoint (Hugging Face layout)")
    p.add_argument("--model", "-m", required=True, help="base checkpoint directory or hub id")
    p.add_argument("--adapter", "-a", required=True, help="LoRA adapter directory (PEFT format)")
    p.add_argument("--out", "-o", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="keep", help="fp32 | bf16 | fp16 | keep (default: the base's)")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("chat", help="chat in the terminal with a model that ships a chat template (streams; "
                       "/reset, Ctrl-D exits)")
    _add_model_args(p)
    p.add_argument("--system", "-s", help="system message at the start of the conversation")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="HTTP server: OpenAI, TGI, llama.cpp and Tabby completion APIs, playground at /")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--api-key", help="require this key (Authorization: Bearer KEY); visible to other local users")
    g.add_argument("--api-key-file", help="read the required API key from this file")
    p.add_argument("--max-batch", type=int, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, help="requests waiting beyond --max-batch before 429 (default 32)")
    p.add_argument("--max-seq-len", type=int, help="tokens per request, prompt + completion (default: the model's)")
    p.add_argument("--model-name", help="name in /v1/models and responses (default: the checkpoint directory's)")
    p.add_argument("--cors-origin", action="append", help="browser origin allowed by CORS (repeatable; '*': any)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on shutdown before they are cancelled")
    p.add_argument("--repo", help="a repository to retrieve context from for /infill and Tabby requests "
                   "(indexed at start, kept fresh; docs/repo.md)")
    p.add_argument("--repo-refresh", type=float, help="seconds between refreshes of the --repo index (default 2)")
    p.add_argument("--num-draft", type=int, help="speculative decoding for a greedy request running alone: up to N "
                   "draft tokens per step, output unchanged (default 0: off; 5 with --draft-model)")
    p.add_argument("--draft-model", help="a smaller checkpoint with the same vocabulary that drafts the tokens "
                   "(e.g. starcoder2-3b for 15b); without it, drafts come from prompt lookup")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="benchmarks: HumanEval(+), MBPP+, HumanEval infilling (pass@k, sandboxed), perplexity")
    p.add_argument("task", choices=(*TASK_NAMES, "repo"), metavar="TASK", help=", ".join((*TASK_NAMES, "repo")))
    p.add_argument("repo", nargs="?", metavar="REPO", help="eval repo: the repository to build the benchmark from")
    _add_model_args(p)
    _add_eval_repo_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--greedy", action="store_true", help="greedy, one sample per problem (the default)")
    g.add_argument("--n-samples", type=int, help="samples per problem (sampling; default T 0.2, top-p 0.95)")
    p.add_argument("--temperature", type=float, help="sampling temperature (with --n-samples; default 0.2)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (with --n-samples; default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, help="default: 512 (completion), 128 (infilling)")
    p.add_argument("--data", help="benchmarks folder or data file (default: ../shared/data/benchmarks beside "
                   "the checkout, when present); perplexity: a prepared data directory or a text file")
    p.add_argument("--limit", type=int, help="first K problems (perplexity: K windows)")
    p.add_argument("--output", "-o", help="write the JSON report here")
    p.add_argument("--samples", help="score completions made elsewhere (JSONL: task_id, completion); no model")
    p.add_argument("--results", help="per-sample JSONL, appended as samples are judged; a rerun continues it")
    p.add_argument("--batch-size", type=int, default=8, help="sequences generated together (default 8)")
    p.add_argument("--workers", type=int, help="sandbox processes in parallel (default: the sandbox's)")
    p.add_argument("--timeout", type=float, help="seconds per test program (default 10)")
    p.add_argument("--no-code-checks", action="store_true", help="skip syntax/ruff/bandit/dependency checks")
    p.add_argument("--sanitize", action="store_true", help="judge only the code the model meant, EvalPlus-style: "
                   "markdown and prose cut away, the entry point and what it depends on kept (not for infilling)")
    p.add_argument("--seq-len", type=int, default=1024, help="perplexity window (default 1024)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="models or precisions side by side: size, memory, load, TTFT, tok/s, "
                       "pass@1, FIM exact match")
    p.add_argument("models", nargs="+", metavar="M", help="PATH[:int8|int4|fp32|bf16|fp16]")
    p.add_argument("--dtype", default="auto", help="dtype where M names none (default: bf16 where fast, else fp32)")
    p.add_argument("--device", default="auto", help="cpu | cuda (default: cuda when present)")
    p.add_argument("--limit", type=int, default=10, help="HumanEval problems and infilling holes (default 10)")
    p.add_argument("--data", help="benchmarks folder, for FIM exact match")
    p.add_argument("--max-new-tokens", type=int, help="for pass@1 and exact match (default: the tasks')")
    p.add_argument("--speed-prompts", type=int, default=3, help="prompts timed for TTFT and tok/s (default 3)")
    p.add_argument("--speed-tokens", type=int, default=64, help="new tokens per timed prompt (default 64)")
    p.add_argument("--plot", help="write a bar chart per metric to this image")
    p.add_argument("--output", "-o", help="write the rows as JSON here")
    p.add_argument("--in-process", action="store_true",
                   help="measure every model in this process (default: a fresh process each, for fair memory)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("index", help="index a git repository for repository-aware completion (chunks + BM25, "
                       "incremental)")
    p.add_argument("repo", help="repository directory (.gitignore is respected inside a git work tree)")
    p.add_argument("--db", help="index database (default: REPO/.starcoder2/index.sqlite)")
    p.add_argument("--query", help="then print the chunks that best match this code or text")
    p.add_argument("-k", type=int, default=8, help="results printed for --query (default 8)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)

    # The bench options live in starcoder2.bench (one definition, also used by `python -m
    # starcoder2.bench`): every argument, --help included, is passed through unparsed.
    p = sub.add_parser("bench", help="speed and memory vs transformers and llama.cpp (bf16, int8, int4)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    try:
        args.func(args)
    except (CheckpointError, ValueError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            return 0
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"starcoder2: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("starcoder2: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
