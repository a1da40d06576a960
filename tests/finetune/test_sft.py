"""Instruction tuning: loss masks on known examples, packing without cross-example leaks, and a run."""

import json

import pytest
import torch
import torch.nn.functional as F

from starcoder2.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, load_chat_template
from starcoder2.data.loader import IGNORE_INDEX
from starcoder2.model import StarCoder2
from starcoder2.finetune.sft import PackedRowLoader, encode_example, pack, read_examples, to_messages
from starcoder2.train.loop import loss_fn

from ..test_chat import STARCODER2_INSTRUCT

TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
DEFAULT = ChatTemplate(DEFAULT_CHAT_TEMPLATE, TOKENS)
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"},
         {"role": "assistant", "content": "    return a + b"}, {"role": "user", "content": "and sub?"},
         {"role": "assistant", "content": "    return a - b"}, {"role": "user", "content": "thanks"}]


def _targets(tok, ids, mask) -> list[str]:
    """The texts of the runs of target tokens, in order."""
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tok.decode(r, skip_special=False) for r in runs]


def test_records_become_messages(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "Add.", "response": "a + b", "system": "S"}) + "\n\n"
                 + json.dumps({"messages": MULTI}) + "\n")
    assert read_examples(f) == [[{"role": "system", "content": "S"}, {"role": "user", "content": "Add."},
                                 {"role": "assistant", "content": "a + b"}], MULTI]
    f.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected"):
        read_examples(f)
    for bad, match in [({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
                       ({"messages": [{"role": "assistant", "content": "x"}]}, "starts with an assistant"),
                       ({"messages": [{"role": "tool", "content": "x"}]}, "role among")]:
        with pytest.raises(ValueError, match=match):
            to_messages(bad)


def test_loss_mask_covers_responses_only(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = encode_example(DEFAULT, tok, MULTI)
    # targets: each response through its eos, nothing else (the last user turn is dropped)
    assert _targets(tok, ids, mask) == ["    return a + b<|endoftext|>", "    return a - b<|endoftext|>"]
    # the text is the template's rendering, and the first prompt is what inference encodes
    assert tok.decode(ids.tolist(), skip_special=False) == DEFAULT.render(MULTI[:5]).removesuffix("\n\n")
    prompt = tok.encode(DEFAULT.render(MULTI[:2], add_generation_prompt=True), allow_special=True)
    assert ids[:len(prompt)].tolist() == prompt and not mask[:len(prompt)].any() and mask[len(prompt)]


def test_loss_mask_with_starcoder2_instruct_template(tiny_tokenizer):
    """Its template always ends with "### Response\\n": that tail after eos is not learnt."""
    template = ChatTemplate(STARCODER2_INSTRUCT, TOKENS)
    ids, mask = encode_example(template, tiny_tokenizer, MULTI[1:5])
    assert _targets(tiny_tokenizer, ids, mask) == ["    return a + b<|endoftext|>", "    return a - b<|endoftext|>"]
    text = tiny_tokenizer.decode(ids.tolist(), skip_special=False)
    assert text.startswith("<|endoftext|>You are an exceptionally") and text.endswith("return a - b<|endoftext|>")


def test_pack_layout_and_labels():
    import numpy as np

    a = (np.array([5, 6, 7, 8]), np.array([False, False, True, True]))
    b = (np.array([9, 10, 11]), np.array([False, True, True]))
    c = (np.array([1, 2, 3, 4, 5, 6]), np.array([False] * 3 + [True] * 3))
    x, y, seg = pack([a, b, c], seq_len=6, pad_id=0)
    I = IGNORE_INDEX
    assert x.tolist() == [[5, 6, 7, 9, 10, 0], [1, 2, 3, 4, 5, 0]]
    assert y.tolist() == [[I, 7, 8, 10, 11, I], [I, I, 4, 5, 6, I]]
    assert seg.tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0]]


def test_packed_loss_equals_examples_alone(tiny_tokenizer):
    """The summed loss of a packed batch equals the sum of each example's loss computed alone."""
    from starcoder2.config import tiny

    torch.manual_seed(0)
    model = StarCoder2(tiny().replace(vocab_size=640)).eval()
    model.init_weights()
    convs = [[{"role": "user", "content": f"write f{i}"}, {"role": "assistant", "content": "x = " * (i + 1)}]
             for i in range(5)]
    examples = [encode_example(DEFAULT, tiny_tokenizer, c) for c in convs]
    x, y, seg = pack(examples, seq_len=128, pad_id=0)
    assert len(x) < len(examples)  # several examples share a row
    with torch.no_grad():
        logits = model(x, segment_ids=seg)
        packed = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        alone = 0.0
        for ids, mask in examples:
            ids_t = torch.from_numpy(ids)
            target = torch.where(torch.from_numpy(mask[1:]), ids_t[1:], IGNORE_INDEX)
            alone += F.cross_entropy(model(ids_t[None, :-1])[0], target, ignore_index=IGNORE_INDEX, reduction="sum")
        mean = loss_fn(model, x, y, seg)  # the training loop's loss: the mean over targets
    n_targets = sum(int(m[1:].sum()) for _, m in examples)
    torch.testing.assert_close(packed, alone, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(mean, alone / n_targets, rtol=1e-6, atol=1e-6)


def test_loader_resumes_exactly():
    rows = tuple(torch.arange(40).view(10, 4) + k for k in range(3))
    loader = PackedRowLoader(rows, batch_size=2, seed=3)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(6)]  # crosses into the next epoch
    again = PackedRowLoader(rows, batch_size=2, seed=3)
    again.load_state_dict(state)
    for want in expected:
        for a, b in zip(again.next_batch(), want):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        PackedRowLoader(rows, batch_size=8, world_size=2)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_run_saves_chat_template(tmp_path, tiny_checkpoint, method):
    """The result carries the chat template, transformers renders it identically, and chat() works.
    Full fine-tuning memorises two pairs (greedy answers equal the responses). LoRA on the random
    tiny base only has to lower the loss: its frozen head (std 0.02) bounds the logits it can reach."""
    from transformers import AutoTokenizer

    from starcoder2 import load
    from starcoder2.finetune.run import FinetuneConfig
    from starcoder2.finetune.sft import finetune_sft

    pairs = [("name two", "beta gamma"), ("count", "1 2 3")]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "response": a}) + "\n" for q, a in pairs))
    out = tmp_path / method
    steps = 80 if method == "full" else 20  # the loop logs every 10 steps
    config = FinetuneConfig(model=str(tiny_checkpoint), out=str(out), method=method, rank=8, alpha=16, dropout=0.0,
                            steps=steps, lr=3e-2, warmup_steps=5, batch_size=2, seq_len=40, eval_every=steps,
                            save_every=steps, dtype="fp32", threads=1)
    last = finetune_sft(config, data, holdout=0.0, progress=False, log=lambda m: None)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    result = out / ("final" if method == "full" else "adapter")
    assert json.loads((result / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_CHAT_TEMPLATE
    conv = [{"role": "user", "content": "name two"}]
    ref = AutoTokenizer.from_pretrained(result).apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert load_chat_template(result).render(conv, add_generation_prompt=True) == ref
    sc = load(result, dtype="fp32") if method == "full" else load(tiny_checkpoint, dtype="fp32", adapter=result)
    answers = [sc.chat([{"role": "user", "content": q}], max_new_tokens=10) for q, _ in pairs]
    if method == "full":
        assert last["loss"] < 0.05 and answers == [a for _, a in pairs]
    else:  # merging keeps the adapter's chat template: the merged checkpoint chats as the adapter did
        from starcoder2 import cli
        assert cli.main(["merge", "--model", str(tiny_checkpoint), "--adapter", str(result),
                         "--out", str(tmp_path / "merged")]) == 0
        merged = load(tmp_path / "merged", dtype="fp32")
        assert merged.chat_template().source == DEFAULT_CHAT_TEMPLATE
        assert [merged.chat([{"role": "user", "content": q}], max_new_tokens=10) for q, _ in pairs] == answers


def test_cli_sft_options(tmp_path, capsys):
    from starcoder2.cli import main

    with pytest.raises(SystemExit):  # --repo or --sft, exactly one
        main(["finetune", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["finetune", "--repo", ".", "--sft", "x.jsonl", "--out", str(tmp_path)])
    assert main(["finetune", "--repo", ".", "--chat-template", "t.jinja", "--full", "--out", str(tmp_path)]) == 1
    assert "--chat-template goes with --sft" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "response": "y"}\n{"messages": 3}\n')
    assert main(["finetune", "--sft", str(bad), "--full", "--out", str(tmp_path / "o")]) == 1
    assert 'bad.jsonl:2: "messages" must be a list' in capsys.readouterr().err
