"""Hot swap: more adapters than device slots (LRU to the CPU tier), register/unregister while serving."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from adapterhub.runtime.api import RequestError
from adapterhub.runtime.engine import Engine

from .references import ADAPTERS, PROMPTS, greedy, make_engine, peft_reference


def _slot_tensors(engine: Engine) -> list:
    decoder = engine.decoder
    tables = [decoder.virtual_tokens, decoder.prefix_kv, decoder.kv, decoder.vectors["ia3"].tensor]
    for layer in decoder.layers:
        tables += [t for target in layer.values() for t in (target.group.a, *target.group.b)]
    return tables


@pytest.mark.parametrize("static_decode", ["off", "on"])
def test_lru_eviction_to_the_cpu_tier_keeps_every_row_exact(
    adapter_dirs: dict[str, Path], static_decode: str
) -> None:
    engine = make_engine(adapter_dirs, max_adapters=2, static_decode=static_decode)
    module_types = [type(module) for module in engine.model.modules()]
    pointers = [tensor.data_ptr() for tensor in _slot_tensors(engine)]
    rows = [(name, prompt) for prompt in PROMPTS[:2] for name in ADAPTERS]
    handles = [engine.submit(greedy(prompt, name)) for name, prompt in rows]
    engine.start()
    try:
        results = [handle.result(timeout=120) for handle in handles]
    finally:
        engine.stop()
    for (name, prompt), result in zip(rows, results, strict=True):
        assert result.token_ids == peft_reference(str(adapter_dirs[name]), prompt)[0], (name, prompt)
    stats = engine.stats()
    assert stats["adapter_evictions"] > 0
    assert stats["adapter_loads"] == stats["adapter_evictions"] + 2
    # Loading copies into preallocated tables: no module surgery, no reallocation.
    assert [type(module) for module in engine.model.modules()] == module_types
    assert [tensor.data_ptr() for tensor in _slot_tensors(engine)] == pointers


def test_unregister_while_running_lets_the_running_request_finish(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(adapter_dirs)
    want = engine.generate(greedy(PROMPTS[0], "ptune", max_tokens=12)).token_ids
    started = threading.Event()
    resume = threading.Event()

    def pause_after_first_token(token: int, delta: str) -> None:
        if not started.is_set():
            started.set()
            resume.wait(timeout=30)

    engine.start()
    try:
        running = engine.submit(greedy(PROMPTS[0], "ptune", max_tokens=12, on_token=pause_after_first_token))
        assert started.wait(timeout=30)
        unregistering = threading.Thread(target=engine.unregister, args=("ptune",))
        unregistering.start()
        resume.set()
        unregistering.join(timeout=30)
        assert running.result(timeout=60).token_ids == want
        with pytest.raises(RequestError) as gone:
            engine.submit(greedy(PROMPTS[0], "ptune"))
        assert gone.value.code == "unknown_adapter"
        engine.register("ptune", str(adapter_dirs["prefix"]))
        replaced = engine.generate(greedy(PROMPTS[0], "ptune"))
    finally:
        engine.stop()
    assert replaced.token_ids == peft_reference(str(adapter_dirs["prefix"]), PROMPTS[0])[0]
    assert "ptune" in [info.name for info in engine.list()]


def test_queued_request_of_an_unregistered_adapter_fails_cleanly(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(adapter_dirs)
    queued = engine.submit(greedy(PROMPTS[1], "ia3"))
    engine.unregister("ia3")
    served = engine.generate(greedy(PROMPTS[1], "lora"))
    with pytest.raises(RequestError) as failed:
        queued.result(timeout=1)
    assert failed.value.code == "unknown_adapter"
    assert served.token_ids == peft_reference(str(adapter_dirs["lora"]), PROMPTS[1])[0]


def test_registry_lists_what_was_registered(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    infos = {info.name: info for info in engine.list()}
    assert set(infos) == set(ADAPTERS)
    assert (infos["lora"].method, infos["lora"].rank) == ("lora", 8)
    assert (infos["lora_rs"].rank, infos["prefix"].num_virtual_tokens) == (4, 3)
    assert infos["ptune"].method == "p_tuning" and infos["ptune"].source == str(adapter_dirs["ptune"])


def test_reloading_a_slot_resets_exactly_what_the_previous_occupant_left(engine: Engine) -> None:
    decoder = engine.decoder
    natives = {info.name: engine._adapters[info.name].native for info in engine.list()}
    slot = decoder.num_slots - 1
    first_a, first_b = decoder.layers[0]["q_proj"].slot_views(slot)
    ia3_side = decoder.vectors["ia3"].tensor[:, decoder.layers[0]["k_proj"].ia3_out]

    decoder.load_slot(slot, natives["lora"])  # rank 8
    decoder.load_slot(slot, natives["lora_rs"])  # rank 4: rows 4..7 must be zero again
    assert first_a[4:].abs().sum() == 0 and first_b[4:].abs().sum() == 0
    assert first_a[:4].abs().sum() > 0
    decoder.load_slot(slot, natives["ia3"])
    assert first_a.abs().sum() == 0 and first_b.abs().sum() == 0
    assert not torch.equal(ia3_side[slot], torch.ones_like(ia3_side[slot]))
    decoder.load_slot(slot, natives["prefix"])
    assert torch.equal(ia3_side[slot], torch.ones_like(ia3_side[slot]))
