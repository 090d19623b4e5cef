"""Local mode in a pseudo-terminal over the real Engine; answers are checked against plain PEFT."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adapterhub.chat.sanitize import terminal_safe

from .harness import chat_terminal, read_jsonl, run_piped
from .reference import peft_greedy

TOKENS = 12
STATUS = r"\(\w+\) · \d+ tokens · [\d.]+ tok/s"
# Each test starts a chat process that loads torch and the Engine: several seconds apiece.
pytestmark = pytest.mark.slow


def test_switching_adapter_answers_with_that_adapters_greedy_output(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    saved = tmp_path / "chat.jsonl"
    with chat_terminal("--base", "builtin:tiny-llama", "--max-tokens", str(TOKENS)) as chat:
        chat.prompt("base")
        first = chat.say("hello how are you", f"base {STATUS}")
        chat.say(f"/adapter {adapters['lora']}", r"adapter: lora \(lora\)")
        chat.prompt("lora")
        chat.say("tell me about the review", f"lora {STATUS}")
        chat.say(f"/adapter {adapters['prompt']}", r"adapter: prompt \(prompt_tuning\)")
        chat.say("thank you", f"prompt {STATUS}")
        chat.say(f"/save {saved}", "saved 6 messages")
        assert chat.close() == 0
    messages = read_jsonl(saved)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert [m["adapter"] for m in messages[1::2]] == ["base", "lora", "prompt"]
    for turn, folder in ((1, None), (3, adapters["lora"]), (5, adapters["prompt"])):
        assert messages[turn]["content"] == peft_greedy(folder, messages[:turn], TOKENS)
    # The switch is real: the base would have answered the second turn differently.
    assert messages[3]["content"] != peft_greedy(None, messages[:3], TOKENS)
    # On screen as terminal_safe shows it: this random model emits control characters.
    assert terminal_safe(messages[1]["content"]).split()[0] in first


def test_compare_prints_one_panel_per_adapter(adapters: dict[str, Path]) -> None:
    with chat_terminal("--adapter", str(adapters["lora"]), "--max-tokens", "6") as chat:
        chat.prompt("lora")
        chat.say(f"/adapter {adapters['ia3']}", r"adapter: ia3 \(ia3\)")
        listing = chat.say("/adapters", r"\*\s+│\s+ia3\s+│\s+ia3")
        assert re.search(r"│\s+lora\s+│\s+lora\s+│", listing)
        assert re.search(r"│\s+base\s+│\s+base\s+│", listing)
        chat.say("hello", f"ia3 {STATUS}")
        every = chat.say("/compare", r"6 tokens.*\n(?:.*\n)*?.*ia3>")
        two = chat.say("/compare lora", r"6 tokens.*\n(?:.*\n)*?.*ia3>")
        assert chat.close() == 0
    assert panel_titles(every) == {"base (base)", "lora (lora)", "ia3 (ia3)"}
    assert panel_titles(two) == {"base (base)", "lora (lora)"}


def panel_titles(screen: str) -> set[str]:
    return set(re.findall(r"╭─+ (\S+ \(\w+\)) ─+╮", screen))


def test_undo_retry_save_and_load(adapters: dict[str, Path], tmp_path: Path) -> None:
    first, restored = tmp_path / "first.jsonl", tmp_path / "restored.jsonl"
    retried = tmp_path / "retried.jsonl"
    with chat_terminal("--base", "builtin:tiny-llama", "--max-tokens", "8") as chat:
        chat.prompt("base")
        chat.say("hello how are you", f"base {STATUS}")
        chat.say("tell me about the review", f"base {STATUS}")
        chat.say("/undo", "2 messages left")
        chat.say(f"/save {first}", "saved 2 messages")
        chat.say(f"/adapter {adapters['ia3']}", r"adapter: ia3 \(ia3\)")
        chat.say("/retry", f"ia3 {STATUS}")
        chat.say(f"/save {retried}", "saved 2 messages")
        chat.say("/reset", "conversation cleared")
        chat.say(f"/load {first}", "loaded 2 messages")
        chat.say(f"/save {restored}", "saved 2 messages")
        assert chat.close() == 0
    before = read_jsonl(first)
    assert [m["content"] for m in before[:1]] == ["hello how are you"]
    assert before[1]["content"] == peft_greedy(None, before[:1], 8)
    after_retry = read_jsonl(retried)
    assert after_retry[0] == before[0]
    assert after_retry[1] == {
        "role": "assistant",
        "content": peft_greedy(adapters["ia3"], before[:1], 8),
        "adapter": "ia3",
    }
    assert after_retry[1]["content"] != before[1]["content"]
    assert restored.read_bytes() == first.read_bytes()


def test_bad_input_is_reported_and_the_session_goes_on(adapters: dict[str, Path], tmp_path: Path) -> None:
    good, kept = tmp_path / "good.jsonl", tmp_path / "kept.jsonl"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"role": "user", "content": "hi"}\n{"role": "robot", "content": "beep"}\n')
    with chat_terminal("--base", "builtin:tiny-llama", "--max-tokens", "4") as chat:
        chat.prompt("base")
        chat.say("/undo", "nothing to undo: the conversation is empty")
        chat.say("/frobnicate now", r"unknown command '/frobnicate': /help lists the commands")
        chat.say("/adapter no-such-adapter", r"no adapter named 'no-such-adapter'")
        chat.say("/set temperature=hot", r"temperature must be a number from 0 to 2, not 'hot'")
        chat.say("/set top_k=3", r"cannot set 'top_k=3'")
        chat.say("hello", f"base {STATUS}")
        chat.say(f"/save {good}", "saved 2 messages")
        chat.say(f"/load {broken}", rf"transcript {broken} line 2 needs a role of system, user, assistant")
        chat.say(f"/load {tmp_path / 'missing.jsonl'}", "cannot read transcript")
        chat.say(f"/save {kept}", "saved 2 messages")
        assert chat.close() == 0
    assert kept.read_bytes() == good.read_bytes()


def test_piped_question_is_answered_once_with_the_adapters_base(adapters: dict[str, Path]) -> None:
    system = "you are a helpful assistant"
    done = run_piped(
        "--adapter",
        str(adapters["lora"]),
        "--system",
        system,
        "--max-tokens",
        "10",
        stdin="hello how are you\n",
    )
    assert done.returncode == 0, done.stderr
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hello how are you"}]
    assert done.stdout == peft_greedy(adapters["lora"], messages, 10) + "\n"
