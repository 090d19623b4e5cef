"""``adapterhub serve`` before the server starts: adapter specs, the base model, one-line errors."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub.errors import UserError
from adapterhub.hub.specs import AdapterSpec, infer_base
from adapterhub.server.launch import parse_adapter_specs
from tests.table_text import column_texts, squeezed


def adapter_folder(root: Path, name: str, base: str | None) -> Path:
    folder = root / name
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
    if base is not None:
        config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_specs_take_aliases_and_default_names(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path, "sentiment-lora", "org/base")
    specs = parse_adapter_specs(f"sql=org/sql-lora@v2, {folder}/ ,org/chat-ia3@main,stored-one,")
    assert specs == [
        AdapterSpec("sql", "org/sql-lora@v2"),
        AdapterSpec("sentiment-lora", f"{folder}/"),
        AdapterSpec("org/chat-ia3", "org/chat-ia3@main"),
        AdapterSpec("stored-one", "stored-one"),
    ]
    assert parse_adapter_specs("") == []


@pytest.mark.parametrize("text", ["a=", "=b", "a b=c", "x,x", "org/a@1,org/a@2"])
def test_bad_specs_are_one_line_errors(text: str) -> None:
    with pytest.raises(UserError) as err:
        parse_adapter_specs(text)
    assert "\n" not in str(err.value) and ("ALIAS=SPEC" in str(err.value) or "twice" in str(err.value))


def test_base_comes_from_the_flag_or_the_adapters_shared_base(tmp_path: Path) -> None:
    one = AdapterSpec("one", str(adapter_folder(tmp_path, "one", "org/base")))
    two = AdapterSpec("two", str(adapter_folder(tmp_path, "two", "org/base")))
    other = AdapterSpec("other", str(adapter_folder(tmp_path, "other", "org/other-base")))
    silent = AdapterSpec("silent", str(adapter_folder(tmp_path, "silent", None)))
    assert infer_base([one, two], None) == "org/base"
    assert infer_base([one, other], "builtin:tiny-llama") == "builtin:tiny-llama"
    listing = r"\(one -> org/base, two -> org/base, other -> org/other-base\): pass --base MODEL"
    with pytest.raises(UserError, match=listing):
        infer_base([one, two, other], None)
    with pytest.raises(UserError, match="'silent' does not record its base model: pass --base"):
        infer_base([silent], None)
    with pytest.raises(UserError, match="nothing to serve"):
        infer_base([], None)


def test_cli_prints_one_line_and_fails_on_disagreeing_bases(tmp_path: Path) -> None:
    one = adapter_folder(tmp_path, "one", "org/base")
    other = adapter_folder(tmp_path, "other", "org/other-base")
    run = subprocess.run(
        [sys.executable, "-m", "adapterhub", "serve", "--adapters", f"{one},{other}"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "pass --base MODEL" in run.stderr


def test_build_engine_infers_the_base_and_registers_the_adapters(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from adapterhub.runtime.api import GenerationRequest, RequestError
    from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
    from adapterhub.server.launch import ServeOptions, build_engine

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    folder = write_random_adapter(model, peft_config("ia3"), tmp_path / "ia3", seed=3)
    options = ServeOptions(adapters=parse_adapter_specs(f"mine={folder}"), device="cpu", max_queue=2)
    engine = build_engine(options)
    assert engine.base_name == str(tiny_llama)
    assert [(info.name, info.method, info.source) for info in engine.list()] == [("mine", "ia3", str(folder))]
    for _ in range(2):  # not started: requests wait in the queue, which holds --max-queue
        engine.submit(GenerationRequest("hello", adapter="mine"))
    with pytest.raises(RequestError) as full:
        engine.submit(GenerationRequest("hello", adapter="mine"))
    assert full.value.code == "overloaded"


def test_serve_on_a_taken_port_fails_in_one_line_before_loading_anything() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A base that does not exist: had it been looked at first, the error would be about it.
        command = [
            sys.executable,
            "-m",
            "adapterhub",
            "serve",
            "--base",
            "./no-such-model",
            "--port",
            str(port),
        ]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err = child.stderr.read()
        child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 1
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err, err
    # CPU seconds, not wall time: a busy machine slows a start, but loading a model costs far more.
    assert usage.ru_utime + usage.ru_stime < 3.0


def test_an_adapter_cannot_take_the_base_models_name(tmp_path: Path) -> None:
    from adapterhub.server.launch import check_names

    folder = adapter_folder(tmp_path, "lora", "builtin:tiny-llama")
    check_names(parse_adapter_specs(f"mine={folder}"), "builtin:tiny-llama")
    with pytest.raises(
        UserError, match="the base model's own name, and could never be reached: give it an alias"
    ):
        check_names(parse_adapter_specs(f"builtin:tiny-llama={folder}"), "builtin:tiny-llama")


def test_the_startup_table_names_every_model_whole_at_80_columns() -> None:
    from rich.console import Console

    from adapterhub.runtime.api import AdapterInfo
    from adapterhub.server.launch import served_table
    from adapterhub.tables import print_table

    class Served:
        base_name = "HuggingFaceTB/SmolLM2-360M-Instruct"
        backend = "fast multi-adapter runtime"

        def list(self) -> list[AdapterInfo]:
            return [
                AdapterInfo("support-lora", "lora", "alice/smollm2-support@v1", self.base_name, rank=16),
                AdapterInfo("style", "prefix_tuning", "/srv/adapters/style-prefix", self.base_name, None, 20),
            ]

    rows = [
        ["HuggingFaceTB/SmolLM2-360M-Instruct", "base", "", ""],
        ["support-lora", "lora", "r=16", "alice/smollm2-support@v1"],
        ["style", "prefix_tuning", "20 virtual tokens", "/srv/adapters/style-prefix"],
    ]
    for console in (
        Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None),  # a terminal
        Console(file=io.StringIO(), width=80),  # a pipe
    ):
        print_table(served_table(Served()), console)
        rendered = console.file.getvalue()
        _, columns = column_texts(rendered)
        assert columns == [squeezed([row[index] for row in rows]) for index in range(4)], rendered
        assert "…" not in rendered
        assert "models served by the fast multi-adapter runtime" in rendered
