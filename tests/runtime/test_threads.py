"""The engine's stepping thread computes with every compute thread; the main thread of a serving
process keeps one, so it never holds an OpenMP team beside the engine's (``runtime/threads.py``)."""

from __future__ import annotations

import threading

import pytest
import torch

from adapterhub.runtime.threads import COMPUTE_THREADS, engine_computes, in_compute_thread

from .references import PROMPTS, greedy, make_engine


def test_the_stepping_thread_computes_with_every_thread_while_the_caller_keeps_one() -> None:
    engine = make_engine({})
    seen: list[tuple[str, int]] = []

    def record(token: int, delta: str) -> None:  # runs on the stepping thread
        seen.append((threading.current_thread().name, torch.get_num_threads()))

    before = torch.get_num_threads()
    with engine_computes():
        assert torch.get_num_threads() == 1
        engine.start()
        try:
            engine.submit(greedy(PROMPTS[0], on_token=record)).result(timeout=60)
        finally:
            engine.stop()
    assert torch.get_num_threads() == before
    assert seen and all(name == "adapterhub-engine" for name, _ in seen)
    assert {threads for _, threads in seen} == {COMPUTE_THREADS}


def test_work_on_a_compute_thread_returns_its_value_or_raises_its_error() -> None:
    with engine_computes():
        assert in_compute_thread(torch.get_num_threads) == COMPUTE_THREADS
        with pytest.raises(ValueError, match="bad"):
            in_compute_thread(lambda: int("bad"))
