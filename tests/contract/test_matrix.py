"""The adapter contract, row by row: every PEFT option is served exactly as plain PEFT serves it, or refused.

Each row is an adapter written by plain PEFT (``save_pretrained``, random non-trivial weights) or a
plain LoRA whose saved config is edited to carry one option PEFT cannot build here. Served rows run in
one mixed batch with base rows and must give PEFT's greedy tokens and first-step logits (a fresh base
per PeftModel); refused rows must raise ``unsupported_adapter`` naming the key. A row served with any
other output fails, which is the one thing the contract exists to prevent.

The bases have ``intermediate_size == hidden_size``, so an IA3 vector put on the wrong side of a
projection, or a LoRA on the wrong module, cannot hide behind a shape error.
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import (
    BOFTConfig,
    FourierFTConfig,
    HRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
)
from transformers import AutoConfig, AutoModelForCausalLM

from adapterhub.runtime.api import GenerationRequest, RequestError, SamplingParams
from adapterhub.runtime.engine import Engine, EngineConfig
from adapterhub.runtime.random_adapters import write_random_adapter
from adapterhub.tiny import build_tokenizer

pytestmark = pytest.mark.slow

PROMPT_IDS = ([5, 70, 81, 99, 120, 7], [9, 44, 3])
NEW_TOKENS = 5
LOGIT_TOLERANCE = 1e-4
QKV = ["q_proj", "k_proj", "v_proj"]
ALL = [*QKV, "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Row:
    name: str
    config: Callable[[Path], PeftConfig]  # given the base folder (its tokenizer, for text init)
    edit: dict = field(default_factory=dict)  # keys written into the saved adapter_config.json
    refused: str | None = None  # what the refusal must name; None: served exactly

    @property
    def served(self) -> bool:
        return self.refused is None


def lora(r: int = 4, **kwargs) -> Callable[[Path], PeftConfig]:
    return lambda base: LoraConfig(task_type="CAUSAL_LM", r=r, **kwargs)


def ia3(**kwargs) -> Callable[[Path], PeftConfig]:
    return lambda base: IA3Config(task_type="CAUSAL_LM", **kwargs)


PLAIN = lora(target_modules=["q_proj", "v_proj"])

LORA_ROWS = [
    Row("lora-default-targets", lora()),
    Row("lora-list", lora(target_modules=ALL, lora_alpha=8)),
    Row("lora-regex-string", lora(target_modules=r".*\.(q|v|down)_proj")),
    Row("lora-dotted-list", lora(target_modules=["self_attn.q_proj", "mlp.down_proj"])),
    Row("lora-all-linear", lora(target_modules="all-linear")),
    Row("lora-exclude", lora(target_modules=ALL, exclude_modules=["k_proj", "gate_proj"])),
    Row("lora-exclude-regex", lora(target_modules=ALL, exclude_modules=r".*\.0\.mlp\..*")),
    Row("lora-layers-int", lora(target_modules=QKV, layers_to_transform=1)),
    Row("lora-layers-pattern", lora(target_modules=QKV, layers_to_transform=[0], layers_pattern="layers")),
    Row(
        "lora-rank-alpha-patterns",
        lora(
            target_modules=ALL,
            r=4,
            rank_pattern={r"layers\.0\.self_attn\.q_proj": 8, "down_proj": 2},
            alpha_pattern={"o_proj": 3, r".*\.1\..*": 11},
        ),
    ),
    Row("lora-rslora", lora(target_modules=ALL, r=8, lora_alpha=5, use_rslora=True)),
    Row("lora-init-gaussian", lora(target_modules=QKV, init_lora_weights="gaussian")),
    Row("lora-init-false", lora(target_modules=QKV, init_lora_weights=False)),
    Row("lora-init-orthogonal", lora(target_modules=QKV, init_lora_weights="orthogonal")),
    Row("lora-init-eva", PLAIN, edit={"init_lora_weights": "eva"}),
    Row("lora-dropout", lora(target_modules=ALL, lora_dropout=0.3)),
    Row("lora-fan-in-fan-out", lora(target_modules=QKV, fan_in_fan_out=True)),
    Row("lora-task-type-null", PLAIN, edit={"task_type": None}),
    Row("lora-inference-mode", PLAIN, edit={"inference_mode": True, "revision": "main"}),
    Row("lora-dora", lora(target_modules=ALL, use_dora=True)),
    Row(
        "lora-dora-rslora-patterns",
        lora(target_modules=QKV, use_dora=True, use_rslora=True, rank_pattern={"v_proj": 2}),
    ),
    Row("lora-bias-on-b", lora(target_modules=QKV, lora_bias=True)),
    Row("lora-bias-all", lora(target_modules=["q_proj", "o_proj"], bias="all")),
    Row("lora-bias-lora-only", lora(target_modules=["q_proj", "v_proj"], bias="lora_only")),
    Row("lora-on-embeddings", lora(target_modules=["embed_tokens", "q_proj"])),
    Row("lora-on-lm-head", lora(target_modules=["lm_head", "v_proj"])),
    Row("lora-trainable-tokens", lora(target_modules=QKV, trainable_token_indices=[3, 17, 70])),
    Row(
        "lora-everything-at-once",
        lora(target_modules=[*ALL, "lm_head"], lora_bias=True, trainable_token_indices=[9, 70]),
    ),
    Row(
        "lora-modules-to-save",
        lora(target_modules=QKV, modules_to_save=["lm_head"]),
        refused="modules_to_save",
    ),
    Row("lora-pissa", lora(target_modules=QKV, init_lora_weights="pissa"), refused="init_lora_weights"),
    Row("lora-olora", lora(target_modules=QKV, init_lora_weights="olora"), refused="init_lora_weights"),
    Row("lora-corda", PLAIN, edit={"init_lora_weights": "corda"}, refused="init_lora_weights"),
    Row("lora-loftq", PLAIN, edit={"init_lora_weights": "loftq"}, refused="init_lora_weights"),
    Row(
        "lora-alora",
        lora(target_modules=QKV, alora_invocation_tokens=[5, 70]),
        refused="alora_invocation_tokens",
    ),
    Row(
        "lora-layer-replication",
        PLAIN,
        edit={"layer_replication": [[0, 2], [1, 2]]},
        refused="layer_replication",
    ),
    Row("lora-qalora", PLAIN, edit={"use_qalora": True}, refused="use_qalora"),
    Row("lora-megatron", PLAIN, edit={"megatron_config": {"tp": 2}}, refused="megatron_config"),
    Row("lora-target-parameters", PLAIN, edit={"target_parameters": ["w1"]}, refused="target_parameters"),
    Row("lora-velora", PLAIN, edit={"velora_config": {"rank": 2}}, refused="velora_config"),
    Row("lora-monteclora", PLAIN, edit={"monteclora_config": {"n": 2}}, refused="monteclora_config"),
    Row("lora-bdlora", PLAIN, edit={"use_bdlora": {"blocks": 2}}, refused="use_bdlora"),
    Row("lora-kasa", PLAIN, edit={"kasa_config": {"beta": 1}}, refused="kasa_config"),
    Row("lora-arrow", PLAIN, edit={"arrow_config": {"top_k": 2}}, refused="arrow_config"),
    Row("lora-unknown-key", PLAIN, edit={"lora_future_option": 3}, refused="lora_future_option"),
    Row("lora-seq-cls", PLAIN, edit={"task_type": "SEQ_CLS"}, refused="task_type"),
]

IA3_ROWS = [
    Row("ia3-default-targets", ia3()),
    Row(
        "ia3-feedforward-list",
        ia3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    Row(
        "ia3-feedforward-regex",
        ia3(target_modules=["v_proj", "down_proj"], feedforward_modules=r".*\.down_proj"),
    ),
    Row(
        "ia3-feedforward-plain-string",
        ia3(target_modules=["v_proj", "down_proj"], feedforward_modules="down_proj"),
    ),
    Row(
        "ia3-feedforward-dotted",
        ia3(target_modules=["q_proj", "mlp.down_proj"], feedforward_modules=["mlp.down_proj"]),
    ),
    Row("ia3-regex-targets", ia3(target_modules=r".*\.(k|up|down)_proj", feedforward_modules=["up_proj"])),
    Row(
        "ia3-exclude", ia3(target_modules=ALL, feedforward_modules=["down_proj"], exclude_modules=["q_proj"])
    ),
    Row("ia3-no-init", ia3(target_modules=QKV, feedforward_modules=[], init_ia3_weights=False)),
    Row(
        "ia3-modules-to-save", ia3(target_modules=QKV, modules_to_save=["lm_head"]), refused="modules_to_save"
    ),
]


PROMPT_ROWS = [
    Row("prompt-random", lambda base: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    Row(
        "prompt-text-init",
        lambda base: PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=5,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="the cat sat",
            tokenizer_name_or_path=str(base),
        ),
    ),
    Row(
        "ptune-mlp",
        lambda base: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=32),
    ),
    Row(
        "ptune-lstm",
        lambda base: PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=4,
            encoder_reparameterization_type="LSTM",
            encoder_num_layers=1,
            encoder_dropout=0.1,
        ),
    ),
    Row("prefix-plain", lambda base: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    Row(
        "prefix-projection",
        lambda base: PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32
        ),
    ),
    Row(
        "prompt-task-type-null",
        lambda base: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        edit={"task_type": None},
        refused="task_type",
    ),
]

OTHER_TYPES = [
    Row("loha", lambda base: LoHaConfig(target_modules=QKV, r=4), refused="LOHA"),
    Row("lokr", lambda base: LoKrConfig(target_modules=QKV, r=4), refused="LOKR"),
    Row("oft", lambda base: OFTConfig(target_modules=QKV, r=0, oft_block_size=16), refused="OFT"),
    Row("boft", lambda base: BOFTConfig(target_modules=QKV, boft_block_size=8), refused="BOFT"),
    Row("vera", lambda base: VeraConfig(target_modules=["q_proj"], r=4), refused="VERA"),
    Row("fourierft", lambda base: FourierFTConfig(target_modules=QKV, n_frequency=16), refused="FOURIERFT"),
    Row("hra", lambda base: HRAConfig(target_modules=QKV, r=4), refused="HRA"),
    Row("xlora", PLAIN, edit={"peft_type": "XLORA"}, refused="XLORA"),
    Row("adalora", PLAIN, edit={"peft_type": "ADALORA"}, refused="ADALORA"),
]


def pick(*names: str) -> list[Row]:
    rows = {row.name: row for row in LORA_ROWS + IA3_ROWS + PROMPT_ROWS}
    return [rows[name] for name in names]


BASIC = (
    "lora-list",
    "lora-regex-string",
    "lora-rank-alpha-patterns",
    "ia3-feedforward-plain-string",
    "ia3-feedforward-dotted",
    "ptune-mlp",
    "prefix-plain",
)
# The full matrix on Llama; on the others, the rows their shapes make different: Qwen2's q/k/v biases
# (DoRA around a bias, biases replaced or added), Qwen3's q/k norms and explicit head_dim, and a Llama
# with tied embeddings (trainable tokens replace output rows too; LoRA on the shared matrix).
BASE_ROWS = {
    "llama": LORA_ROWS + IA3_ROWS + PROMPT_ROWS + OTHER_TYPES,
    "qwen2": pick(
        *BASIC,
        "lora-dora",
        "lora-bias-on-b",
        "lora-bias-all",
        "lora-bias-lora-only",
        "lora-everything-at-once",
    ),
    "qwen3": pick(*BASIC, "lora-dora", "lora-on-embeddings"),
    "llama-tied": pick(
        "lora-list",
        "lora-trainable-tokens",
        "lora-on-embeddings",
        "lora-on-lm-head",
        "lora-everything-at-once",
        "prompt-random",
    ),
}
BASES = {
    "llama": ("llama", False),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "llama-tied": ("llama", True),
}


def _base_folder(root: Path, base: str) -> Path:
    model_type, tied = BASES[base]
    shapes = dict(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tied,
    )
    if model_type != "llama":
        shapes["head_dim"] = 16
    config = AutoConfig.for_model(model_type, **shapes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # Qwen2's q/k/v biases, with values that matter
                param.normal_(0, 0.5)
    folder = root / base
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def _load_base(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _write(row: Row, base_folder: Path, base: torch.nn.Module, folder: Path, seed: int) -> Path:
    # A copy per row: PiSSA and OLoRA rewrite the base weights they are built on.
    write_random_adapter(copy.deepcopy(base), row.config(base_folder), folder, seed=seed)
    if row.edit:
        config_file = folder / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config.update(row.edit)
        config_file.write_text(json.dumps(config))
    return folder


@dataclass
class Outcome:
    refusal: RequestError | None = None
    tokens: list[list[int]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


@functools.cache
def _outcomes(model_type: str, root: str) -> tuple[Path, dict[str, Path], dict[str, Outcome]]:
    """Register every row's adapter on one engine, then serve all accepted ones in one mixed batch."""
    root = tempfile.mkdtemp(dir=root)  # a failed attempt leaves its folders behind
    base_folder = _base_folder(Path(root), model_type)
    writer = _load_base(base_folder)
    rows = BASE_ROWS[model_type]
    folders = {
        row.name: _write(row, base_folder, writer, Path(root) / row.name, seed)
        for seed, row in enumerate(rows, 1)
    }
    engine = Engine(
        EngineConfig(
            base=str(base_folder),
            quantization="none",
            device="cpu",
            max_adapters=len(rows),
            max_lora_rank=8,
            max_batch_size=2 * (len(rows) + 1),
        )
    )
    outcomes = {row.name: Outcome() for row in rows}
    for row in rows:
        try:
            engine.register(row.name, str(folders[row.name]))
        except RequestError as refusal:
            outcomes[row.name].refusal = refusal
    served = [None, *(row.name for row in rows if outcomes[row.name].refusal is None)]
    requests = [
        GenerationRequest(list(ids), adapter=name, params=SamplingParams(max_tokens=NEW_TOKENS))
        for name in served
        for ids in PROMPT_IDS
    ]
    first_logits = engine.score(requests)
    results = _run(engine, requests)
    base_outcome = Outcome()
    for index, request in enumerate(requests):
        outcome = base_outcome if request.adapter is None else outcomes[request.adapter]
        outcome.tokens.append(results[index])
        outcome.logits.append(first_logits[index])
    outcomes["<base>"] = base_outcome
    return base_folder, folders, outcomes


