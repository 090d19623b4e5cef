"""The local store and adapter validation, without any Hub."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from adapterhub.card import adapter_card, with_hub_metadata
from adapterhub.errors import UserError
from adapterhub.hub import resolve, store
from adapterhub.hub.adapter import inspect_adapter


@pytest.mark.parametrize(
    ("name", "method", "rank", "virtual_tokens"),
    [
        ("lora-builtin", "lora", 4, None),
        ("ia3", "ia3", None, None),
        ("prompt", "prompt_tuning", None, 4),
        ("prefix", "prefix_tuning", None, 3),
        ("p-tuning", "p_tuning", None, 5),
    ],
)
def test_inspect_every_family(adapters_dir: Path, name: str, method: str, rank, virtual_tokens) -> None:
    folder = adapters_dir / name
    summary = inspect_adapter(folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    assert (summary.method, summary.rank, summary.num_virtual_tokens) == (method, rank, virtual_tokens)
    assert summary.base_model == "builtin:tiny-llama"
    assert summary.params == sum(tensor.numel() for tensor in tensors.values())


def test_prompt_embeddings_of_the_wrong_shape_are_refused(adapter_copy) -> None:
    folder = adapter_copy("prefix")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_virtual_tokens": 7}))
    with pytest.raises(UserError, match="prompt_embeddings has 3 rows, num_virtual_tokens is 7"):
        inspect_adapter(folder)


def test_add_list_show_verify_and_remove(adapter_copy, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    source = adapter_copy("lora-builtin")
    manifest = store.add_folder(source, "local-lora")
    weights = source / "adapter_model.safetensors"
    assert manifest.files["adapter_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (manifest.origin, manifest.source, manifest.revision) == ("local", str(source.resolve()), None)
    assert manifest.size == sum(path.stat().st_size for path in source.iterdir())
    assert [entry.name for entry in store.entries()] == ["local-lora"]
    assert store.read("local-lora") == manifest
    assert resolve("local-lora") == store.entry_path("local-lora")

    with pytest.raises(UserError, match="store name 'local-lora' is taken"):
        store.add_folder(adapter_copy("prompt"), "local-lora")
    assert store.add_folder(adapter_copy("prompt"), "local-lora", replace=True).method == "prompt_tuning"

    assert store.verify("local-lora") == []
    (store.entry_path("local-lora") / "adapter_model.safetensors").write_bytes(b"tampered")
    assert store.verify("local-lora") == ["adapter_model.safetensors"]

    manifest_path = store.entry_path("local-lora") / store.MANIFEST
    manifest_path.write_text("{not json")
    with pytest.raises(UserError, match="the manifest of 'local-lora' is unreadable"):
        store.entries()

    store.remove("local-lora")
    assert store.entries() == [] and list(store.root().iterdir()) == []


def test_adapter_card_metadata_for_hub_and_builtin_bases() -> None:
    card = adapter_card(
        base_model="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        method="ia3",
        title="alice/ia3",
        metrics={"accuracy": 0.91234},
        recipe_yaml="method:\n  type: ia3\n",
        curve_png="loss_curve.png",
        extra_tags=["sentiment"],
    )
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata == {
        "base_model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "library_name": "peft",
        "tags": ["ia3", "adapterhub", "peft", "sentiment"],
    }
    assert "| accuracy | 0.9123 |" in card and "![training loss](loss_curve.png)" in card
    assert "```yaml\nmethod:\n  type: ia3\n```" in card
    assert with_hub_metadata(card, base_model="TinyLlama/TinyLlama-1.1B-Chat-v1.0", method="ia3") == card

    builtin = adapter_card(base_model="builtin:tiny-llama", method="lora", title="tiny")
    assert "base_model:" not in builtin.split("---")[1] and "`builtin:tiny-llama`" in builtin


def test_list_never_cuts_a_value_in_a_pipe_or_at_80_columns(
    adapter_copy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from rich.console import Console

    from adapterhub.hub import commands
    from tests.table_text import column_texts, squeezed

    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    for name, kind in (("prefix_tuning-support-style-v2", "prefix"), ("p_tuning-greeter", "p-tuning")):
        store.add_folder(adapter_copy(kind), name)
    entries = store.entries()
    expected = {
        0: [entry.name for entry in entries],
        1: [entry.method for entry in entries],
        2: [entry.base_model for entry in entries],
        4: [f"{entry.params:,}" for entry in entries],
        5: [entry.source_at_revision for entry in entries],  # the long temp folders they came from
    }
    headers = ["name", "method", "base model", "size", "stored params", "source@revision"]
    for console in (
        Console(file=io.StringIO(), width=80),  # a pipe
        Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None),  # a terminal
    ):
        monkeypatch.setattr(commands, "console", console)
        commands.list_adapters.main([], standalone_mode=False)
        rendered = console.file.getvalue()
        shown_headers, columns = column_texts(rendered)
        assert "…" not in rendered and shown_headers == [squeezed([header]) for header in headers]
        for index, values in expected.items():
            assert columns[index] == squeezed(values), rendered
        assert columns[3].count("KiB") == len(entries)
        if console.is_terminal:
            assert max(len(line) for line in rendered.splitlines()) <= 80


class WritesAMarker:
    """Pickled as a call to ``open(marker, "w")``: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_in_adapter_model_bin_is_refused_unrun_naming_the_file(adapter_copy, tmp_path: Path) -> None:
    import torch

    folder = adapter_copy("lora-builtin")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"base_model.model.lm_head.weight": WritesAMarker(marker)}, folder / "adapter_model.bin")
    with pytest.raises(UserError) as refused:
        inspect_adapter(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / 'adapter_model.bin'} holds more than plain tensors")
    assert "adapter_model.safetensors" in message and "\n" not in message
    assert not marker.exists()


def test_a_deeply_nested_adapter_config_is_one_line_naming_the_file(adapter_copy) -> None:
    folder = adapter_copy("lora-builtin")
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    with pytest.raises(UserError, match=r"adapter_config\.json is nested too deeply"):
        inspect_adapter(folder)
