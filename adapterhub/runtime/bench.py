"""``adapterhub bench serve``: one base, one batch; the engine's base, one-adapter and mixed-family
throughput against plain PEFT doing the same work, plus adapter load and swap latency.

Adapters are made on the fly with random non-zero weights (no download). Every phase generates
exactly ``--new-tokens`` per row (EOS is ignored) so the token counts of all phases are equal.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from adapterhub.models import unwrap_peft
from adapterhub.runtime.api import FAMILIES, GenerationRequest, SamplingParams
from adapterhub.runtime.backends import open_engine
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.runtime.serving import ServingEngine
from adapterhub.runtime.threads import engine_computes, in_compute_thread

VIRTUAL_TOKENS = 16
T = TypeVar("T")
SWAP_REPEATS = 5


@dataclass
class Workload:
    prompts: list[list[int]]
    adapters: list[str | None]  # per row
    new_tokens: int


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, run: Callable[[], T]) -> tuple[float, T]:
    """Seconds and result of one run (after the device has finished its work)."""
    _sync(device)
    start = time.perf_counter()
    tokens = run()
    _sync(device)
    return time.perf_counter() - start, tokens


def engine_run(engine: ServingEngine, work: Workload) -> int:
    """Submit the whole batch before the loop starts, so it is admitted as one batch."""
    params = SamplingParams(max_tokens=work.new_tokens)
    handles = [
        engine.submit(GenerationRequest(prompt, adapter=adapter, params=params))
        for prompt, adapter in zip(work.prompts, work.adapters, strict=True)
    ]
    engine.start()
    try:
        return sum(handle.result().completion_tokens for handle in handles)
    finally:
        engine.stop()


def hf_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **extra) -> tuple[int, float]:
    """Tokens and seconds of one ``generate`` call, after an untimed one-token warm-up."""
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids), **extra)
    with torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=1, **kwargs)
        seconds, out = _timed(
            ids.device.type,
            lambda: model.generate(
                input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs
            ),
        )
    # A decoder's output holds the prompt; an encoder-decoder's holds the decoder start token.
    prompt = 1 if getattr(model.config, "is_encoder_decoder", False) else ids.shape[1]
    return (out.shape[1] - prompt) * ids.shape[0], seconds


def peft_run(
    engine: ServingEngine, folders: dict[str, Path], families: dict[str, str], work: Workload
) -> tuple[int, float]:
    """Plain PEFT on the engine's own base: all LoRA rows in one ``adapter_names`` batch, other rows
    grouped per adapter (one PeftModel holds one PEFT type, and only LoRA honours per-row names).
    Only ``generate`` is timed; loading and unloading adapters is not."""
    from peft import PeftModel

    model = engine.model
    ids = torch.tensor(work.prompts, device=engine.device)
    tokens, seconds = 0, 0.0
    lora_rows = [i for i, a in enumerate(work.adapters) if a is not None and families[a] == "lora"]
    loras = sorted({work.adapters[i] for i in lora_rows})
    if loras:
        peft_model = PeftModel.from_pretrained(model, str(folders[loras[0]]), adapter_name=loras[0])
        for name in loras[1:]:
            peft_model.load_adapter(str(folders[name]), adapter_name=name)
        names = [work.adapters[i] for i in lora_rows]
        with peft_autocast(engine):
            done, took = hf_generate(peft_model, ids[lora_rows], work.new_tokens, adapter_names=names)
        tokens, seconds = tokens + done, seconds + took
        unwrap_peft(model)
    for name in sorted({a for a in work.adapters if a is not None and families[a] != "lora"}):
        rows = [i for i, a in enumerate(work.adapters) if a == name]
        with peft_autocast(engine):
            done, took = hf_generate(
                PeftModel.from_pretrained(model, str(folders[name])), ids[rows], work.new_tokens
            )
        tokens, seconds = tokens + done, seconds + took
        unwrap_peft(model)
    base_rows = [i for i, a in enumerate(work.adapters) if a is None]
    if base_rows:
        done, took = hf_generate(model, ids[base_rows], work.new_tokens)
        tokens, seconds = tokens + done, seconds + took
    return tokens, seconds


def peft_autocast(engine: ServingEngine) -> contextlib.AbstractContextManager:
    """Autocast to the engine's compute dtype around plain PEFT's generate.

    PEFT keeps adapter weights in fp32; on a 4-bit base with bf16 compute its IA3 layers then return
    fp32 keys and values beside bf16 queries, and attention refuses the mix unless autocast is on.
    """
    device_type = torch.device(engine.device).type
    return torch.autocast(device_type, dtype=engine.dtype, enabled=engine.dtype != torch.float32)


def load_and_swap_ms(engine: Engine, folder: Path, resident: list[str]) -> tuple[float, float]:
    """Median ms to register a LoRA and copy it into a free slot, and to swap a CPU-tier adapter in
    (evicting the least recently used) once every slot is taken."""
    loads_before = engine.pool.loads
    loads = []
    for repeat in range(SWAP_REPEATS):
        name = f"load-{repeat}"
        _sync(engine.device)
        start = time.perf_counter()
        engine.register(name, str(folder))
        engine.make_resident(name)
        _sync(engine.device)
        loads.append(time.perf_counter() - start)
        engine.unregister(name)
    for name in resident:
        engine.make_resident(name)
    engine.register("swap", str(folder))
    # Cycling through one more adapter than there are slots makes every access an LRU miss.
    cycle = ["swap", *resident]
    swaps = []
    for repeat in range(SWAP_REPEATS):
        name = cycle[repeat % len(cycle)]
        _sync(engine.device)
        start = time.perf_counter()
        engine.make_resident(name)
        _sync(engine.device)
        swaps.append(time.perf_counter() - start)
    engine.unregister("swap")
    if engine.pool.loads - loads_before < len(loads) + len(swaps):
        raise RuntimeError("a timed swap found its adapter resident; the swap timing would be wrong")
    return 1000 * statistics.median(loads), 1000 * statistics.median(swaps)


def bench_engine(
    *,
    base: str,
    quantize: str,
    device: str,
    adapters: int,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    rank: int = 16,
    static_decode: str = "auto",
) -> ServingEngine:
    """An engine sized for a benchmark: a slot per adapter, context for the prompts plus virtual
    tokens plus the generation, and EOS ignored so every request generates exactly ``new_tokens``.
    Loaded on a short-lived compute thread (``runtime/threads.py``)."""
    config = EngineConfig(
        base=base,
        quantization=quantize,
        device=device,
        max_adapters=adapters,
        max_lora_rank=rank,
        max_batch_size=batch,
        max_context=prompt_len + VIRTUAL_TOKENS + new_tokens + 1,
        max_virtual_tokens=VIRTUAL_TOKENS,
        static_decode=static_decode,
    )
    engine = in_compute_thread(lambda: open_engine(config))
    engine.eos_ids = set()
    return engine


def random_prompts(engine: ServingEngine, count: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


def register_random_adapters(
    engine: ServingEngine, count: int, folder: Path, rank: int = 16
) -> tuple[dict[str, Path], dict[str, str]]:
    """Write ``count`` random adapters (families round-robin over all five) with PEFT under ``folder``
    and register them, on a short-lived compute thread; returns name -> folder and name -> family."""
    return in_compute_thread(lambda: _write_and_register(engine, count, folder, rank))


def _write_and_register(
    engine: ServingEngine, count: int, folder: Path, rank: int
) -> tuple[dict[str, Path], dict[str, str]]:
    families = {f"{FAMILIES[i % len(FAMILIES)]}-{i}": FAMILIES[i % len(FAMILIES)] for i in range(count)}
    folders = {}
    fast = isinstance(engine, Engine)  # the fallback's bases take PEFT's per-architecture targets
    task_type = "SEQ_2_SEQ_LM" if engine.seq2seq else "CAUSAL_LM"
    for seed, (name, family) in enumerate(families.items(), start=1):
        config = peft_config(
            family, rank=rank, num_virtual_tokens=VIRTUAL_TOKENS, task_type=task_type, llama_targets=fast
        )
        folders[name] = write_random_adapter(engine.model, config, folder / name, seed=seed)
        engine.register(name, str(folders[name]))
    return folders, families


@engine_computes()  # the engine thread computes; heavy set-up runs on short-lived threads
def run_bench(
    *,
    device: str,
    base: str,
    adapters: int,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    quantize: str,
    rank: int,
    static_decode: str,
    progress: Callable[[str], None],
    repeats: int = 1,
) -> dict:
    progress(f"loading {base}")
    engine = bench_engine(
        base=base,
        quantize=quantize,
        device=device,
        adapters=adapters,
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        rank=rank,
        static_decode=static_decode,
    )
    prompts = random_prompts(engine, batch, prompt_len)
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-") as tmp:
        progress(f"writing {adapters} random adapters with PEFT")
        folders, families = register_random_adapters(engine, adapters, Path(tmp), rank=rank)
        names = list(families)
        first_lora = next(name for name, family in families.items() if family == "lora")
        phases = {
            "base": Workload(prompts, [None] * batch, new_tokens),
            "one_adapter": Workload(prompts, [first_lora] * batch, new_tokens),
            "mixed": Workload(prompts, [names[i % len(names)] for i in range(batch)], new_tokens),
        }
        results: dict[str, float] = {}
        for phase, work in phases.items():
            progress(f"engine: {phase} (warm-up)")
            # Untimed run of the same work first: each phase has its own decode shapes to capture.
            engine_run(engine, work)
        # The phases take turns, round after round, so a slow spell of a shared machine falls on
        # all of them; each figure is a median over rounds, each ratio the median of its rounds' ratios.
        rounds: dict[str, list[float]] = {phase: [] for phase in phases}  # tok/s of each round
        for turn in range(repeats):
            for phase, work in phases.items():
                progress(f"engine: {phase} (round {turn + 1} of {repeats})")
                seconds, tokens = _timed(engine.device, lambda work=work: engine_run(engine, work))
                rounds[phase].append(tokens / seconds)
        for phase, work in phases.items():
            results[f"{phase}_tok_s"] = statistics.median(rounds[phase])
            seconds = batch * new_tokens / results[f"{phase}_tok_s"]
            prefill, _ = _timed(
                engine.device, lambda work=work: engine_run(engine, Workload(work.prompts, work.adapters, 1))
            )
            results[f"{phase}_prefill_ms"] = 1000 * prefill
            results[f"{phase}_decode_step_ms"] = 1000 * (seconds - prefill) / max(new_tokens - 1, 1)
        round_ratios = {
            phase: [p / b for b, p in zip(rounds["base"], rounds[phase], strict=True)]
            for phase in ("one_adapter", "mixed")
        }
        progress("transformers generate: base")
        ids = torch.tensor(prompts, device=engine.device)
        tokens, seconds = in_compute_thread(lambda: hf_generate(engine.model, ids, new_tokens))
        results["transformers_base_tok_s"] = tokens / seconds
        progress("plain PEFT: the mixed batch")
        tokens, seconds = in_compute_thread(lambda: peft_run(engine, folders, families, phases["mixed"]))
        results["peft_tok_s"] = tokens / seconds
        load_ms = swap_ms = None
        if isinstance(engine, Engine):  # the fallback keeps no adapter resident to time
            progress("adapter load and swap")
            # Timed where the engine loads adapters in serving: on a thread with every compute thread.
            load_ms, swap_ms = in_compute_thread(lambda: load_and_swap_ms(engine, folders[first_lora], names))
    return {
        **{key: round(value, 2) for key, value in results.items()},
        "one_adapter_over_base": round(statistics.median(round_ratios["one_adapter"]), 3),
        "mixed_over_base": round(statistics.median(round_ratios["mixed"]), 3),
        # Each round's own ratio, so a single run's figure shows how much the machine moved it.
        **{
            f"{phase}_over_base_rounds": [round(ratio, 3) for ratio in ratios]
            for phase, ratios in round_ratios.items()
        },
        "repeats": repeats,
        "speedup_vs_peft": round(results["mixed_tok_s"] / results["peft_tok_s"], 2),
        "adapter_load_ms": None if load_ms is None else round(load_ms, 3),
        "adapter_swap_ms": None if swap_ms is None else round(swap_ms, 3),
        "backend": engine.backend,
        "device": engine.device,
        "device_name": torch.cuda.get_device_name() if engine.device.startswith("cuda") else "cpu",
        "base": base,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "quantization": engine.quantization,
        "static_decode": getattr(engine, "static_decode", False),
        "cuda_graphs": getattr(engine, "cuda_graphs", False),
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "adapters": adapters,
        "families": families,
        "lora_rank": rank,
        "lora_targets": "q,k,v,o,gate,up,down" if isinstance(engine, Engine) else "PEFT's defaults",
        "virtual_tokens": VIRTUAL_TOKENS,
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
