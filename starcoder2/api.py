"""The public Python API: `starcoder2.load(...)` and what the loaded object can do.

    import starcoder2
    sc = starcoder2.load("bigcode/starcoder2-3b", dtype="bf16")   # or a directory, or None: the default model
    sc.complete("def fibonacci(n):", max_new_tokens=64)
    sc.infill("def add(a, b):\n    ", "\n\nprint(add(1, 2))")
    for piece in sc.stream_complete("import os\n"): print(piece, end="")
    sc.chat([{"role": "user", "content": "Write a quicksort"}])   # models that ship a chat template
    ids = sc.generate(sc.tokenizer.encode("x = "), max_new_tokens=8)       # new token ids
    logits = sc.model(torch.tensor([ids]))                                   # (1, T, vocab) fp32
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import check_fits, load_adapter, merge_adapter
from .chat import ChatTemplate, chat_prompt, chat_stop_ids, find_chat_template, no_chat_template
from .checkpoint import (CheckpointError, load_model, read_config, read_quantization_config, read_tensor, resolve,
                         tensor_reader)
from .config import ModelConfig
from .device import fast_bf16, resolve_device, resolve_dtype
from .infer.generate import SamplingParams, generate_tokens
from .infer.hugepages import HugePageArena
from .infer.quantize import (Rows, is_quant_target, prequantized_layers, quantize_head, quantize_model,
                             use_native_kernels)
from .infer.text import TextStream
from .model import StarCoder2
from .prompts import default_stop_ids, fim_prompt
from .tokenizer import Tokenizer, TokenizerError

DEFAULT_MODEL_ENV = "STARCODER2_MODEL"
EMBEDDED_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"


def default_model_path() -> Path:
    """$STARCODER2_MODEL if set, else the small model shipped inside the package."""
    if os.environ.get(DEFAULT_MODEL_ENV):
        return resolve(os.environ[DEFAULT_MODEL_ENV])
    if (EMBEDDED_MODEL_DIR / "config.json").is_file():
        return EMBEDDED_MODEL_DIR
    raise CheckpointError(f"no model given, ${DEFAULT_MODEL_ENV} is unset and this install has no embedded "
                          f"default model at {EMBEDDED_MODEL_DIR}; pass --model PATH_OR_ID")


@dataclass
class LoadedModel:
    """A model with its tokenizer. `model.forward(ids (B, T)) -> logits (B, T, V)`."""

    model: StarCoder2
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    adapter: Path | None = None  # the LoRA adapter merged at load, if any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _params(self, stop_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, repetition_penalty: float = 1.0, stop: list[str] | str | None = None,
                seed: int | None = None) -> SamplingParams:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, stop=stop, stop_token_ids=stop_ids)

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, int | None, str]]:
        """(row, token, new text) as generated; a row ends at a stop string too. After the last
        token, each row's held-back text comes with token None."""
        texts = [TextStream(self.tokenizer, params.stop) for _ in prompts]
        cancelled: set[int] = set()
        for b, tok in generate_tokens(self.model, prompts, params, cancelled):
            yield b, tok, texts[b].push(tok)
            if texts[b].stopped:
                cancelled.add(b)
        for b, text in enumerate(texts):
            yield b, None, text.flush()

    def _stream(self, ids: list[int], stop_ids: list[int], **kw) -> Iterator[str]:
        for _, _, piece in self._run([ids], self._params(stop_ids, **kw)):
            if piece:
                yield piece

    # ---- token level -------------------------------------------------------------------------

    def generate(self, input_ids: list[int] | list[list[int]] | torch.Tensor, **kw) -> list[int] | list[list[int]]:
        """New token ids for one prompt (a list of ids) or several (a list of lists or a (B, T) tensor).
        Greedy when temperature=0. Ends at the tokenizer's EOS, `max_new_tokens`, or a `stop` string
        (the ids then end with the token that completed it)."""
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.tolist()
        single = bool(input_ids) and isinstance(input_ids[0], int)
        prompts = [input_ids] if single else input_ids
        out: list[list[int]] = [[] for _ in prompts]
        for b, tok, _ in self._run(prompts, self._params([self.tokenizer.eos_id], **kw)):
            if tok is not None:
                out[b].append(tok)
        return out[0] if single else out

    # ---- text level --------------------------------------------------------------------------

    def stream_complete(self, prompt: str, allow_special: bool = False, **kw) -> Iterator[str]:
        """Continue `prompt`; yields text pieces. `allow_special=True` lets special-token text in the
        prompt (e.g. a hand-written `<fim_prefix>`) become the special token."""
        ids = self.tokenizer.encode(prompt, allow_special=allow_special)
        if not ids:
            raise ValueError("the prompt is empty")
        return self._stream(ids, [self.tokenizer.eos_id], **kw)

    def stream_infill(self, prefix: str, suffix: str, mode: str = "psm", **kw) -> Iterator[str]:
        """Fill in the middle between `prefix` and `suffix` (StarCoder2 FIM); yields text pieces."""
        return self._stream(fim_prompt(self.tokenizer, prefix, suffix, mode), default_stop_ids(self.tokenizer), **kw)

    def complete(self, prompt: str, **kw) -> str:
        return "".join(self.stream_complete(prompt, **kw))

    def infill(self, prefix: str, suffix: str, **kw) -> str:
        return "".join(self.stream_infill(prefix, suffix, **kw))

    # ---- chat --------------------------------------------------------------------------------

    def chat_template(self) -> ChatTemplate:
        """The adapter's chat template (`finetune --sft` saves one with it), else the checkpoint's;
        ChatTemplateError for a base model."""
        template = find_chat_template(self.adapter, self.path)
        if template is None:
            raise no_chat_template(self.path.name)
        return template

    def stream_chat(self, messages: list[dict], **kw) -> Iterator[str]:
        """The assistant's next turn after `messages` ([{"role", "content"}, ...]); yields text pieces
        and ends at the template's end-of-turn token."""
        template = self.chat_template()
        ids = chat_prompt(template, self.tokenizer, messages)
        return self._stream(ids, sorted({*default_stop_ids(self.tokenizer), *chat_stop_ids(template, self.tokenizer)}),
                            **kw)

    def chat(self, messages: list[dict], **kw) -> str:
        return "".join(self.stream_chat(messages, **kw))


