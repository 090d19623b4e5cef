"""The options of ``serve --replicas`` and of ``build_app`` (``serve run`` / KubeRay), checked before any
Ray process starts."""

from __future__ import annotations

import pytest

from adapterhub.errors import UserError
from tests.cli_runner import run_cli

pytest.importorskip("ray.serve", reason="Ray Serve is the cluster extra: pip install -e '.[cluster]'")


def test_build_app_refuses_unknown_and_mistyped_options() -> None:
    from adapterhub.server.cluster import build_app

    with pytest.raises(UserError, match="build_app: unknown option 'replica'"):
        build_app({"base": "builtin:tiny-llama", "replica": "2"})
    with pytest.raises(UserError, match="build_app: option 'max_adapters' must be int, got 'many'"):
        build_app({"base": "builtin:tiny-llama", "max_adapters": "many"})
    with pytest.raises(UserError, match="no such folder"):
        build_app({"adapters": "a=./missing-adapter", "replicas": "2"})


def test_ray_address_needs_replicas() -> None:
    result = run_cli(["serve", "--base", "builtin:tiny-llama", "--ray-address", "127.0.0.1:6379"])
    assert (
        result.returncode == 2
        and "--ray-address" in result.stderr
        and "only with --replicas" in result.stderr
    )
