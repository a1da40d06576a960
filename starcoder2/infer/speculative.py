"""Drafting for speculative decoding. Prompt lookup (n-gram) drafting needs no second model: code
edits and completions often repeat spans already in the prompt (a renamed variable, a file
rewritten with small changes), so the tokens that followed the last occurrence of the current
n-gram are a cheap guess that the model verifies in one forward pass."""

from __future__ import annotations


def prompt_lookup_draft(tokens: list[int], max_draft: int = 8, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to `max_draft` tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram (max_ngram down to min_ngram) of `tokens`; [] when none occurs."""
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        pattern = tokens[L - n:]
        first = pattern[0]
        for start in range(L - n - 1, -1, -1):  # most recent occurrence first
            if tokens[start] == first and tokens[start:start + n] == pattern:
                return tokens[start + n:start + n + max_draft]
    return []
