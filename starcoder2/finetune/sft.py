"""Instruction tuning (SFT): chat-formatted examples, loss on the assistant's turns only, packed rows
without attention between examples.

    starcoder2 finetune --sft data.jsonl --out runs/sft [--full | --lora --rank 16 ...] [--chat-template T.jinja]
    starcoder2 chat --model M --adapter runs/sft/adapter          (LoRA)   or   --model runs/sft/final (full)

Input: JSONL, one example a line, either `{"instruction": ..., "response": ...}` (optional "system")
or `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`.

Each conversation is rendered with the model's chat template (chat.py; a base model gets
DEFAULT_CHAT_TEMPLATE, StarCoder2-Instruct's format). The text is cut at every assistant turn:
render(messages[:i], add_generation_prompt=True) is the prompt the model will see at inference, and
what render(messages[:i + 1]) adds after it, up to and including the eos token, is the response.
Prompt pieces and response pieces are tokenized separately, as at inference (the prompt is encoded
alone, the response generated after it); labels are IGNORE_INDEX except on response tokens.

Examples are packed into rows of seq_len positions, next-fit in a shuffled order; each example is a
run of one segment id (padding: 0), and the model's `segment_ids` mask keeps attention and positions
inside each run, so a packed example trains exactly as it would alone. A held-out fraction of the
examples (by a hash of their text) gives the held-out loss. Runs go through finetune/run.py's
`finetune` (LoRA or full, checkpoints, resume, DDP), with this module as its token source.
The chat template used is saved with the result (tokenizer_config.json `chat_template`).

Left out: multi-turn examples longer than seq_len are truncated (their later turns lost), not split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError, find_chat_template, save_chat_template
from ..chat import special_tokens as read_special_tokens
from ..data.loader import IGNORE_INDEX
from ..device import resolve_device
from ..tokenizer import Tokenizer
from ..train.config import TrainConfig
from ..train.parallel import Dist, init_distributed
from .run import FinetuneConfig, finetune

ROLES = ("system", "user", "assistant")
Encoded = tuple[np.ndarray, np.ndarray]  # ids (n,) int64, loss mask (n,) bool: True where the token is a target


# ---- examples ----------------------------------------------------------------------------------------

def read_examples(path: str | Path) -> list[list[dict]]:
    """Each JSONL line as a list of messages; a malformed line is an error naming its number."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(to_messages(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def to_messages(record: object) -> list[dict]:
    """One JSONL record -> [{"role", "content"}, ...] with at least one assistant turn."""
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError('"messages" must be a list of {"role", "content"} objects')
        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"a message needs a role among {', '.join(ROLES)} and a string content, got {m}")
    elif isinstance(record.get("instruction"), str) and isinstance(record.get("response"), str):
        messages = [{"role": "user", "content": record["instruction"]},
                    {"role": "assistant", "content": record["response"]}]
        if isinstance(record.get("system"), str):
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ValueError('expected {"instruction", "response"} strings or a "messages" list')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the example has no assistant turn to learn")
    if messages[0]["role"] == "assistant":
        raise ValueError("the example starts with an assistant turn: nothing prompts it")
    return messages


def encode_example(template: ChatTemplate, tok: Tokenizer, messages: list[dict]) -> Encoded:
    """Token ids of the conversation up to its last assistant turn, and which ids are targets."""
    eos = template.eos_token
    pieces: list[tuple[str, bool]] = []  # (text, is_response)
    done = ""  # text covered by the pieces so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        full = template.render(messages[:i + 1])
        if not (full.startswith(prompt) and prompt.startswith(done)):
            raise ChatTemplateError("the chat template does not render conversations as prefixes of longer ones, "
                                    "so responses cannot be located in its text")
        end = len(full)
        if eos and (k := full.find(eos, len(prompt))) >= 0:
            end = k + len(eos)  # the turn ends at eos; what the template writes after it is not learnt
        pieces += [(prompt[len(done):], False), (full[len(prompt):end], True)]
        done = full[:end]
    ids, mask = [], []
    for text, is_response in pieces:
        piece = tok.encode(text, allow_special=True) if text else []
        ids += piece
        mask += [is_response] * len(piece)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


# ---- packing -----------------------------------------------------------------------------------------

