"""Sampling functions against transformers' logits processors and float64 recomputation."""

import pytest
import torch

from starcoder2.infer.sampling import apply_repetition_penalty, sample, top_k_top_p_filter


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, temperature=0.0, top_k=3, top_p=0.5), logits.argmax(-1))


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (10, 0.6), (0, 0.05)])
def test_filters_match_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(3, 200) * 3
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = top_k_top_p_filter(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    logits = probs.log().float()
    kept = ~torch.isinf(top_k_top_p_filter(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(top_k_top_p_filter(logits, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits = torch.randn(2, 30)
    ids = torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter(1, ids, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), ref)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.log()[None].expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, temperature=1.0, generator=g), minlength=4).double() / 20000
    assert torch.allclose(counts, probs.double(), atol=0.015)
    assert counts[3] == 0


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(1, 100)
    a = [sample(logits, 1.0, generator=torch.Generator().manual_seed(7)).item() for _ in range(3)]
    assert len(set(a)) == 1
