"""Loading a base model: a Hub id, a local folder, a builtin tiny model, a GGUF file, or random weights.

``random:<hub-id>`` (or ``random_init=True``) builds the architecture from its config with random
weights, so speed and memory can be measured without downloading a checkpoint. Configs of the
models our benchmarks use ship in ``adapterhub/data/configs`` so that this works offline. A ``.gguf``
file (or ``gguf:PATH``) is converted once into a cached transformers folder (``adapterhub.gguf``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adapterhub import gguf
from adapterhub.errors import UserError
from adapterhub.tiny import BUILTIN_PREFIX, build_tokenizer, builtin_config, builtin_path

RANDOM_PREFIX = "random:"
QUANTIZATIONS = ("none", "nf4", "int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHIPPED_CONFIGS = Path(__file__).parent / "data" / "configs"


@dataclass
class ModelSpec:
    """Which base model to load and how; mirrors the recipe's ``model`` section."""

    name: str
    quantization: str = "none"
    dtype: str = "auto"
    random_init: bool = False
    device: str = "auto"


def parse_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """``auto`` is bf16 on CUDA (fast, stable) and fp32 on CPU (bf16 matmuls are slow there)."""
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for but no CUDA GPU is visible: use --device cpu")
    return device


def split_random(name: str) -> tuple[str, bool]:
    return (name.removeprefix(RANDOM_PREFIX), True) if name.startswith(RANDOM_PREFIX) else (name, False)


def local_path(name: str) -> str:
    """A builtin name or a GGUF file becomes its cache folder; anything else is passed through."""
    if name.startswith(BUILTIN_PREFIX):
        return str(builtin_path(name))
    if gguf.is_gguf(name):
        return str(gguf.resolve(name))
    return name


def base_id(name: str) -> str:
    """The name an adapter records for its base: a GGUF file's source (file name and hash), else ``name``."""
    name, _ = split_random(name)
    return gguf.source(name).id if gguf.is_gguf(name) else name


def source_path(name: str) -> str:
    """What to hand ``from_pretrained`` for ``name``: a builtin's folder, a folder, or a Hub id.

    A name written as a path that does not exist is refused here, rather than sent to the Hub as an id.
    Before a Hub id is fetched, the Hub's reachability is checked once (see ``adapterhub.hub.reach``).
    """
    from adapterhub.hub.adapter import is_local_path
    from adapterhub.hub.reach import go_offline_if_unreachable

    path = local_path(name)
    if Path(path).exists():
        return path
    if is_local_path(name):
        raise UserError(f"model '{name}': no such folder: give an existing model folder or a Hub id")
    go_offline_if_unreachable()
    return path


def shipped_config_path(name: str) -> Path | None:
    path = SHIPPED_CONFIGS / (name.replace("/", "--") + ".json")
    return path if path.exists() else None


