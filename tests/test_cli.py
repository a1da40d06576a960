"""The CLI in-process: outputs, and one-line errors with a non-zero exit."""

import io
import json
import subprocess
import sys

import pytest

from starcoder2 import cli


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_complete_from_argument_file_and_stdin(capsys, monkeypatch, tiny_checkpoint, tmp_path):
    import starcoder2
    expected = starcoder2.load(tiny_checkpoint, dtype="fp32").complete("def f(x):", max_new_tokens=10)
    m = ["--model", str(tiny_checkpoint), "--dtype", "fp32", "--max-new-tokens", "10"]
    assert run(capsys, "complete", "def f(x):", *m) == (0, expected + "\n", "")
    (tmp_path / "p.py").write_text("def f(x):")
    assert run(capsys, "complete", "--file", str(tmp_path / "p.py"), *m)[1] == expected + "\n"
    assert run(capsys, "complete", *m, stdin="def f(x):", monkeypatch=monkeypatch)[1] == expected + "\n"


def test_infill_at_a_cursor_in_a_file(capsys, tiny_checkpoint, tmp_path):
    import starcoder2
    src = "def f(x):\n    y = x\n    return y\n"
    (tmp_path / "a.py").write_text(src)
    expected = starcoder2.load(tiny_checkpoint, dtype="fp32").infill("def f(x):\n    y = ", "x\n    return y\n",
                                                                     max_new_tokens=8)
    code, out, _ = run(capsys, "infill", "--file", str(tmp_path / "a.py"), "--line", "2", "--column", "9",
                       "--model", str(tiny_checkpoint), "--dtype", "fp32", "--max-new-tokens", "8")
    assert code == 0 and out == expected + "\n"


def test_info_preset_and_checkpoint(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "info", "--preset", "3b")
    assert code == 0 and "3,030,371,328" in out and "12.12 GB / 6.06 GB" in out
    code, out, _ = run(capsys, "info", "--model", str(tiny_checkpoint))
    assert code == 0 and "<fim_prefix>" in out and "<|endoftext|>" in out


def test_convert_changes_dtype_and_shards(capsys, tiny_checkpoint, tmp_path):
    code, out, _ = run(capsys, "convert", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"),
                       "--dtype", "bf16", "--max-shard-size", "50KB")
    assert code == 0
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("argv, message", [
    (["complete", "x", "--model", "/nonexistent/dir"], "no checkpoint directory"),
    (["complete", "x", "--model", "nobody/nothing"], "not in the Hugging Face cache"),
    (["infill", "--file", "/nonexistent.py", "--line", "1", "--model", "."], "No such file"),
    (["info", "--preset", "42b"], "unknown preset"),
])
def test_errors_are_one_line(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith("starcoder2: error: ") and message in err and err.count("\n") == 1


def test_cursor_errors(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    code, _, err = run(capsys, "infill", "--file", str(tmp_path / "a.py"), "--line", "9", "--model", str(tiny_checkpoint))
    assert code == 1 and "line" in err and err.count("\n") == 1


def test_console_script_help_and_exit_code(tmp_path):
    exe = [sys.executable, "-m", "starcoder2.cli"]
    for sub in ([], ["complete"], ["infill"], ["info"], ["convert"]):
        r = subprocess.run(exe + sub + ["--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: starcoder2" in r.stdout
    r = subprocess.run(exe + ["complete", "x", "--model", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().endswith("no config.json")
