"""The real ``adapterhub`` commands in fresh processes, with the HF_* variables set before import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_runner import run_cli

from .conftest import hub_env
from .fake_hub import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_FILES = ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.json")


def _ok(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _peft_logits(base: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    with torch.no_grad():
        return model(torch.tensor([[1, 7, 42, 99, 3]])).logits


@pytest.mark.slow
def test_plain_peft_adapter_push_pull_list_show_rm(hub: FakeHub, adapter_copy, tmp_path: Path) -> None:
    source = adapter_copy("prompt")
    pusher = hub_env(hub, tmp_path)
    pushed = json.loads(_ok(run_cli(["push", str(source), "alice/prompt", "--tag", "v1", "--json"], pusher)))
    assert pushed["commit"] == hub.repos["alice/prompt"].tags["v1"] and not pushed["no_op"]

    repushed = run_cli(["push", str(source), "alice/prompt", "--tag", "v1"], pusher)
    again = _ok(repushed)
    assert f"unchanged, nothing to push: {hub.url}/alice/prompt/tree/v1" in again
    assert "No files have been modified" not in repushed.stderr  # huggingface_hub's own line stays off
    assert f"commit {pushed['commit']}" in again

    puller = {**hub_env(hub, tmp_path, user="bob"), "ADAPTERHUB_HOME": str(tmp_path / "bob-home")}
    pulled = json.loads(_ok(run_cli(["pull", "alice/prompt@v1", "--name", "greeter", "--json"], puller)))
    assert pulled["revision"] == pushed["commit"] and not pulled["no_op"]
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (Path(pulled["path"]) / file_name).read_bytes() == (source / file_name).read_bytes()
    assert "already up to date: greeter" in _ok(
        run_cli(["pull", "alice/prompt@v1", "--name", "greeter"], puller)
    )

    listed = json.loads(_ok(run_cli(["list", "--json"], puller)))
    assert [(entry["name"], entry["method"], entry["num_virtual_tokens"]) for entry in listed] == [
        ("greeter", "prompt_tuning", 4)
    ]
    table = _ok(run_cli(["list"], puller))
    assert (
        "greeter" in table and "prompt_tuning" in table and f"alice/prompt@{pushed['commit'][:12]}" in table
    )
    shown = _ok(run_cli(["show", "greeter"], puller))
    digest = listed[0]["files"]["adapter_model.safetensors"]
    assert f"sha256 adapter_model.safetensors │ {digest}" in shown
    assert "removed greeter" in _ok(run_cli(["rm", "greeter"], puller))
    assert json.loads(_ok(run_cli(["list", "--json"], puller))) == []


@pytest.mark.slow
def test_trained_adapter_round_trips_through_the_hub(hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path)
    trained = tmp_path / "trained"
    train = ["train", "recipes/quickstart.yaml", "training.max_steps=2", f"output.dir={trained}"]
    _ok(run_cli(train, env, cwd=REPO_ROOT))
    pushed = json.loads(
        _ok(run_cli(["push", str(trained), "alice/quickstart", "--tag", "v1", "--json"], env))
    )
    remote = hub.repos["alice/quickstart"].commits[pushed["commit"]].files
    assert remote["README.md"] == (trained / "README.md").read_bytes()

    fresh = {**env, "ADAPTERHUB_HOME": str(tmp_path / "fresh-home"), "HF_HOME": str(tmp_path / "fresh-hf")}
    pulled = json.loads(_ok(run_cli(["pull", "alice/quickstart@v1", "--json"], fresh)))
    stored = Path(pulled["path"])
    for file_name in (*SHARED_FILES, "README.md"):
        assert (stored / file_name).read_bytes() == (trained / file_name).read_bytes(), file_name
    manifest = json.loads((stored / "manifest.json").read_text())
    assert manifest["revision"] == pushed["commit"] and manifest["ref"] == "v1"
    assert (manifest["method"], manifest["base_model"], manifest["rank"]) == (
        "lora",
        "builtin:tiny-llama",
        16,
    )
    assert _peft_logits(tiny_llama, stored).equal(_peft_logits(tiny_llama, trained))
