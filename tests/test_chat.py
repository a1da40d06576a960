"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False)."""

import json
import shutil
from pathlib import Path

import jinja2
import pytest

from starcoder2.api import EMBEDDED_MODEL_DIR
from starcoder2.chat import (DEFAULT_CHAT_TEMPLATE, ChatTemplateError, load_chat_template, require_chat_template,
                             save_chat_template)

# bigcode/starcoder2-15b-instruct-v0.1's tokenizer_config.json `chat_template` (its model card's
# self-alignment format): a fixed preamble, no system role, and always a trailing "### Response".
STARCODER2_INSTRUCT = (
    "{{bos_token}}{{'You are an exceptionally intelligent coding assistant that consistently delivers accurate "
    "and reliable responses to user instructions.\\n\\n'}}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'system' %}\n"
    "        {{ raise_exception('System messages are not allowed in this template.') }}\n"
    "    {%- else %}\n"
    "        {%- if message['role'] == 'user' %}\n"
    "{{'### Instruction\\n' + message['content'] + '\\n\\n'}}\n"
    "        {%- else %}\n"
    "{{'### Response\\n' + message['content'] + eos_token + '\\n\\n'}}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{{'### Response\\n'}}"
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mistral-style: system folded into the first user turn, alternation enforced with raise_exception,
# plus the environment's extras: namespace, loop controls, tojson without HTML escaping, a
# {% generation %} block, a None-valued key dropped, and strftime_now.
STRICT = """{{ bos_token }}
{%- set ns = namespace(system='', count=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] + '\\n\\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message.tool_calls is defined %}{{ raise_exception('tool_calls should have been dropped') }}{% endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first %}
[INST] {{ ns.system + message['content'] }} [/INST]
        {%- else %}
[INST] {{ message['content'] }} [/INST]
        {%- endif %}
    {%- else %}
        {% generation %}{{ message['content'] | trim }}{% endgeneration %}{{ eos_token }}
    {%- endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- if ns.count > 50 %}{% break %}{% endif %}
{%- endfor %}
{{ {'turns': ns.count, 'html': '<a href="x">&</a>'} | tojson }}
{%- if add_generation_prompt %} {{ strftime_now('%Y') }}{% endif %}
"""

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Write a function that reverses a string."}],
    "multi": [
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b\n", "tool_calls": None},
        {"role": "user", "content": "Now <b>subtract</b> & test it, \"quoted\"."},
    ],
}
SYSTEM = [{"role": "system", "content": "You are terse."}, *CONVERSATIONS["multi"]]


def _checkpoint(tmp_path: Path, template=None, *, jinja_file: str | None = None, eos: str | None = None) -> Path:
    """The embedded model's tokenizer files, with a chat template in tokenizer_config.json and/or a file."""
    out = tmp_path / "ckpt"
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    if template is not None:
        config["chat_template"] = template
    if eos is not None:
        config["eos_token"] = {"__type": "AddedToken", "content": eos, "special": True}  # older files
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja_file is not None:
        (out / "chat_template.jinja").write_text(jinja_file)
    return out


def _reference(path: Path, messages, **kw) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).apply_chat_template(messages, tokenize=False, **kw)


