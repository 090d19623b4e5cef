"""Adapters as users name them (a store name, a local folder or ``REPO_ID[@REV]``): the name each one
goes by, and the base model a set of them was trained on. Shared by ``serve`` and ``chat``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import UserError


@dataclass(frozen=True)
class AdapterSpec:
    name: str  # what clients put in the ``model`` field
    spec: str  # a store name, a local PEFT folder or REPO_ID[@REV]


def default_name(spec: str) -> str:
    """A local folder is named after itself; a store name or Hub repo id keeps its name, less ``@REV``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve().name
    return spec.split("@", 1)[0]


def infer_base(adapters: list[AdapterSpec], base: str | None) -> str:
    """``base`` if given, else the one ``base_model_name_or_path`` all adapters share."""
    # Imported here: reading adapters needs torch, and `serve` binds its port before anything that slow.
    from adapterhub.contract.files import read_config
    from adapterhub.hub.resolve import resolve

    if base:
        return base
    if not adapters:
        raise UserError("nothing to serve: pass --base MODEL and/or --adapters a,b,...")
    bases = {}
    for adapter in adapters:
        recorded = read_config(resolve(adapter.spec)).get("base_model_name_or_path")
        if not recorded:
            raise UserError(f"adapter '{adapter.name}' does not record its base model: pass --base MODEL")
        bases[adapter.name] = recorded
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{name} -> {model}" for name, model in bases.items())
        raise UserError(f"adapters were trained on different base models ({listing}): pass --base MODEL")
    return next(iter(bases.values()))
