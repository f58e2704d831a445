"""Steps per second of the ShapesWorld DanceOPD student through the training script's own loop.

    python benchmarks/bench_shapesworld_step.py --data ROOT/data/all/metadata.jsonl --steps 120 --warmup 20

The run is the `student` stage of `train_sources.sh` (fusion of the three shipped sources, batch 64, 64 px,
N = 16, LoRA r32), cut to ``--steps`` optimizer steps. Each optimizer step is timed by a global optimizer
post-hook (after a device synchronize); the first ``--warmup`` steps are not counted. ``--code_dir`` runs another
checkout's `train_danceopd.py` (an older commit) on the same data and sources, for before/after figures made in
one run. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "danceopd_diffusers" / "shapesworld"


def student_args(data: str, steps: int, output_dir: str, batch_size: int) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(SOURCES / "sources" / "base"),
        "--fields_config", str(SOURCES / "fusion.yaml"),
        "--dataset_name", data,
        "--resolution", "64", "--max_sequence_length", "32", "--num_rollout_steps", "16",
        "--rank", "32", "--train_batch_size", str(batch_size), "--gradient_accumulation_steps", "1",
        "--learning_rate", "5e-4", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "100",
        "--cache_latents", "--allow_tf32", "--report_to", "none", "--seed", "0",
        "--checkpointing_steps", "1000000", "--validation_steps", "1000000", "--skip_pipeline_export",
        "--max_train_steps", str(steps), "--output_dir", output_dir,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a ShapesWorld data/all/metadata.jsonl (prepare)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--code_dir", default=str(REPO), help="the checkout whose train_danceopd.py runs")
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    sys.path.insert(0, args.code_dir)
    import train_danceopd

    stamps: list[float] = []

    def stamp(optimizer, *_):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(stamp)
    with tempfile.TemporaryDirectory() as out:
        train_danceopd.main(
            train_danceopd.parse_args(student_args(args.data, args.steps, out, args.batch_size))
        )
    times = [b - a for a, b in zip(stamps[args.warmup :], stamps[args.warmup + 1 :])]
    result = {
        "label": args.label,
        "code_dir": args.code_dir,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "batch_size": args.batch_size,
        "measured_steps": len(times),
        "steps_per_s": len(times) / sum(times),
        "median_step_s": statistics.median(times),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
