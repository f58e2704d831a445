"""The embedded default: `accelerate launch train_danceopd.py` with no model argument, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_embedded_default_runs_offline_and_loss_goes_down(tiny_path, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(REPO / "train_danceopd.py"),
            "--output_dir",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = proc.stdout + proc.stderr
    assert "embedded demo" in text and "Steps: 100%" in text
    first, last = map(
        float, re.search(r"loss: first \d+ steps ([\d.]+) -> last \d+ steps ([\d.]+)", text).groups()
    )
    assert last < 0.6 * first, (first, last)
    for name in (
        "pytorch_lora_weights.safetensors",
        "model_index.json",
        "pipeline_danceopd.py",
        "README.md",
        "samples.png",
        "checkpoint-120",
    ):
        assert (out / name).exists(), name