def load_config(name: str) -> PretrainedConfig:
    """The model's config, from a local folder, a shipped copy, or the Hub."""
    name, _ = split_random(name)
    shipped = shipped_config_path(name)
    if shipped is not None and not Path(name).exists():
        data = json.loads(shipped.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(source_path(name))
    except (OSError, ValueError) as err:
        raise model_not_found(name) from err


def offline_config(name: str) -> PretrainedConfig | None:
    """The base's config when it is at hand without the network (builtin, folder, shipped, cached)."""
    from transformers.utils import logging as transformers_logging

    name, _ = split_random(name)
    if name.startswith(BUILTIN_PREFIX):
        return builtin_config(name)
    if shipped_config_path(name) is not None or Path(name).is_dir():
        try:
            return load_config(name)
        except UserError:
            return None
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None
    finally:
        transformers_logging.set_verbosity(verbosity)


def model_not_found(name: str, what: str = "model") -> UserError:
    from adapterhub.hub.reach import unreachable_hint

    hint = unreachable_hint()
    if hint is not None:
        return UserError(
            f"{what} '{name}' not found: {hint}: check your network and HF_ENDPOINT, or give a local folder"
        )
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = "we are offline (HF_HUB_OFFLINE=1)" if offline else "check the id, your network and HF_TOKEN"
    return UserError(f"{what} '{name}' not found: {hint}, or give a local folder")


def raw_config_dict(name: str) -> dict:
    """The config as the checkpoint stores it, before transformers adjusts it."""
    name, _ = split_random(name)
    shipped = shipped_config_path(name)
    if shipped is not None and not Path(name).exists():
        return json.loads(shipped.read_text())
    config_file = Path(local_path(name)) / "config.json"
    return json.loads(config_file.read_text()) if config_file.exists() else load_config(name).to_dict()


def is_seq2seq(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def auto_class(config: PretrainedConfig) -> type:
    return AutoModelForSeq2SeqLM if is_seq2seq(config) else AutoModelForCausalLM


def quantization_config(quantization: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"unknown quantization '{quantization}': use one of {', '.join(QUANTIZATIONS)}")


def keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes' CPU kernel from repacking 4-bit weights in place.

    bitsandbytes 0.50 on AVX512-BF16 CPUs repacks a Linear4bit's weight on its first no-grad
    forward; afterwards gradients through it are lost and ``dequantize_4bit`` returns garbage.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; random-weight Hub models offline get the tiny tokenizer (ids only matter)."""
    name, random_init = split_random(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_path(name))
    except (OSError, ValueError, TypeError) as err:
        if not random_init:
            raise model_not_found(name) from err
        tokenizer = build_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec) -> PreTrainedModel:
    """Load (or build with random weights) the base model, quantized and placed as ``spec`` says."""
    name, random_prefix = split_random(spec.name)
    random_init = spec.random_init or random_prefix
    device = resolve_device(spec.device)
    dtype = parse_dtype(spec.dtype, device)
    if spec.quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization '{spec.quantization}': use one of {', '.join(QUANTIZATIONS)}")
    config = load_config(name)
    auto = auto_class(config)
    kwargs: dict = {"dtype": dtype}
    if spec.quantization != "none":
        kwargs["quantization_config"] = quantization_config(spec.quantization, dtype)
        kwargs["device_map"] = {"": device}
    if random_init:
        model = _random_model(auto, config, device, kwargs)
    else:
        try:
            model = auto.from_pretrained(source_path(name), **kwargs)
        except OSError as err:
            raise model_not_found(name, "weights of model") from err
    if spec.quantization == "none":
        model = model.to(device)
    keep_4bit_weights_trainable(model)
    record_name(model, name)
    return model


def record_name(model: PreTrainedModel, name: str) -> None:
    """Record the Hub id, builtin name or GGUF source (not a cache path) where PEFT and we read it."""
    model.config.name_or_path = model.name_or_path = base_id(name)


def _random_model(auto: type, config: PretrainedConfig, device: str, kwargs: dict) -> PreTrainedModel:
    # Initialising a billion random weights takes seconds on a GPU and minutes on a CPU.
    with torch.device(device):
        model = auto.from_config(config, dtype=kwargs["dtype"])
    if "quantization_config" not in kwargs:
        return model
    # bitsandbytes quantizes while loading, so a random model takes a round trip through disk.
    with tempfile.TemporaryDirectory(prefix="adapterhub-random-") as tmp:
        model.save_pretrained(tmp)
        del model
        return auto.from_pretrained(tmp, **kwargs)


def unwrap_peft(model: torch.nn.Module) -> None:
    """Put every module PEFT wrapped back in its place, so the next PeftModel finds a plain base.

    PEFT's own ``unload()`` refuses IA3 on 4-bit bases ("cannot merge"), though nothing needs merging.
    Wrappers nest (a LoRA over trainable tokens over the output head): the outermost one is replaced by
    the innermost original module, and what was inside it is not visited again.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    def original(module: torch.nn.Module) -> torch.nn.Module:
        while True:
            if isinstance(module, AuxiliaryTrainingWrapper):  # trainable tokens, modules_to_save
                module = module.original_module
            elif isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
                module = module.base_layer
            else:
                return module

    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue
        unwrapped = original(module)
        if unwrapped is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, unwrapped)
            replaced.append(name)
    if "peft_config" in vars(model):  # what PEFT leaves on the base it wrapped
        del model.peft_config
