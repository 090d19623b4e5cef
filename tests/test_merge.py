"""``adapterhub merge``: exports equal PEFT's outputs, combinations equal PEFT's, bad input is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hub.fake_hub import FakeHub
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import adapterhub.merge
from adapterhub.cli import main
from adapterhub.errors import UserError
from adapterhub.merge import MergeRequest, merge
from adapterhub.models import ModelSpec, load_model
from tests.cli_runner import run_cli

INPUT_IDS = torch.tensor([[1, 5, 9, 33, 100, 200, 7, 300, 45, 2]])
FP32_BOUND = 1e-5
# Measured 0.004 (LoRA) and 0.0038 (IA3) on the tiny Llama, logits up to ~1: bf16 keeps 8 mantissa bits.
BF16_BOUND = 0.02
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base_path: Path, config: PeftConfig, out: Path, seed: int, *, seq2seq: bool = False) -> Path:
    """Save a PEFT adapter whose weights are random, so that merging it changes the outputs a lot."""
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = get_peft_model(auto.from_pretrained(base_path), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.1)
            elif "ia3_" in name:
                parameter.normal_(1.0, 0.3)
    model.save_pretrained(out)
    return out


def copy_adapter(source: Path, target: Path, **config: object) -> Path:
    """A copy of ``source`` with ``config`` entries overriding its adapter_config.json."""
    shutil.copytree(source, target)
    config_file = target / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config}))
    return target


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_mt5: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    ia3 = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    prompt = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4}
    return {
        "lora_a": save_adapter(tiny_llama, lora, root / "lora_a", seed=1),
        "lora_b": save_adapter(
            tiny_llama, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]), root / "lora_b", 2
        ),
        "lora_r4": save_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]), root / "lora_r4", 3),
        "ia3_a": save_adapter(tiny_llama, ia3, root / "ia3_a", seed=4),
        "ia3_b": save_adapter(tiny_llama, ia3, root / "ia3_b", seed=5),
        "prompt_tuning": save_adapter(tiny_llama, PromptTuningConfig(**prompt), root / "prompt_tuning", 6),
        "p_tuning": save_adapter(
            tiny_llama, PromptEncoderConfig(encoder_hidden_size=64, **prompt), root / "p_tuning", 7
        ),
        "prefix_tuning": save_adapter(tiny_llama, PrefixTuningConfig(**prompt), root / "prefix_tuning", 8),
        "mt5_lora": save_adapter(
            tiny_mt5, LoraConfig(r=8, target_modules=["q", "v", "wo"]), root / "mt5_lora", 9, seq2seq=True
        ),
    }


def peft_logits(base: str, adapter_paths: list[Path], combine: dict | None = None, quantization="none"):
    """What PEFT computes with the adapters on a fresh base (a shared base object would corrupt outputs)."""
    base_model = load_model(ModelSpec(base, quantization=quantization, dtype="float32", device="cpu"))
    model = PeftModel.from_pretrained(base_model, str(adapter_paths[0]), adapter_name="a0")
    for index, path in enumerate(adapter_paths[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    if combine is not None:
        torch.manual_seed(combine.pop("seed", 0))
        model.add_weighted_adapter(
            [f"a{i}" for i in range(len(adapter_paths))], adapter_name="mix", **combine
        )
        model.set_adapter("mix")
    return logits_of(model)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=INPUT_IDS, decoder_input_ids=INPUT_IDS[:, :4]).logits.float()
        return model(input_ids=INPUT_IDS).logits.float()


def merged_logits(folder: Path) -> torch.Tensor:
    config = json.loads((folder / "config.json").read_text())
    auto = AutoModelForSeq2SeqLM if config.get("is_encoder_decoder") else AutoModelForCausalLM
    return logits_of(auto.from_pretrained(folder))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference, relative to the logits' scale when that exceeds 1 (fp32 rounding is relative)."""
    return ((actual - expected).abs().max() / max(1.0, expected.abs().max().item())).item()


def base_logits(base: Path) -> torch.Tensor:
    return logits_of(AutoModelForCausalLM.from_pretrained(base))


