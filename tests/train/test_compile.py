"""``training.compile``: the compiled training step computes what the eager one does, in one graph."""

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import adapterhub.train.trainer as trainer_module
from tests.train.helpers import quiet_train, recipe
from tests.train.test_train import METHODS


def without_dropout(build):
    """Dropout draws different random numbers compiled and eager; without it both must agree."""

    def build_and_disable_dropout(*args, **kwargs):
        model = build(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            elif isinstance(getattr(module, "dropout", None), float):  # attention-probability dropout
                module.dropout = 0.0
        return model

    return build_and_disable_dropout


@pytest.mark.slow
@pytest.mark.parametrize("model", ["builtin:tiny-llama", "builtin:tiny-mt5"], ids=["llama", "mt5"])
@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_training_matches_eager_in_one_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, model: str
) -> None:
    monkeypatch.setattr(trainer_module, "build_peft_model", without_dropout(trainer_module.build_peft_model))
    results = {}
    for compiled in (False, True):
        counters.clear()
        results[compiled] = quiet_train(
            recipe(
                tmp_path / str(compiled),
                METHODS[method],
                model={"name": model},
                data={"max_length": 48, "max_target_length": 4},
                training={"compile": compiled, "max_steps": 8, "generation_eval": False},
            )
        )
    assert counters["stats"]["unique_graphs"] >= 1, "the compiled run traced nothing"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"

    eager, compiled = results[False].metrics, results[True].metrics
    assert eager["eval_loss"] < eager["initial_eval_loss"]
    for key in ("train_loss", "eval_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key
    eager_weights = results[False].model.state_dict()
    for name, value in results[True].model.state_dict().items():
        if "lora_" in name or "ia3_" in name or "prompt_encoder" in name:
            torch.testing.assert_close(value, eager_weights[name], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_training_under_bf16_autocast_learns_in_one_graph(tmp_path: Path, method: str) -> None:
    """The seed recipes' GPU set-up (bf16 autocast, compiled, mt5 architecture) traces without a break."""
    torch._dynamo.reset()  # an earlier test's graphs would otherwise be reused and nothing traced here
    counters.clear()
    result = quiet_train(
        recipe(
            tmp_path,
            METHODS[method],
            model={"name": "builtin:tiny-mt5"},
            data={"max_length": 48, "max_target_length": 4},
            training={"compile": True, "precision": "bf16", "max_steps": 8, "generation_eval": False},
        )
    )
    assert counters["stats"]["unique_graphs"] >= 1, "the compiled run traced nothing"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]


def test_a_compile_the_machine_cannot_build_is_one_line_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor.config as inductor_config

    from adapterhub.errors import UserError

    torch._dynamo.reset()
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/bin/false",))  # a C++ toolchain that cannot build
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a cached kernel would skip the build
    with pytest.raises(UserError, match=r"^training\.compile: .*set training\.compile: false"):
        quiet_train(
            recipe(
                tmp_path,
                METHODS["lora"],
                training={"compile": True, "max_steps": 1, "generation_eval": False},
            )
        )
    torch._dynamo.reset()
