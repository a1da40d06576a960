"""The trainer end to end on a tiny model: it learns, logs, resumes exactly after SIGKILL, matches
one process with two (DDP and FSDP2), exports what transformers loads, and rejects bad configs.

Runs are the `tiny` preset on 32-token windows in fp32 on one thread (see _fixtures.py); the
subprocess tests (kill/resume, torchrun) start Python several times, a few seconds each.
Not covered here: CUDA, bf16/fp16 autocast, torch.compile, activation checkpointing, FIM batches.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from starcoder2 import cli
from starcoder2.config import ModelConfig
from starcoder2.data.loader import BatchLoader, PackedWindows, open_shards
from starcoder2.model import StarCoder2
from starcoder2.train.config import TrainConfig
from starcoder2.train.loop import export_checkpoint, train
from starcoder2.train.optim import build_optimizer, lr_at
from starcoder2.train.state import latest_checkpoint, load_checkpoint, save_checkpoint

from ._fixtures import (cli_cmd, gloo_unavailable, prepare_tiny_data, read_metrics, run_config, subprocess_env,
                        torchrun_cmd, write_config)

CHECKPOINT_FILES = {"model.safetensors", "optimizer.pt", "rng.pt", "state.json", "train_config.json", "config.json"}
METRIC_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
CODE = 'def greet(name):\n    """Say hello."""\n    return f"hello, {name}!" if name else None\n\nprint(greet("x"))\n'


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_tokenizer) -> Path:
    data = prepare_tiny_data(tmp_path_factory.mktemp("train_data"), tiny_tokenizer)
    assert open_shards(data, "train") and open_shards(data, "valid")  # both splits, or eval goes untested
    return data


def _train(config: dict, **kwargs) -> dict:
    threads = torch.get_num_threads()
    try:
        return train(TrainConfig.from_dict(config), progress=False, log=lambda m: None, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> tuple[dict, dict]:
    """40 steps with an untied head (the tied one is covered by the resume and 2-process runs)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    config = run_config(tiny_data, out, max_steps=40, warmup_steps=5, eval_every=20, save_every=20,
                        model_config={"tie_word_embeddings": False})
    return config, _train(config)


# ---- 1. it learns, logs, follows the schedule -------------------------------------------------------


def test_lr_at_is_linear_warmup_then_cosine_to_the_floor():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert [lr_at(s, **kw) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: midpoint of peak and floor
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)  # floor after the end
    after = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly decreasing through the cosine
    assert lr_at(0, lr=3e-4, warmup_steps=0, max_steps=100, min_lr_ratio=0.0) == pytest.approx(3e-4)
    assert lr_at(100, lr=3e-4, warmup_steps=0, max_steps=100, min_lr_ratio=0.0) == pytest.approx(0.0)


def test_tiny_run_learns_and_logs_every_metric(tiny_run, tiny_tokenizer):
    config, result = tiny_run
    out = Path(config["out"])
    records = read_metrics(out)
    assert sorted(records) == list(range(1, 41))
    for step, r in records.items():
        assert METRIC_FIELDS <= r.keys(), step
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["mfu"] < 1  # the CPU has a known peak, so MFU is a number, and a sane one
        # the lr logged with step s is the one its update used: lr_at(s - 1)
        assert r["lr"] == pytest.approx(lr_at(step - 1, lr=3e-3, warmup_steps=5, max_steps=40, min_lr_ratio=0.1))
    lrs = [records[s]["lr"] for s in range(1, 41)]
    assert lrs.index(max(lrs)) in (4, 5) and lrs[-1] < lrs[10] < lrs[5]  # warmup to the peak, then decay
    # random init predicts roughly uniformly: the first loss is about ln(vocab)
    assert records[1]["loss"] == pytest.approx(math.log(tiny_tokenizer.vocab_size), abs=0.15)
    first = sum(records[s]["loss"] for s in range(1, 6)) / 5
    last = sum(records[s]["loss"] for s in range(36, 41)) / 5
    assert last < first - 0.5, (first, last)
    for step in (20, 40):  # eval_every=20 and the last step
        r = records[step]
        assert r["val_tokens"] == 2 * 4 * 32  # eval_batches x batch x seq_len
        assert 0 < r["val_loss"] < records[1]["loss"] and 0 < r["val_bpb"] < 16
    assert "val_loss" not in records[19]
    assert result == records[40]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000020", "step-000040"]
    assert latest_checkpoint(ckpts) == ckpts / "step-000040"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "final").iterdir()}


