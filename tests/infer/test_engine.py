"""The engine against the reference generation loop: batching, joins and leaves, prefix cache,
cancellation, streaming, threads."""

import threading

import pytest
import torch

from starcoder2.config import tiny
from starcoder2.infer.engine import Engine
from starcoder2.infer.generate import SamplingParams, generate
from starcoder2.model import StarCoder2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = StarCoder2(tiny())
    m.init_weights()
    with torch.no_grad():  # larger weights than the init: sharper logits, fewer near-ties
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m.eval()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in lengths]


def test_greedy_equals_reference_with_joins_and_leaves(model):
    prompts = _prompts([5, 30, 12, 70, 3, 18])
    lengths = [40, 7, 25, 60, 1, 33]  # different max_new_tokens: requests leave at different steps
    engine = Engine(model, max_batch=3)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    while engine.has_work():
        engine.step()
        assert len(engine.running) <= 3
    for r, p, n in zip(reqs, prompts, lengths):
        assert r.output == generate(model, [p], SamplingParams(max_new_tokens=n))[0]
        assert r.finish_reason == "length"


def test_alone_equals_batched_with_mixed_params(model):
    prompts = _prompts([9, 14, 21, 6])
    params = [SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=30, temperature=0.8, seed=5),
              SamplingParams(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, seed=6),
              SamplingParams(max_new_tokens=30, repetition_penalty=1.3)]
    batched = Engine(model, max_batch=4)
    reqs = [batched.submit(p, sp) for p, sp in zip(prompts, params)]
    while batched.has_work():
        batched.step()
    for r, p, sp in zip(reqs, prompts, params):
        alone = Engine(model, max_batch=1).generate([p], sp)[0]
        assert r.output == alone.output
        assert r.output == generate(model, [p], sp)[0]


def test_stop_ids_and_strings_per_request(model, tiny_tokenizer):
    engine = Engine(model, tokenizer=tiny_tokenizer, max_batch=2)
    prompt = _prompts([10])[0]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=30))[0]
    stop_tok = free.output[12]
    by_id = engine.generate([prompt], SamplingParams(max_new_tokens=30, stop_token_ids=[stop_tok]))[0]
    assert by_id.output == free.output[:free.output.index(stop_tok)] and by_id.finish_reason == "stop"
    if len(free.text) > 10:
        stop = free.text[5:8]
        by_text = engine.generate([prompt], SamplingParams(max_new_tokens=30, stop=[stop]))[0]
        assert by_text.text == free.text[:free.text.index(stop)] and by_text.finish_reason == "stop"


def test_streaming_events(model, tiny_tokenizer):
    events = []
    engine = Engine(model, tokenizer=tiny_tokenizer)
    req = engine.submit(_prompts([8])[0], SamplingParams(max_new_tokens=20), on_event=events.append)
    while engine.has_work():
        engine.step()
    assert [e.token for e in events[:-1]] == req.output
    assert events[-1].finished and events[-1].token is None and all(not e.finished for e in events[:-1])
    assert "".join(e.text for e in events) == req.text == tiny_tokenizer.decode(req.output)


def test_cancel_frees_the_slot_at_once(model):
    engine = Engine(model, max_batch=2)
    a, b = [engine.submit(p, SamplingParams(max_new_tokens=50)) for p in _prompts([6, 9])]
    engine.step()
    engine.step()
    assert len(engine.running) == 2
    engine.cancel(a)
    assert len(engine.running) == 1 and a.finish_reason == "cancelled" and a.done.is_set()
    c = engine.submit(_prompts([11], seed=3)[0], SamplingParams(max_new_tokens=20))
    engine.step()
    assert engine.running == [b, c]
    while engine.has_work():
        engine.step()
    assert b.output == generate(model, _prompts([6, 9])[1:], SamplingParams(max_new_tokens=50))[0]
    assert c.output == generate(model, [c.prompt], SamplingParams(max_new_tokens=20))[0]


def test_cancel_from_a_callback_and_while_waiting(model):
    engine = Engine(model, max_batch=1)

    def stop_after_3(event):
        if len(event.request.output) == 3 and not event.finished:
            engine.cancel(event.request)
    a = engine.submit(_prompts([5])[0], SamplingParams(max_new_tokens=40), on_event=stop_after_3)
    waiting = engine.submit(_prompts([7])[0], SamplingParams(max_new_tokens=40))
    engine.cancel(waiting)
    while engine.has_work():
        engine.step()
    assert a.finish_reason == "cancelled" and len(a.output) == 3
    assert waiting.finish_reason == "cancelled" and waiting.output == []


@pytest.mark.parametrize("base_len", [40, 150])  # within and far past the sliding window (16)
def test_prefix_cache_reuses_and_matches_reference(model, base_len):
    engine = Engine(model, max_batch=2, prefix_cache_tokens=10_000)
    base = _prompts([base_len])[0]
    params = SamplingParams(max_new_tokens=24)
    first = engine.generate([base], params)[0]
    assert first.cached_tokens == 0
    # the editor keystroke: the same file with a few more tokens
    longer = base + _prompts([7], seed=9)[0]
    second = engine.generate([longer], params)[0]
    assert second.cached_tokens == base_len
    assert second.output == generate(model, [longer], params)[0]
    # an edit near the end (shorter shared prefix); within the window only an entry holding
    # positions from the start can serve it
    edited = base[:base_len - 3] + [7, 8, 9]
    third = engine.generate([edited], params)[0]
    assert third.output == generate(model, [edited], params)[0]
    if base_len <= 16:
        assert third.cached_tokens == base_len - 3


