"""The reference generation loop against transformers' generate, batching and stops."""

import pytest
import torch

from starcoder2.config import tiny
from starcoder2.infer.generate import SamplingParams, generate, generate_tokens

from ..conftest import hf_reference


@pytest.fixture(scope="module")
def pair():
    return hf_reference(tiny())


def _prompts(n_tokens, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in n_tokens]


def test_greedy_equals_transformers_past_the_window(pair):
    hf, ours = pair
    for prompt in _prompts([5, 23]):
        got = generate(ours, [prompt], SamplingParams(max_new_tokens=72))[0]
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=72, min_new_tokens=72, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert len(prompt) + 72 > 4 * ours.config.sliding_window
        assert got == ref


def test_batched_equals_one_by_one(pair):
    _, ours = pair
    prompts = _prompts([3, 17, 40, 9])
    params = SamplingParams(max_new_tokens=40)
    batched = generate(ours, prompts, params)
    assert batched == [generate(ours, [p], params)[0] for p in prompts]


def test_seeded_sampling_same_alone_or_batched(pair):
    _, ours = pair
    prompts = _prompts([6, 11])
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=123)
    batched = generate(ours, prompts, params)
    assert batched == [generate(ours, [p], params)[0] for p in prompts]
    other = generate(ours, prompts, SamplingParams(max_new_tokens=20, temperature=0.9, seed=124))
    assert other != batched


def test_stop_ids_end_a_row_and_are_not_returned(pair):
    _, ours = pair
    prompt = _prompts([8])[0]
    free = generate(ours, [prompt], SamplingParams(max_new_tokens=30))[0]
    stop = free[10]
    first = free.index(stop)
    got = generate(ours, [prompt], SamplingParams(max_new_tokens=30, stop_token_ids=[stop]))[0]
    assert got == free[:first]


def test_cancellation_ends_a_row(pair):
    _, ours = pair
    cancelled: set[int] = set()
    seen = {0: 0, 1: 0}
    for row, _ in generate_tokens(ours, _prompts([4, 4]), SamplingParams(max_new_tokens=20), cancelled):
        seen[row] += 1
        if row == 0 and seen[0] == 3:
            cancelled.add(0)
    assert seen == {0: 3, 1: 20}


def test_repetition_penalty_matches_transformers(pair):
    hf, ours = pair
    prompt = _prompts([12])[0]
    got = generate(ours, [prompt], SamplingParams(max_new_tokens=30, repetition_penalty=1.5))[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                      repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref


def test_context_limit(pair):
    _, ours = pair
    limit = ours.config.max_position_embeddings
    got = generate(ours, _prompts([limit - 5]), SamplingParams(max_new_tokens=50))[0]
    assert len(got) == 5
    with pytest.raises(ValueError, match="context"):
        generate(ours, _prompts([limit]), SamplingParams(max_new_tokens=1))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=-1)])
def test_bad_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
