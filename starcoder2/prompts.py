"""Prompt builders for StarCoder2: file-level FIM (PSM/SPM), repository-level prompts, stop ids.

Prompts are assembled as id lists piece by piece (reference §6.4, §7): every text piece between two
sentinels is encoded on its own with `encode(allow_special=False)`, so code that literally contains
`<file_sep>` cannot inject control tokens, and sentinels are inserted by id, resolved from the
loaded tokenizer. Layouts (reference §7.1, §7.2, §7.4):

    PSM   <fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>
    SPM   <fim_prefix><fim_suffix>{suffix}<fim_middle>{prefix}          (BigCode Megatron's SPM)
    repo  <repo_name>{name}<file_sep>{path}\\n{code}...
          <file_sep><fim_prefix>{cur_path}\\n{prefix}<fim_suffix>{suffix}<fim_middle>     (one line)

With `max_tokens`, prompts are truncated keeping what is nearest the cursor: context files go first
(earliest in the list first), then the prefix is cut from the left and the suffix from the right.
Deliberately left out: chat templates and llama.cpp's different "SPM" infill layout.
"""

from __future__ import annotations

from starcoder2.tokenizer import Tokenizer, TokenizerError

FIM_MODES = ("psm", "spm")
_STOP_TOKENS = (
    "<|endoftext|>",
    "<file_sep>",
    "<fim_prefix>",
    "<fim_suffix>",
    "<fim_middle>",
    "<fim_pad>",
    "<repo_name>",
)
_REPLACEMENT_CHAR = "\ufffd"
_UTF8_MAX_CONTINUATION = 3  # a cut can leave at most 3 bytes of a broken character at the edge


def fim_prompt(
    tok: Tokenizer, prefix: str, suffix: str, mode: str = "psm", max_tokens: int | None = None
) -> list[int]:
    """File-level fill-in-the-middle prompt; the model continues with the middle."""
    if mode not in FIM_MODES:
        raise ValueError(f"unknown FIM mode {mode!r}; expected one of {FIM_MODES}")
    pre, mid, suf = _fim_ids(tok)
    prefix_ids, suffix_ids = tok.encode(prefix), tok.encode(suffix)
    if max_tokens is not None:
        prefix_ids, suffix_ids = _fit_prefix_suffix(tok, prefix_ids, suffix_ids, max_tokens - 3, max_tokens)
    if mode == "psm":
        return [pre, *prefix_ids, suf, *suffix_ids, mid]
    return [pre, suf, *suffix_ids, mid, *prefix_ids]


def repo_prompt(
    tok: Tokenizer,
    files: list[tuple[str, str]],
    current_path: str | None,
    prefix: str,
    suffix: str | None = None,
    repo_name: str | None = None,
    max_tokens: int | None = None,
) -> list[int]:
    """Repository-level prompt: context `files` (path, code) then the current file (reference §7.4).

    suffix=None gives a plain completion `<file_sep>{current_path}\\n{prefix}`; otherwise the current
    file is a PSM FIM segment with the path inside the prefix segment, as in training (§7.3).
    repo_name=None omits the `<repo_name>` part; current_path=None omits the current file's path line.
    Order matters for prefix caching: stable content (context files) comes first.
    """
    file_sep = _require(tok, "<file_sep>")
    fim = None if suffix is None else _fim_ids(tok)
    head = [] if repo_name is None else [_require(tok, "<repo_name>"), *tok.encode(repo_name)]
    context = [[file_sep, *tok.encode(f"{path}\n{code}")] for path, code in files]
    path_line = "" if current_path is None else f"{current_path}\n"
    suffix_ids = [] if suffix is None else tok.encode(suffix)
    # The path line and prefix form one text piece, encoded together as in training.
    current_ids = tok.encode(path_line + prefix)
    n_sentinels = 1 if fim is None else 4  # <file_sep> (+ <fim_prefix>, <fim_suffix>, <fim_middle>)

    if max_tokens is not None:
        fixed = len(head) + n_sentinels
        if fixed + len(current_ids) + len(suffix_ids) <= max_tokens:
            # The current file fits whole: drop context files farthest from it (earliest) first.
            room = max_tokens - fixed - len(current_ids) - len(suffix_ids)
            total = sum(map(len, context))
            while context and total > room:
                total -= len(context.pop(0))
        else:
            context = []
            # Encoding the path line apart keeps it whole while the prefix is cut from the left.
            path_ids = tok.encode(path_line)
            budget = max_tokens - fixed - len(path_ids)
            prefix_ids, suffix_ids = _fit_prefix_suffix(tok, tok.encode(prefix), suffix_ids, budget, max_tokens)
            current_ids = path_ids + prefix_ids

    ids = head + [t for piece in context for t in piece]
    if fim is None:
        return ids + [file_sep, *current_ids]
    pre, mid, suf = fim
    return ids + [file_sep, pre, *current_ids, suf, *suffix_ids, mid]


