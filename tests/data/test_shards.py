import numpy as np
import pytest

from starcoder2.data.shards import Shard, ShardWriter, token_dtype


def test_round_trip_documents(tmp_path):
    docs = [np.arange(5), np.array([7]), np.arange(100, 140)]
    with ShardWriter(tmp_path / "a.ds", vocab_size=8192) as w:
        for d in docs:
            w.write(d)
    shard = Shard(tmp_path / "a.ds", token_dtype(8192))
    assert len(shard) == 3 and shard.tokens.dtype == np.uint16
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(shard.document(i), d)
    assert list(shard.ends) == [5, 6, 46]


def test_large_vocab_uses_uint32(tmp_path):
    with ShardWriter(tmp_path / "b.ds", vocab_size=100_000) as w:
        w.write([99_999, 70_000])
    assert list(Shard(tmp_path / "b.ds", token_dtype(100_000)).document(0)) == [99_999, 70_000]


def test_failed_write_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "c.ds", vocab_size=512) as w:
            w.write([1, 2, 3])
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_truncated_index_is_an_error(tmp_path):
    with ShardWriter(tmp_path / "d.ds", vocab_size=512) as w:
        w.write([1, 2, 3])
    (tmp_path / "d.ds").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="index ends at 3"):
        Shard(tmp_path / "d.ds", token_dtype(512))
