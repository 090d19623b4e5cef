"""The OpenAI-compatible request bodies the server accepts, and the one shape every error takes.

Request bodies are allowlists. Every field of OpenAI's chat-completions and completions schemas is
either declared here and honoured, declared as having no effect on a self-hosted server
(``NO_EFFECT``), or refused with a 400 ``unsupported`` naming it when set to anything but its
default (``unsupported_fields``); a field nobody declared is refused the same way, as OpenAI's own
server refuses unknown arguments. vLLM's sampling extras (``top_k``, ``min_p``, ...) are honoured
under vLLM's names and meanings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# OpenAI fields about the platform's own bookkeeping (billing tiers, stored completions, abuse
# monitoring, prompt-cache routing): accepted, and nothing here changes with them.
NO_EFFECT = (
    "user",
    "store",
    "metadata",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The first place in ``value`` holding a lone UTF-16 surrogate (JSON allows ``"\\ud800"``), if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, BaseModel):
        return _lone_surrogate(dict(value), where)
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, where) or _lone_surrogate(item, f"{where}.{key}".lstrip("."))
            if found:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if found := _lone_surrogate(item, f"{where}[{index}]"):
                return found
    return None


class UnicodeText(BaseModel):
    """A request whose every string is valid Unicode: a lone surrogate cannot be tokenized or echoed."""

    @model_validator(mode="after")
    def _no_lone_surrogates(self) -> UnicodeText:
        where = _lone_surrogate(self, "")
        if where is not None:
            raise PydanticCustomError(
                "lone_surrogate", f"{where} holds a lone UTF-16 surrogate (like \\ud800): send valid Unicode"
            )
        return self


class Body(UnicodeText):
    """A request object whose undeclared fields are collected (``model_extra``), then refused."""

    model_config = ConfigDict(extra="allow")

    def unsupported_fields(self, prefix: str = "") -> list[str]:
        """Fields set to something this server does not honour, as dotted paths."""
        refused = [name for name, value in (self.model_extra or {}).items() if value is not None]
        refused += [name for name in self._refused_when_set() if getattr(self, name) not in (None, False)]
        for name in type(self).model_fields:
            value = getattr(self, name)
            children = value if isinstance(value, list) else [value]
            for index, child in enumerate(children):
                if isinstance(child, Body):
                    where = f"{name}.{index}" if isinstance(value, list) else name
                    refused += child.unsupported_fields(f"{where}.")
        return [prefix + name for name in refused]

    def _refused_when_set(self) -> tuple[str, ...]:
        return ()


class StreamOptions(Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI pads chunks; this server does not

    def _refused_when_set(self) -> tuple[str, ...]:
        return ("include_obfuscation",)


class JsonSchemaFormat(Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(Body):
    """What completions and chat share: the model (adapter or base) and the sampling knobs."""

    model: str = Field(description="An adapter name from GET /v1/models, or the base model's id.")
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) to a bias in [-100, 100] added to its logit."
    )
    # Accepted; see NO_EFFECT.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # vLLM's sampling extras (sent in the openai client's ``extra_body``).
    top_k: int = Field(default=0, ge=-1, description="vLLM: keep the k most likely tokens; 0 or -1: off.")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="vLLM: drop tokens below min_p × top.")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0, description="vLLM: 1 is off.")
    min_tokens: int = Field(default=0, ge=0, description="vLLM: no EOS or stop token before this many.")
    ignore_eos: bool = Field(default=False, description="vLLM: EOS does not end the generation.")
    stop_token_ids: list[int] | None = Field(default=None, description="vLLM: token ids that end it.")
    skip_special_tokens: bool = Field(default=True, description="vLLM: leave special tokens out of text.")
    guided_json: dict[str, Any] | str | None = Field(default=None, description="vLLM: a JSON schema.")
    guided_regex: str | None = Field(default=None, description="vLLM: a regular expression.")
    guided_choice: list[str] | None = Field(default=None, description="vLLM: one of these strings.")
    guided_grammar: str | None = Field(default=None, description="vLLM: a GBNF or Lark grammar.")
    response_format: ResponseFormat | None = Field(
        default=None, description="Chat: OpenAI's; completions: vLLM's extra of the same shape."
    )


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids or a list of such lists."
    )
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None

    def _refused_when_set(self) -> tuple[str, ...]:
        refused = ("suffix",) if self.suffix else ()
        return refused + (("best_of",) if self.best_of not in (None, 1) else ())


class TextPart(Body):
    type: Literal["text"]
    text: str


class ContentPart(Body):
    """Any content part; only text ones are served (the app refuses the others by type)."""

    type: str
    text: str | None = None


class FunctionCall(Body):
    name: str
    arguments: str


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None

    def _refused_when_set(self) -> tuple[str, ...]:
        return ("refusal", "audio", "function_call")


class FunctionDefinition(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, min_length=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI fields this server refuses when set (see _refused_when_set).
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    def _refused_when_set(self) -> tuple[str, ...]:
        refused = (
            "audio",
            "prediction",
            "reasoning_effort",
            "verbosity",
            "web_search_options",
            "moderation",
            "functions",
            "function_call",
        )
        return refused + (("modalities",) if self.modalities not in (None, ["text"]) else ())


class AdapterLoadRequest(UnicodeText):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^=\s]+$")
    source: str = Field(min_length=1, description="A store name, a local PEFT folder or REPO_ID[@REV].")


class LoraLoadRequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body; any PEFT family loads through it here."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[^=\s]+$")
    lora_path: str = Field(min_length=1)
    load_inplace: bool = Field(default=False, description="Replacing a loaded adapter is not supported.")


class LoraUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class TokenizeRequest(Body):
    """vLLM's ``POST /tokenize``: a ``prompt``, or chat ``messages`` through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (vLLM)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[StrictInt]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelMetadata(BaseModel):
    kind: Literal["base", "adapter"]
    backend: str | None = Field(
        default=None, description="The base's: the fast runtime or the PEFT fallback."
    )
    method: str | None = Field(default=None, description="The adapter's PEFT family.")
    source: str | None = None
    base_model: str | None = None
    rank: int | None = None
    num_virtual_tokens: int | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int | None = None
    metadata: ModelMetadata


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DeletedModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
