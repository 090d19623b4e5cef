"""Chat prompts with tools, and tool calls parsed back out of the generated text.

Tools are rendered by the base's own chat template (``apply_chat_template(..., tools=...)``); what a
model writes to call one depends on the format its template teaches, so each supported format is
one ``ToolFormat``, found from the template's text:

- ``hermes`` (Hermes 2 Pro, Qwen 2/2.5/3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
- ``llama3_json`` (Llama 3.1–3.3): ``{"name": ..., "parameters": {...}}``, optionally after
  ``<|python_tag|>``, several joined by ``; ``.

``tool_choice: required`` or a named function is enforced by a grammar in the format's own syntax
(one ``%json`` schema per allowed function), so the model writes what its template taught it.
Parsing follows vLLM's ``hermes`` and ``llama3_json`` tool parsers.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from adapterhub.plain_chat import plain_transcript
from adapterhub.runtime.api import GrammarSpec
from adapterhub.runtime.grammar import JSON_OPTIONS
from adapterhub.server.errors import ApiError
from adapterhub.server.schemas import ChatCompletionRequest, ChatMessage


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI's tool_calls carry it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


class ToolFormat:
    """One way of writing tool calls: how to recognize its template, constrain it, and parse it."""

    name = ""

    def matches(self, template: str) -> bool:
        raise NotImplementedError

    def call_rule(self, index: int, name: str, parameters: dict[str, Any]) -> str:
        """A Lark rule ``f{index}`` matching one call of function ``name``."""
        raise NotImplementedError

    def grammar(self, functions: list[tuple[str, dict[str, Any]]], parallel: bool) -> GrammarSpec:
        rules = [self.call_rule(i, name, parameters) for i, (name, parameters) in enumerate(functions)]
        call = " | ".join(f"f{i}" for i in range(len(functions)))
        repeat = f" ({json.dumps(self.separator)} call)*" if parallel else ""
        head = f"start: call{repeat}\ncall: {self.open_json()}({call}){self.close_json()}\n"
        return GrammarSpec("lark", head + "\n".join(rules))

    separator = "\n"

    def open_json(self) -> str:
        return ""

    def close_json(self) -> str:
        return ""

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a whole generation; no calls when it holds none (or any is malformed)."""
        raise NotImplementedError

    def holds_back(self, text: str, sent: int) -> int:
        """How many characters at the end of the streamed ``text`` (``sent`` of them sent already)
        may belong to a tool call: the stream sends content up to there and keeps the rest."""
        raise NotImplementedError


def _schema(properties: dict[str, Any], required: list[str]) -> str:
    schema = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
        "x-guidance": JSON_OPTIONS,
    }
    return json.dumps(schema)


def _parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    return parameters if parameters else {"type": "object"}


class Hermes(ToolFormat):
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    pattern = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def matches(self, template: str) -> bool:
        return self.start in template

    def open_json(self) -> str:
        return json.dumps(self.start + "\n") + " "

    def close_json(self) -> str:
        return " " + json.dumps("\n" + self.end)

    def call_rule(self, index: int, name: str, parameters: dict[str, Any]) -> str:
        schema = _schema(
            {"name": {"const": name}, "arguments": _parameters(parameters)}, ["name", "arguments"]
        )
        return f"f{index}: %json {schema}"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.start not in text:
            return text, []
        try:
            calls = []
            for closed, unclosed in self.pattern.findall(text):
                call = json.loads(closed or unclosed)
                calls.append(ParsedCall(call["name"], json.dumps(call["arguments"], ensure_ascii=False)))
        except (ValueError, KeyError, TypeError):
            return text, []
        content = text[: text.index(self.start)]
        return content or None, calls

    def holds_back(self, text: str, sent: int) -> int:
        unsent = text[sent:]
        if self.start in unsent:
            return len(unsent) - unsent.index(self.start)
        return _partial_overlap(unsent, self.start)


class Llama3Json(ToolFormat):
    name = "llama3_json"
    tag = "<|python_tag|>"
    separator = "; "

    def matches(self, template: str) -> bool:
        return self.tag in template or "ipython" in template

    def call_rule(self, index: int, name: str, parameters: dict[str, Any]) -> str:
        schema = _schema(
            {"name": {"const": name}, "parameters": _parameters(parameters)}, ["name", "parameters"]
        )
        return f"f{index}: %json {schema}"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        body = body.removeprefix(self.tag).lstrip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, at = json.JSONDecoder(), [], 0
        try:
            while at < len(body):
                call, end = decoder.raw_decode(body, at)
                arguments = call["arguments"] if "arguments" in call else call["parameters"]
                calls.append(ParsedCall(call["name"], json.dumps(arguments, ensure_ascii=False)))
                at = end
                while at < len(body) and body[at] in "; \n":
                    at += 1
        except (ValueError, KeyError, TypeError):
            return text, []
        return None, calls

    def holds_back(self, text: str, sent: int) -> int:
        """A Llama 3 message is a tool call only if it starts as one: hold it all back until the
        first character shows which."""
        stripped = text.lstrip()
        if sent or not (stripped.startswith(("{", self.tag)) or self.tag.startswith(stripped)):
            return 0
        return len(text) - sent


