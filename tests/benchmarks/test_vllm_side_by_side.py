"""The vLLM side-by-side script's own logic: fair server settings, the exactness check, paired ratios.

vLLM itself is not installed in CI (it lives in its own venv), so no server starts here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm_side_by_side.py"


@pytest.fixture(scope="module")
def sbs():
    spec = importlib.util.spec_from_file_location("vllm_side_by_side", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_both_servers_get_the_same_limits_and_threads(sbs) -> None:
    limits = sbs.Limits(threads=2, max_batch=32, max_context=512, adapter_slots=3, max_lora_rank=12)
    adapters = {"a": Path("/x/a"), "b": Path("/x/b")}
    hub = sbs.adapterhub_server("python3", Path("/base"), adapters, 9001, limits)
    vllm = sbs.vllm_server("/venv/bin/python", Path("/base"), adapters, 9002, limits)

    def flag(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    assert flag(hub, "--adapters") == "a=/x/a,b=/x/b" and flag(hub, "--max-adapters") == "3"
    assert vllm[vllm.index("--lora-modules") + 1 : vllm.index("--lora-modules") + 3] == ["a=/x/a", "b=/x/b"]
    assert flag(vllm, "--max-loras") == "3" and flag(vllm, "--max-num-seqs") == "32"
    assert flag(vllm, "--max-model-len") == "512" and flag(vllm, "--dtype") == "float32"
    assert flag(vllm, "--max-lora-rank") == "16"  # the smallest value vLLM allows that holds rank 12
    assert "--no-enable-prefix-caching" in vllm

    env = sbs.vllm_env(2, [3, 1, 2], ["/lib/tcmalloc.so"])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1,2" and env["LD_PRELOAD"] == "/lib/tcmalloc.so"
    assert env["OMP_NUM_THREADS"] == sbs.thread_env(2)["OMP_NUM_THREADS"] == "2"
    with pytest.raises(click.BadParameter, match="3 threads on 2 cores"):
        sbs.vllm_env(3, [0, 1], [])


def test_ranks_cycle_and_vllm_rank_is_an_allowed_value(sbs) -> None:
    assert sbs.adapter_ranks(5, [8, 16]) == [8, 16, 8, 16, 8]
    assert [sbs.vllm_lora_rank(rank) for rank in (1, 8, 9, 64, 65)] == [1, 8, 16, 64, 128]


def test_a_choice_is_exact_only_with_peft_tokens(sbs) -> None:
    ids, logprobs, pieces = [5, 9], [-0.5, -1.25], ["a", "\ufffd"]

    def choice(tokens: list[str], served: list[float], token_ids: list[int] | None = None) -> dict:
        text = "".join(tokens)
        body = {"text": text, "logprobs": {"tokens": tokens, "token_logprobs": served}}
        return body if token_ids is None else {**body, "token_ids": token_ids}

    by_text = sbs.compare_choice(choice(pieces, [-0.5, -1.2501]), ids, logprobs, pieces, "a\ufffd")
    assert by_text["tokens_equal"] and by_text["checked"] == "token texts and logprobs"
    # Another partial-byte token reads "\ufffd" too: its logprob gives it away.
    other = sbs.compare_choice(choice(pieces, [-0.5, -3.0]), ids, logprobs, pieces, "a\ufffd")
    assert not other["tokens_equal"] and other["max_abs_logprob_diff"] == pytest.approx(1.75)
    # vLLM returns ids; its text holds back a trailing incomplete UTF-8 character.
    by_ids = sbs.compare_choice(choice(["a", ""], [-0.5, -3.0], [5, 9]), ids, logprobs, pieces, "a\ufffd")
    assert by_ids["tokens_equal"] and by_ids["checked"] == "token ids" and not by_ids["text_equal"]
    short = sbs.compare_choice(choice(["a"], [-0.5]), ids, logprobs, pieces, "a\ufffd")
    assert not short["tokens_equal"]
    summary = sbs.summarize_exactness({"m": [by_text, other]})
    assert summary["m"]["exact"] is False and summary["m"]["prompts"] == 2


def test_a_choice_may_part_from_peft_only_at_a_tie(sbs) -> None:
    ids, logprobs, pieces = [5, 9, 4], [-0.5, -1.0, -0.7], ["a", "b", "c"]
    ties = [[], [(7, "x", -1.0004)], []]  # PEFT's logprobs tie "x" to its choice "b" at position 1
    served = {"text": "axz", "logprobs": {"tokens": ["a", "x", "z"], "token_logprobs": [-0.5, -1.0004, -2.0]}}
    tie = sbs.compare_choice(served, ids, logprobs, pieces, "abc", ties)
    assert tie["exact"] and tie["tie_at"] == 1 and not tie["tokens_equal"]
    assert tie["max_abs_logprob_diff"] == pytest.approx(0.0)  # nothing after the tie is compared
    assert sbs.compare_choice({**served, "token_ids": [5, 7, 1]}, ids, logprobs, pieces, "abc", ties)["exact"]
    # Without a tie in PEFT's logprobs there, the same parting is not exact ...
    assert not sbs.compare_choice(served, ids, logprobs, pieces, "abc", [[], [], []])["exact"]
    # ... nor is the tied token served with a logprob that is not PEFT's.
    off = {**served, "logprobs": {"tokens": ["a", "x", "z"], "token_logprobs": [-0.5, -1.5, -2.0]}}
    assert not sbs.compare_choice(off, ids, logprobs, pieces, "abc", ties)["exact"]
    summary = sbs.summarize_exactness({"m": [tie]})
    assert summary["m"]["exact"] is True and summary["m"]["ties_taken"] == 1


def test_paired_ratio_is_the_median_of_each_pairs_ratio(sbs) -> None:
    runs = [
        {"pair": 1, "server": "vllm", "http_tok_s": 100.0},
        {"pair": 1, "server": "adapterhub", "http_tok_s": 150.0},
        {"pair": 0, "server": "adapterhub", "http_tok_s": 120.0},
        {"pair": 0, "server": "vllm", "http_tok_s": 100.0},
        {"pair": 2, "server": "adapterhub", "http_tok_s": 50.0},
        {"pair": 2, "server": "vllm", "http_tok_s": 100.0},
    ]
    assert sbs.paired_ratio(runs, "adapterhub", "vllm") == (1.2, [1.2, 1.5, 0.5])
    assert [sbs.pair_order(pair) for pair in (0, 1)] == [("adapterhub", "vllm"), ("vllm", "adapterhub")]
