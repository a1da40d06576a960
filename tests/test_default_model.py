"""The embedded default model: shipped inside the package, loads offline, completes and infills."""

import json
import os
import subprocess
import sys

import pytest
import torch

from starcoder2.api import EMBEDDED_MODEL_DIR, load
from starcoder2.tokenizer import STARCODER2_SPECIAL_TOKENS

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(),
                                reason="the embedded model is not in this checkout (recipes/embedded/run.sh makes it)")


@pytest.fixture(scope="module")
def lm():
    return load(None, dtype="fp32", device="cpu")


def test_shipped_files_and_size():
    names = {p.name for p in EMBEDDED_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "data_manifest.json", "LICENSE-NOTES.md"} <= names
    size = sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.iterdir())
    assert size <= 40e6, f"{size / 1e6:.1f} MB exceeds the 40 MB budget"
    manifest = json.loads((EMBEDDED_MODEL_DIR / "data_manifest.json").read_text())
    assert set(manifest["licences"]) and all("GPL" not in k for k in manifest["licences"])


def test_architecture_and_vocabulary(lm):
    cfg = lm.config
    assert 1e6 < sum(p.numel() for p in lm.model.parameters()) < 40e6
    assert cfg.vocab_size <= 16384 and cfg.num_kv_heads < cfg.num_heads and cfg.sliding_window
    tok = lm.tokenizer
    assert [tok.token_id(t) for t in STARCODER2_SPECIAL_TOKENS] == list(range(len(STARCODER2_SPECIAL_TOKENS)))


def test_it_learned_python(lm):
    """Held-out-style check: a stdlib-like snippet is far more likely than shuffled tokens."""
    code = "def add(a, b):\n    return a + b\n\n\nif __name__ == '__main__':\n    print(add(1, 2))\n"
    ids = torch.tensor([lm.tokenizer.encode(code)])
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]

    def nll(x):
        with torch.no_grad():
            logits = lm.model(x)
        return torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).item()

    # ln(8192) = 9.0 nats is a uniform guess; the model's held-out loss is ~2.9 (model card)
    assert nll(ids) < 3.0 and nll(shuffled) > nll(ids) + 2.0


def test_complete_and_infill(lm):
    out = lm.complete("def fibonacci(n):", max_new_tokens=48)
    assert out.strip() and "\n" in out
    mid = lm.infill("def mean(values):\n    total = ", "\n    return total / len(values)\n", max_new_tokens=24)
    assert mid.strip() and "<fim" not in mid


def test_cli_uses_it_with_no_model_argument(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STARCODER2_MODEL"}
    env.update(HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")  # nothing cached, nothing downloadable
    r = subprocess.run([sys.executable, "-m", "starcoder2.cli", "complete", "import os\n", "--max-new-tokens", "16"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