def _partial_overlap(text: str, tag: str) -> int:
    """Length of the longest proper prefix of ``tag`` that ends ``text``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


FORMATS: tuple[ToolFormat, ...] = (Hermes(), Llama3Json())


def template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    return template


@dataclass
class ToolPlan:
    """How one chat request uses tools: the format to parse, the grammar that enforces the choice."""

    format: ToolFormat
    grammar: GrammarSpec | None
    named: bool  # a named function: OpenAI ends such a message with finish_reason "stop"


def plan_tools(body: ChatCompletionRequest, tokenizer: Any, model: str) -> ToolPlan | None:
    """None when no tool can be called (no tools, or ``tool_choice: none``)."""
    choice = body.tool_choice
    if body.tools is None:
        if choice not in (None, "none"):
            raise ApiError(
                400, "tool_choice needs tools: send the tools it chooses from", "invalid_value", "tool_choice"
            )
        return None
    if choice == "none":
        return None
    template = template_text(tokenizer)
    found = next((fmt for fmt in FORMATS if fmt.matches(template)), None)
    if found is None:
        parsed = ", ".join(fmt.name for fmt in FORMATS)
        message = (
            f"model '{model}' has a chat template with no tool-call format this server parses ({parsed}): "
            "serve a tool-capable base such as Qwen2.5 or Llama 3.1"
        )
        raise ApiError(400, message, "tools_unsupported", "tools")
    functions = [(tool.function.name, _parameters(tool.function.parameters)) for tool in body.tools]
    named = not isinstance(choice, str) and choice is not None
    if named:
        wanted = choice.function.name
        functions = [(name, parameters) for name, parameters in functions if name == wanted]
        if not functions:
            message = f"tool_choice names function '{wanted}', which is not among the tools"
            raise ApiError(400, message, "invalid_value", "tool_choice")
    grammar = None
    if choice == "required" or named:
        grammar = found.grammar(functions, parallel=body.parallel_tool_calls is not False and not named)
    return ToolPlan(found, grammar, named)


def render(
    tokenizer: Any,
    messages: list[ChatMessage],
    tools: list[dict[str, Any]] | None,
    model: str,
    *,
    plain: bool = False,
) -> list[int]:
    """The prompt token ids of a conversation through the base's chat template, tools included.

    ``plain``: a base without a template (an encoder-decoder) gets ``plain_chat``'s transcript.
    """
    conversation = [template_message(message) for message in messages]
    if not template_text(tokenizer):
        if plain and not tools:
            return list(tokenizer(plain_transcript(conversation))["input_ids"])
        raise ApiError(
            400, f"base model '{model}' has no chat template: use /v1/completions", "no_chat_template"
        )
    try:
        if tools:
            plain = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            with_tools = tokenizer.apply_chat_template(
                conversation, tools=tools, add_generation_prompt=True, tokenize=False
            )
            if plain == with_tools:
                message = (
                    f"model '{model}' has a chat template that does not render tools: "
                    "serve a tool-capable base"
                )
                raise ApiError(400, message, "tools_unsupported", "tools")
        encoded = tokenizer.apply_chat_template(
            conversation, tools=tools or None, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except ApiError:
        raise
    except Exception as err:  # the template itself raises on conversations it does not accept
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ApiError(
            400, f"messages rejected by the chat template: {first}", "bad_messages", "messages"
        ) from err
    return list(encoded["input_ids"])


def template_message(message: ChatMessage) -> dict[str, Any]:
    """One OpenAI message as chat templates read it: text content, and tool-call arguments as
    objects rather than JSON strings (as vLLM hands them to templates)."""
    entry: dict[str, Any] = {"role": message.role, "content": message_text(message)}
    if message.name is not None:
        entry["name"] = message.name
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                message_ = f"tool call {call.id} has arguments that are not JSON"
                raise ApiError(400, message_, "invalid_value", "messages") from None
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments},
                }
            )
        entry["tool_calls"] = calls
    return entry


def message_text(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content)


class ToolCallStream:
    """Splits one streamed generation into content deltas and, at its end, the parsed tool calls."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        """The content that can be sent now."""
        self.text += delta
        if self.plan.grammar is not None:
            return ""  # the grammar forces tool calls from the first token
        sendable = max(len(self.text) - self.plan.format.holds_back(self.text, self.sent), self.sent)
        content, self.sent = self.text[self.sent : sendable], sendable
        return content

    def finish(self, text: str) -> tuple[str, list[ParsedCall]]:
        """(content not sent yet, tool calls) once the whole ``text`` is known."""
        content, calls = self.plan.format.parse(text)
        if calls:
            unsent = (content or "")[self.sent :]
            return unsent, calls
        return text[self.sent :], []
