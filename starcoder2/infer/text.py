"""Turning a stream of token ids into returned text: whole UTF-8 characters, no special tokens,
and stop strings that never appear in the output, even when they span several tokens."""

from __future__ import annotations

from ..tokenizer import StreamDecoder, Tokenizer


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """Per sequence: `push(token)` returns text that is safe to show; `stopped` turns True once a
    stop string is complete (the text up to it has then been returned and nothing after it)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.decoder = StreamDecoder(tokenizer, skip_special=True)
        self.stops = [s for s in (stop or []) if s]
        self.pending = ""  # decoded text not yet returned because it may begin a stop string
        self.stopped = False

    def _emit(self, text: str, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.pending + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)]
        keep = 0 if final else _held_back(text, self.stops)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def push(self, token: int) -> str:
        return self._emit(self.decoder.push(token), final=False)

    def flush(self) -> str:
        return self._emit(self.decoder.flush(), final=True)
