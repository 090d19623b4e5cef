"""The allowlist covers the installed PEFT exactly, and refuses what it does not know."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import peft
import pytest

from adapterhub.contract import read_adapter
from adapterhub.contract.config_keys import RULES, WRITTEN_AGAINST_PEFT, installed_defaults, peft_config_class
from adapterhub.runtime.api import RequestError


@pytest.mark.parametrize("method", list(RULES))
def test_every_field_of_the_installed_peft_config_has_a_rule(method: str) -> None:
    """A PEFT upgrade that adds an option fails here until someone decides whether it is served."""
    fields = {field.name for field in dataclasses.fields(peft_config_class(method))}
    assert fields == set(RULES[method]), (peft.__version__, WRITTEN_AGAINST_PEFT)


def test_the_table_was_written_against_the_installed_peft() -> None:
    assert peft.__version__ == WRITTEN_AGAINST_PEFT


def _edited(adapter_dirs: dict[str, Path], tmp_path: Path, name: str, **changes) -> Path:
    folder = tmp_path / name
    shutil.copytree(adapter_dirs[name], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_an_unknown_key_is_refused_naming_it(adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _edited(adapter_dirs, tmp_path, "lora", new_option_from_the_future=True)
    with pytest.raises(RequestError, match="new_option_from_the_future=True") as refused:
        read_adapter(folder)
    assert refused.value.code == "unsupported_adapter"


def test_a_key_without_a_rule_is_accepted_only_at_the_peft_default(
    adapter_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback for options the table does not know but the installed PEFT does."""
    monkeypatch.delitem(RULES["lora"], "use_qalora")
    assert installed_defaults("lora")["use_qalora"] is False
    read_adapter(_edited(adapter_dirs, tmp_path, "lora", use_qalora=False))
    with pytest.raises(RequestError, match="use_qalora=True"):
        read_adapter(_edited(adapter_dirs, tmp_path / "on", "lora", use_qalora=True))


def test_values_peft_itself_refuses_are_corrupt(adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _edited(adapter_dirs, tmp_path, "lora", use_dora=True, lora_bias=True)
    with pytest.raises(RequestError, match="not a valid lora config") as refused:
        read_adapter(folder)
    assert refused.value.code == "corrupt_adapter"