def _run(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    handles = [engine.submit(request) for request in requests]
    engine.start()
    try:
        return [handle.result(timeout=300).token_ids for handle in handles]
    finally:
        engine.stop()


def _peft_reference(base_folder: Path, folder: Path | None) -> tuple[list[list[int]], list[torch.Tensor]]:
    # A fresh base per PeftModel: two PeftModels around one base object give wrong outputs.
    model = _load_base(base_folder)
    if folder is not None:
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    tokens, logits = [], []
    for ids in PROMPT_IDS:
        prompt = torch.tensor([ids])
        mask = torch.ones_like(prompt)
        with torch.no_grad():
            logits.append(model(input_ids=prompt, attention_mask=mask).logits[0, -1].float())
            out = model.generate(
                input_ids=prompt,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        tokens.append(out[0, len(ids) :].tolist())
    return tokens, logits


CASES = [(model_type, row) for model_type, rows in BASE_ROWS.items() for row in rows]


@pytest.mark.parametrize(("model_type", "row"), CASES, ids=[f"{t}-{row.name}" for t, row in CASES])
def test_each_option_is_served_exactly_or_refused_naming_it(
    model_type: str, row: Row, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base_folder, folders, outcomes = _outcomes(model_type, str(tmp_path_factory.getbasetemp()))
    outcome = outcomes[row.name]
    if not row.served:
        assert outcome.refusal is not None, f"{row.name} was served; the contract says it must be refused"
        assert outcome.refusal.code == "unsupported_adapter", outcome.refusal
        assert row.refused in str(outcome.refusal), outcome.refusal
        assert "\n" not in str(outcome.refusal)
        return
    assert outcome.refusal is None, f"{row.name} was refused: {outcome.refusal}"
    want_tokens, want_logits = _peft_reference(base_folder, folders[row.name])
    assert outcome.tokens == want_tokens, row.name
    for got, want in zip(outcome.logits, want_logits, strict=True):
        assert torch.allclose(got, want, atol=LOGIT_TOLERANCE, rtol=0), (row.name, (got - want).abs().max())


@pytest.mark.parametrize("model_type", list(BASE_ROWS))
def test_base_rows_of_the_mixed_batch_stay_the_base(model_type: str, tmp_path_factory) -> None:
    base_folder, _, outcomes = _outcomes(model_type, str(tmp_path_factory.getbasetemp()))
    want_tokens, want_logits = _peft_reference(base_folder, None)
    assert outcomes["<base>"].tokens == want_tokens
    for got, want in zip(outcomes["<base>"].logits, want_logits, strict=True):
        assert torch.allclose(got, want, atol=LOGIT_TOLERANCE, rtol=0)
