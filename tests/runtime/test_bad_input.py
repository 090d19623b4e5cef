"""Every bad input gets one clear RequestError for that request, and the engine keeps serving the others."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import AdaLoraConfig, LoHaConfig, LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapterhub.errors import UserError
from adapterhub.models import ModelSpec, load_model
from adapterhub.runtime.api import RequestError
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.tiny import tiny_config

from .references import BASE, PROMPTS, greedy, make_engine


@pytest.fixture(scope="module")
def served(adapter_dirs: dict[str, Path]) -> tuple[Engine, list[int]]:
    engine = make_engine(adapter_dirs, max_virtual_tokens=8)
    return engine, engine.generate(greedy(PROMPTS[0], "lora")).token_ids


def _tiny_base():
    return load_model(ModelSpec(BASE, device="cpu"))


def _refused(served: tuple[Engine, list[int]], code: str, action) -> str:
    engine, want = served
    with pytest.raises(RequestError) as refused:
        action(engine)
    assert refused.value.code == code
    assert "\n" not in str(refused.value)
    assert engine.generate(greedy(PROMPTS[0], "lora")).token_ids == want
    return str(refused.value)


def _wider_base_adapter(tmp_path: Path, family: str) -> Path:
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    wider = AutoModelForCausalLM.from_config(config)
    return write_random_adapter(wider, peft_config(family), tmp_path / f"wide-{family}", seed=3)


def test_unknown_adapter(served) -> None:
    message = _refused(served, "unknown_adapter", lambda e: e.submit(greedy(PROMPTS[0], "nope")))
    assert "nope" in message


@pytest.mark.parametrize("family", ["lora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_adapter_for_a_wider_base(served, tmp_path: Path, family: str) -> None:
    folder = _wider_base_adapter(tmp_path, family)
    message = _refused(served, "incompatible_adapter", lambda e: e.register("wide", str(folder)))
    assert "different base" in message


def test_adapter_targeting_modules_this_base_lacks(served, tiny_mt5: Path, tmp_path: Path) -> None:
    """An MT5 adapter's q/v/wo: PEFT cannot build it on a Llama, and the message says which modules."""
    mt5 = load_model(ModelSpec(str(tiny_mt5), device="cpu"))
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q", "v", "wo"], r=4)
    folder = write_random_adapter(mt5, config, tmp_path / "mt5", seed=4)
    message = _refused(served, "incompatible_adapter", lambda e: e.register("mt5", str(folder)))
    assert "not found in the base model" in message and "'wo'" in message


@pytest.mark.parametrize(
    "config",
    [
        LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4),
        AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], total_step=10, init_r=4),
    ],
    ids=["loha", "adalora"],
)
def test_unsupported_peft_type_names_the_supported_ones(served, tmp_path: Path, config) -> None:
    folder = write_random_adapter(_tiny_base(), config, tmp_path / "other", seed=5)
    message = _refused(served, "unsupported_adapter", lambda e: e.register("other", str(folder)))
    assert "LoRA, IA3, prompt tuning, P-tuning, prefix tuning" in message


def test_rank_above_slot_capacity(served, tmp_path: Path) -> None:
    folder = write_random_adapter(_tiny_base(), peft_config("lora", rank=32), tmp_path / "r32", seed=6)
    message = _refused(served, "slot_capacity", lambda e: e.register("r32", str(folder)))
    assert "max_lora_rank" in message


def test_virtual_tokens_above_slot_capacity(served, tmp_path: Path) -> None:
    config = peft_config("prompt_tuning", num_virtual_tokens=9)
    folder = write_random_adapter(_tiny_base(), config, tmp_path / "long", seed=7)
    _refused(served, "slot_capacity", lambda e: e.register("long", str(folder)))


def _corrupt_copy(adapter_dirs: dict[str, Path], tmp_path: Path, damage) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(adapter_dirs["lora"], folder)
    damage(folder)
    return folder


def _truncate(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def _nan(folder: Path) -> None:
    weights = load_file(folder / "adapter_model.safetensors")
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, folder / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _nan,
        lambda folder: (folder / "adapter_model.safetensors").unlink(),
        lambda folder: (folder / "adapter_config.json").write_text("{not json"),
        lambda folder: (folder / "adapter_config.json").write_text(json.dumps({"r": 8})),
    ],
    ids=["truncated", "nan", "no-weights", "bad-json", "no-peft-type"],
)
def test_corrupt_files(served, adapter_dirs: dict[str, Path], tmp_path: Path, damage) -> None:
    folder = _corrupt_copy(adapter_dirs, tmp_path, damage)
    _refused(served, "corrupt_adapter", lambda e: e.register("broken", str(folder)))


def test_prompt_longer_than_the_context(served) -> None:
    engine, _ = served
    too_long = [5] * engine.max_context
    _refused(served, "prompt_too_long", lambda e: e.submit(greedy(too_long)))
    # Virtual tokens count against the context too.
    fits_without_prefix = too_long[:-1]
    _refused(served, "prompt_too_long", lambda e: e.submit(greedy(fits_without_prefix, "prefix")))


def test_registering_a_name_twice_is_refused(served, adapter_dirs: dict[str, Path]) -> None:
    _refused(served, "bad_request", lambda e: e.register("lora", str(adapter_dirs["ia3"])))


def test_non_llama_base_is_refused(tiny_mt5: Path) -> None:
    with pytest.raises(UserError, match="the fast runtime does not serve"):
        Engine(EngineConfig(base="builtin:tiny-mt5", quantization="none", device="cpu"))


def test_nan_check_is_not_vacuous(adapter_dirs: dict[str, Path]) -> None:
    weights = load_file(adapter_dirs["lora"] / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in weights.values())


def _recorded_for(folder: Path, base_model: str, tmp_path: Path) -> Path:
    copy = shutil.copytree(folder, tmp_path / "other-base")
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_model
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def test_adapter_recorded_for_another_base_warns_then_serves(
    served, adapter_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    engine, _ = served
    folder = _recorded_for(adapter_dirs["lora"], "someone/other-model", tmp_path)
    engine.register("other", str(folder))
    try:
        assert "trained on 'someone/other-model'" in capsys.readouterr().err
        assert engine.generate(greedy(PROMPTS[0], "other")).completion_tokens > 0
    finally:
        engine.unregister("other")


def test_strict_base_refuses_an_adapter_recorded_for_another_base(
    adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    engine = make_engine({"lora": adapter_dirs["lora"]}, strict_base=True)
    folder = _recorded_for(adapter_dirs["lora"], "someone/other-model", tmp_path)
    with pytest.raises(RequestError) as refused:
        engine.register("other", str(folder))
    assert refused.value.code == "incompatible_adapter"
    assert "trained on 'someone/other-model', not 'builtin:tiny-llama'" in str(refused.value)
    assert engine.generate(greedy(PROMPTS[0], "lora")).completion_tokens > 0
