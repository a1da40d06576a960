"""Weights moved to huge pages: same values, same Parameter objects (ties kept), nothing left behind,
and the load path reads into the arena directly."""

from __future__ import annotations

import pytest
import torch

import starcoder2.infer.hugepages as hp
from starcoder2.api import load_for_inference
from starcoder2.config import tiny
from starcoder2.infer.hugepages import HUGE_PAGE, HugePageArena, hugepage_buffer
from starcoder2.model import StarCoder2

from ..conftest import hf_reference

needs_thp = pytest.mark.skipif(not hp.hugepages_available(), reason="transparent huge pages unavailable here")
IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 8]])


@needs_thp
def test_buffer_starts_on_a_huge_page_and_is_writable():
    b = hugepage_buffer(3 * HUGE_PAGE + 5)
    assert b.data_ptr() % HUGE_PAGE == 0 and b.numel() == 3 * HUGE_PAGE + 5
    b.fill_(7)
    assert int(b.sum()) == 7 * b.numel()


@needs_thp
def test_arena_packs_small_tensors_and_maps_big_ones_alone():
    arena = HugePageArena(chunk=1 << 20)
    a, b = arena.empty((10, 3), torch.float32), arena.empty((5,), torch.bfloat16)
    big = arena.empty((1 << 19,), torch.float32)  # 2 MiB > chunk: its own mapping
    assert b.data_ptr() - a.data_ptr() == 128  # 120 bytes rounded up to the cache-line alignment
    assert all(arena.owns(t) for t in (a, b, big)) and not arena.owns(torch.empty(4))
    assert big.data_ptr() % HUGE_PAGE == 0
    a.fill_(1.5), b.fill_(2.0), big.fill_(3.0)
    assert float(a.sum()) == 45 and float(b.sum()) == 10 and float(big[-1]) == 3.0


@needs_thp
def test_adopt_keeps_values_parameters_and_ties():
    _, model = hf_reference(tiny())
    model.eval()
    with torch.no_grad():
        before = model(IDS)
    params = {n: p for n, p in model.named_parameters()}
    arena = HugePageArena(chunk=64 << 10)
    moved = arena.adopt(model)
    assert moved == sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    assert {n: p for n, p in model.named_parameters()} == params  # same objects
    assert model.lm_head.weight is model.embed_tokens.weight
    assert all(arena.owns(t) for t in model.state_dict().values())
    assert arena.adopt(model) == 0
    with torch.no_grad():
        assert torch.equal(model(IDS), before)


def test_without_huge_pages_nothing_moves(monkeypatch):
    monkeypatch.setattr(hp, "hugepages_available", lambda: False)
    arena = HugePageArena()
    model = StarCoder2(tiny())
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert arena.adopt(model) == 0 and [p.data_ptr() for p in model.parameters()] == ptrs
    assert arena.empty((3, 4), torch.float32).shape == (3, 4)


@needs_thp
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_loaded_models_live_in_huge_pages(tiny_checkpoint, quantize, monkeypatch):
    owned = []
    real = HugePageArena.owns
    monkeypatch.setattr(HugePageArena, "owns", lambda self, t: owned.append(self) or real(self, t))
    model, _ = load_for_inference(tiny_checkpoint, "fp32", "cpu", quantize, group_size=64)
    arena = owned[-1]
    assert all(arena.owns(t) for t in model.state_dict().values())
    ref, _ = load_for_inference(tiny_checkpoint, "fp32", "cpu", quantize, group_size=64, native=False)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(IDS), rtol=0, atol=1e-4)


def test_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("STARCODER2_HUGEPAGES", "0")
    arena = HugePageArena()
    model = StarCoder2(tiny())
    assert not arena.enabled and arena.adopt(model) == 0
