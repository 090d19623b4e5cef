"""A run killed mid-checkpoint resumes to the same weights; two runs into one place: one wins at once."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from scripted_engine import wait_until

from adapterhub.errors import UserError
from adapterhub.hub import store
from adapterhub.recipe import recipe_from_dict
from adapterhub.train.trainer import train
from tests.train.helpers import QUICKSTART_DATA, REPO, quiet_train, recipe

LORA = {"type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
SHORT = {"max_steps": 6, "save_steps": 2, "generation_eval": False, "eval_max_samples": 8}

# Trains the recipe below into argv[1], killing itself with SIGKILL in the middle of the step-4 save:
# after the adapter and optimizer are written, before the RNG and trainer state are.
KILLED_MID_SAVE = f"""
import os, signal, sys
from pathlib import Path
from adapterhub.train.trainer import AdapterTrainer
from tests.train.helpers import quiet_train, recipe

real_save_rng_state = AdapterTrainer._save_rng_state

def save_rng_state_or_die(self, output_dir):
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    real_save_rng_state(self, output_dir)

AdapterTrainer._save_rng_state = save_rng_state_or_die
quiet_train(recipe(Path(sys.argv[1]), {LORA!r}, training={SHORT!r}))
"""


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter_model.safetensors")


@pytest.mark.slow
def test_kill_9_mid_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = quiet_train(recipe(tmp_path / "straight", LORA, training=SHORT)).output_dir

    crashed = tmp_path / "crashed"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_SAVE, str(crashed)], cwd=REPO, capture_output=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    checkpoints = crashed / ".out.partial" / "checkpoints"
    assert (checkpoints / "checkpoint-2" / "COMPLETE").is_file()
    assert (checkpoints / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (checkpoints / "checkpoint-4" / "COMPLETE").exists()

    shown = io.StringIO()
    resumed = train(recipe(crashed, LORA, training={**SHORT, "resume": True}), Console(file=shown, width=200))
    assert "skipping checkpoint-4: its save was interrupted" in shown.getvalue()
    assert "resuming from checkpoint-2 (step 2)" in shown.getvalue()
    assert resumed.metrics["steps"] == 6
    expected, got = weights(straight), weights(resumed.output_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


@pytest.mark.slow
def test_two_trains_into_one_output_dir_or_store_name_one_wins_the_others_fail_at_once(tmp_path) -> None:
    """The first run holds its locks while it waits for its data (a named pipe); the others fail:
    one through the CLI, one in this process."""
    data = tmp_path / "data.jsonl"
    os.mkfifo(data)
    base = {"method": LORA, "data": {"path": str(data), "max_samples": 32}}
    recipe_text = (
        f"method: {base['method']}\ndata: {base['data']}\n"
        "training: {max_steps: 2, batch_size: 8, eval_max_samples: 4, generation_eval: false}\n"
    )
    (tmp_path / "r.yaml").write_text(recipe_text)
    command = [sys.executable, "-m", "adapterhub", "train", str(tmp_path / "r.yaml")]
    out, other = tmp_path / "out", tmp_path / "other"
    winner = [*command, f"output.dir={out}", "output.store_name=shared"]
    first = subprocess.Popen(winner, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        lock_file = tmp_path / ".out.lock"
        wait_until(lambda: lock_file.exists() and lock_file.read_text() == str(first.pid), timeout=120)
        wait_until(lambda: (store.root() / ".shared.lock").exists(), timeout=120)
        same_dir = subprocess.run(
            [*command, f"output.dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert (same_dir.returncode, same_dir.stderr.strip()) == (
            1,
            f"error: output dir {out} is being written by another adapterhub process (PID {first.pid}): "
            "wait for that run to finish, or choose another output.dir",
        )
        same_name = recipe_from_dict(
            {**yaml.safe_load(recipe_text), "output": {"dir": str(other), "store_name": "shared"}}
        )
        with pytest.raises(UserError) as refused:
            quiet_train(same_name)
        assert str(refused.value) == (
            f"store name 'shared' is being written by another adapterhub process (PID {first.pid}): "
            "wait for it to finish, or use another name"
        )
        data.write_text(QUICKSTART_DATA.read_text())  # lets the first run go on
        assert first.wait(300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert not other.exists() and not list(tmp_path.glob(".other*"))
    assert store.read("shared").source == str(out) and store.verify("shared") == []
    stored = store.entry_path("shared") / "adapter_model.safetensors"
    assert stored.read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    assert not lock_file.exists() and not (store.root() / ".shared.lock").exists()
