"""Response-only loss of checkpoints on held-out instruction pairs (the demo's before/after number).

    python recipes/chat/heldout_loss.py runs/chat/heldout.jsonl starcoder2/assets/default_model runs/chat/full/final

Each example is rendered with the chat template of the last checkpoint (the fine-tuned run's) (the same prompt for every
model, so the numbers compare), packed, and scored on its response tokens only (nats per token).
"""

from __future__ import annotations

import sys

import torch

from starcoder2 import load
from starcoder2.finetune.sft import encode_example, pack, read_examples, resolve_template
from starcoder2.train.loop import loss_fn


def main() -> None:
    data, *models = sys.argv[1:]
    examples = read_examples(data)
    template = resolve_template(models[-1])  # the fine-tuned run's template (else the default one)
    for path in models:
        lm = load(path, dtype="fp32", device="cpu")
        encoded = [encode_example(template, lm.tokenizer, m) for m in examples]
        x, y, seg = pack(encoded, seq_len=512, pad_id=lm.tokenizer.eos_id)
        with torch.no_grad():
            loss = loss_fn(lm.model, x, y, seg).item()
        print(f"{path}: held-out response loss {loss:.3f} nats/token over {int((y != -100).sum())} tokens "
              f"({len(examples)} examples)")


if __name__ == "__main__":
    main()
