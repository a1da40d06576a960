"""Chat templates: render a conversation exactly as transformers' `apply_chat_template(tokenize=False)`.

    template = load_chat_template("path/to/checkpoint")          # None for a base (completion) model
    text = template.render([{"role": "user", "content": "Write a quicksort"}], add_generation_prompt=True)
    ids = tokenizer.encode(text, allow_special=True)              # the template's special-token text -> ids

A template is Jinja code shipped with the checkpoint: `chat_template.jinja` (and named ones under
`additional_chat_templates/`), which take priority, else `chat_template` in `tokenizer_config.json`
(a string, or a list of `{"name", "template"}`). It runs in the environment transformers builds
(`chat_template_utils._cached_compile_jinja_template`): an ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension, the `{% generation %}` tag (rendered as
its body), `tojson` without HTML escaping, `raise_exception`, `strftime_now`, and `dict`/`namespace`
that refuse underscore names. Templates see `messages` (keys whose value is None dropped, reasoning
aliased as transformers does), `tools`, `documents`, `add_generation_prompt` and the checkpoint's
named special tokens (`bos_token`, `eos_token`, ...) as strings.

`DEFAULT_CHAT_TEMPLATE` is what `--sft` gives a base model: StarCoder2-15B-Instruct's
`### Instruction` / `### Response` turns ending in `<|endoftext|>`, plus optional system text.
Left out: tool-schema generation from Python functions, `continue_final_message`, assistant masks
(finetune/sft.py derives its loss masks from prefix renders instead), and transformers'
opt-in `sanitize_control_tokens` (as in transformers by default, special-token text inside a message
becomes the special token when the rendered text is encoded with `allow_special=True`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from .tokenizer import Tokenizer

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# The named special tokens transformers passes to templates (SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, first = standard
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'system' %}\n"
    "{{ message['content'] + '\\n\\n' }}\n"
    "    {%- elif message['role'] == 'user' %}\n"
    "{{ '### Instruction\\n' + message['content'] + '\\n\\n' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "{{ '### Response\\n' + message['content'] + eos_token + '\\n\\n' }}\n"
    "    {%- else %}\n"
    "{{ raise_exception('Unknown role: ' + message['role']) }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{ '### Response\\n' }}\n"
    "{%- endif %}\n"
)


class ChatTemplateError(ValueError):
    """No usable chat template, or the template refused the conversation (its raise_exception)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A template's source and the special tokens it is rendered with."""

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... -> text

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The conversation as text. kwargs reach the template as variables (they override special tokens)."""
        import jinja2

        if not messages:
            raise ChatTemplateError("the conversation is empty: give at least one message")
        chat = []
        for m in messages:
            if not isinstance(m, dict):
                raise ChatTemplateError(f"a message must be an object with role and content, got {m!r}")
            chat.append(_alias_reasoning({k: _plain(v) for k, v in m.items() if v is not None}))
        try:
            return _compile(self.source).render(messages=chat, tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **{**self.special_tokens, **_plain(kwargs)})
        except (jinja2.TemplateError, TypeError) as e:  # raise_exception(), a sandbox violation, bad data
            raise ChatTemplateError(f"chat template: {e}") from None


def load_chat_template(path: str | Path, name: str | None = None) -> ChatTemplate | None:
    """The checkpoint's chat template (with its special tokens), or None when it ships none.

    name: one of several named templates; default "default" (transformers' rule)."""
    path = Path(path)
    config = _read_json(path / "tokenizer_config.json")
    templates = _template_files(path)
    if not templates:
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates = {"default": raw}
        elif isinstance(raw, list):
            templates = {t["name"]: t["template"] for t in raw}
        elif isinstance(raw, dict):
            templates = dict(raw)
    if not templates:
        return None
    if name is None and len(templates) > 1 and "default" not in templates:
        raise ChatTemplateError(f"{path} has several chat templates and none is named 'default': "
                                f"choose one of {', '.join(sorted(templates))}")
    key = name or ("default" if "default" in templates else next(iter(templates)))
    if key not in templates:
        raise ChatTemplateError(f"{path} has no chat template named {key!r} (it has {', '.join(sorted(templates))})")
    return ChatTemplate(templates[key], special_tokens(path, config))


def find_chat_template(*dirs: str | Path | None) -> ChatTemplate | None:
    """The first template among `dirs` (e.g. an adapter's directory, then its base checkpoint)."""
    for d in dirs:
        if d is not None and (template := load_chat_template(d)) is not None:
            return template
    return None


def no_chat_template(model_name: str) -> ChatTemplateError:
    """The error every chat entry point gives for a base checkpoint."""
    return ChatTemplateError(f"{model_name} has no chat template: it is a base (completion) model; "
                             "use /v1/completions or fine-tune with --sft")


def require_chat_template(path: str | Path, model_name: str | None = None) -> ChatTemplate:
    """load_chat_template, or `no_chat_template` for a base checkpoint."""
    template = load_chat_template(path)
    if template is None:
        raise no_chat_template(model_name or Path(path).name)
    return template


def chat_prompt(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids that ask for the assistant's next turn. The template writes control tokens as text
    (`<|endoftext|>`, `<|im_start|>`), so they are encoded as special tokens, as transformers does."""
    ids = tokenizer.encode(template.render(messages, add_generation_prompt=True), allow_special=True)
    if not ids:
        raise ChatTemplateError("the chat template rendered an empty prompt")
    return ids


def chat_stop_ids(template: ChatTemplate, tokenizer: Tokenizer) -> list[int]:
    """Ids that end the assistant's turn: the template's eos token and the tokenizer's, plus the
    end-of-turn markers of common templates (ChatML's `<|im_end|>`, ...) that this template writes."""
    names = [template.eos_token, tokenizer.eos_token, *(t for t in END_OF_TURN_TOKENS if t in template.source)]
    ids = (tokenizer.token_id(t) for t in names if t)
    return sorted({i for i in ids if i is not None})


def special_tokens(path: Path, config: dict | None = None) -> dict[str, str]:
    """Named special tokens as transformers resolves them: tokenizer_config.json, where a legacy
    special_tokens_map.json overrides it when the config has no `added_tokens_decoder`."""
    config = _read_json(path / "tokenizer_config.json") if config is None else config
    tokens = {k: config[k] for k in SPECIAL_TOKEN_NAMES if k in config}
    if "added_tokens_decoder" not in config:
        legacy = _read_json(path / "special_tokens_map.json")
        tokens.update({k: legacy[k] for k in SPECIAL_TOKEN_NAMES if k in legacy})
    out = {}
    for k, v in tokens.items():
        text = v.get("content") if isinstance(v, dict) else v
        if isinstance(text, str):
            out[k] = text
    return out


def save_chat_template(out_dir: str | Path, source: str) -> None:
    """Set `chat_template` in out_dir/tokenizer_config.json (atomically), as transformers saves it."""
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = _read_json(config_path)
    config["chat_template"] = source
    tmp = config_path.with_name(config_path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(config_path)


# ---- helpers -------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _template_files(path: Path) -> dict[str, str]:
    templates = {}
    if (path / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (path / CHAT_TEMPLATE_DIR).is_dir():
        for f in sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    return templates


def _plain(value: Any) -> Any:
    """Only JSON-like data reaches the sandbox (transformers' `_plain_template_data`, minus numpy)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic messages from the server
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in transformers' sandbox (templates from checkpoints are untrusted code)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for masks; renders its body."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes (<, >, &, '); transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore attributes (no reaching CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from None
