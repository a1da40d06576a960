"""Fill-in-the-middle at training time, as BigCode's Megatron-LM does it (reference §4).

A packed window of seq_len + 1 ids is split at every end-of-document id; a repository document
(one that holds `<file_sep>`) is FIM'd with probability `rate` and then each of its file fragments
with probability `fragment_rate`; any other document with probability `rate`. A FIM'd piece is
decoded to text, cut at two uniform character positions, re-encoded piecewise and laid out as SPM
(probability `spm_rate`) or PSM. The result is cut or padded with `<fim_pad>` to the window length.

One deliberate change from Megatron: the RNG is not one stream per dataset object (which makes
forked loader workers and ranks repeat each other's choices) but is passed in, and the loader seeds
it per sample from (seed, epoch, sample index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..tokenizer import Tokenizer


@dataclass(frozen=True, kw_only=True)
class FIMConfig:
    rate: float = 0.5  # --fim-rate of the StarCoder2 example config
    spm_rate: float = 0.5  # --fim-spm-rate
    fragment_rate: float = 0.5  # --fragment-fim-rate, per file inside a FIM'd repository document
    split_token: str | None = "<file_sep>"  # --fim-split-sample; None: whole documents only


@dataclass(frozen=True)
class FIMTokens:
    prefix: int
    middle: int
    suffix: int
    pad: int
    eod: int
    split: int | None

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, split_token: str | None = "<file_sep>") -> FIMTokens:
        def need(name: str) -> int:
            i = tok.token_id(name)
            if i is None:
                raise ValueError(f"tokenizer has no {name} token: FIM training needs it")
            return i

        split = tok.token_id(split_token) if split_token else None
        return cls(need("<fim_prefix>"), need("<fim_middle>"), need("<fim_suffix>"), need("<fim_pad>"),
                   tok.eos_id, split)


def permute(ids: list[int], tok: Tokenizer, t: FIMTokens, rate: float, spm_rate: float,
            rng: np.random.Generator) -> list[int]:
    """With probability `rate`, one FIM example from `ids` (character-level cut), else `ids`."""
    if rng.random() >= rate:
        return ids
    text = tok.decode(ids, skip_special=False)
    lo, hi = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    pre, mid, suf = (tok.encode(s) for s in (text[:lo], text[lo:hi], text[hi:]))
    if rng.random() < spm_rate:  # SPM, in the variant StarCoder2 trained on (reference §4 step 4)
        return [t.prefix, t.suffix, *suf, t.middle, *pre, *mid]
    return [t.prefix, *pre, t.suffix, *suf, t.middle, *mid]


def _split(ids: list[int], sep: int) -> list[list[int]]:
    """Split on `sep`, dropping it: [a, sep, b] -> [[a], [b]]."""
    out: list[list[int]] = [[]]
    for i in ids:
        if i == sep:
            out.append([])
        else:
            out[-1].append(i)
    return out


def apply_fim(window: np.ndarray, tok: Tokenizer, t: FIMTokens, config: FIMConfig,
              rng: np.random.Generator) -> np.ndarray:
    """FIM-transform one packed window (L,) of ids; returns (L,) ids (cut or `<fim_pad>`-padded)."""
    length = len(window)
    out: list[int] = []
    for n, segment in enumerate(_split(window.tolist(), t.eod)):
        if n:
            out.append(t.eod)
        if not segment:
            continue
        if t.split is None or t.split not in segment:
            out += permute(segment, tok, t, config.rate, config.spm_rate, rng)
        elif rng.random() >= config.rate:
            out += segment
        else:
            for k, fragment in enumerate(_split(segment, t.split)):
                if k:
                    out.append(t.split)
                if fragment:
                    out += permute(fragment, tok, t, config.fragment_rate, config.spm_rate, rng)
    out = out[:length] + [t.pad] * max(0, length - len(out))
    return np.asarray(out, dtype=np.int64)
