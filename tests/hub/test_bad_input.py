"""Every bad input gets one clear line and a non-zero exit, and leaves the store exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub.hub import pull, push_folder, store

from .conftest import DEAD_ENDPOINT, TOKENS, run_main, store_listing, upload_raw
from .fake_hub import FakeHub


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("alice/missing", ("repo alice/missing not found", "HF_TOKEN")),
        ("alice/kept@no-such-tag", ("revision 'no-such-tag' not found in alice/kept",)),
        ("alice/kept@" + "0" * 40, ("not found in alice/kept",)),
        ("not a repo", ("not a Hub repo id", "ORG/NAME")),
    ],
)
def test_unknown_repo_or_revision(held, capsys, monkeypatch, spec: str, needles: tuple[str, ...]) -> None:
    code, err = run_main(["pull", spec, "--name", "new"], capsys, monkeypatch)
    assert_one_line_error(code, err, *needles)
    assert store_listing() == held


def test_repo_without_adapter_config(hub: FakeHub, held, capsys, monkeypatch, tiny_llama: Path) -> None:
    push_folder(tiny_llama, "alice/full-model", kind="model")
    code, err = run_main(["pull", "alice/full-model"], capsys, monkeypatch)
    assert_one_line_error(code, err, "no adapter_config.json", "full model, not an adapter")

    upload_raw(hub, "alice/notes", {"notes.txt": b"hello"})
    code, err = run_main(["pull", "alice/notes"], capsys, monkeypatch)
    assert_one_line_error(code, err, "no adapter_config.json", "not a PEFT adapter")
    assert store_listing() == held


def test_config_that_is_not_a_peft_config(
    hub: FakeHub, held, adapters_dir: Path, capsys, monkeypatch
) -> None:
    weights = (adapters_dir / "lora-builtin" / "adapter_model.safetensors").read_bytes()
    upload_raw(
        hub,
        "alice/odd-config",
        {
            "adapter_config.json": json.dumps({"hello": "world"}).encode(),
            "adapter_model.safetensors": weights,
        },
    )
    code, err = run_main(["pull", "alice/odd-config"], capsys, monkeypatch)
    assert_one_line_error(code, err, "adapter_config.json has no peft_type", "not a PEFT adapter config")
    assert store_listing() == held


def test_corrupt_or_mismatched_weights(hub: FakeHub, held, adapters_dir: Path, capsys, monkeypatch) -> None:
    config = (adapters_dir / "lora-builtin" / "adapter_config.json").read_bytes()
    weights = (adapters_dir / "lora-builtin" / "adapter_model.safetensors").read_bytes()
    upload_raw(
        hub, "alice/truncated", {"adapter_config.json": config, "adapter_model.safetensors": weights[:-40]}
    )
    code, err = run_main(["pull", "alice/truncated"], capsys, monkeypatch)
    assert_one_line_error(code, err, "adapter_model.safetensors are corrupt")

    upload_raw(
        hub, "alice/garbage", {"adapter_config.json": config, "adapter_model.safetensors": b"\x00" * 64}
    )
    code, err = run_main(["pull", "alice/garbage"], capsys, monkeypatch)
    assert_one_line_error(code, err, "adapter_model.safetensors are corrupt")

    prompt_weights = (adapters_dir / "prompt" / "adapter_model.safetensors").read_bytes()
    upload_raw(
        hub, "alice/mismatch", {"adapter_config.json": config, "adapter_model.safetensors": prompt_weights}
    )
    code, err = run_main(["pull", "alice/mismatch"], capsys, monkeypatch)
    assert_one_line_error(code, err, "do not match its lora config", "no lora_A/lora_B weights")
    assert store_listing() == held


def test_a_bad_new_revision_leaves_the_held_one_in_place(hub: FakeHub, held, capsys, monkeypatch) -> None:
    upload_raw(hub, "alice/kept", {"adapter_model.safetensors": b"broken"})
    code, err = run_main(["pull", "alice/kept", "--name", "kept"], capsys, monkeypatch)
    assert_one_line_error(code, err, "corrupt")
    assert store_listing() == held
    assert store.verify("kept") == []


def test_rejected_token_401_and_foreign_namespace_403(hub: FakeHub, held, adapter_copy, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "stolen-token")
    code, err = run_main(["pull", "alice/kept", "--name", "new"], capsys, monkeypatch)
    assert_one_line_error(code, err, "rejected the token (401)", "HF_TOKEN")

    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    code, err = run_main(["push", str(adapter_copy("lora-builtin")), "bob/stolen"], capsys, monkeypatch)
    assert_one_line_error(code, err, "no permission for bob/stolen", "(403)")
    assert "bob/stolen" not in hub.repos
    assert store_listing() == held


def test_push_with_no_token_says_none_is_set(hub: FakeHub, held, adapter_copy, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    code, err = run_main(["push", str(adapter_copy("lora-builtin")), "alice/new"], capsys, monkeypatch)
    assert_one_line_error(code, err, "needs a token for this (401) and none is set", "HF_TOKEN")
    assert "rejected" not in err and "alice/new" not in hub.repos
    assert store_listing() == held


def test_private_repo_of_another_user_is_not_found(hub: FakeHub, held, adapter_copy, capsys, monkeypatch):
    push_folder(adapter_copy("lora-builtin"), "alice/secret", private=True)
    monkeypatch.setenv("HF_TOKEN", TOKENS["bob"])
    code, err = run_main(["pull", "alice/secret"], capsys, monkeypatch)
    assert_one_line_error(code, err, "repo alice/secret not found", "your token cannot see it")
    assert store_listing() == held


def test_offline_and_unreachable_server(hub: FakeHub, held, capsys, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    code, err = run_main(["pull", "alice/kept", "--name", "new"], capsys, monkeypatch)
    assert_one_line_error(code, err, "HF_HUB_OFFLINE=1")

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", DEAD_ENDPOINT)
    code, err = run_main(["pull", "alice/kept", "--name", "new"], capsys, monkeypatch)
    assert_one_line_error(code, err, f"cannot reach the Hub at {DEAD_ENDPOINT}", "HF_ENDPOINT")
    assert store_listing() == held


def test_an_interrupted_download_leaves_no_partial_folder(hub: FakeHub, held, adapter_copy, monkeypatch):
    import adapterhub.hub.remote as remote

    push_folder(adapter_copy("lora-builtin"), "alice/interrupted")
    real_download = remote.hf_hub_download
    calls = []

    def download_then_interrupt(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_download(*args, **kwargs)

    monkeypatch.setattr(remote, "hf_hub_download", download_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pull("alice/interrupted")
    assert len(calls) == 2
    assert store_listing() == held


def test_name_clash_in_the_store(hub: FakeHub, held, adapter_copy, capsys, monkeypatch) -> None:
    push_folder(adapter_copy("prompt"), "alice/other")
    code, err = run_main(["pull", "alice/other", "--name", "kept"], capsys, monkeypatch)
    assert_one_line_error(code, err, "store name 'kept' already holds alice/kept@", "--name")

    code, err = run_main(["pull", "alice/other", "--name", "../escape"], capsys, monkeypatch)
    assert_one_line_error(code, err, "invalid store name '../escape'")
    assert store_listing() == held


def test_pushing_a_folder_with_no_adapter(hub: FakeHub, tmp_path: Path, adapter_copy, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(["push", str(empty), "alice/nothing"], capsys, monkeypatch)
    assert_one_line_error(code, err, "holds no adapter", "adapter_config.json")

    code, err = run_main(["push", str(tmp_path / "missing"), "alice/nothing"], capsys, monkeypatch)
    assert_one_line_error(code, err, "neither a folder nor a store name")

    code, err = run_main(["push", str(adapter_copy("lora")), "alice/nothing"], capsys, monkeypatch)
    assert_one_line_error(code, err, "is a local path, not a Hub id", "--base-model")

    broken_card = adapter_copy("lora-builtin")
    (broken_card / "README.md").write_text("---\ntags: [unclosed\n---\n# card\n")
    code, err = run_main(["push", str(broken_card), "alice/nothing"], capsys, monkeypatch)
    assert_one_line_error(code, err, "README.md metadata", "not valid YAML")
    assert hub.repos == {}

    (broken_card / "README.md").write_text("---\nlicense: do-what-you-like\n---\n# card\n")
    code, err = run_main(["push", str(broken_card), "alice/nothing"], capsys, monkeypatch)
    assert_one_line_error(code, err, "refused the upload to alice/nothing", "license")
    repo = hub.repos["alice/nothing"]
    assert list(repo.commits[repo.branches["main"]].files) == [".gitattributes"]


def test_a_tag_on_another_version_is_refused_before_anything_is_pushed(
    hub: FakeHub, adapter_copy, capsys, monkeypatch
) -> None:
    push_folder(adapter_copy("lora-builtin"), "alice/tagged", tag="v1")
    commits = dict(hub.repos["alice/tagged"].commits)
    code, err = run_main(
        ["push", str(adapter_copy("prompt")), "alice/tagged", "--tag", "v1"], capsys, monkeypatch
    )
    assert_one_line_error(code, err, "tag 'v1' already exists on alice/tagged", "choose a new tag")
    assert hub.repos["alice/tagged"].commits == commits


def test_show_and_rm_of_an_unknown_name(hub: FakeHub, capsys, monkeypatch) -> None:
    for command in ("show", "rm"):
        code, err = run_main([command, "ghost"], capsys, monkeypatch)
        assert_one_line_error(code, err, "no adapter named 'ghost' in the store", "adapterhub list")


def test_resolve_of_an_unknown_name_or_folder(hub: FakeHub, tmp_path: Path) -> None:
    from adapterhub.errors import UserError
    from adapterhub.hub import resolve

    with pytest.raises(UserError, match="no adapter named 'ghost' in the store"):
        resolve("ghost")
    with pytest.raises(UserError, match=r"has no adapter_config\.json"):
        resolve(str(tmp_path))
