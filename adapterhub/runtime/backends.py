"""Which backend serves a base: the fast multi-adapter runtime when a family describes it (found by
``model_type`` in ``runtime/families/``), else the exact PEFT fallback. Both have one interface."""

from __future__ import annotations

from adapterhub.models import load_config
from adapterhub.runtime.serving import EngineConfig, ServingEngine


def open_engine(config: EngineConfig) -> ServingEngine:
    from adapterhub.runtime.families import serves

    if serves(load_config(config.base)):
        from adapterhub.runtime.engine import Engine

        return Engine(config)
    from adapterhub.runtime.fallback import FallbackEngine

    return FallbackEngine(config)
