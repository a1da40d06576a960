import json

import numpy as np
import pytest
import torch

from starcoder2.data.fim import FIMConfig
from starcoder2.data.loader import IGNORE_INDEX, BatchLoader, PackedWindows, open_shards
from starcoder2.data.shards import ShardWriter, token_dtype


def _write(tmp_path, arrays_per_shard, vocab=512):
    shards = []
    for k, arrays in enumerate(arrays_per_shard):
        name = f"train-{k:05d}.ds"
        with ShardWriter(tmp_path / name, vocab) as w:
            for a in arrays:
                w.write(a)
        shards.append({"file": name, "split": "train", "documents": len(arrays), "tokens": w.num_tokens})
    (tmp_path / "manifest.json").write_text(json.dumps({"dtype": token_dtype(vocab).str, "shards": shards}))
    return open_shards(tmp_path, "train")


def test_windows_cross_shards_like_megatron(tmp_path):
    stream = np.arange(1, 50) % 500
    shards = _write(tmp_path, [[stream[:10], stream[10:23]], [stream[23:]]])
    w = PackedWindows(shards, seq_len=8)
    assert len(w) == (49 - 1) // 8
    for i in range(len(w)):
        np.testing.assert_array_equal(w.window(i), stream[i * 8 : i * 8 + 9])


def test_batches_are_shifted_labels_and_resume_exactly(tmp_path, tiny_tokenizer):
    rng = np.random.default_rng(0)
    shards = _write(tmp_path, [[rng.integers(40, 500, 300) for _ in range(10)]])
    make = lambda: BatchLoader(PackedWindows(shards, 16), 4, seed=3, tokenizer=tiny_tokenizer, fim=FIMConfig(rate=0.5))
    a = make()
    ref = [a.next_batch() for _ in range(60)]  # crosses epoch boundaries (46 batches per epoch)
    for x, y in ref[:3]:
        assert x.shape == y.shape == (4, 16)
    b = make()
    for _ in range(25):
        b.next_batch()
    state = b.state_dict()
    c = make()
    c.load_state_dict(json.loads(json.dumps(state)))
    for (x1, y1), (x2, y2) in zip(ref[25:], [c.next_batch() for _ in range(35)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_no_fim_labels_are_next_tokens(tmp_path):
    shards = _write(tmp_path, [[np.arange(100) % 500]])
    x, y = BatchLoader(PackedWindows(shards, 10), 2, shuffle=False).next_batch()
    assert torch.equal(y[:, :-1], x[:, 1:]) and (y != IGNORE_INDEX).all()


def test_ranks_split_the_epoch(tmp_path):
    shards = _write(tmp_path, [[np.arange(400) % 500]])
    w = PackedWindows(shards, 8)
    seen = []
    for rank in range(2):
        loader = BatchLoader(w, 2, seed=1, rank=rank, world_size=2)
        for _ in range(loader.batches_per_epoch):
            x, _ = loader.next_batch()
            seen += [int(r[0]) for r in x]
    assert len(seen) == len(set(seen)) == 2 * 2 * (len(w) // 4)


def test_too_little_data_is_a_clear_error(tmp_path):
    shards = _write(tmp_path, [[np.arange(20)]])
    with pytest.raises(ValueError, match="cannot fill one batch"):
        BatchLoader(PackedWindows(shards, 16), 4)
