"""Generation: sampling, limits, stop strings, EOS, streaming, cancel, continuous batching, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adapterhub.runtime.api import GenerationRequest, RequestError, SamplingParams
from adapterhub.runtime.engine import Engine

from .references import ADAPTERS, PROMPTS, greedy, make_engine


def _sampled(prompt: str, seed: int | None, adapter: str | None = None, **params) -> GenerationRequest:
    settings = dict(max_tokens=12, temperature=1.0, seed=seed) | params
    return GenerationRequest(prompt, adapter=adapter, params=SamplingParams(**settings))


def test_seeded_sampling_is_reproducible_and_independent_of_batch_companions(engine: Engine) -> None:
    alone = engine.generate(_sampled(PROMPTS[0], seed=7, adapter="lora")).token_ids
    handles = [engine.submit(_sampled(PROMPTS[1], seed=None)) for _ in range(3)]
    with_others = engine.generate(_sampled(PROMPTS[0], seed=7, adapter="lora")).token_ids
    for handle in handles:
        handle.result(timeout=60)
    other_seed = engine.generate(_sampled(PROMPTS[0], seed=8, adapter="lora")).token_ids
    assert alone == with_others
    assert alone != other_seed


def test_top_k_one_and_tiny_top_p_reduce_sampling_to_greedy(engine: Engine) -> None:
    want = engine.generate(greedy(PROMPTS[2], "ia3", max_tokens=12)).token_ids
    assert engine.generate(_sampled(PROMPTS[2], seed=1, adapter="ia3", top_k=1)).token_ids == want
    assert engine.generate(_sampled(PROMPTS[2], seed=2, adapter="ia3", top_p=1e-6)).token_ids == want
    assert engine.generate(_sampled(PROMPTS[2], seed=3, adapter="ia3", temperature=5.0)).token_ids != want


def test_max_tokens_ends_with_length(engine: Engine) -> None:
    result = engine.generate(greedy(PROMPTS[1], "prefix", max_tokens=5))
    assert (result.completion_tokens, result.finish_reason) == (5, "length")
    assert result.prompt_tokens == len(engine.tokenizer(PROMPTS[1])["input_ids"])


def test_stop_string_cuts_text_and_streamed_deltas_add_up(engine: Engine) -> None:
    full = engine.generate(greedy(PROMPTS[0], "ptune", max_tokens=16)).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    deltas: list[str] = []
    request = greedy(PROMPTS[0], "ptune", max_tokens=16, on_token=lambda token, delta: deltas.append(delta))
    request.params = SamplingParams(max_tokens=16, stop=(stop,))
    result = engine.generate(request)
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert "".join(deltas) == result.text
    assert len(deltas) == result.completion_tokens


def test_eos_ends_with_stop(engine: Engine) -> None:
    first = engine.generate(greedy(PROMPTS[1], max_tokens=3)).token_ids
    saved = engine.eos_ids
    engine.eos_ids = {first[1]}
    try:
        result = engine.generate(greedy(PROMPTS[1], max_tokens=8))
    finally:
        engine.eos_ids = saved
    assert (result.token_ids, result.finish_reason) == (first[:2], "stop")


def test_cancel_leaves_the_batch_and_others_are_unaffected(engine: Engine) -> None:
    want = engine.generate(greedy(PROMPTS[2], "lora_rs", max_tokens=12)).token_ids
    handles: list = []

    def cancel_after_three(token: int, delta: str) -> None:
        if len(seen) == 2:
            handles[0].cancel()
        seen.append(token)

    seen: list[int] = []
    handles.append(engine.submit(greedy(PROMPTS[0], "prompt", max_tokens=12, on_token=cancel_after_three)))
    handles.append(engine.submit(greedy(PROMPTS[2], "lora_rs", max_tokens=12)))
    engine.start()
    try:
        cancelled, other = (handle.result(timeout=60) for handle in handles)
    finally:
        engine.stop()
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.completion_tokens == 3
    assert other.token_ids == want


@pytest.mark.parametrize("static_decode", ["off", "on"])
def test_requests_join_and_leave_between_decode_steps(
    adapter_dirs: dict[str, Path], static_decode: str
) -> None:
    engine = make_engine(adapter_dirs, static_decode=static_decode)
    want = {name: engine.generate(greedy(PROMPTS[0], name, max_tokens=12)).token_ids for name in ADAPTERS}
    joined = threading.Event()
    late: dict[str, object] = {}

    def join_midway(token: int, delta: str) -> None:
        if not joined.is_set():
            joined.set()
            late.update({name: engine.submit(greedy(PROMPTS[0], name, max_tokens=12)) for name in ADAPTERS})

    engine.start()
    try:
        first = engine.submit(greedy(PROMPTS[0], "lora", max_tokens=12, on_token=join_midway))
        assert first.result(timeout=60).token_ids == want["lora"]
        assert {name: handle.result(timeout=60).token_ids for name, handle in late.items()} == want
    finally:
        engine.stop()


def test_many_producer_threads_feed_one_loop(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(adapter_dirs, max_batch_size=6)
    names = [None, *ADAPTERS]
    want = {(n, p): engine.generate(greedy(p, n, max_tokens=6)).token_ids for n in names for p in PROMPTS[:2]}
    results: dict = {}
    errors: list[BaseException] = []

    def produce(name: str | None) -> None:
        try:
            for prompt in PROMPTS[:2]:
                results[(name, prompt)] = engine.generate(greedy(prompt, name, max_tokens=6)).token_ids
        except BaseException as err:
            errors.append(err)

    engine.start()
    threads = [threading.Thread(target=produce, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    engine.stop()
    assert not errors
    assert results == want


def test_bad_parameters_and_a_full_queue_are_refused_and_stop_finishes_queued_work(
    adapter_dirs: dict[str, Path],
) -> None:
    engine = make_engine(adapter_dirs, max_queue=1)
    for params in (SamplingParams(max_tokens=0), SamplingParams(temperature=-1), SamplingParams(top_p=0)):
        with pytest.raises(RequestError) as bad:
            engine.submit(GenerationRequest(PROMPTS[0], params=params))
        assert bad.value.code == "bad_request"
    want = engine.generate(greedy(PROMPTS[0])).token_ids
    queued = engine.submit(greedy(PROMPTS[0]))
    with pytest.raises(RequestError) as full:
        engine.submit(greedy(PROMPTS[0]))
    assert full.value.code == "overloaded"
    engine.stop(grace_s=30)
    assert queued.result(timeout=1).token_ids == want
    assert engine.generate(greedy(PROMPTS[0])).token_ids == want


def test_generation_stops_at_the_context_limit(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(adapter_dirs, max_context=48)
    prompt_ids = engine.tokenizer(PROMPTS[2])["input_ids"]
    result = engine.generate(greedy(prompt_ids, "prefix", max_tokens=100))
    assert result.finish_reason == "length"
    assert len(prompt_ids) + 3 + result.completion_tokens == 48 + 1


def test_streamed_text_of_multibyte_characters_is_whole_and_adds_up(engine: Engine) -> None:
    """Byte-level tokens split characters; no delta may carry a half character (U+FFFD)."""
    text = "héllo wörld ✓ 日本語 🙂 done"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas: list[str] = []
    handle = engine.submit(
        greedy([5], max_tokens=len(ids), on_token=lambda token, delta: deltas.append(delta))
    )
    for token in ids:
        handle.accept(token, None, engine.tokenizer.decode, eos_ids=set(), room=len(ids) + 1)
    handle.cancel()
    assert handle.result().text == text == "".join(deltas)
    assert not any("\ufffd" in delta for delta in deltas)
    assert len(deltas) == len(ids) > len(text.split())


def test_top_k_and_top_p_keep_samples_inside_the_allowed_set(engine: Engine) -> None:
    logits = engine.score([greedy(PROMPTS[1], "ptune")])[0]
    probs = logits.softmax(-1)
    top_two = set(probs.topk(2).indices.tolist())
    nucleus = probs.sort(descending=True)
    cut = int((nucleus.values.cumsum(0) < 0.5).sum()) + 1
    within_half = set(nucleus.indices[:cut].tolist())
    firsts_k = {
        engine.generate(_sampled(PROMPTS[1], seed=s, adapter="ptune", top_k=2, max_tokens=1)).token_ids[0]
        for s in range(12)
    }
    firsts_p = {
        engine.generate(_sampled(PROMPTS[1], seed=s, adapter="ptune", top_p=0.5, max_tokens=1)).token_ids[0]
        for s in range(12)
    }
    assert firsts_k <= top_two and len(firsts_k) == 2
    assert firsts_p <= within_half


def test_stop_with_a_grace_period_cancels_what_it_cannot_finish(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(adapter_dirs)
    started = threading.Event()

    def slow(token: int, delta: str) -> None:
        started.set()
        threading.Event().wait(0.05)

    engine.start()
    handle = engine.submit(greedy(PROMPTS[0], "lora", max_tokens=200, on_token=slow))
    assert started.wait(timeout=30)
    engine.stop(grace_s=0.2)
    result = handle.result(timeout=10)
    assert result.finish_reason == "cancelled"
    assert 0 < result.completion_tokens < 200