@pytest.mark.parametrize("name", ["lora_a", "ia3_a"])
def test_single_adapter_merge_matches_peft(adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path, name):
    out = tmp_path / "merged"
    merge(MergeRequest(adapters=[str(adapters[name])], out=out))
    expected = peft_logits(str(tiny_llama), [adapters[name]])
    assert max_error(merged_logits(out), expected) < FP32_BOUND
    assert (base_logits(tiny_llama) - expected).abs().max() > 0.1, "the adapter must change the outputs"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        path.name for path in out.iterdir()
    }
    assert not list(out.glob("adapter_*")), "a merged model carries no adapter files"


def test_seq2seq_lora_merge_matches_peft(adapters: dict[str, Path], tiny_mt5: Path, tmp_path: Path):
    out = tmp_path / "merged"
    merge(MergeRequest(adapters=[str(adapters["mt5_lora"])], out=out))
    expected = peft_logits(str(tiny_mt5), [adapters["mt5_lora"]])
    assert max_error(merged_logits(out), expected) < FP32_BOUND


def test_bf16_export_stays_within_bound(adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "merged"
    merge(MergeRequest(adapters=[str(adapters["lora_a"])], out=out, dtype="bf16"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert reloaded.dtype == torch.bfloat16
    difference = max_error(logits_of(reloaded), peft_logits(str(tiny_llama), [adapters["lora_a"]]))
    assert FP32_BOUND < difference < BF16_BOUND


@pytest.mark.parametrize(
    ("names", "combine", "weights", "density"),
    [
        (["lora_a", "lora_b"], "linear", [0.7, 0.3], None),
        (["lora_a", "lora_b", "lora_r4"], "cat", [1.0, 0.5, -0.5], None),
        (["lora_a", "lora_b"], "ties", [1.0, 1.0], 0.5),
        (["lora_a", "lora_b"], "dare_linear", [0.6, 0.6], 0.7),
        (["lora_a", "lora_b"], "dare_ties", [1.0, 0.5], 0.5),
        (["ia3_a", "ia3_b"], "linear", [0.25, 0.75], None),
    ],
)
def test_combined_merge_matches_peft_weighted_adapter(
    adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path, names, combine, weights, density
):
    paths = [adapters[name] for name in names]
    out = tmp_path / "merged"
    request = MergeRequest(
        adapters=[str(p) for p in paths], out=out, combine=combine, weights=weights, density=density, seed=3
    )
    merge(request)
    options = {"weights": weights, "seed": 3}
    if names[0].startswith("lora"):
        options |= {"combination_type": combine, "density": density}
    expected = peft_logits(str(tiny_llama), paths, combine=options)
    assert max_error(merged_logits(out), expected) < FP32_BOUND
    settings = yaml.safe_load((out / "README.md").read_text().split("---")[1])["adapterhub_merge"]
    assert (
        settings["combine"] == combine and settings["weights"] == weights and settings["density"] == density
    )


def test_default_weights_average_the_adapters(adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path):
    paths = [adapters["ia3_a"], adapters["ia3_b"]]
    merge(MergeRequest(adapters=[str(p) for p in paths], out=tmp_path / "merged"))
    expected = peft_logits(str(tiny_llama), paths, combine={"weights": [0.5, 0.5]})
    assert max_error(merged_logits(tmp_path / "merged"), expected) < FP32_BOUND


def test_card_records_base_adapters_methods_and_settings(adapters: dict[str, Path], tmp_path: Path):
    adapter = copy_adapter(
        adapters["lora_a"], tmp_path / "trained", base_model_name_or_path="builtin:tiny-llama"
    )
    out = tmp_path / "merged"
    merge(MergeRequest(adapters=[str(adapter)], out=out, dtype="fp32"))
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and "lora" in metadata["tags"]
    assert "base_model" not in metadata, "a builtin name is no Hub id"
    settings = metadata["adapterhub_merge"]
    assert settings["base_model"] == "builtin:tiny-llama" and settings["base_weights"] == "original"
    assert settings["adapters"] == [
        {
            "spec": str(adapter),
            "method": "lora",
            "rank": 8,
            "base_model": "builtin:tiny-llama",
            "trained_quantization": None,
        }
    ]
    assert settings["combine"] is None and settings["dtype"] == "float32"
    assert f"| `{adapter}` | lora | 8 |" in card


def test_nf4_trained_adapter_merges_into_dequantized_nf4_weights(
    adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path
):
    """``nf4`` reproduces the adapter on its NF4 base; ``original`` differs by the quantization error."""
    adapter = copy_adapter(
        adapters["lora_a"], tmp_path / "qlora", base_model_name_or_path="builtin:tiny-llama"
    )
    (adapter / "recipe.yaml").write_text("model:\n  name: builtin:tiny-llama\n  quantization: nf4\n")
    merge(MergeRequest(adapters=[str(adapter)], out=tmp_path / "auto"))
    merge(MergeRequest(adapters=[str(adapter)], out=tmp_path / "original", base_weights="original"))
    on_nf4 = peft_logits("builtin:tiny-llama", [adapter], quantization="nf4")
    on_original = peft_logits("builtin:tiny-llama", [adapter])
    nf4_policy, original_policy = merged_logits(tmp_path / "auto"), merged_logits(tmp_path / "original")
    assert max_error(nf4_policy, on_nf4) < FP32_BOUND
    assert max_error(original_policy, on_original) < FP32_BOUND
    # Measured 0.043 on the tiny Llama (logits up to 0.55): the base's NF4 quantization error,
    # which the adapter never saw.
    assert (original_policy - on_nf4).abs().max() > 0.01
    card = yaml.safe_load((tmp_path / "auto" / "README.md").read_text().split("---")[1])
    assert card["adapterhub_merge"]["base_weights"] == "nf4"
    assert card["adapterhub_merge"]["adapters"][0]["trained_quantization"] == "nf4"


@pytest.mark.slow
def test_merges_adapter_trained_by_adapterhub_on_nf4(tmp_path: Path, monkeypatch):
    from adapterhub.recipe import load_recipe
    from adapterhub.train.trainer import train

    repo = Path(__file__).parents[1]
    monkeypatch.chdir(repo)  # the recipe names its data relative to the repository
    run = tmp_path / "run"
    overrides = ["model.quantization=nf4", "training.max_steps=2", "training.eval_max_samples=4"]
    train(load_recipe(repo / "recipes" / "quickstart.yaml", [*overrides, f"output.dir={run}"]))
    plan = merge(MergeRequest(adapters=[str(run)], out=tmp_path / "merged"))
    assert plan.base == "builtin:tiny-llama" and plan.base_weights == "nf4"
    expected = peft_logits("builtin:tiny-llama", [run], quantization="nf4")
    assert max_error(merged_logits(tmp_path / "merged"), expected) < FP32_BOUND


@pytest.mark.slow
def test_export_loads_without_peft(adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "merged"
    merge(MergeRequest(adapters=[str(adapters["lora_a"])], out=out))
    # None in sys.modules is how Python sees a package that is not installed: find_spec() answers None
    # (transformers' availability probe) and import raises ModuleNotFoundError. A finder that raised
    # ImportError instead would crash that probe, which a real missing install never does.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["peft"] = None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import is_peft_available
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        AutoTokenizer.from_pretrained({str(out)!r})
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({INPUT_IDS.tolist()})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        try:
            import peft
        except ModuleNotFoundError:
            print("peft blocked", is_peft_available())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "peft blocked False" in result.stdout
    expected = peft_logits(str(tiny_llama), [adapters["lora_a"]])
    assert max_error(torch.load(tmp_path / "logits.pt"), expected) < FP32_BOUND


def test_cli_merges_and_prints_json(adapters: dict[str, Path], tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "merged"
    argv = ["adapterhub", "merge", str(adapters["lora_a"]), str(adapters["lora_b"]), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--combine", "cat", "--weights", "1,0.5", "--json"])
    main()
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and report["combine"] == "cat" and report["weights"] == [1.0, 0.5]
    assert (out / "model.safetensors").is_file()


def assert_nothing_written(folder: Path, out: Path) -> None:
    assert not out.exists()
    assert not [path.name for path in folder.iterdir() if path.name.startswith(f".{out.name}")]


def assert_one_line_cli_error(argv: list[str], monkeypatch, capsys, *words: str) -> None:
    monkeypatch.setattr(sys, "argv", ["adapterhub", "merge", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err.strip()
    assert exited.value.code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err


def test_refuses_adapter_whose_base_differs(adapters: dict[str, Path], tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "merged"
    argv = [str(adapters["lora_a"]), "--base", "builtin:tiny-mt5", "--out", str(out)]
    assert_one_line_cli_error(argv, monkeypatch, capsys, "builtin:tiny-mt5", "--base")
    assert_nothing_written(tmp_path, out)


def test_refuses_adapters_of_different_bases(adapters: dict[str, Path], tmp_path: Path):
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="different bases"):
        merge(MergeRequest(adapters=[str(adapters["lora_a"]), str(adapters["mt5_lora"])], out=out))
    assert_nothing_written(tmp_path, out)


def test_accepts_builtin_base_for_adapter_recording_its_folder(
    adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path
):
    out = tmp_path / "merged"
    merge(MergeRequest(adapters=[str(adapters["lora_a"])], base="builtin:tiny-llama", out=out))
    assert max_error(merged_logits(out), peft_logits(str(tiny_llama), [adapters["lora_a"]])) < FP32_BOUND


def test_refuses_adapter_without_base_or_not_fitting_the_base(adapters: dict[str, Path], tmp_path: Path):
    adapter = copy_adapter(adapters["mt5_lora"], tmp_path / "no_base", base_model_name_or_path=None)
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="records no base model: pass --base"):
        merge(MergeRequest(adapters=[str(adapter)], out=out))
    with pytest.raises(UserError, match=r"does not fit this base: .*not found in the base model"):
        merge(MergeRequest(adapters=[str(adapter)], out=out, base="builtin:tiny-llama"))
    assert_nothing_written(tmp_path, out)


def test_refuses_unknown_adapter(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "merged"
    assert_one_line_cli_error(["no-such-adapter", "--out", str(out)], monkeypatch, capsys, "no-such-adapter")
    assert_nothing_written(tmp_path, out)


def test_refuses_weights_not_matching_adapters(
    adapters: dict[str, Path], tmp_path: Path, monkeypatch, capsys
):
    out = tmp_path / "merged"
    argv = [str(adapters["lora_a"]), str(adapters["lora_b"]), "--weights", "1", "--out", str(out)]
    assert_one_line_cli_error(argv, monkeypatch, capsys, "--weights has 1 values for 2 adapters")
    assert_nothing_written(tmp_path, out)


def test_refuses_unknown_combine_method(adapters: dict[str, Path], tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "merged"
    argv = [str(adapters["lora_a"]), str(adapters["lora_b"]), "--combine", "median", "--out", str(out)]
    assert_one_line_cli_error(argv, monkeypatch, capsys, "median", "dare_ties")
    assert_nothing_written(tmp_path, out)
    with pytest.raises(UserError, match="unknown --combine 'median'"):  # before any download is tried
        merge(MergeRequest(adapters=["org/not-pulled"], out=out, combine="median"))


def test_refuses_existing_out_without_overwrite(
    adapters: dict[str, Path], tmp_path: Path, monkeypatch, capsys
):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_cli_error(
        [str(adapters["lora_a"]), "--out", str(out)], monkeypatch, capsys, "--overwrite"
    )
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    merge(MergeRequest(adapters=[str(adapters["lora_a"])], out=out, overwrite=True))
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    ("name", "family"),
    [("prompt_tuning", "prompt tuning"), ("p_tuning", "P-tuning"), ("prefix_tuning", "prefix tuning")],
)
def test_refuses_prompt_family_adapter(
    adapters: dict[str, Path], tmp_path: Path, monkeypatch, capsys, name: str, family: str
):
    out = tmp_path / "merged"
    argv = [str(adapters[name]), "--out", str(out)]
    assert_one_line_cli_error(argv, monkeypatch, capsys, family, "cannot be merged", "adapterhub serve")
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("names", "options", "message"),
    [
        (["lora_a", "ia3_a"], {}, "cannot combine LoRA with IA3"),
        (
            ["ia3_a", "ia3_b"],
            {"combine": "ties", "density": 0.5},
            "IA3 adapters combine with --combine linear",
        ),
        (["lora_a", "lora_b"], {"combine": "ties"}, "needs --density"),
        (["lora_a", "lora_b"], {"combine": "dare_linear", "density": 1.5}, "out of range"),
        (["lora_a", "lora_b"], {"density": 0.5}, "--density applies to"),
        (["lora_a", "lora_r4"], {"combine": "linear"}, "same r value"),
        (["lora_a"], {"base_weights": "int4"}, "unknown --base-weights"),
        (["lora_a"], {"dtype": "fp8"}, "unknown --dtype"),
    ],
)
def test_refuses_bad_combinations(adapters: dict[str, Path], tmp_path: Path, names, options, message):
    out = tmp_path / "merged"
    with pytest.raises(UserError, match=message) as refused:
        merge(MergeRequest(adapters=[str(adapters[name]) for name in names], out=out, **options))
    assert "\n" not in str(refused.value)
    assert_nothing_written(tmp_path, out)


def test_failure_while_saving_leaves_nothing_half_written(
    adapters: dict[str, Path], tmp_path: Path, monkeypatch
):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")

    def broken_card(plan) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(adapterhub.merge, "model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        merge(MergeRequest(adapters=[str(adapters["lora_a"])], out=out, overwrite=True))
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]


@pytest.fixture(scope="module")
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    server, thread = hub.serve()
    yield hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.mark.slow
def test_merges_hub_adapter_and_pushes_the_model(
    adapters: dict[str, Path], fake_hub: FakeHub, tmp_path: Path
):
    """``REPO_ID@TAG`` is pulled through the hub module, its NF4 recipe picks the policy, --push uploads."""
    files = {path.name: path.read_bytes() for path in adapters["lora_a"].iterdir()}
    adapter = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps(
        {**adapter, "base_model_name_or_path": "builtin:tiny-llama"}
    ).encode()
    files["recipe.yaml"] = b"model:\n  name: builtin:tiny-llama\n  quantization: nf4\n"
    repo = fake_hub.create_repo("alice/qlora")
    repo.tags["v1"] = fake_hub.commit(repo, None, files, [], "adapter").sha
    local_adapter = tmp_path / "qlora"
    local_adapter.mkdir()
    for name, data in files.items():
        (local_adapter / name).write_bytes(data)
    out = tmp_path / "merged"
    # A fresh process: huggingface_hub reads HF_ENDPOINT when it is imported.
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env |= {
        "HF_ENDPOINT": fake_hub.url,
        "HF_TOKEN": "alice-token",
        "HF_HOME": str(tmp_path / "hf-home"),
        "ADAPTERHUB_HOME": str(tmp_path / "home"),
    }
    command = ["alice/qlora@v1", "--out", str(out), "--push", "alice/qlora-merged", "--json"]
    result = run_cli(["merge", *command], env=env, cwd=None, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["base_weights"] == "nf4" and report["adapters"][0]["spec"] == "alice/qlora@v1"
    pushed = fake_hub.repos["alice/qlora-merged"]
    assert report["pushed"]["commit"] == pushed.branches["main"]
    remote_files = pushed.commits[pushed.branches["main"]].files
    local_files = {path.name: path.read_bytes() for path in out.iterdir()}
    assert {name: data for name, data in remote_files.items() if name != ".gitattributes"} == local_files
    expected = peft_logits("builtin:tiny-llama", [local_adapter], quantization="nf4")
    assert max_error(merged_logits(out), expected) < FP32_BOUND


def test_an_alias_bomb_recipe_yaml_in_the_adapter_is_one_line(
    adapters: dict[str, Path], tmp_path: Path, monkeypatch, capsys
):
    from tests.test_yamlio import alias_bomb

    adapter = copy_adapter(adapters["lora_a"], tmp_path / "bombed")
    (adapter / "recipe.yaml").write_text("model: {name: builtin:tiny-llama}\n" + alias_bomb())
    out = tmp_path / "merged"
    started = time.perf_counter()
    assert_one_line_cli_error([str(adapter), "--out", str(out)], monkeypatch, capsys, "recipe.yaml: refused")
    assert time.perf_counter() - started < 10  # parsing stops at the cap; expanding would take minutes
    assert_nothing_written(tmp_path, out)
