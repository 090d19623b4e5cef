"""With the Hub unreachable (a refused connection, a name that does not resolve), a missing model or dataset
fails at once in one line, instead of after huggingface_hub's retries."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterhub.errors import UserError
from adapterhub.hub import reach
from tests.cli_runner import run_cli


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This process online as far as the libraries know, with HF_ENDPOINT at a port nobody listens on."""
    import datasets.config
    import huggingface_hub.constants as hf_constants

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(reach, "_offline_because", None)
    reach.unreachable_reason.cache_clear()
    yield endpoint
    reach.unreachable_reason.cache_clear()


def test_a_missing_model_fails_at_once_when_the_hub_refuses_connections(unreachable_hub: str) -> None:
    from adapterhub.models import load_config

    started = time.perf_counter()
    with pytest.raises(UserError) as refused:
        load_config("nobody/no-such-model")
    assert time.perf_counter() - started < 5.0
    port = unreachable_hub.rsplit(":", 1)[1]
    assert f"cannot be reached (connection to 127.0.0.1:{port} refused)" in str(refused.value)
    assert "HF_ENDPOINT" in str(refused.value) and "\n" not in str(refused.value)


def test_a_missing_dataset_fails_at_once_too(unreachable_hub: str) -> None:
    from adapterhub.recipe import DataArgs
    from adapterhub.train.data import load_splits

    started = time.perf_counter()
    with pytest.raises(UserError, match=r"dataset 'nobody/no-such-data' could not be loaded: the Hub at"):
        load_splits(DataArgs(dataset="nobody/no-such-data"))
    assert time.perf_counter() - started < 5.0


def test_a_name_that_does_not_resolve_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert (
        reach.unreachable_reason("http://no-such-host.invalid")
        == "the name no-such-host.invalid does not resolve"
    )


def test_a_path_like_model_name_that_does_not_exist_is_no_such_folder(tmp_path: Path) -> None:
    from adapterhub.models import load_config

    with pytest.raises(UserError, match=r"model '\./models/nope': no such folder"):
        load_config("./models/nope")


def test_the_cli_says_it_in_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: nobody/no-such-model}\nmethod: {type: lora}\ndata: {path: x.jsonl}\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    result = run_cli(["params", str(recipe)], env=env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "model 'nobody/no-such-model' not found: the Hub at" in result.stderr
