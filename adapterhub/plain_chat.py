"""How a conversation becomes a prompt for a base with no chat template (an encoder-decoder such as
mt0/MT5, or a plain language model): one ``role: content`` line per message, then ``assistant:`` for
the model to continue. ``chat`` uses it for every such base and the server for encoder-decoders."""

from __future__ import annotations


def plain_transcript(messages: list[dict[str, str]]) -> str:
    return "".join(f"{message['role']}: {message['content']}\n" for message in messages) + "assistant:"