def pack(examples: list[Encoded], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples (in the given order) -> rows (R, seq_len) of input ids, labels and segment ids.

    An example of n ids takes n - 1 positions: inputs ids[:-1], labels ids[1:] where the label is a
    target (else IGNORE_INDEX). Rows fill next-fit; an example longer than a row is truncated.
    Padding has segment 0 and no targets; examples in a row are segments 1, 2, ..."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for ids, mask in examples:
        x = ids[:-1][:seq_len]
        y = np.where(mask[1:], ids[1:], IGNORE_INDEX)[:seq_len]
        if len(x) == 0 or (y == IGNORE_INDEX).all():
            continue
        if used + len(x) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((x, y))
        used += len(x)
    rows = [r for r in rows if r]
    inputs = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, (x, y) in enumerate(row, 1):
            inputs[r, at:at + len(x)] = torch.from_numpy(x)
            labels[r, at:at + len(x)] = torch.from_numpy(y)
            segments[r, at:at + len(x)] = s
            at += len(x)
    return inputs, labels, segments


class PackedRowLoader:
    """Yields (input_ids, labels, segment_ids), each (B, S), from packed rows; resumable like
    data.loader.BatchLoader (epoch permutations from (seed, epoch); rank r takes every W-th row)."""

    def __init__(self, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(rows[0])} packed rows cannot fill one batch of {batch_size} x {world_size} "
                             "processes: add examples or lower --batch/--seq-len")
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows[0]) // (self.batch_size * self.world_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows[0]))
        first = self.position * self.batch_size * self.world_size + self.rank
        picks = torch.from_numpy(order[first:first + self.batch_size * self.world_size:self.world_size])
        self.position += 1
        return tuple(t[picks] for t in self.rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---- the run -----------------------------------------------------------------------------------------

def is_held_out(messages: list[dict], fraction: float) -> bool:
    """A stable choice by content, so a rerun or another process holds out the same examples."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def sft_source(examples: list[list[dict]], template: ChatTemplate, holdout: float,
               log: Callable[[str], None] = print) -> Callable[[TrainConfig, Tokenizer, Dist], tuple]:
    """A `token_source` for finetune(): (train loader, held-out batches, their target bytes)."""

    def source(config: TrainConfig, tok: Tokenizer, d: Dist) -> tuple:
        train, valid = [], []
        for messages in examples:
            (valid if is_held_out(messages, holdout) else train).append(encode_example(template, tok, messages))
        order = np.random.default_rng(config.seed).permutation(len(train))
        rows = pack([train[i] for i in order], config.seq_len, tok.eos_id)
        if d.is_main:
            _, labels, segments = rows
            targets = int((labels != IGNORE_INDEX).sum())
            too_long = sum(len(ids) - 1 > config.seq_len for ids, _ in train)
            log(f"sft: {len(train)} training examples in {len(labels)} rows of {config.seq_len} "
                f"({(segments != 0).float().mean():.0%} filled, {targets:,} target tokens), "
                f"{len(valid)} held out" + (f"; {too_long} truncated to seq_len" if too_long else ""))
        loader = PackedRowLoader(rows, config.batch_size, seed=config.seed, rank=d.rank, world_size=d.world_size)
        if not valid:
            return loader, [], 0
        vx, vy, vs = pack(valid, config.seq_len, tok.eos_id)
        n = min(config.eval_batches * config.batch_size, len(vx))
        batches = [(vx[i:i + config.batch_size], vy[i:i + config.batch_size], vs[i:i + config.batch_size])
                   for i in range(0, n, config.batch_size)]
        nbytes = sum(len(tok.decode(y[y != IGNORE_INDEX].tolist()).encode()) for _, ys, _ in batches for y in ys)
        return loader, batches, nbytes

    return source


def resolve_template(model: str | Path, template_file: str | Path | None = None) -> ChatTemplate:
    """--chat-template FILE, else the model's own template, else DEFAULT_CHAT_TEMPLATE."""
    tokens = read_special_tokens(Path(model))
    if template_file is not None:
        return ChatTemplate(Path(template_file).read_text(encoding="utf-8"), tokens)
    return find_chat_template(model) or ChatTemplate(DEFAULT_CHAT_TEMPLATE, tokens)


def prepare_sft_dir(data: Path, model: str | Path, template: ChatTemplate, manifest: dict) -> Path:
    """OUT/data as finetune() reads it: tokenizer/ (with the chat template) and a manifest with no
    shards (the examples come from the JSONL through the token source)."""
    Tokenizer.from_dir(model).save(data / "tokenizer")
    save_chat_template(data / "tokenizer", template.source)
    tmp = data / "manifest.json.tmp"
    tmp.write_text(json.dumps({"kind": "sft", "dtype": "uint16", "shards": [], **manifest}, indent=1) + "\n")
    os.replace(tmp, data / "manifest.json")
    return data


def finetune_sft(config: FinetuneConfig, jsonl: str | Path, *, holdout: float = 0.05,
                 template_file: str | Path | None = None, resume: bool = False, device: str | None = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """`starcoder2 finetune --sft`: instruction-tune `config.model` on `jsonl`; the result (OUT/adapter
    or OUT/final) carries the chat template it was trained with. Returns the last metrics record."""
    import torch.distributed as dist

    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    examples = read_examples(jsonl)
    template = resolve_template(config.model, template_file)
    if template.eos_token is None:
        raise ValueError(f"{config.model}: tokenizer_config.json names no eos_token to end responses with")
    template.render(examples[0])  # a template that refuses this data (e.g. system turns) fails now
    d = init_distributed(resolve_device(device).type)
    data = Path(config.out) / "data"
    if d.is_main:
        prepare_sft_dir(data, config.model, template, {"source": str(jsonl), "examples": len(examples)})
    if d.world_size > 1:
        dist.barrier()
    last = finetune(config, data, resume=resume, device=device, progress=progress, log=log,
                    token_source=sft_source(examples, template, holdout, log))
    final = Path(config.out) / "final"
    if d.is_main and config.method == "full" and final.is_dir():
        save_chat_template(final, template.source)  # the loop's export writes a tokenizer without it
    return last