def load_for_inference(path: Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                       quantize: str | None = None, group_size: int = 128, native: bool = True,
                       adapter: str | os.PathLike | None = None, head: bool = True) -> tuple[StarCoder2, ModelConfig]:
    """The model as `load` prepares it: cast, a LoRA adapter merged in, optionally quantized
    (streamed: each weight is read, merged, quantized and freed before the next, so peak memory stays
    near the quantized size; `head`: the LM head too, to int8, `quantize_head`), and with the native
    decode kernels where the CPU has them."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    stored = read_quantization_config(path)  # a pre-quantized checkpoint (convert --quantize)
    if stored is not None and quantize not in (None, stored.get("mode")):
        raise CheckpointError(f"{path} is pre-quantized to {stored.get('mode')}: drop --quantize {quantize}, "
                              "or quantize the float checkpoint instead")
    if (quantize is not None or stored is not None) and dt == torch.float32 and fast_bf16(dev):
        dt = torch.bfloat16  # where bf16 is fast, the int kernels take bf16 activations (AVX-512)
    lora = load_adapter(adapter) if adapter is not None else None
    if lora is not None:
        if stored is not None:
            raise CheckpointError(f"{path} is pre-quantized: apply the adapter to the float checkpoint "
                                  "(with --quantize to quantize at load)")
        check_fits(lora, read_config(path))  # before reading gigabytes of weights
    # on CPU the weights go to huge pages: decode streams each one per token (+3-16 % kernel reads, AVX2)
    alloc = HugePageArena() if native and dev.type == "cpu" else None
    empty = alloc.empty if alloc is not None else None
    # an int8 head is quantized from the file a slice of rows at a time: the float matrix (604 MB at
    # 3B in fp32) never whole in memory
    int8_head = head and (quantize is not None or stored is not None)
    head_src = "embed_tokens.weight" if read_config(path).tie_word_embeddings else "lm_head.weight"
    skip_head = (lambda name: name == head_src) if int8_head else (lambda name: False)
    if stored is not None:  # the stored buffers load as they are: no quantization pass
        model, config = load_model(path, dt, dev, prepare=prequantized_layers(stored, dt), alloc=empty,
                                   defer=skip_head)
    elif quantize is None:
        model, config = load_model(path, dt, dev, alloc=empty)
        if lora is not None:
            merge_adapter(model, lora)
    else:
        model, config = load_model(path, dt, dev, defer=lambda n: is_quant_target(n) or skip_head(n), alloc=empty)

        # LoRA targets are all quantized linears: each merges as it streams in, before quantization
        def load_weight(name: str) -> torch.Tensor:
            weight = read_tensor(path, name).to(dev)
            return lora.merged_weight(name, weight) if lora is not None else weight

        quantize_model(model, quantize, group_size=group_size, dtype=dt, load_weight=load_weight,
                       place=alloc.adopt if alloc is not None else None)
    if int8_head:  # pre-quantized files keep the float head, tied or not
        read_head = tensor_reader(path, head_src)  # found once, read a slice of rows at a time
        quantize_head(model, Rows((config.vocab_size, config.hidden_size),
                                  lambda a, b: read_head((a, b)).to(dev, dt), dev))
    if alloc is not None:
        use_native_kernels(model)  # ~2x faster decode than torch's GEMV (AVX-512 bf16, AVX2 fp32/bf16)
        alloc.adopt(model)  # what was built after reading (quantized layers, merged LoRA, int8 head)
    return model, config


def load(path_or_id: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, quantize: str | None = None,
         group_size: int = 128, adapter: str | os.PathLike | None = None) -> LoadedModel:
    """Load a checkpoint (directory, hub id from the local HF cache, or None for the default model).
    dtype: "fp32" | "bf16" | "fp16" (default: bf16 where the hardware multiplies it fast, else fp32); device: "cpu" | "cuda" (default: CUDA when present);
    quantize: None | "int8" | "int4" (weight-only; activations in bf16 where the hardware has fast bf16, else fp32);
    adapter: a LoRA adapter directory (PEFT format), merged into the weights at load."""
    path = resolve(path_or_id) if path_or_id is not None else default_model_path()
    model, config = load_for_inference(path, dtype, device, quantize, group_size, adapter=adapter)
    try:
        tokenizer = Tokenizer.from_dir(path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{config.vocab_size} embeddings")
    return LoadedModel(model, tokenizer, config, path, Path(adapter) if adapter is not None else None)
