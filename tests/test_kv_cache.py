"""Cached decoding equals a full recompute at every step, also past the sliding window."""

import pytest
import torch

from starcoder2.config import tiny
from starcoder2.kv_cache import KVCache
from starcoder2.model import StarCoder2


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = StarCoder2(tiny())
    m.init_weights()
    return m.eval()


@torch.no_grad()
def test_decode_equals_full_recompute_past_window(model):
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 4 * cfg.sliding_window))
    full = model(ids)
    cache = KVCache(cfg, 2, ids.shape[1])
    assert cache.capacity == cfg.sliding_window  # a ring: never more than the window
    got = [model(ids[:, :5], torch.arange(5), cache)]
    for t in range(5, ids.shape[1]):
        got.append(model(ids[:, t:t + 1], torch.tensor([t]), cache))
        assert (got[-1][:, 0] - full[:, t]).abs().max() < 1e-4, f"step {t}"
    assert (torch.cat(got, 1) - full).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[40], [3, 30, 7], [16, 16, 8], [1] * 5 + [35]])
def test_chunked_prefill_equals_full(model, chunks):
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, sum(chunks)))
    full = model(ids)
    cache = KVCache(cfg, 1, 1000)
    start, out = 0, []
    for n in chunks:
        out.append(model(ids[:, start:start + n], torch.arange(start, start + n), cache))
        start += n
    assert (torch.cat(out, 1) - full).abs().max() < 1e-4


@torch.no_grad()
def test_rows_at_different_positions(model):
    """Two sequences of different lengths share a cache; row-subset decode matches each alone."""
    cfg = model.config
    a = torch.randint(0, cfg.vocab_size, (1, 30))
    b = torch.randint(0, cfg.vocab_size, (1, 9))
    cache = KVCache(cfg, 3, 64)
    model(a[:, :20], torch.arange(20), cache, torch.tensor([2]))
    model(b[:, :5], torch.arange(5), cache, torch.tensor([0]))
    # one decode step for both rows at their own positions
    step = model(torch.tensor([[a[0, 20]], [b[0, 5]]]), torch.tensor([[20], [5]]), cache, torch.tensor([2, 0]))
    assert (step[0, 0] - model(a[:, :21])[0, -1]).abs().max() < 1e-4
    assert (step[1, 0] - model(b[:, :6])[0, -1]).abs().max() < 1e-4


def test_capacity_is_enforced_without_window(model):
    cfg = model.config.replace(sliding_window=None)
    m = StarCoder2(cfg).eval()
    cache = KVCache(cfg, 1, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="capacity"):
        m(torch.zeros(1, 9, dtype=torch.long), torch.arange(9), cache)


def test_reset_forgets_rows(model):
    cfg = model.config
    cache = KVCache(cfg, 2, 32)
    with torch.no_grad():
        model(torch.ones(2, 4, dtype=torch.long), torch.arange(4), cache)
    cache.reset([1])
    assert (cache.slot_pos[1] == -1).all() and (cache.slot_pos[0, :4] == torch.arange(4)).all()


@torch.no_grad()
def test_truncate_forgets_guesses_exactly_within_the_window(model):
    """A draft model's cache: guesses written at positions 6..9, the target keeps 0..7. After
    truncate the row attends as if only the kept tokens had ever been written."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    guessed = ids.clone()
    guessed[0, 8:10] = (ids[0, 8:10] + 1) % cfg.vocab_size  # two wrong guesses
    cache = KVCache(cfg, 1, 32)  # capacity 16 = the window; 10 positions: no slot reused yet
    model(guessed[:, :10], torch.arange(10), cache)
    cache.truncate(0, 8)
    assert sorted(cache.slot_pos[0][cache.slot_pos[0] >= 0].tolist()) == list(range(8))
    got = model(ids[:, 8:12], torch.arange(8, 12), cache)
    torch.testing.assert_close(got, model(ids)[:, 8:12], rtol=0, atol=1e-5)