def test_one_batch_is_overfit_to_near_zero_loss(tiny_data):
    torch.set_num_threads(1)
    x, y = BatchLoader(PackedWindows(open_shards(tiny_data, "train"), 32), 4, seed=0).next_batch()  # (4, 32)
    model = StarCoder2(TrainConfig(data="", out="", model="tiny").model_cfg(600))
    model.init_weights(torch.Generator().manual_seed(0))
    model.train()
    optimizer = build_optimizer(model, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for _ in range(100):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 5 and losses[-1] < 0.05, losses[::10]


# ---- 3. checkpoints: atomic, and a resume continues the same run exactly --------------------------------


def _assert_complete(ckpt: Path) -> None:
    assert CHECKPOINT_FILES <= {p.name for p in ckpt.iterdir()}, ckpt
    state = json.loads((ckpt / "state.json").read_text())
    assert ckpt.name == f"step-{state['step']:06d}"
    load_file(str(ckpt / "model.safetensors"))
    torch.load(ckpt / "optimizer.pt", weights_only=True)


def test_resume_after_sigkill_continues_the_uninterrupted_run(tiny_data, tmp_path):
    n = 60
    reference = run_config(tiny_data, tmp_path / "reference", max_steps=n, save_every=5, eval_every=30)
    _train(reference)
    expected = read_metrics(tmp_path / "reference")

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.json", {**reference, "out": str(out)})
    latest = out / "checkpoints" / "latest"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cli_cmd("train", "--config", str(cfg), "-q"), env=subprocess_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    ckpts = out / "checkpoints"
    path = latest_checkpoint(ckpts)
    assert path is not None and latest.read_text().strip() == path.name
    for ckpt in ckpts.glob("step-*"):  # nothing half-written under a final name
        _assert_complete(ckpt)
    resumed_at = json.loads((path / "state.json").read_text())["step"]
    assert 5 <= resumed_at < n and resumed_at % 5 == 0  # killed mid-run, after a checkpoint

    done = subprocess.run(cli_cmd("train", "--config", str(cfg), "--resume", "-q"), env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {path} at step {resumed_at}" in done.stderr
    got = read_metrics(out)
    assert sorted(got) == list(range(1, n + 1))
    for step in range(resumed_at + 1, n + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=0, abs=1e-6), (step, key)
    assert got[n]["val_loss"] == pytest.approx(expected[n]["val_loss"], rel=0, abs=1e-6)
    final, ref = (load_file(str(p / "checkpoints" / f"step-{n:06d}" / "model.safetensors"))
                  for p in (out, tmp_path / "reference"))
    for name in ref:
        torch.testing.assert_close(final[name], ref[name], rtol=0, atol=1e-6)


def test_resume_with_dropout_continues_the_random_stream(tiny_data, tmp_path):
    """Dropout masks after a resume are the ones the uninterrupted run drew (RNG state restored)."""
    dropout = {"residual_dropout": 0.1, "embedding_dropout": 0.1}
    reference = run_config(tiny_data, tmp_path / "reference", max_steps=12, save_every=6, eval_every=100,
                           model_config=dropout, keep_checkpoints=0)
    _train(reference)
    expected = read_metrics(tmp_path / "reference")
    # a run that stopped at step 6: the reference's own step-6 checkpoint, copied into a fresh run dir
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "reference" / "checkpoints" / "step-000006", out / "checkpoints" / "step-000006")
    (out / "checkpoints" / "latest").write_text("step-000006\n")
    _train({**reference, "out": str(out)}, resume=True)
    got = read_metrics(out)
    assert sorted(got) == list(range(7, 13))
    for step in range(7, 13):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=0, abs=1e-6), step


