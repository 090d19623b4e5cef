"""The PEFT methods adapterhub trains, one module each, looked up by name in a registry."""

from __future__ import annotations

from adapterhub.errors import UserError, did_you_mean
from adapterhub.methods.base import BuildContext, Method

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str, source: str = "recipe") -> Method:
    if name not in _REGISTRY:
        raise UserError(
            f"{source}: unknown method.type '{name}'{did_you_mean(str(name), _REGISTRY)}; "
            f"choose one of {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[name]


# Importing a method module registers it.
from adapterhub.methods import ia3, lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: E402, F401

__all__ = ["BuildContext", "Method", "get", "names", "register"]