def default_stop_ids(tok: Tokenizer) -> list[int]:
    """Ids to stop generation on (reference §7.4), those present in this tokenizer."""
    ids = (tok.token_id(t) for t in _STOP_TOKENS)
    return [i for i in ids if i is not None]


def split_at_cursor(text: str, line: int, column: int | None = None) -> tuple[str, str]:
    """Split `text` at a 1-based (line, column) cursor into (prefix, suffix).

    The cursor sits before the `column`-th character of the line, so column 1 is the start of the
    line and len(line) + 1 its end; column=None means the end of the line (before "\\n", or before
    "\\r\\n"). Columns count Unicode code points (LSP clients send UTF-16 units by default: convert).
    A text ending in "\\n" has one more, empty, last line.
    """
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise ValueError(f"line {line} is out of range: the text has {len(lines)} line(s), numbered from 1")
    start = sum(len(s) + 1 for s in lines[: line - 1])  # +1 for each "\n"
    content = lines[line - 1]
    if content.endswith("\r"):
        content = content[:-1]
    if column is None:
        column = len(content) + 1
    elif not 1 <= column <= len(content) + 1:
        raise ValueError(
            f"column {column} is out of range for line {line}: it has {len(content)} character(s), "
            f"so columns run from 1 to {len(content) + 1}"
        )
    cursor = start + column - 1
    return text[:cursor], text[cursor:]


def _fim_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """(<fim_prefix>, <fim_middle>, <fim_suffix>) ids, or a TokenizerError naming what is missing."""
    pre, mid, suf = tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id
    if pre is None or mid is None or suf is None:
        found = {"<fim_prefix>": pre, "<fim_middle>": mid, "<fim_suffix>": suf}
        missing = [name for name, token_id in found.items() if token_id is None]
        raise TokenizerError(f"this tokenizer has no FIM tokens {missing}; it cannot build infilling prompts")
    return pre, mid, suf


def _require(tok: Tokenizer, token: str) -> int:
    token_id = tok.token_id(token)
    if token_id is None:
        raise TokenizerError(f"this tokenizer has no {token} token, needed for repository prompts")
    return token_id


def _fit_prefix_suffix(
    tok: Tokenizer, prefix_ids: list[int], suffix_ids: list[int], budget: int, max_tokens: int
) -> tuple[list[int], list[int]]:
    """Cut prefix (from the left) and suffix (from the right) to at most `budget` tokens together.

    The prefix matters most for the next tokens, so it gets at least 3/4 of the budget; whatever one
    side does not need goes to the other.
    """
    if budget < 0:
        raise ValueError(f"max_tokens={max_tokens} cannot hold the prompt's fixed tokens (sentinels, names, path)")
    if len(prefix_ids) + len(suffix_ids) <= budget:
        return prefix_ids, suffix_ids
    n_suffix = min(len(suffix_ids), max(budget // 4, budget - len(prefix_ids)))
    n_prefix = min(len(prefix_ids), budget - n_suffix)
    # Byte-level tokens can split a character; drop the orphaned bytes a cut left at the far edge.
    if n_prefix < len(prefix_ids):
        prefix_ids = _trim_broken_edge(tok, prefix_ids[len(prefix_ids) - n_prefix :], from_left=True)
    if n_suffix < len(suffix_ids):
        suffix_ids = _trim_broken_edge(tok, suffix_ids[:n_suffix], from_left=False)
    return prefix_ids, suffix_ids


def _trim_broken_edge(tok: Tokenizer, ids: list[int], from_left: bool) -> list[int]:
    for _ in range(_UTF8_MAX_CONTINUATION):
        # A few tokens are enough context to tell a broken character from an incomplete one.
        edge = tok.decode(ids[:8] if from_left else ids[-8:], skip_special=False)
        broken = edge.startswith(_REPLACEMENT_CHAR) if from_left else edge.endswith(_REPLACEMENT_CHAR)
        if not broken:
            break
        ids = ids[1:] if from_left else ids[:-1]
    return ids