def test_a_crash_while_saving_leaves_latest_on_the_previous_complete_checkpoint(tmp_path, monkeypatch):
    import starcoder2.train.state as state

    model = StarCoder2(TrainConfig(data="", out="", model="tiny").model_cfg(0))
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    save = dict(state={"loader": {"epoch": 0, "position": 1}}, train_config={}, model_config=model.config.to_hf())
    first = save_checkpoint(tmp_path, 1, model, optimizer, **save)
    _assert_complete(first)

    def crash(*args, **kwargs):  # dies after model.safetensors, while writing optimizer.pt
        raise OSError("disk full")

    monkeypatch.setattr(state.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, optimizer, **save)
    monkeypatch.undo()
    assert not (tmp_path / "step-000002").exists()
    assert (tmp_path / "latest").read_text().strip() == "step-000001"
    assert latest_checkpoint(tmp_path) == first
    restored = StarCoder2(model.config)
    assert load_checkpoint(first, restored, build_optimizer(restored, 1e-3, 0.1, (0.9, 0.95), 1e-8))["step"] == 1
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_with_the_single_process_rng_format_still_resumes(tmp_path):
    """rng.pt once held one process's state ({"torch": ...}); runs saved then must still resume."""
    model = StarCoder2(TrainConfig(data="", out="", model="tiny").model_cfg(0))
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    ckpt = save_checkpoint(tmp_path, 3, model, optimizer, state={"loader": {}}, train_config={},
                           model_config=model.config.to_hf())
    torch.manual_seed(123)
    saved_rng = torch.get_rng_state()
    torch.save({"torch": saved_rng}, ckpt / "rng.pt")
    torch.manual_seed(0)
    state = load_checkpoint(ckpt, model, optimizer)
    assert state["step"] == 3 and state["rng_restored"]
    assert torch.equal(torch.get_rng_state(), saved_rng)


# ---- 4. two processes with batch B == one process with batch 2B --------------------------------------------

TWO_PROC_STEPS = 15
TWO_PROC_RTOL = 1e-4  # fp32: only the order of the gradient and loss reductions differs


