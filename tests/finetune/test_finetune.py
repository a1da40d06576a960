"""`starcoder2 finetune` and `merge` end to end on the tiny checkpoint and a small repository of
stdlib modules: LoRA leaves a PEFT adapter and adapter-only checkpoints, resumes exactly, merges
into a checkpoint transformers loads with the adapter's logits; full fine-tuning exports a HF
checkpoint; bad input is a one-line error.

Runs are fp32 on one thread (bit-reproducible), 32-token windows, FIM on. Not covered here: bf16
(the same code with another dtype; benchmarks/bench_finetune.py runs it), torchrun/DDP (run by hand,
docs/finetune.md), the SIGKILL half of kill/resume (tests/train covers the checkpoint atomicity).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from starcoder2 import cli
from starcoder2.checkpoint import load_model
from starcoder2.data.pipeline import DataConfig
from starcoder2.finetune import FinetuneConfig, finetune, finetune_repo

MODULES = ("textwrap", "shlex", "fnmatch", "glob", "bisect", "heapq", "string", "fractions")
DATA = DataConfig(near_dedup=False, decontaminate=False, workers=1)
HOLDOUT = 0.25


@pytest.fixture(scope="session")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft_repo") / "project"
    root.mkdir()
    for name in MODULES:
        shutil.copy(importlib.import_module(name).__file__, root / f"{name}.py")
    return root


def _config(model: Path, out: Path, **kw) -> FinetuneConfig:
    return FinetuneConfig(**{"model": str(model), "out": str(out), "steps": 8, "batch_size": 4, "seq_len": 32,
                             "eval_every": 4, "save_every": 4, "log_every": 1, "eval_batches": 2, "lr": 1e-2, "rank": 4,
                             "dropout": 0.1, "dtype": "fp32", "threads": 1, **kw})


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="session")
def lora_run(tiny_checkpoint, repo, tmp_path_factory) -> FinetuneConfig:
    config = _config(tiny_checkpoint, tmp_path_factory.mktemp("ft") / "lora")
    threads = torch.get_num_threads()
    try:
        finetune_repo(config, repo, DATA, holdout=HOLDOUT, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return config


def test_held_out_files_are_those_eval_repo_samples_from(lora_run, repo):
    from starcoder2.eval.repobench import RepoBenchSettings, sample_cursors

    files = json.loads((Path(lora_run.out) / "data" / "manifest.json").read_text())["files"]
    valid = sorted(f["path"] for f in files if f["split"] == "valid")
    assert valid and len(valid) < len(files)
    code = {f"{m}.py": (repo / f"{m}.py").read_text() for m in MODULES}
    cursors = sample_cursors(code, RepoBenchSettings(holdout=HOLDOUT, seed=0, n=20))
    assert {c.path for c in cursors} <= set(valid)
    assert set(valid) == {c.path for c in sample_cursors(code, RepoBenchSettings(holdout=HOLDOUT, seed=0, n=500))}


def test_eval_repo_baseline_reports_before_and_after_on_the_held_out_files(lora_run, repo, tiny_checkpoint,
                                                                          tmp_path, capsys):
    adapter, out = Path(lora_run.out) / "adapter", tmp_path / "before_after.json"
    assert cli.main(["eval", "repo", str(repo), "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--baseline",
                     "--holdout", str(HOLDOUT), "--n", "2", "--kinds", "single", "--modes", "file", "--no-tests",
                     "--budget", "160", "--dtype", "fp32", "--index", str(tmp_path / "i.sqlite"), "-q", "-o", str(out),
                     "--plot", str(tmp_path / "ba.png")]) == 0
    assert (tmp_path / "ba.png").stat().st_size > 1000
    report = json.loads(out.read_text())
    files = json.loads((Path(lora_run.out) / "data" / "manifest.json").read_text())["files"]
    assert report["held_out_files"] == sorted(f["path"] for f in files if f["split"] == "valid")
    before, after = report["before"], report["after"]
    assert before["model"] == str(tiny_checkpoint) and after["model"].endswith(f"+ adapter {adapter}")
    assert before["cursors"] == after["cursors"] == 2
    assert before["held_out_loss"]["tokens"] == after["held_out_loss"]["tokens"] > 0
    assert before["held_out_loss"]["loss"] != after["held_out_loss"]["loss"]  # the adapter changed the model
    table = capsys.readouterr().out
    assert "| file | single | 2 |" in table and "→" in table and "held-out loss" in table
    assert cli.main(["eval", "repo", str(repo), "--model", str(tiny_checkpoint), "--baseline"]) == 1  # no adapter
    assert "--adapter" in capsys.readouterr().err


def test_lora_run_leaves_a_peft_adapter_and_adapter_only_checkpoints(lora_run, tiny_checkpoint):
    out = Path(lora_run.out)
    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    raw = json.loads((adapter / "adapter_config.json").read_text())
    assert raw["base_model_name_or_path"] == str(tiny_checkpoint) and raw["task_type"] == "CAUSAL_LM"
    assert (raw["r"], raw["lora_alpha"], raw["lora_dropout"]) == (4, 32.0, 0.1)
    assert sorted(raw["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"])
    assert len(load_file(str(adapter / "adapter_model.safetensors"))) == 2 * 6 * 2  # layers x targets x (A, B)
    ckpt = load_file(str(out / "checkpoints" / "step-000008" / "model.safetensors"))
    assert ckpt and all(".lora_A." in k or ".lora_B." in k for k in ckpt)  # not the frozen base
    records = _metrics(out)
    assert sorted(records) == list(range(1, 9))
    assert "val_loss" in records[4] and "val_loss" in records[8]
    assert records[8]["val_loss"] < records[4]["val_loss"]  # held-out loss falls as the adapters learn
    assert sum(records[s]["loss"] for s in (7, 8)) < sum(records[s]["loss"] for s in (1, 2))
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    held = {f["path"] for f in manifest["files"] if f["split"] == "valid"}
    assert held and held < {f"{m}.py" for m in MODULES}  # split by file


def test_lora_resume_continues_the_uninterrupted_run(lora_run, tmp_path):
    """A run stopped after step 4 (the reference's own step-4 checkpoint) resumes to the same losses,
    held-out loss and adapter: LoRA dropout masks included (RNG state restored)."""
    ref = Path(lora_run.out)
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step-000004", out / "checkpoints" / "step-000004")
    (out / "checkpoints" / "latest").write_text("step-000004\n")
    config = FinetuneConfig(**{**lora_run.to_dict(), "out": str(out)})
    finetune(config, ref / "data", resume=True, progress=False, log=lambda m: None)
    got, want = _metrics(out), _metrics(ref)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(want[step][key], rel=0, abs=1e-6), (step, key)
    assert got[8]["val_loss"] == pytest.approx(want[8]["val_loss"], rel=0, abs=1e-6)
    a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (out, ref))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_activation_checkpointing_trains_the_same_adapters(lora_run, tmp_path, monkeypatch):
    """Recomputing the blocks in backward (LoRA dropout masks replayed) gives the same run."""
    from starcoder2.train import parallel

    applied = []
    real = parallel.apply_activation_checkpointing
    monkeypatch.setattr(parallel, "apply_activation_checkpointing", lambda m: applied.append(m) or real(m))
    ref = Path(lora_run.out)
    config = FinetuneConfig(**{**lora_run.to_dict(), "out": str(tmp_path / "ckpt"), "activation_checkpointing": True})
    finetune(config, ref / "data", progress=False, log=lambda m: None)
    assert len(applied) == 1
    got, want = _metrics(tmp_path / "ckpt"), _metrics(ref)
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=0, abs=1e-5), step
    a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (tmp_path / "ckpt", ref))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


@torch.no_grad()
def test_merged_checkpoint_loads_in_transformers_with_the_adapters_logits(lora_run, tiny_checkpoint, tmp_path, capsys):
    from peft import PeftModel
    from transformers import Starcoder2ForCausalLM

    adapter, merged = Path(lora_run.out) / "adapter", tmp_path / "merged"
    assert cli.main(["merge", "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--out", str(merged)]) == 0
    ids = torch.tensor([[3, 50, 120, 7, 64, 200, 11, 90]])
    hf_merged = Starcoder2ForCausalLM.from_pretrained(merged).eval()(ids).logits
    peft = PeftModel.from_pretrained(Starcoder2ForCausalLM.from_pretrained(tiny_checkpoint), str(adapter)).eval()
    torch.testing.assert_close(hf_merged, peft(input_ids=ids).logits, rtol=0, atol=1e-5)
    base, _ = load_model(tiny_checkpoint)
    assert not torch.allclose(hf_merged, base(ids), atol=1e-3)


def test_full_finetune_trains_every_weight_and_exports_a_checkpoint(lora_run, tiny_checkpoint, tmp_path):
    config = _config(tiny_checkpoint, tmp_path / "full", method="full", steps=2, lr=1e-3, eval_every=2, save_every=2)
    finetune(config, Path(lora_run.out) / "data", progress=False, log=lambda m: None)
    tuned, _ = load_model(tmp_path / "full" / "final")
    base, _ = load_model(tiny_checkpoint)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))}
    assert changed == {n for n, _ in base.named_parameters()}  # every weight, not just some
    assert not (tmp_path / "full" / "adapter").exists()
    ckpt = load_file(str(tmp_path / "full" / "checkpoints" / "step-000002" / "model.safetensors"))
    assert "layers.0.mlp.c_fc.weight" in ckpt and ckpt["layers.0.mlp.c_fc.weight"].dtype == torch.float32


def test_finetune_cli_errors_are_one_line(lora_run, tiny_checkpoint, repo, tmp_path, capsys):
    base = ["finetune", "--model", str(tiny_checkpoint), "-q"]
    for argv, message in [
        (["--repo", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "not a directory"),
        (["--repo", str(repo), "--out", str(tmp_path / "o"), "--targets", "q_proj,lm_head"], "unknown LoRA target"),
        (["--repo", str(repo), "--out", str(tmp_path / "o"), "--parallel", "fsdp"], "DDP"),
        (["--repo", str(repo), "--out", str(tmp_path / "o"), "--steps", "0"], "max_steps must be positive"),
        (["--repo", str(repo), "--out", lora_run.out, "--resume", "--rank", "8", "--dtype", "fp32",
          "--holdout", "0.25"], "--resume with rank=8"),
    ]:
        assert cli.main(base + argv) == 1, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("starcoder2: error: "), err
        assert message in err, err
    assert not (tmp_path / "o").exists()


def test_keep_best_leaves_the_lowest_held_out_loss_adapter(lora_run, tmp_path):
    """OUT/best/adapter is the adapter of the eval step with the lowest held-out loss and best.json
    names it; a resumed run compares against the best it had, not only against its own evals."""
    out = tmp_path / "best_run"
    config = FinetuneConfig(**{**lora_run.to_dict(), "out": str(out), "keep_best": True, "eval_every": 2})
    finetune(config, Path(lora_run.out) / "data", progress=False, log=lambda m: None)
    vals = {s: r["val_loss"] for s, r in _metrics(out).items() if "val_loss" in r}
    best_step = min(vals, key=vals.get)
    assert json.loads((out / "best" / "best.json").read_text()) == {"step": best_step, "val_loss": vals[best_step]}
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (out / "best" / "adapter", out / "adapter"))
    assert all(torch.equal(a[k], b[k]) for k in a) == (best_step == max(vals))

    resumed = tmp_path / "resumed"  # from the step-4 checkpoint, with a best no later eval can beat
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004")
    (resumed / "checkpoints" / "latest").write_text("step-000004\n")
    shutil.copytree(out / "best", resumed / "best")
    (resumed / "best" / "best.json").write_text(json.dumps({"step": 2, "val_loss": 0.0}))
    finetune(FinetuneConfig(**{**config.to_dict(), "out": str(resumed)}), Path(lora_run.out) / "data", resume=True,
             progress=False, log=lambda m: None)
    assert json.loads((resumed / "best" / "best.json").read_text()) == {"step": 2, "val_loss": 0.0}
    with pytest.raises(ValueError, match="keep_best"):
        FinetuneConfig(**{**lora_run.to_dict(), "method": "full", "keep_best": True, "parallel": "fsdp"})
