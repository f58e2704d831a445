"""Two CPU processes under `accelerate launch`: one route per step, the same on both processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_take_the_same_routes(tiny_path, tmp_path):
    config = tmp_path / "fields.yaml"
    config.write_text(
        "fields:\n  base: {type: base}\n  c2: {type: cfg, of: base, scale: 2.0}\n  c5: {type: cfg, of: base, scale: 5.0}\n"
        "routes:\n  - {field: c2, task: t2i}\n  - {field: c5, task: t2i}\n"
    )
    data = tmp_path / "prompts.csv"
    data.write_text("prompt\na red circle\ntwo blue squares\na green star\n")
    out = tmp_path / "out"
    # accelerate's `--cpu` launcher starts a single process unless MPI is installed; `--multi_gpu` on a machine
    # without CUDA starts two torchrun processes, which the script runs as gloo CPU processes.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
        str(REPO / "train_danceopd.py"),
        "--pretrained_model_name_or_path",
        tiny_path,
        "--fields_config",
        str(config),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "3",
        "--num_rollout_steps",
        "4",
        "--rank",
        "4",
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--max_sequence_length",
        "16",
        "--report_to",
        "none",
        "--seed",
        "3",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [
        [json.loads(line) for line in (out / "logs" / f"routes_rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert [e["step"] for e in logs[0]] == list(range(6))
    assert [e["route"] for e in logs[0]] == [e["route"] for e in logs[1]]
    assert len({e["route"] for e in logs[0]}) == 2  # both routes were drawn over the run
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "checkpoint-6" / "random_states_1.pkl").exists()
    assert (out / "model_index.json").exists()
