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


ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="loads overlap decoding on CUDA only")


@pytest.mark.parametrize(
    ("static_decode", "device"),
    [("off", "cpu"), ("on", "cpu"), pytest.param("on", "cuda", marks=ON_CUDA)],
)
def test_lru_eviction_to_the_cpu_tier_keeps_every_row_exact(
    adapter_dirs: dict[str, Path], static_decode: str, device: str
) -> None:
    # Two slots for every family: most loads happen while other rows decode (on CUDA, overlapped).
    engine = make_engine(adapter_dirs, max_adapters=2, static_decode=static_decode, device=device)
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


def test_a_request_whose_adapter_is_still_loading_waits_while_the_running_rows_decode(
    adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(adapter_dirs, max_adapters=2)
    loads = engine.decoder.loads
    events: list[str] = []
    pending_polls = 3  # as a CUDA side-stream copy that has not landed for three steps

    def ready(slot: int) -> bool:
        events.append(f"poll {slot}")
        return events.count(f"poll {slot}") > pending_polls

    monkeypatch.setattr(loads, "ready", ready)
    monkeypatch.setattr(loads, "wait", lambda slots: events.append(f"wait {sorted(slots)}"))
    late: list = []

    def on_first(token: int, delta: str) -> None:
        events.append("first")
        if not late:  # from the stepping thread, once the first row is decoding
            request = greedy(PROMPTS[1], "lora_rs", on_token=lambda *_: events.append("late"))
            late.append(engine.submit(request))

    engine.start()
    try:
        first = engine.submit(greedy(PROMPTS[0], "lora", max_tokens=8, on_token=on_first))
        first_tokens = first.result(timeout=60).token_ids
        late_tokens = late[0].result(timeout=60).token_ids
    finally:
        engine.stop()
    first_slot, late_slot = engine._adapters["lora"].slot, engine._adapters["lora_rs"].slot
    # The first row's prefill; one decode step for each poll that found the late row's load pending
    # (a LoRA load into a free slot changes nothing other slots read, so it did not wait at once);
    # then the late row's prefill beside the first row's next token, waiting for its slot.
    assert events[:12] == [
        f"wait [{first_slot}]",
        "first",
        *[f"poll {late_slot}", "first"] * pending_polls,
        f"poll {late_slot}",
        f"wait [{late_slot}]",
        "first",
        "late",
    ]
    assert first_tokens == peft_reference(str(adapter_dirs["lora"]), PROMPTS[0])[0][:8]
    assert late_tokens == peft_reference(str(adapter_dirs["lora_rs"]), PROMPTS[1])[0]


def test_a_load_that_changes_what_every_slot_reads_is_waited_for_at_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = engine.decoder
    waited: list[int] = []
    monkeypatch.setattr(decoder.loads, "wait", waited.extend)
    natives = {info.name: engine._adapters[info.name].native for info in engine.list()}
    slot = decoder.num_slots - 1
    decoder.load_slot(slot, natives["lora"])  # its own rows of preallocated tables: overlaps
    assert waited == []
    before = decoder.layout_version
    decoder.load_slot(slot, natives["dora"])  # allocates the DoRA table all slots read
    assert decoder.layout_version > before and waited == [slot]
    decoder.load_slot(slot, natives["ptune"])  # its virtual tokens' states: a forward after the copy
    assert waited == [slot, slot]


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