@pytest.mark.parametrize("template", ["starcoder2_instruct", "chatml", "strict", "default"])
@pytest.mark.parametrize("conversation", ["single", "multi", "system"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_transformers(tmp_path, template, conversation, add_generation_prompt):
    source = {"starcoder2_instruct": STARCODER2_INSTRUCT, "chatml": CHATML, "strict": STRICT,
              "default": DEFAULT_CHAT_TEMPLATE}[template]
    path = _checkpoint(tmp_path, source)
    messages = SYSTEM if conversation == "system" else CONVERSATIONS[conversation]
    ours = load_chat_template(path)
    try:
        expected = _reference(path, messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:  # the template refused the conversation: so must we, with its message
        assert "System messages are not allowed" in str(e)
        with pytest.raises(ChatTemplateError, match="System messages are not allowed"):
            ours.render(messages, add_generation_prompt=add_generation_prompt)
        return
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_starcoder2_instruct_known_text(tmp_path):
    text = load_chat_template(_checkpoint(tmp_path, STARCODER2_INSTRUCT)).render(CONVERSATIONS["single"])
    assert text == ("<|endoftext|>You are an exceptionally intelligent coding assistant that consistently delivers "
                    "accurate and reliable responses to user instructions.\n\n### Instruction\nWrite a function that "
                    "reverses a string.\n\n### Response\n")


def test_alternation_error_matches_transformers(tmp_path):
    path = _checkpoint(tmp_path, STRICT)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        _reference(path, bad)
    with pytest.raises(ChatTemplateError, match="must alternate"):
        load_chat_template(path).render(bad)


def test_named_templates_and_jinja_file(tmp_path):
    named = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "{{ 'tools' }}"}]
    path = _checkpoint(tmp_path, named)
    assert load_chat_template(path).render(CONVERSATIONS["single"]) == _reference(path, CONVERSATIONS["single"])
    assert load_chat_template(path, name="tool_use").render(CONVERSATIONS["single"]) == "tools"
    with pytest.raises(ChatTemplateError, match="no chat template named 'nope'"):
        load_chat_template(path, name="nope")
    # chat_template.jinja wins over the config entry, as in transformers
    path2 = _checkpoint(tmp_path / "2", CHATML, jinja_file=STARCODER2_INSTRUCT, eos="<fim_pad>")
    ours = load_chat_template(path2)
    assert ours.eos_token == "<fim_pad>"
    assert ours.render(CONVERSATIONS["multi"]) == _reference(path2, CONVERSATIONS["multi"])


def test_sandbox_blocks_escapes(tmp_path):
    path = _checkpoint(tmp_path, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        load_chat_template(path).render(CONVERSATIONS["single"])
    path = _checkpoint(tmp_path / "2", "{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(ChatTemplateError, match="underscore"):
        load_chat_template(path).render(CONVERSATIONS["single"])


def test_base_model_has_no_template():
    assert load_chat_template(EMBEDDED_MODEL_DIR) is None
    with pytest.raises(ChatTemplateError, match="default_model has no chat template: it is a base"):
        require_chat_template(EMBEDDED_MODEL_DIR)


def test_syntax_error_and_empty_conversation(tmp_path):
    path = _checkpoint(tmp_path, "{% for m in messages %}{{ m }")
    with pytest.raises(ChatTemplateError, match="syntax error"):
        load_chat_template(path).render(CONVERSATIONS["single"])
    with pytest.raises(ChatTemplateError, match="empty"):
        load_chat_template(_checkpoint(tmp_path / "2", CHATML)).render([])


def test_saved_template_loads_in_transformers(tmp_path):
    path = _checkpoint(tmp_path)
    save_chat_template(path, DEFAULT_CHAT_TEMPLATE)
    assert load_chat_template(path).source == DEFAULT_CHAT_TEMPLATE
    text = _reference(path, CONVERSATIONS["multi"], add_generation_prompt=True)
    assert text == ("### Instruction\ndef add(a, b):\n\n### Response\n    return a + b\n<|endoftext|>\n\n"
                    "### Instruction\nNow <b>subtract</b> & test it, \"quoted\".\n\n### Response\n")


def test_cli_chat_keeps_history_and_resets(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """`starcoder2 chat` answers turn by turn with the conversation so far; /reset forgets it."""
    import io

    from starcoder2 import load
    from starcoder2.cli import main

    path = tmp_path / "chat-model"
    shutil.copytree(tiny_checkpoint, path)
    save_chat_template(path, DEFAULT_CHAT_TEMPLATE)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nmore\n/reset\nhi\n"))
    assert main(["chat", "--model", str(path), "--dtype", "fp32", "--system", "S", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out.split("\n")
    sc = load(path, dtype="fp32")
    first = sc.chat([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}], max_new_tokens=6)
    second = sc.chat([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": first}, {"role": "user", "content": "more"}], max_new_tokens=6)
    assert "\n".join(out) == f"{first}\n{second}\n{first}\n"


def test_cli_chat_base_model_fails_in_one_line(capsys, monkeypatch):
    import io

    from starcoder2.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no chat template: it is a base (completion) model" in err
