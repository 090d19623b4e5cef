from __future__ import annotations

import io

from rich.console import Console

from adapterhub.chat.backends import AdapterEntry
from adapterhub.chat.view import Reply, render


def drawn(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text().splitlines()


def test_compare_panels_wrap_into_rows_that_fit() -> None:
    replies = [
        Reply(
            AdapterEntry(f"a{i}", "lora"), text=f"answer **{i}**", completion_tokens=2, finish_reason="stop"
        )
        for i in range(5)
    ]
    lines = drawn(render(replies, side_by_side=True, final=True, per_row=3), width=130)
    title_rows = [line for line in lines if "(lora)" in line]
    assert [row.count("(lora)") for row in title_rows] == [3, 2]
    text = "\n".join(lines)
    assert all(f"answer {i}" in text for i in range(5))  # Markdown: the asterisks became bold


def test_status_names_adapter_method_and_speed() -> None:
    reply = Reply(AdapterEntry("lora-a", "lora"), completion_tokens=12, finish_reason="length", seconds=0.5)
    assert reply.status() == "lora-a (lora) · 12 tokens · 24.0 tok/s · hit max_tokens"
    reply.stop()
    assert reply.status().endswith("· stopped")


def test_a_length_stop_says_whether_max_tokens_or_the_context_ran_out() -> None:
    lora = AdapterEntry("lora-a", "lora")
    hit_limit = Reply(lora, completion_tokens=12, max_tokens=12, prompt_tokens=30, finish_reason="length")
    assert hit_limit.status().endswith("· hit max_tokens (12)")
    context_full = Reply(lora, completion_tokens=5, max_tokens=64, prompt_tokens=123, finish_reason="length")
    assert context_full.status().endswith(
        "· context full (123 prompt + 5 reply tokens): /undo or /reset to make room"
    )
    unknown_prompt = Reply(lora, completion_tokens=5, max_tokens=64, finish_reason="length")
    assert "context full: /undo" in unknown_prompt.status()