def test_prefix_cache_eviction_keeps_results_correct(model):
    # 30-token prompts past the 16-token window: each entry holds the last 16 positions
    engine = Engine(model, max_batch=1, prefix_cache_tokens=40)
    prompts = _prompts([30, 30, 30])
    params = SamplingParams(max_new_tokens=10)
    for p in prompts:
        engine.generate([p], params)
    assert engine.prefix_cache.tokens <= 40 and len(engine.prefix_cache.entries) == 2
    again = engine.generate([prompts[0] + [1, 2, 3]], params)[0]  # evicted: computed from scratch
    assert again.cached_tokens == 0
    assert again.output == generate(model, [again.prompt], params)[0]
    hit = engine.generate([prompts[2] + [1, 2, 3]], params)[0]
    assert hit.cached_tokens == 30 and hit.output == generate(model, [hit.prompt], params)[0]


def test_background_thread_serves_concurrent_submitters(model):
    engine = Engine(model, max_batch=3)
    engine.start()
    try:
        prompts = _prompts([4, 8, 15, 16, 23])
        results = {}

        def client(i):
            results[i] = engine.submit(prompts[i], SamplingParams(max_new_tokens=15))
            results[i].wait(30)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        assert results[i].output == generate(model, [p], SamplingParams(max_new_tokens=15))[0]


def test_bad_requests(model):
    engine = Engine(model, max_seq_len=64)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([])
    with pytest.raises(ValueError, match="context"):
        engine.submit([1] * 64)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([1, 10_000])
    assert not engine.has_work()


def test_prompt_lookup_speculation_equals_plain_greedy(model):
    # A prompt that repeats itself, like a file being rewritten: drafts get accepted.
    chunk = _prompts([12], seed=4)[0]
    prompt = chunk * 6
    params = SamplingParams(max_new_tokens=60)
    plain = generate(model, [prompt], params)[0]
    engine = Engine(model, max_batch=2, num_draft=6)
    got = engine.generate([prompt], params)[0]
    assert got.output == plain
    assert engine.stats["draft_tokens"] > 0
    # past the window and alongside a prefix cache; drafts of a model's own repeating output too
    engine = Engine(model, max_batch=1, num_draft=4, prefix_cache_tokens=1000)
    for p in (prompt, prompt + chunk[:5], _prompts([40], seed=8)[0]):
        assert engine.generate([p], params)[0].output == generate(model, [p], params)[0]


def test_speculation_respects_stops_and_limits(model):
    chunk = _prompts([10], seed=2)[0]
    prompt = chunk * 5
    plain = generate(model, [prompt], SamplingParams(max_new_tokens=30))[0]
    engine = Engine(model, num_draft=8)
    for n in (1, 2, 7, 30):
        assert engine.generate([prompt], SamplingParams(max_new_tokens=n))[0].output == plain[:n]
    stop = plain[9]
    got = engine.generate([prompt], SamplingParams(max_new_tokens=30, stop_token_ids=[stop]))[0]
    assert got.output == plain[:plain.index(stop)]


def _noisy_copy(model, scale, seed=1):
    """The model with noise on its matrices: a draft that guesses right most of the time, not always."""
    torch.manual_seed(seed)
    draft = StarCoder2(model.config)
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * scale * p.std())
    return draft.eval()


@pytest.mark.parametrize("draft_kind", ["same", "noisy", "unrelated"])
def test_draft_model_speculation_equals_plain_greedy(model, draft_kind):
    draft = {"same": lambda: model, "noisy": lambda: _noisy_copy(model, 0.5),
             "unrelated": lambda: _noisy_copy(model, 50.0)}[draft_kind]()
    params = SamplingParams(max_new_tokens=48)
    prompts = _prompts([5, 30, 70], seed=11)  # 30 and 70 tokens: past the 16-token window (ring buffers)
    engine = Engine(model, max_batch=2, num_draft=5, draft_model=draft)
    for p in prompts:  # one at a time: each runs alone, so every step may speculate
        assert engine.generate([p], params)[0].output == generate(model, [p], params)[0]
    drafted, accepted = engine.stats["draft_tokens"], engine.stats["accepted_tokens"]
    assert drafted > 0
    if draft_kind == "same":
        assert accepted == drafted  # the model's own guesses are always right
    if draft_kind == "noisy":
        assert 0 < accepted < drafted  # both paths: accepted guesses and cut-back rejected ones
    # two at once (no speculation while both run), then the survivor alone: its draft cache catches up
    before = engine.stats["draft_tokens"]
    short, long = (engine.submit(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[1:], (8, 48)))
    while not long.finished:
        engine.step()
    assert short.output == generate(model, [prompts[1]], SamplingParams(max_new_tokens=8))[0]
    assert long.output == generate(model, [prompts[2]], params)[0]
    assert engine.stats["draft_tokens"] > before


def test_draft_model_respects_stops_and_limits(model):
    prompt = _prompts([20], seed=3)[0]
    plain = generate(model, [prompt], SamplingParams(max_new_tokens=30))[0]
    engine = Engine(model, num_draft=8, draft_model=_noisy_copy(model, 0.3))
    for n in (1, 2, 7, 30):
        assert engine.generate([prompt], SamplingParams(max_new_tokens=n))[0].output == plain[:n]
    stop = plain[12]
    got = engine.generate([prompt], SamplingParams(max_new_tokens=30, stop_token_ids=[stop]))[0]
    assert got.output == plain[:plain.index(stop)]


def test_draft_model_needs_the_same_vocabulary(model):
    other = StarCoder2(tiny().replace(vocab_size=640))
    with pytest.raises(ValueError, match="one vocabulary"):
        Engine(model, num_draft=4, draft_model=other)
