"""Tokenizer: a thin wrapper over the checkpoint's `tokenizers` tokenizer, safe for code and for streaming.

StarCoder2 uses a GPT-2-style byte-level BPE with 38 special tokens (reference §6). The wrapper exists
for three reasons the raw `tokenizers.Tokenizer` does not cover:
- Special-token injection (§6.4): by default `tokenizers` turns the literal text `<file_sep>` or
  `<|endoftext|>` inside a source file into a control token. `encode(text)` never does that; callers
  that want control tokens from text (TGI / llm-ls style prompts) ask with `allow_special=True`.
- Ids come from the files: EOS, FIM and repository sentinels are looked up by string in the loaded
  vocabulary, never hard-coded (STYLE §10).
- Streaming: byte-level pieces can end in the middle of a UTF-8 character, so `StreamDecoder` only
  releases whole characters, decoding a short window of ids per token.

`train_bpe` trains a small tokenizer of the same shape (tests, data pipeline experiments).
Deliberately left out: padding, truncation, batching and chat templates (prompts.py builds prompts).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

# Official order (reference §6.2): the first 38 ids of the StarCoder2 vocabulary. Only used to train
# tokenizers and in tests; at runtime every id is read from the checkpoint's files.
STARCODER2_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<repo_name>",
    "<file_sep>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
    "<code_to_intermediate>",
    "<intermediate_to_code>",
    "<pr>",
    "<pr_status>",
    "<pr_is_merged>",
    "<pr_base>",
    "<pr_file>",
    "<pr_base_code>",
    "<pr_diff>",
    "<pr_diff_hunk>",
    "<pr_comment>",
    "<pr_event_id>",
    "<pr_review>",
    "<pr_review_state>",
    "<pr_review_comment>",
    "<pr_in_reply_to_review_id>",
    "<pr_in_reply_to_comment_id>",
    "<pr_diff_hunk_comment_line>",
    "<NAME>",
    "<EMAIL>",
    "<KEY>",
    "<PASSWORD>",
]

DEFAULT_MODEL_MAX_LENGTH = 16384  # StarCoder2's training context (reference §1)
_REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decode yields for an incomplete byte sequence


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable, or a required token is absent from it."""