@pytest.fixture(scope="module")
def one_process_run(tiny_data, tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("one_process") / "run"
    _train(run_config(tiny_data, out, max_steps=TWO_PROC_STEPS, batch_size=8, eval_batches=2))
    return read_metrics(out)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_combined_batch(parallel, tiny_data, one_process_run, tmp_path):
    # eval batches are per process: 4 x 4 windows here cover the same 16 as 2 x 8 in one process
    config = run_config(tiny_data, tmp_path / "run", max_steps=TWO_PROC_STEPS, batch_size=4, eval_batches=4,
                        parallel=parallel)
    cfg = write_config(tmp_path / "cfg.json", config)
    done = subprocess.run(torchrun_cmd(2, "train", "--config", str(cfg), "-q"), env=subprocess_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if done.returncode != 0:
        if reason := gloo_unavailable(tmp_path):
            pytest.skip(reason)
        pytest.fail(f"torchrun failed:\n{done.stderr[-4000:]}")
    got = read_metrics(tmp_path / "run")
    assert sorted(got) == sorted(one_process_run) == list(range(1, TWO_PROC_STEPS + 1))
    for step, ref in one_process_run.items():
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(ref[key], rel=TWO_PROC_RTOL), (step, key)
        assert got[step]["tokens"] == ref["tokens"]
    assert got[TWO_PROC_STEPS]["loss"] < got[1]["loss"] - 0.3  # it trained (a stale optimizer would not)
    for step in (10, 15):
        assert got[step]["val_tokens"] == one_process_run[step]["val_tokens"]
        assert got[step]["val_loss"] == pytest.approx(one_process_run[step]["val_loss"], rel=TWO_PROC_RTOL)
    # the checkpoint (gathered from shards under FSDP) and the final export hold the same weights
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / f"step-{TWO_PROC_STEPS:06d}" / "model.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert ckpt["embed_tokens.weight"].shape[0] >= 600
    for name, weight in ckpt.items():
        exported = final["model." + name if not name.startswith("lm_head") else name].float()
        torch.testing.assert_close(exported, weight, rtol=2**-8, atol=1e-6)


# ---- 5. export to the Hugging Face layout ---------------------------------------------------------------------


def test_export_loads_in_transformers_with_the_same_logits(tiny_run, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer, Starcoder2ForCausalLM

    from starcoder2.checkpoint import load_model

    run_dir = Path(tiny_run[0]["out"])
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    ours = StarCoder2(ModelConfig.from_hf(json.loads((ckpt / "config.json").read_text())))
    load_checkpoint(ckpt, ours, None)
    ours.eval()
    assert not ours.config.tie_word_embeddings  # the untied head travels as its own tensor

    out = export_checkpoint(run_dir, tmp_path / "hf", dtype=torch.float32)
    ids = torch.tensor([tiny_tokenizer.encode(CODE)[:40]])  # (1, 40): longer than the window (16)
    assert ids.shape[1] == 40
    with torch.no_grad():
        expected = ours(ids)
        hf = Starcoder2ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=1e-4)
        loaded, config = load_model(out)
        assert config == ours.config
        torch.testing.assert_close(loaded(ids), expected, rtol=0, atol=1e-5)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok(CODE, add_special_tokens=False)["input_ids"] == tiny_tokenizer.encode(CODE)
    assert hf_tok.eos_token_id == tiny_tokenizer.eos_id

    # the CLI writes the same weights; the end-of-run export is the last checkpoint in bf16
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "cli"), "--dtype", "fp32"]) == 0
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == load_file(str(tmp_path / "cli" / "model.safetensors")).keys()
    for name, t in load_file(str(tmp_path / "cli" / "model.safetensors")).items():
        assert torch.equal(t, exported[name]), name
    for name, t in load_file(str(run_dir / "final" / "model.safetensors")).items():
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t.float(), exported[name], rtol=2**-8, atol=1e-6)


def test_export_of_a_directory_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out")


# ---- 6. configuration errors --------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"parallel": "zero3"}, "parallel must be 'ddp' or 'fsdp'"),
    ({"dtype": "fp8"}, "dtype must be auto, bf16, fp16 or fp32"),
    ({"seq_len": 0}, "seq_len must be positive"),
    ({"batch_size": -1}, "batch_size must be positive"),
    ({"grad_accum": 0}, "grad_accum must be positive"),
    ({"max_steps": 0}, "max_steps must be positive"),
    ({"save_every": 0}, "save_every must be positive"),
    ({"log_every": 0}, "log_every must be positive"),
    ({"eval_every": 0}, "eval_every must be positive"),
    ({"model": "tiniest"}, "unknown preset 'tiniest'"),
    ({"model_config": {"hiden_size": 64}}, "unknown model_config keys: hiden_size"),
    ({"model_config": {"hidden_size": 65}}, "not divisible by num_heads"),
    ({"fim": {"rat": 0.5}}, "unknown fim keys: rat"),
])
def test_train_config_rejects_bad_values_with_a_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"data": "d", "out": "o", **changes})


def test_unknown_train_config_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown train config keys: learning_rate, max_step"):
        TrainConfig.from_dict({"data": "d", "out": "o", "learning_rate": 1e-3, "max_step": 5})
    cfg = write_config(tmp_path / "cfg.json", {"data": "d", "out": "o", "batchsize": 4})
    with pytest.raises(ValueError, match="unknown train config keys: batchsize"):
        TrainConfig.from_file(cfg)
    config = TrainConfig.from_dict({"data": "d", "out": "o", "fim": {"rate": 0.0}, "betas": [0.9, 0.99]})
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # what checkpoints store


def test_cli_train_with_a_missing_data_dir_exits_1_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    code = cli.main(["train", "--data", str(missing), "--out", str(tmp_path / "run"), "--preset", "tiny", "-q"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("starcoder2: error: "), err
    assert str(missing) in err
    assert not (tmp_path / "run").exists()
