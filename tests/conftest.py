"""Shared fixtures: tiny configs, a transformers reference model with the same weights, a tiny
tokenizer trained on stdlib sources, and a complete tiny checkpoint directory."""

from __future__ import annotations

import inspect

import pytest
import torch

from starcoder2.config import ModelConfig, tiny
from starcoder2.model import StarCoder2

TOKENIZER_VOCAB = 600
CHECKPOINT_VOCAB = 640  # embeddings may outnumber tokenizer entries, as in real checkpoints


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Training and fine-tuning set torch's thread count from their config, some tests the default
    dtype: every test gets both back as they were."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def hf_reference(config: ModelConfig, seed: int = 0):
    """A random transformers Starcoder2ForCausalLM and our model holding the same weights."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    torch.manual_seed(seed)
    hf = Starcoder2ForCausalLM(Starcoder2Config(**config.to_hf())).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to constants: randomise them too
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "norm." in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = StarCoder2(config).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=not config.tie_word_embeddings)
    ours.tie_weights()
    return hf, ours


def corpus_texts() -> list[str]:
    import json, textwrap, argparse, dataclasses  # noqa: E401 - modules used as a small code corpus
    return [inspect.getsource(m) for m in (json, textwrap, argparse, dataclasses)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from starcoder2.tokenizer import train_bpe
    return train_bpe(corpus_texts(), vocab_size=TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A complete HF-layout checkpoint (random weights, trained tokenizer), shared read-only."""
    from starcoder2.checkpoint import save_model

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    model = StarCoder2(tiny().replace(vocab_size=CHECKPOINT_VOCAB))
    model.init_weights()
    tok_dir = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save(tok_dir)
    save_model(model, out, tokenizer_dir=tok_dir)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer):
    """The tiny trained tokenizer (alias used by the tokenizer and prompt tests)."""
    return tiny_tokenizer


def make_tokenizer_dir(tmp_path):
    """Save a freshly trained tiny tokenizer under tmp_path/"tokenizer" and return that directory."""
    from starcoder2.tokenizer import train_bpe

    out = tmp_path / "tokenizer"
    train_bpe(corpus_texts(), vocab_size=TOKENIZER_VOCAB).save(out)
    return out
