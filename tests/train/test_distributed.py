"""Data-parallel training with no code change: two CPU processes over gloo, launched by torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftConfig

from tests.ports import free_port
from tests.train.helpers import QUICKSTART_DATA, REPO


@pytest.mark.slow
def test_two_process_gloo_run_writes_one_adapter(tmp_path: Path) -> None:
    recipe = tmp_path / "dist.yaml"
    recipe.write_text(
        "method: {type: lora, r: 4}\n"
        f"data: {{path: {QUICKSTART_DATA}, max_samples: 64}}\n"
        "training: {max_steps: 3, batch_size: 4, eval_max_samples: 8, logging_steps: 1}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "adapterhub",
        "train",
        str(recipe),
        "--json",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    assert PeftConfig.from_pretrained(tmp_path / "out").peft_type == "LORA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.yaml", "out"]
