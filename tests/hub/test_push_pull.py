"""Push to and pull from the fake Hub through the library API, with the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from adapterhub.cli import main
from adapterhub.hub import pull, push_folder, resolve, store

from .conftest import upload_raw
from .fake_hub import FakeHub


def _store_home() -> Path:
    return Path(os.environ["ADAPTERHUB_HOME"])


def _fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, label: str) -> None:
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / f"home-{label}"))


def test_push_with_tag_then_pull_by_tag_is_byte_identical_and_loads_in_peft(
    any_hub: FakeHub, adapter_copy, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source = adapter_copy("lora-builtin")
    pushed = push_folder(source, "alice/tiny-lora", tag="v1", message="first version")
    assert not pushed.no_op
    assert pushed.url == f"{any_hub.url}/alice/tiny-lora/tree/v1"
    assert any_hub.repos["alice/tiny-lora"].tags["v1"] == pushed.commit
    stored_through_lfs = any_hub.repos["alice/tiny-lora"].commits[pushed.commit].lfs
    assert stored_through_lfs == ({"adapter_model.safetensors"} if any_hub.lfs else set())
    card = any_hub.repos["alice/tiny-lora"].commits[pushed.commit].files["README.md"].decode()
    assert "library_name: peft" in card and "- lora" in card and "- adapterhub" in card

    _fresh_store(tmp_path, monkeypatch, "puller")
    pulled = pull("alice/tiny-lora@v1", name="mine")
    assert pulled.revision == pushed.commit and not pulled.no_op
    for file_name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (pulled.path / file_name).read_bytes() == (source / file_name).read_bytes()
    manifest = store.read("mine")
    assert (manifest.source, manifest.revision, manifest.ref) == ("alice/tiny-lora", pushed.commit, "v1")
    assert (manifest.method, manifest.base_model, manifest.rank) == ("lora", "builtin:tiny-llama", 4)
    assert manifest.params == 4 * (64 + 64) * 2 + 4 * (64 + 32) * 2
    assert store.verify("mine") == []

    prompt = torch.tensor([[1, 5, 9, 13]])
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), source)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), pulled.path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, expected(prompt).logits, rtol=0, atol=0)


def test_pull_by_branch_and_by_commit_sha(any_hub: FakeHub, adapter_copy) -> None:
    first = push_folder(adapter_copy("lora-builtin"), "alice/multi")
    second = push_folder(adapter_copy("prompt"), "alice/multi", branch="prompt")
    assert second.commit != first.commit

    on_branch = pull("alice/multi@prompt", name="from-branch")
    assert on_branch.revision == second.commit
    assert store.read("from-branch").method == "prompt_tuning"

    by_sha = pull(f"alice/multi@{first.commit}", name="from-sha")
    assert by_sha.revision == first.commit
    assert store.read("from-sha").method == "lora"


def test_repushing_an_unchanged_folder_is_a_no_op(any_hub: FakeHub, adapter_copy) -> None:
    source = adapter_copy("lora-builtin")
    first = push_folder(source, "alice/same", tag="v1")
    commits_before = len(any_hub.repos["alice/same"].commits)
    again = push_folder(source, "alice/same", tag="v1")
    assert again.no_op and again.commit == first.commit
    assert len(any_hub.repos["alice/same"].commits) == commits_before


def test_pulling_the_same_revision_again_is_a_no_op_and_a_new_one_replaces(
    hub: FakeHub, adapter_copy
) -> None:
    source = adapter_copy("lora-builtin")
    push_folder(source, "alice/evolving")
    first = pull("alice/evolving")
    hub.requests.clear()
    again = pull("alice/evolving")
    assert again.no_op and again.revision == first.revision
    assert not [path for method, path in hub.requests if "/resolve/" in path]

    metrics = {"loss": 0.5}
    (source / "metrics.json").write_text(json.dumps(metrics))
    second = push_folder(source, "alice/evolving")
    updated = pull("alice/evolving")
    assert not updated.no_op and updated.revision == second.commit
    assert json.loads((updated.path / "metrics.json").read_text()) == metrics
    assert [entry.name for entry in store.entries()] == ["evolving"]


def test_push_rewrites_a_local_base_path_to_the_hub_id(hub: FakeHub, adapter_copy) -> None:
    source = adapter_copy("lora")
    original = json.loads((source / "adapter_config.json").read_text())
    assert Path(original["base_model_name_or_path"]).is_dir()

    pushed = push_folder(source, "alice/rewritten", base_model="TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    files = hub.repos["alice/rewritten"].commits[pushed.commit].files
    config = json.loads(files["adapter_config.json"])
    assert config == {**original, "base_model_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}
    assert files["adapter_model.safetensors"] == (source / "adapter_model.safetensors").read_bytes()
    assert "base_model: TinyLlama/TinyLlama-1.1B-Chat-v1.0" in files["README.md"].decode()
    assert json.loads((source / "adapter_config.json").read_text()) == original


def test_push_takes_the_base_model_from_the_recipe(hub: FakeHub, adapter_copy) -> None:
    source = adapter_copy("lora")
    (source / "recipe.yaml").write_text("model:\n  name: TinyLlama/TinyLlama-1.1B-Chat-v1.0\nmethod: lora\n")
    (source / "README.md").unlink()
    pushed = push_folder(source, "alice/from-recipe")
    files = hub.repos["alice/from-recipe"].commits[pushed.commit].files
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == (
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    )
    assert files["recipe.yaml"] == (source / "recipe.yaml").read_bytes()
    assert "name: TinyLlama/TinyLlama-1.1B-Chat-v1.0" in files["README.md"].decode()


def test_push_keeps_an_existing_model_card_and_only_fixes_its_metadata(hub: FakeHub, adapter_copy) -> None:
    source = adapter_copy("lora")
    complete = (
        "---\nbase_model: org/base\nlibrary_name: peft\ntags:\n- lora\n- adapterhub\n- peft\n---\n# mine\n"
    )
    (source / "README.md").write_text(complete)
    pushed = push_folder(source, "alice/own-card", base_model="org/base")
    assert hub.repos["alice/own-card"].commits[pushed.commit].files["README.md"].decode() == complete

    peft_card = (adapter_copy("lora-builtin") / "README.md").read_text()
    (source / "README.md").write_text(peft_card)
    pushed = push_folder(source, "alice/own-card", base_model="org/base")
    card = hub.repos["alice/own-card"].commits[pushed.commit].files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "org/base" and metadata["library_name"] == "peft"
    assert {"lora", "adapterhub"} <= set(metadata["tags"])
    assert not [tag for tag in metadata["tags"] if tag.startswith("base_model:")]
    assert card.endswith(peft_card.split("---", 2)[2].lstrip("\n"))


def test_push_model_kind_uploads_a_full_model_folder(hub: FakeHub, tiny_llama: Path) -> None:
    pushed = push_folder(tiny_llama, "alice/merged", kind="model", tag="v1")
    files = hub.repos["alice/merged"].commits[pushed.commit].files
    assert files["model.safetensors"] == (tiny_llama / "model.safetensors").read_bytes()
    assert "config.json" in files and "tokenizer.json" in files


def test_pull_from_a_subfolder(hub: FakeHub, adapter_copy, tmp_path: Path) -> None:
    nested = tmp_path / "nested"
    source = adapter_copy("prompt")
    (nested / "adapters").mkdir(parents=True)
    source.rename(nested / "adapters" / "prompt")
    (nested / "config.json").write_text("{}")
    (nested / "model.safetensors").write_bytes(b"not really")
    push_folder(nested, "alice/bundle", kind="model")
    pulled = pull("alice/bundle", subfolder="adapters/prompt", name="bundled-prompt")
    assert (pulled.path / "adapter_model.safetensors").read_bytes() == (
        nested / "adapters" / "prompt" / "adapter_model.safetensors"
    ).read_bytes()
    assert store.read("bundled-prompt").subfolder == "adapters/prompt"
    assert sorted(path.name for path in pulled.path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]


def test_an_interrupted_transfer_resumes_with_a_range_request(any_hub: FakeHub, adapter_copy) -> None:
    source = adapter_copy("lora-builtin")
    push_folder(source, "alice/flaky")
    any_hub.cut_next_download.add("adapter_model.safetensors")
    pulled = pull("alice/flaky")
    assert (pulled.path / "adapter_model.safetensors").read_bytes() == (
        source / "adapter_model.safetensors"
    ).read_bytes()
    assert not any_hub.cut_next_download


def test_resolve_store_name_local_folder_and_hub_spec(hub: FakeHub, adapter_copy) -> None:
    source = adapter_copy("lora-builtin")
    pushed = push_folder(source, "alice/resolvable", tag="v1")

    assert resolve(str(source)) == source
    from_hub = resolve("alice/resolvable@v1")
    assert store.read(from_hub.name).revision == pushed.commit
    assert resolve("resolvable") == from_hub
    hub.requests.clear()
    assert resolve("alice/resolvable@v1") == from_hub
    assert resolve(f"alice/resolvable@{pushed.commit}") == from_hub
    assert hub.requests == []


def test_base_model_mismatch_warns_by_default_and_refuses_when_strict(
    hub: FakeHub, adapter_copy, capsys: pytest.CaptureFixture
) -> None:
    from adapterhub.errors import UserError

    push_folder(adapter_copy("lora-builtin"), "alice/based")
    path = resolve("alice/based", base_model="builtin:tiny-llama")
    assert "warning" not in capsys.readouterr().err
    assert resolve("alice/based", base_model="other/model") == path
    assert "trained on 'builtin:tiny-llama', not 'other/model'" in capsys.readouterr().err
    with pytest.raises(UserError, match="trained on 'builtin:tiny-llama', not 'other/model'"):
        resolve("alice/based", strict_base="other/model")
    with pytest.raises(UserError, match="not 'other/model'"):
        pull("alice/based", name="strict", base_model="other/model", strict_base=True)
    assert not store.exists("strict")
    assert pull("alice/based", base_model="other/model").no_op
    assert "not 'other/model'" in capsys.readouterr().err


def test_push_a_store_name(hub: FakeHub, adapter_copy, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    first = push_folder(adapter_copy("ia3"), "alice/ia3")
    pulled = pull("alice/ia3", name="stored-ia3")
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["adapterhub", "push", "stored-ia3", "alice/ia3-copy", "--json"])
    main()
    copy = json.loads(capsys.readouterr().out)
    original = hub.repos["alice/ia3"].commits[first.commit].files
    assert hub.repos["alice/ia3-copy"].commits[copy["commit"]].files == original
    assert "manifest.json" in {path.name for path in pulled.path.iterdir()}


def test_push_replaces_stale_adapter_files_and_keeps_the_rest_of_the_repo(hub: FakeHub, adapter_copy) -> None:
    upload_raw(hub, "alice/mixed", {"adapter_model.bin": b"stale weights", "notes/extra.txt": b"keep me"})
    source = adapter_copy("lora-builtin")
    pushed = push_folder(source, "alice/mixed", tag="v1")
    files = hub.repos["alice/mixed"].commits[pushed.commit].files
    assert "adapter_model.bin" not in files and files["notes/extra.txt"] == b"keep me"
    assert files["adapter_model.safetensors"] == (source / "adapter_model.safetensors").read_bytes()
    assert push_folder(source, "alice/mixed", tag="v1").no_op


def test_push_uploads_eval_results_and_the_card_shows_them_as_model_index(hub: FakeHub, adapter_copy) -> None:
    from huggingface_hub import ModelCard

    from adapterhub.eval.results import Score, TaskScores, save_scores

    scores = TaskScores(
        "arc_easy",
        {"acc": Score(0.5, 0.01, True), "acc_norm": Score(0.625, 0.02, True)},
        num_fewshot=5,
        samples=100,
        version=1.0,
        dataset={"path": "allenai/ai2_arc", "name": "ARC-Easy", "split": "test"},
    )
    for with_card in (True, False):  # PEFT's own README gets the index; a generated card, a table too
        source = adapter_copy("lora-builtin")
        if not with_card:
            (source / "README.md").unlink()
        saved = save_scores(source, scores, run={"adapter": "x"})
        repo = f"alice/evaluated-{with_card}"
        pushed = push_folder(source, repo)
        files = hub.repos[repo].commits[pushed.commit].files
        assert files["eval/arc_easy.json"] == saved.read_bytes()
        card = ModelCard(files["README.md"].decode())  # huggingface_hub's own parser of model-index
        results = {(r.task_name, r.dataset_type, r.metric_type): r for r in card.data.eval_results}
        assert {key: r.metric_value for key, r in results.items()} == {
            ("arc_easy", "allenai/ai2_arc", "acc"): 0.5,
            ("arc_easy", "allenai/ai2_arc", "acc_norm"): 0.625,
        }
        result = results[("arc_easy", "allenai/ai2_arc", "acc")]
        assert (result.dataset_config, result.dataset_split, result.dataset_args) == (
            "ARC-Easy",
            "test",
            {"num_few_shot": 5},
        )
        assert card.data.model_name == repo
        assert ("| arc_easy | 5 | acc_norm | 0.625 ± 0.02 |" in card.text) is not with_card

    (source / "eval" / "arc_easy.json").unlink()  # a result deleted here goes from the repo too
    pushed = push_folder(source, repo)
    assert "eval/arc_easy.json" not in hub.repos[repo].commits[pushed.commit].files
