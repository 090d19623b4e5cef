"""Reading the two files of a PEFT adapter folder without trusting them.

No pickle is ever run: ``.bin`` weights load with ``weights_only=True``. The config's size and
nesting are bounded, every entry of the weights must be a floating-point tensor, and any failure is
one line naming the file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from adapterhub.runtime.api import RequestError

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
# Real configs are a few KB; a megabyte is far beyond any of them and far below trouble.
MAX_CONFIG_BYTES = 1 << 20


def _corrupt(message: str) -> RequestError:
    return RequestError(message, "corrupt_adapter")


def read_config(folder: Path, label: str | None = None) -> dict:
    """``label`` names the adapter in messages (a repo id for a pull's temporary folder)."""
    path = folder / CONFIG_FILE
    shown = f"{label}/{CONFIG_FILE}" if label else str(path)
    if not path.is_file():
        raise _corrupt(f"adapter {label or folder} has no {CONFIG_FILE}: give a PEFT save_pretrained folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise _corrupt(f"adapter {shown} is over {MAX_CONFIG_BYTES >> 20} MB, not a PEFT config: re-save it")
    try:
        config = json.loads(path.read_bytes())
    except RecursionError as err:
        raise _corrupt(f"adapter {shown} is nested too deeply to be a PEFT config: re-save it") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(f"adapter {shown} is not valid JSON ({err}): re-save the adapter") from err
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise _corrupt(
            f"adapter {shown} has no peft_type, so it is not a PEFT adapter config: re-save the adapter"
        )
    return config


def read_weights(folder: Path, label: str | None = None) -> dict[str, torch.Tensor]:
    safetensors_file, bin_file = folder / SAFETENSORS_FILE, folder / BIN_FILE
    if safetensors_file.is_file():
        path = safetensors_file
    elif bin_file.is_file():
        path = bin_file
    else:
        raise _corrupt(f"adapter {label or folder} has no {SAFETENSORS_FILE}: give a folder saved by PEFT")
    shown = f"{label}/{path.name}" if label else str(path)
    try:
        if path is safetensors_file:
            from safetensors.torch import load_file

            weights = load_file(path)
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = " ".join(str(err).split())[:100]
        raise _corrupt(
            f"{shown} holds more than plain tensors, so it was not unpickled ({reason}): "
            "re-save the adapter as adapter_model.safetensors"
        ) from err
    except Exception as err:  # safetensors and torch raise assorted types for corrupt or hostile bytes
        reason = " ".join(str(err).split())[:100] or type(err).__name__
        raise _corrupt(
            f"adapter weights {shown} are corrupt or unreadable ({reason}): re-download or re-save it"
        ) from err
    if not isinstance(weights, dict) or not weights:
        raise _corrupt(f"adapter weights {shown} hold no tensors: re-save the adapter")
    for key, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise _corrupt(f"adapter weights {shown}: '{key}' is not a floating-point tensor: re-save it")
    return weights
