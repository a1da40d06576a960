"""Request bodies of the four wire APIs (shapes: shared/reference/apis.md), as pydantic models.

Every model ignores unknown fields (editors send options meant for other servers) and is strict
about the types of the fields it knows: `"max_tokens": "16"` is an error, not 16. Fields that are
accepted for compatibility but have no effect say so in a comment. Limits are named constants.
Responses are plain dicts built in the route modules: their shapes follow apis.md field by field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

MAX_N = 16  # choices per prompt (OpenAI `n`)
MAX_STOP = 32  # stop strings per request (OpenAI allows 4; Continue sends 7 for StarCoder)
MAX_LOGPROBS = 5  # OpenAI's limit; also TGI `top_n_tokens` and llama.cpp `n_probs`


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# ---- OpenAI ----------------------------------------------------------------------------------------

class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Body):
    """OpenAI `POST /v1/completions` (legacy completions). `suffix` present: the server renders the
    StarCoder2 FIM prompt `<fim_prefix>{prompt}<fim_suffix>{suffix}<fim_middle>`, with both texts
    taken as plain user text. `suffix` absent: `prompt` is raw, special-token text becomes tokens."""

    model: str | None = None  # echoed back; any name is served by the one loaded model
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # None: 16, as OpenAI
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1.0; 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extension
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1)  # only best_of == n (or null) is served
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, no effect (Tabby sends 0.5)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, no effect
    logit_bias: dict[str, float] | None = None  # only empty or null
    seed: int | None = None
    user: str | None = None  # opaque, unused
    # llm-ls sends its TGI-shaped default body to OpenAI servers too: its `max_new_tokens`, `stop`,
    # `temperature` and `top_p` apply where the top-level field is absent.
    parameters: dict[str, Any] | None = None


# ---- Tabby -----------------------------------------------------------------------------------------

class TabbySnippet(_Body):
    filepath: str = ""
    body: str
    score: float | None = None  # the client ranked them already


class TabbySegments(_Body):
    prefix: str
    suffix: str | None = None
    filepath: str | None = None
    git_url: str | None = None  # its last path part becomes the <repo_name>
    declarations: list[TabbySnippet] | None = None
    relevant_snippets_from_changed_files: list[TabbySnippet] | None = None
    relevant_snippets_from_recently_opened_files: list[TabbySnippet] | None = None
    clipboard: str | None = None  # not used in the prompt


class TabbyDebugOptions(_Body):
    raw_prompt: str | None = None  # bypasses prompt building; special-token text becomes tokens
    return_snippets: bool = False
    return_prompt: bool = False
    disable_retrieval_augmented_code_completion: bool = False


class TabbyCompletionRequest(_Body):
    """Tabby's own `POST /v1/completions` (what Tabby's IDE extensions send to a Tabby server)."""

    language: str | None = None
    segments: TabbySegments
    user: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    mode: str | None = None  # "standard" only
    debug_options: TabbyDebugOptions | None = None


class TabbyEvent(_Body):
    """Tabby's `POST /v1/events` (acceptance telemetry); counted in /metrics, otherwise dropped."""

    type: Literal["view", "select", "dismiss"]
    completion_id: str
    choice_index: int = 0
    view_id: str | None = None
    elapsed: int | None = None


def _completion_kind(body: Any) -> str:
    """The rule that tells the two `/v1/completions` bodies apart: a JSON object with a `segments`
    key is Tabby's request; anything else is OpenAI's (which has no `segments` field)."""
    return "tabby" if isinstance(body, dict) and "segments" in body else "openai"


AnyCompletionRequest = Annotated[
    Annotated[CompletionRequest, Tag("openai")] | Annotated[TabbyCompletionRequest, Tag("tabby")],
    Discriminator(_completion_kind),
]


# ---- TGI -------------------------------------------------------------------------------------------

class GenerateParameters(_Body):
    max_new_tokens: int | None = Field(None, ge=0)  # None: up to the context
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    do_sample: bool = False  # sampling is also implied by temperature/top_p/top_k, as in TGI
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = None  # accepted, no effect
    typical_p: float | None = None  # accepted, no effect
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    return_full_text: bool | None = None
    seed: int | None = Field(None, ge=0)
    truncate: int | None = Field(None, ge=1)  # keep only the last N input tokens
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)  # only 1
    watermark: bool = False  # only false
    grammar: dict[str, Any] | None = None  # only null
    adapter_id: str | None = None  # accepted, no effect


class GenerateRequest(_Body):
    """TGI `POST /generate`, `/generate_stream` and `/` (the last one reads `stream`)."""

    inputs: str = Field(min_length=1)  # TGI's rule: empty inputs are a validation error
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


# ---- llama.cpp -------------------------------------------------------------------------------------

class LlamaCompletionRequest(_Body):
    """llama.cpp `POST /completion`; its defaults are llama.cpp's."""

    prompt: str | list[int] = ""
    n_predict: int = Field(-1, ge=-1)  # -1: up to the context; 0: prefill only (warms the prefix cache)
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1 or <= 0: off
    min_p: float | None = None  # accepted, no effect
    repeat_penalty: float = Field(1.0, gt=0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    stream: bool = False
    cache_prompt: bool = True  # the server's prefix cache is always on when it has one
    seed: int = -1  # -1: random
    n_probs: int = Field(0, ge=0, le=MAX_LOGPROBS)
    # Sampler order; only membership matters here: "top_k", "top_p", "temperature" (also as the
    # letters "k", "p", "t" in a string), "penalties"; others (min_p, infill, ...) are ignored.
    samplers: list[str] | str | None = None
    n_indent: int = Field(0, ge=0)
    t_max_predict_ms: int = 0  # <= 0: no limit
    t_max_prompt_ms: int | None = None  # accepted, no effect
    id_slot: int | None = None  # accepted, no effect
    response_fields: list[str] | None = None


class InfillExtra(_Body):
    filename: str = ""
    text: str


class InfillRequest(LlamaCompletionRequest):
    """llama.cpp `POST /infill`: `input_extra` chunks go first (stable, so the prefix cache hits),
    rendered as StarCoder2 repository files; `prompt` is appended to `input_prefix`."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillExtra] = Field(default_factory=list)


# ---- utilities -------------------------------------------------------------------------------------

class TokenizeRequest(_Body):
    """llama.cpp's `{"content"}` (answer `{"tokens"}`) or TGI's `{"inputs"}` (answer a token list)."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["content"]}, {"required": ["inputs"]}]})

    content: str | None = None
    inputs: str | None = None
    parse_special: bool = True  # a raw prompt's rule: special-token text becomes special tokens
    add_special: bool = False  # accepted: StarCoder2 adds no BOS
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]
