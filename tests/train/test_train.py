"""Every method trains on the tiny Llama (fp32 and nf4) and the tiny MT5, and reloads in plain PEFT."""

import io
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Trainer, TrainingArguments

from adapterhub.errors import UserError
from adapterhub.models import ModelSpec, load_model
from adapterhub.train.trainer import AdapterTrainer, train
from tests.train.helpers import quiet_train, recipe

METHODS = {
    "lora": {"type": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "ia3": {"type": "ia3"},
    "prompt_tuning": {"type": "prompt_tuning", "num_virtual_tokens": 8},
    "p_tuning": {"type": "p_tuning", "num_virtual_tokens": 8, "encoder_hidden_size": 64},
    "prefix_tuning": {"type": "prefix_tuning", "num_virtual_tokens": 8},
}
CASES = (
    [(m, "builtin:tiny-llama", "none") for m in METHODS]
    + [(m, "builtin:tiny-llama", "nf4") for m in METHODS]
    + [(m, "builtin:tiny-mt5", "none") for m in METHODS]
)


def sample_batch(model_name: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 40, 77, 90, 120, 33, 8, 200]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mt5" in model_name:
        batch["decoder_input_ids"] = torch.tensor([[0, 31, 64]])
    return batch


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "model", "quantization"), CASES, ids=lambda v: str(v).replace("builtin:", "")
)
def test_method_trains_and_reloads_in_plain_peft(
    tmp_path: Path, method: str, model: str, quantization: str
) -> None:
    result = quiet_train(
        recipe(tmp_path, METHODS[method], model={"name": model, "quantization": quantization})
    )
    metrics = result.metrics
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    out = result.output_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "metrics.json",
        "loss_curve.png",
        "README.md",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == model
    assert f"- {method}" in (out / "README.md").read_text()

    trained = result.model.eval()
    base = load_model(ModelSpec(model, quantization=quantization))
    reloaded = PeftModel.from_pretrained(base, out).eval()
    batch = sample_batch(model)
    with torch.no_grad():
        expected = trained(**batch).logits
        actual = reloaded(**batch).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_plain_transformers_loads_the_base_of_a_builtin(tiny_llama: Path, tiny_mt5: Path) -> None:
    assert AutoModelForCausalLM.from_pretrained(tiny_llama).config.model_type == "llama"
    assert AutoModelForSeq2SeqLM.from_pretrained(tiny_mt5).config.model_type == "mt5"


def test_quickstart_learns(tmp_path: Path) -> None:
    from adapterhub.recipe import load_recipe
    from tests.train.helpers import REPO

    loaded = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"output.dir={tmp_path / 'qs'}"])
    loaded.data.path = str(REPO / loaded.data.path)
    metrics = quiet_train(loaded).metrics
    assert metrics["initial_accuracy"] < 0.5
    assert metrics["accuracy"] >= 0.9
    assert metrics["generation_accuracy"] >= 0.9
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]


def test_chat_data_trains_on_assistant_tokens_only(tmp_path: Path, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    from adapterhub.recipe import DataArgs
    from adapterhub.train.data import Tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [
        {"role": "user", "content": "hello how are you"},
        {"role": "assistant", "content": "great"},
        {"role": "user", "content": "and the food"},
        {"role": "assistant", "content": "awful"},
    ]
    example = Tokenize(tokenizer, DataArgs(path="x"), seq2seq=False).messages(messages)
    learned = tokenizer.decode([t for t in example["labels"] if t != -100])
    # Each assistant turn is learned through the template's end of turn; user turns never are.
    assert learned == "great</s>\nawful</s>\n"


def test_existing_output_dir_is_refused_then_overwritten(tmp_path: Path) -> None:
    method = METHODS["ia3"]
    quiet_train(recipe(tmp_path, method, training={"max_steps": 2}))
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        quiet_train(recipe(tmp_path, method, training={"max_steps": 2}))
    quiet_train(recipe(tmp_path, method, training={"max_steps": 4, "overwrite": True, "learning_rate": 0.1}))
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() != before
    assert not list(tmp_path.glob(".out*")), "no work folder left behind"


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterhub.train import trainer as trainer_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "write_output", crash)
        with pytest.raises(KeyboardInterrupt):
            quiet_train(recipe(tmp_path, METHODS["lora"], training={"max_steps": 2, "save_steps": 2}))
    assert not (tmp_path / "out").exists(), "an interrupted run leaves no output dir"
    checkpoint = tmp_path / ".out.partial" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "COMPLETE").is_file()

    # The adapter contract guards this door too: a checkpoint whose weights went NaN is refused.
    weights_file = checkpoint / "adapter_model.safetensors"
    good = weights_file.read_bytes()
    weights = load_file(weights_file)
    first = next(iter(weights))
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, weights_file)
    with pytest.raises(UserError, match=r"checkpoint-2 cannot be resumed from .*NaN or inf"):
        quiet_train(
            recipe(tmp_path, METHODS["lora"], training={"max_steps": 4, "save_steps": 2, "resume": True})
        )
    weights_file.write_bytes(good)

    shown = io.StringIO()
    resumed = recipe(tmp_path, METHODS["lora"], training={"max_steps": 4, "save_steps": 2, "resume": True})
    result = train(resumed, console=Console(file=shown, width=200))
    assert "resuming from checkpoint-2 (step 2)" in shown.getvalue()
    assert result.metrics["steps"] == 4
    assert result.model.peft_config["default"].r == 8
    assert not trainer_module.work_dir_for(result.output_dir).exists()
    with pytest.raises(UserError, match="nothing to resume"):
        quiet_train(recipe(tmp_path, METHODS["lora"], training={"resume": True}))
    fresh = recipe(tmp_path, METHODS["ia3"], training={"resume": True}, output={"dir": str(tmp_path / "new")})
    with pytest.raises(UserError, match=r"resume=true but .*\.new\.partial holds no complete checkpoint"):
        quiet_train(fresh)


def test_store_name_adds_the_trained_adapter_to_the_store(tmp_path: Path) -> None:
    from adapterhub.hub import resolve
    from adapterhub.hub.store import exists

    result = quiet_train(
        recipe(tmp_path, METHODS["ia3"], training={"max_steps": 2}, output={"store_name": "tiny-ia3"})
    )
    assert exists("tiny-ia3")
    stored = resolve("tiny-ia3")
    assert (stored / "adapter_model.safetensors").read_bytes() == (
        result.output_dir / "adapter_model.safetensors"
    ).read_bytes()
    with pytest.raises(UserError, match="store name 'tiny-ia3' is taken"):
        quiet_train(recipe(tmp_path / "again", METHODS["ia3"], output={"store_name": "tiny-ia3"}))
    assert not (tmp_path / "again" / "out").exists()


def test_training_seed_makes_a_run_repeat(tmp_path: Path) -> None:
    """The adapter's random initial values come from training.seed too, not only the data order."""
    runs = [
        quiet_train(
            recipe(tmp_path / name, METHODS["lora"], training={"max_steps": 4, "generation_eval": False})
        ).output_dir
        for name in ("first", "second")
    ]
    first, second = (load_file(run / "adapter_model.safetensors") for run in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_adapter_trainer_counts_flops_like_trainer(tmp_path: Path, tiny_llama: Path) -> None:
    model = load_model(ModelSpec("builtin:tiny-llama"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = AdapterTrainer(model=model, args=args)
    batch = {"input_ids": torch.ones(3, 7, dtype=torch.long)}
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
