"""One contract at every door: pull, serve, chat and merge refuse the same bad adapters the same way."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub.hub import store
from adapterhub.runtime.api import RequestError
from tests.hub.conftest import run_main, upload_raw
from tests.runtime.references import make_engine

pytestmark = pytest.mark.slow
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _nan_weights(folder: Path) -> str:
    weights = load_file(folder / "adapter_model.safetensors")
    weights[A_KEY][0, 0] = float("nan")
    save_file(weights, folder / "adapter_model.safetensors")
    return "NaN or inf weights"


def _wrong_shape(folder: Path) -> str:
    weights = load_file(folder / "adapter_model.safetensors")
    weights[A_KEY] = torch.randn(weights[A_KEY].shape[0], 32)
    save_file(weights, folder / "adapter_model.safetensors")
    return "lora_A.weight' is [8, 32] there, [8, 64] on this base"


def _unknown_key(folder: Path) -> str:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_future_option": 1}))
    return "lora_future_option=1 is not served"


BREAKERS = {"nan": _nan_weights, "shape": _wrong_shape, "unknown-key": _unknown_key}


@pytest.fixture(params=list(BREAKERS))
def broken(request, adapter_dirs: dict[str, Path], tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / f"broken-{request.param}"
    shutil.copytree(adapter_dirs["lora"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "builtin:tiny-llama"})
    )
    return folder, BREAKERS[request.param](folder)


def _one_line(stderr: str, needle: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], stderr
    assert "Traceback" not in stderr


def test_serve_refuses_it(broken: tuple[Path, str]) -> None:
    folder, needle = broken
    engine = make_engine({})
    with pytest.raises(RequestError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        engine.register("bad", str(folder))
    assert engine.list() == []


def _chat(spec: str, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    return run_main(["chat", "--base", "builtin:tiny-llama", "--adapter", spec], capsys, monkeypatch)


def test_chat_refuses_it(broken: tuple[Path, str], capsys, monkeypatch) -> None:
    folder, needle = broken
    code, err = _chat(str(folder), capsys, monkeypatch)
    assert code == 1
    _one_line(err, needle)


def test_merge_refuses_it(broken: tuple[Path, str], tmp_path: Path, capsys, monkeypatch) -> None:
    folder, needle = broken
    code, err = run_main(["merge", str(folder), "--out", str(tmp_path / "merged")], capsys, monkeypatch)
    assert code == 1
    _one_line(err, needle)
    assert not (tmp_path / "merged").exists()


def test_pull_stores_nothing(broken: tuple[Path, str], hub, capsys, monkeypatch) -> None:
    folder, needle = broken
    upload_raw(hub, "alice/broken", {path.name: path.read_bytes() for path in folder.iterdir()})
    code, err = run_main(["pull", "alice/broken", "--name", "broken"], capsys, monkeypatch)
    assert code == 1
    _one_line(err, needle)
    assert not store.exists("broken")


@pytest.mark.parametrize("spec", ["./runs/missing", "/no/such/adapter", "~/no-such-adapter"])
def test_a_path_that_does_not_exist_is_no_such_folder(spec: str, tmp_path: Path, capsys, monkeypatch) -> None:
    engine = make_engine({})
    with pytest.raises(RequestError, match="no such folder"):
        engine.register("missing", spec)
    _one_line(
        run_main(["merge", spec, "--out", str(tmp_path / "merged")], capsys, monkeypatch)[1], "no such folder"
    )
    _one_line(_chat(spec, capsys, monkeypatch)[1], "no such folder")
