"""The CLI turns expected failures into one line and a non-zero exit, never a traceback."""

import errno
import pickle

import click
import pytest
import torch

from adapterhub import cli
from adapterhub.errors import UserError

ERRORS = {
    "user": (UserError("recipe file x.yaml not found: give a path"), "error: recipe file x.yaml not found"),
    "enospc": (
        OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/adapter_model.safetensors"),
        "error: /data/runs/x/adapter_model.safetensors: no space left on the device: free some space",
    ),
    "erofs": (
        OSError(errno.EROFS, "Read-only file system", "/ro/runs/x"),
        "error: /ro/runs/x: the file system is read-only: choose a writable folder",
    ),
    "eacces": (
        PermissionError(errno.EACCES, "Permission denied", "/root/runs"),
        "error: /root/runs: permission denied: choose a folder you can write to",
    ),
    "recursion": (
        RecursionError("maximum recursion depth exceeded"),
        "error: an input file is nested too deeply",
    ),
    "unpickling": (
        pickle.UnpicklingError("Weights only load failed"),
        "error: refused to unpickle a weights file (Weights only load failed): only plain tensors",
    ),
    "oom": (
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
        "error: out of GPU memory (CUDA out of memory. Tried to allocate 2 GiB): lower training.batch_size",
    ),
}


@click.command()
@click.argument("kind")
def failing(kind: str) -> None:
    raise ERRORS[kind][0]


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_expected_failures_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, kind: str
) -> None:
    monkeypatch.setitem(cli.COMMANDS, "failing", "tests.test_cli:failing")
    monkeypatch.setattr("sys.argv", ["adapterhub", "failing", kind])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(ERRORS[kind][1]) and len(err.splitlines()) == 1


def test_every_command_is_importable() -> None:
    for name in cli.COMMANDS:
        assert isinstance(cli.cli.get_command(click.Context(cli.cli), name), click.Command), name
