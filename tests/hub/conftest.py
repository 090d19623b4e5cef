"""Fixtures for hub tests: the fake Hub server, a process pointed at it, and tiny PEFT adapters.

In-process tests re-point huggingface_hub's import-time constants at a dead address, so any call that
does not pass our endpoint explicitly fails instead of quietly reaching the real Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from .fake_hub import FakeHub, running_hub

DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once
TOKENS = {"alice": "alice-token", "bob": "bob-token"}


@pytest.fixture(scope="session")
def hub_server() -> Iterator[FakeHub]:
    with running_hub() as hub:
        yield hub


@pytest.fixture
def hub(hub_server: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    """An empty fake Hub, with this process pointed at it as alice, a fresh HF_HOME and a fresh store."""
    import huggingface_hub.constants as hf_constants

    hub_server.reset()
    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "adapterhub-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", DEAD_ENDPOINT)
    monkeypatch.setattr(
        hf_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        DEAD_ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    return hub_server


def store_listing() -> dict[str, bytes]:
    """Every file under the store, hidden temp folders and locks included, with its bytes."""
    from adapterhub.hub import store

    root = store.root()
    if not root.exists():
        return {}
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.fixture
def held(hub: FakeHub, adapter_copy) -> dict[str, bytes]:
    """A store that already holds one adapter (``kept``), whose files must survive every failure."""
    from adapterhub.hub import pull, push_folder

    push_folder(adapter_copy("lora-builtin"), "alice/kept")
    pull("alice/kept", name="kept")
    return store_listing()


@pytest.fixture(params=["regular", "lfs"])
def any_hub(request: pytest.FixtureRequest, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """The fake Hub in both upload modes: files inline in commits, or weights through git-LFS."""
    import huggingface_hub.constants as hf_constants

    if request.param == "lfs":
        hub.lfs = True
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    return hub


def save_peft_adapter(base: Path, out: Path, config, *, base_model_name: str | None = None) -> Path:
    """Save a freshly initialised PEFT adapter on ``base``; optionally record another base model name."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    model.save_pretrained(out)
    if base_model_name is not None:
        config_path = out / "adapter_config.json"
        data = json.loads(config_path.read_text())
        data["base_model_name_or_path"] = base_model_name
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return out


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """Plain-PEFT adapters on the tiny Llama, made once: ``lora`` records the local base path; the
    others (``lora-builtin``, ``prompt``, ``ia3``, ``prefix``, ``p-tuning``) record ``builtin:tiny-llama``,
    which is portable as is."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    root = tmp_path_factory.mktemp("adapters")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    save_peft_adapter(tiny_llama, root / "lora", lora)
    builtin = {
        "lora-builtin": lora,
        "prompt": PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "ia3": IA3Config(task_type="CAUSAL_LM"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "p-tuning": PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=64, task_type="CAUSAL_LM"),
    }
    for name, config in builtin.items():
        save_peft_adapter(tiny_llama, root / name, config, base_model_name="builtin:tiny-llama")
    return root


@pytest.fixture
def adapter_copy(adapters_dir: Path, tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of one of ``adapters_dir``'s adapters, safe to modify."""

    def copy(name: str) -> Path:
        target = tmp_path / "src" / f"{name}-{len(list(tmp_path.glob('src/*')))}"
        shutil.copytree(adapters_dir / name, target)
        return target

    return copy


def hub_env(hub: FakeHub, tmp_path: Path, user: str = "alice") -> dict[str, str]:
    """The environment of a separate adapterhub process talking to ``hub``, set before it imports anything."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=TOKENS[user],
        HF_HOME=str(tmp_path / f"hf-home-{user}"),
        HF_HUB_DISABLE_TELEMETRY="1",
        ADAPTERHUB_HOME=os.environ["ADAPTERHUB_HOME"],
        COLUMNS="200",
    )
    return env


def run_main(
    args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """Run the real CLI entry point in this process; return its exit status and its stderr."""
    from adapterhub.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["adapterhub", *args])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def upload_raw(hub: FakeHub, repo_id: str, files: dict[str, bytes]) -> str:
    """Put files on the Hub as they are, bypassing push's validation (as another tool might)."""
    api = HfApi(endpoint=hub.url, token=TOKENS["alice"])
    api.create_repo(repo_id, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    return api.create_commit(repo_id, operations=operations, commit_message="raw upload").oid
