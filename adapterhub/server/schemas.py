"""The OpenAI-compatible request bodies the server accepts, and the one shape every error takes.

Fields OpenAI defines that we cannot honour are refused with a 400 rather than silently ignored;
unknown fields are ignored, as OpenAI's own server does, so newer clients keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: bool = False


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


class SamplingFields(UnicodeText):
    """What completions and chat share: the model (adapter or base) and the sampling knobs."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="An adapter name from GET /v1/models, or the base model's id.")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    logprobs: int | bool | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    def unsupported_fields(self) -> list[str]:
        """OpenAI fields set to something this server cannot honour."""
        used = {
            "logprobs": self.logprobs not in (None, False, 0),
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
        }
        return [name for name, is_used in used.items() if is_used]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids or a list of such lists."
    )
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported_fields(self) -> list[str]:
        used = {"echo": self.echo, "best_of": self.best_of not in (None, 1), "suffix": bool(self.suffix)}
        return super().unsupported_fields() + [name for name, is_used in used.items() if is_used]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class AdapterLoadRequest(UnicodeText):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^=\s]+$")
    source: str = Field(min_length=1, description="A store name, a local PEFT folder or REPO_ID[@REV].")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelMetadata(BaseModel):
    kind: Literal["base", "adapter"]
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
    metadata: ModelMetadata


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DeletedModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