class Tokenizer:
    """Byte-level BPE tokenizer with injection-safe encoding and ids resolved from the vocabulary."""

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        eos_token: str = "<|endoftext|>",
        bos_token: str | None = None,
        *,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    ):
        self._hf = hf_tokenizer
        self._plain = _without_added_tokens(hf_tokenizer)
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.model_max_length = model_max_length

        added = hf_tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        self._added_ids = frozenset(added)
        self._special_ids = frozenset(i for i, t in added.items() if t.special)

        eos_id = self.token_id(eos_token)
        if eos_id is None:
            raise TokenizerError(f"eos_token {eos_token!r} is not in the vocabulary")
        self._eos_id = eos_id
        self.bos_id = self.token_id(bos_token) if bos_token is not None else None
        self.fim_prefix_id = self.token_id("<fim_prefix>")
        self.fim_middle_id = self.token_id("<fim_middle>")
        self.fim_suffix_id = self.token_id("<fim_suffix>")
        self.fim_pad_id = self.token_id("<fim_pad>")
        self.repo_name_id = self.token_id("<repo_name>")
        self.file_sep_id = self.token_id("<file_sep>")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (required) and `tokenizer_config.json` (optional) from a checkpoint dir."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        try:
            hf = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # missing file, bad JSON, or a tokenizer format we cannot read
            raise TokenizerError(f"cannot load tokenizer from {tokenizer_file}: {e}") from e

        kwargs: dict = {}
        config_file = path / "tokenizer_config.json"
        if config_file.exists():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"cannot read {config_file}: {e}") from e
            if (eos := _token_content(config.get("eos_token"))) is not None:
                kwargs["eos_token"] = eos
            kwargs["bos_token"] = _token_content(config.get("bos_token"))
            # HF writes a huge sentinel (1e30) when no limit is known; keep only plausible values.
            max_len = config.get("model_max_length")
            if isinstance(max_len, int) and 0 < max_len < 2**31:
                kwargs["model_max_length"] = max_len
        return cls(hf, **kwargs)

    # ---- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (49,152 for the StarCoder2 checkpoints)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all added tokens flagged special."""
        return self._special_ids

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def token_id(self, token: str) -> int | None:
        """Id of `token` in the loaded vocabulary, or None when absent."""
        return self._hf.token_to_id(token)

    # ---- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. No BOS is ever prepended.

        allow_special=False: `text` is plain data; literal `<file_sep>` etc. are spelled with ordinary
        byte-level tokens and no added-token id can appear. allow_special=True: added-token text in
        `text` becomes the added token's id (what TGI/llm-ls clients expect).
        """
        if allow_special:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._encode_plain(text)

    def _encode_plain(self, text: str) -> list[int]:
        ids = self._plain.encode(text, add_special_tokens=False).ids
        if self._added_ids.isdisjoint(ids):
            return ids
        # `_plain` knows no added tokens, so this only happens when BPE merges themselves spell an
        # added token's vocabulary entry (possible in third-party tokenizers). Split the text and
        # encode the halves separately: byte-level decoding concatenates, so the text is unchanged.
        if len(text) <= 1:
            raise TokenizerError(f"character {text!r} only encodes to an added-token id")
        mid = len(text) // 2
        return self._encode_plain(text[:mid]) + self._encode_plain(text[mid:])

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Ids -> text; incomplete UTF-8 sequences become U+FFFD."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that transformers' AutoTokenizer loads."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(out_dir / "tokenizer.json"))
        added = self._hf.get_added_tokens_decoder()
        config = {
            # Not "GPT2Tokenizer": transformers 5 rebuilds that class's backend with a plain ByteLevel
            # pre-tokenizer, dropping the Digits splitter, so ids differ on whitespace before digits.
            # PreTrainedTokenizerFast loads tokenizer.json verbatim in transformers 4 and 5.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token if self.bos_token is not None else self.eos_token,
            "eos_token": self.eos_token,
            "unk_token": self.eos_token,
            "add_prefix_space": False,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "additional_special_tokens": [added[i].content for i in sorted(self._special_ids)],
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _token_content(value: object) -> str | None:
    """tokenizer_config.json spells a token as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _without_added_tokens(hf: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of `hf` that does not match added tokens in text (for injection-safe encoding).

    Keeping a second instance, instead of toggling `encode_special_tokens` on a shared one, makes
    concurrent `encode` calls with different `allow_special` flags safe. Dropping the added tokens also
    covers added tokens that are not flagged special, which `encode_special_tokens` would still match.
    """
    spec = json.loads(hf.to_str())
    spec["added_tokens"] = []
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


class StreamDecoder:
    """Incremental detokenizer: `push` returns only newly completed text, `flush` the rest.

    Uses TGI's prefix_offset/read_offset scheme: the text of the new ids is obtained by decoding a
    short window (the previously released chunk's ids as context, plus the pending ids) and removing
    the context's text, so the cost per token does not grow with the sequence. Text ending in U+FFFD
    is held back because the next ids may complete the UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._window: list[int] = []  # context ids followed by not yet released ids
        self._read = 0  # _window[:_read] is context whose text was already released

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        prefix_text = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        if len(text) <= len(prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        # The released chunk becomes the next context; older ids are no longer needed.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Release whatever is pending (possibly ending in U+FFFD) and reset."""
        prefix_text = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        self._window, self._read = [], 0
        return text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special) if ids else ""


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train a StarCoder2-shaped byte-level BPE; the 38 special tokens get ids 0..37 in order."""
    hf = tokenizers.Tokenizer(models.BPE())
    # Digits then the GPT-2 regex, as StarCoder1 did (reference §6.3).
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=STARCODER2_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
