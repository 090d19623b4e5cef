"""``adapterhub bench serve --distinct N [--registered M --skew zipf --slots S]``: many LoRA adapters.

M LoRA adapters are registered (the CPU tier holds them all); each round is one batch whose rows
cycle over N distinct adapters drawn from the M (uniformly, or by a Zipf law as per-customer traffic
is), with S device slots, so later rounds evict the least recently used. The same rounds run once
on the base alone; the ratio says what serving many adapters costs. The engine's load and eviction
counters tell how often an adapter had to come in from the CPU tier.

The adapters share one PEFT-written template (so one config, one module plan) and differ in their
random weights, written straight to safetensors: a thousand of them take seconds, not a PEFT
wrap each.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapterhub.runtime.api import GenerationRequest, SamplingParams
from adapterhub.runtime.bench import Workload, bench_engine, engine_run, random_prompts
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.runtime.serving import ServingEngine
from adapterhub.runtime.threads import engine_computes, in_compute_thread

ZIPF_EXPONENT = 1.1


def write_copies(template: Path, root: Path, count: int) -> list[Path]:
    """``count`` adapters like ``template`` with their own random weights (seeded by index)."""
    weights = load_file(template / "adapter_model.safetensors")
    config = (template / "adapter_config.json").read_text()
    folders = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index + 1)
        folder = root / f"lora-{index:04d}"
        folder.mkdir(parents=True)
        noise = {
            key: 0.2 * torch.randn(t.shape, generator=generator).to(t.dtype) for key, t in weights.items()
        }
        save_file(noise, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(config)
        folders.append(folder)
    return folders


def draw_rounds(names: list[str], distinct: int, rounds: int, skew: str, seed: int = 0) -> list[list[str]]:
    """Each round's ``distinct`` adapters: uniform, or Zipf (adapter k drawn ∝ 1/k^s)."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, len(names) + 1, dtype=torch.float64)
    weights = ranks.pow(-ZIPF_EXPONENT) if skew == "zipf" else torch.ones(len(names), dtype=torch.float64)
    return [
        [
            names[i]
            for i in torch.multinomial(weights, distinct, replacement=False, generator=generator).tolist()
        ]
        for _ in range(rounds)
    ]


def _one_round(engine: ServingEngine, work: Workload) -> int:
    """One batch, submitted at once to the running engine; the next round starts when it is done."""
    params = SamplingParams(max_tokens=work.new_tokens)
    handles = [
        engine.submit(GenerationRequest(prompt, adapter=adapter, params=params))
        for prompt, adapter in zip(work.prompts, work.adapters, strict=True)
    ]
    return sum(handle.result().completion_tokens for handle in handles)


def run_many_bench(
    *,
    device: str,
    base: str,
    quantize: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    rank: int,
    distinct: int,
    registered: int,
    slots: int,
    skew: str,
    rounds: int,
    targets: str,
    progress: Callable[[str], None],
    static_decode: str = "auto",
    repeats: int = 1,
) -> dict:
    with engine_computes():  # the engine thread computes; set-up runs on short-lived threads
        progress(f"loading {base}")
        engine = bench_engine(
            base=base,
            quantize=quantize,
            device=device,
            adapters=slots,
            batch=batch,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            rank=rank,
            static_decode=static_decode,
        )
        with tempfile.TemporaryDirectory(prefix="adapterhub-bench-many-") as tmp:
            progress(f"writing {registered} LoRA adapters (rank {rank} on {targets})")
            folders = in_compute_thread(lambda: _write_adapters(engine, Path(tmp), registered, rank, targets))
            progress(f"registering {registered} adapters")
            start = time.perf_counter()
            names = in_compute_thread(lambda: [engine.register(f.name, str(f)).name for f in folders])
            register_s = time.perf_counter() - start
            timed, loads, evictions = _timed_rounds(
                engine, names, distinct, rounds, skew, batch, prompt_len, new_tokens, repeats, progress
            )
    ratio = statistics.median(m / b for b, m in zip(timed["base"], timed["many"], strict=True))
    return {
        "base_tok_s": round(statistics.median(timed["base"]), 2),
        "many_tok_s": round(statistics.median(timed["many"]), 2),
        "many_over_base": round(ratio, 3),
        "adapter_loads": engine.pool.loads - loads,
        "adapter_evictions": engine.pool.evictions - evictions,
        "register_ms_each": round(1000 * register_s / registered, 2),
        "distinct": distinct,
        "registered": registered,
        "slots": slots,
        "skew": skew,
        "rounds": rounds,
        "repeats": repeats,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "lora_rank": rank,
        "lora_targets": targets,
        "base": base,
        "device": engine.device,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "quantization": engine.quantization,
        "static_decode": getattr(engine, "static_decode", False),
        "cpu_tier_mib": round(engine.cpu_tier_bytes() / 2**20, 1),
    }


def _write_adapters(engine: ServingEngine, root: Path, count: int, rank: int, targets: str) -> list[Path]:
    """``count`` LoRAs from one PEFT-written template, each with its own random weights."""
    template = write_random_adapter(
        engine.model, peft_config("lora", rank=rank, target_modules=targets.split(",")), root / "t", seed=0
    )
    folders = write_copies(template, root / "many", count)
    shutil.rmtree(template)
    return folders


def _timed_rounds(
    engine: ServingEngine,
    names: list[str],
    distinct: int,
    rounds: int,
    skew: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    progress: Callable[[str], None],
) -> tuple[dict[str, list[float]], int, int]:
    """tok/s of every base and many-adapter batch, and the loads and evictions before the timed ones."""
    prompts = random_prompts(engine, batch, prompt_len)
    plan = draw_rounds(names, distinct, rounds, skew)
    works = [
        Workload(prompts, [chosen[i % len(chosen)] for i in range(batch)], new_tokens) for chosen in plan
    ]
    base_work = Workload(prompts, [None] * batch, new_tokens)
    progress("engine: warm-up, untimed")
    engine_run(engine, base_work)
    engine_run(engine, works[0])
    loads, evictions = engine.pool.loads, engine.pool.evictions
    # Each many-adapter batch is paired with a base batch run just before it, so a slow spell of
    # a shared machine falls on both; the ratio is the median of the pairs' ratios.
    timed: dict[str, list[float]] = {"base": [], "many": []}  # tok/s per batch
    engine.start()
    try:
        for turn in range(repeats):
            for index, work in enumerate(works):
                progress(f"engine: round {index + 1} of {rounds} (pass {turn + 1} of {repeats})")
                for phase, batch_work in (("base", base_work), ("many", work)):
                    start = time.perf_counter()
                    tokens = _one_round(engine, batch_work)
                    timed[phase].append(tokens / (time.perf_counter() - start))
    finally:
        engine.stop()
    return timed, loads, evictions
