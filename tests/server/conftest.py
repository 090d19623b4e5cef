"""Fixtures of the server tests; the scripted engine is in ../scripted_engine.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripted_engine import ScriptedEngine


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def scripted(tiny_tokenizer) -> ScriptedEngine:
    engine = ScriptedEngine(tiny_tokenizer)
    engine.register("lora-a", "lora")
    engine.register("ia3-b", "ia3")
    return engine


# A Hermes/Qwen-style template (tools listed in a system turn, calls as <tool_call> JSON, results
# as <tool_response>), and a Llama 3.1-style one (JSON calls with "parameters", ipython results).
HERMES_TEMPLATE = """{%- if tools %}<|system|>
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <arguments>}
</tool_call>{{ eos_token }}
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|assistant|>
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}{{ eos_token }}
{% elif message.role == "tool" %}<|user|>
<tool_response>
{{ message.content }}
</tool_response>{{ eos_token }}
{% else %}<|{{ message.role }}|>
{{ message.content }}{{ eos_token }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""

LLAMA3_TEMPLATE = """{%- if tools %}<|system|>
Environment: ipython
Given the following functions, respond with a JSON for a function call with its proper arguments.
Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}{{ eos_token }}
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|assistant|>
{%- for call in message.tool_calls %}
{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments | tojson }}}
{%- endfor %}{{ eos_token }}
{% elif message.role == "tool" %}<|ipython|>
{{ message.content }}{{ eos_token }}
{% else %}<|{{ message.role }}|>
{{ message.content }}{{ eos_token }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""


def write_tool_base(folder: Path, template: str) -> Path:
    """The tiny Llama with a tool-capable chat template; ``<tool_call>`` tags are added (not special)
    tokens, as in Qwen2.5's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapterhub.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<tool_call>", "</tool_call>", "<|ipython|>"])
    tokenizer.chat_template = template
    config = tiny_config("llama")
    config.vocab_size = 576  # room for the added tokens; widths stay multiples of 64
    config.max_position_embeddings = 2048  # tool descriptions are long in a 512-token vocabulary
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hermes_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tool_base(tmp_path_factory.mktemp("hermes-base"), HERMES_TEMPLATE)


@pytest.fixture(scope="session")
def llama3_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tool_base(tmp_path_factory.mktemp("llama3-base"), LLAMA3_TEMPLATE)
