"""Which thread computes: the engine's stepping thread, with every compute thread, and no other.

PyTorch's CPU thread pool is OpenMP's (libgomp): each thread that starts a parallel region gets a
team of worker threads of its own, kept for the rest of that thread's life. Measured on this
project's 2-core VM: once the main thread had a team, a mixed batch's decode steps on the engine's
stepping thread took 268 ms instead of 160 ms, and the small index ops of LoRA rows took 10 to 30
times longer (the stepping thread and its worker ran on one core). A command whose engine steps on
its own thread therefore leaves its main thread one compute thread from the start
(``leave_compute_to_the_engine``, before it loads anything); the stepping thread takes them all
(``take_compute_threads``), and other heavy work runs on a short-lived thread (``in_compute_thread``)
whose team ends with it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

COMPUTE_THREADS = torch.get_num_threads()  # before any command lowers the main thread's
T = TypeVar("T")


def leave_compute_to_the_engine() -> None:
    """The calling (main) thread computes with one thread, so it never starts a team of workers."""
    torch.set_num_threads(1)


@contextlib.contextmanager
def engine_computes() -> Iterator[None]:
    """``leave_compute_to_the_engine`` for a block (a benchmark), restoring the caller's threads after."""
    before = torch.get_num_threads()
    leave_compute_to_the_engine()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def take_compute_threads() -> None:
    torch.set_num_threads(COMPUTE_THREADS)


def in_compute_thread(work: Callable[[], T]) -> T:
    """``work()`` on a thread of its own with every compute thread; its team ends when it returns."""
    outcome: dict[str, object] = {}

    def run() -> None:
        take_compute_threads()
        try:
            outcome["value"] = work()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name="adapterhub-compute")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
