"""Steps per second of the ShapesWorld DanceOPD student through the training script's own loop.

    python benchmarks/bench_shapesworld_step.py --data ROOT/data/all/metadata.jsonl --steps 120 --warmup 20

The run is the `student` stage of `train_sources.sh` (fusion of the three shipped sources, batch 64, 64 px,
N = 16, LoRA r32), cut to ``--steps`` optimizer steps. Each optimizer step is timed by a global optimizer
post-hook (after a device synchronize); the first ``--warmup`` steps are not counted. ``--code_dir`` runs another
checkout's `train_danceopd.py` (an older commit) on the same data and sources, for before/after figures made in
one run. Prints one JSON line.

``--processes N`` launches N such runs at once on the same device (each with 1/N of the CPU threads) and prints
each one's line and then their sum: how many study runs one card should hold at once. ``--profile FILE`` writes
where one run's host time goes (cProfile of the measured steps, by own and by cumulative time) and how long the
device was busy (torch.profiler over ``--profile_steps`` steps: the sum of kernel time against wall time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from profiling import device_profile_text, start_device_profile
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
    parser.add_argument("--cuda_graphs", action="store_true", help="pass --cuda_graphs to the script")
    parser.add_argument("--processes", type=int, default=1, help="this many runs at once; prints their sum")
    parser.add_argument("--profile", default=None, help="write a host and device profile of the run here")
    parser.add_argument("--profile_steps", type=int, default=10, help="steps under torch.profiler")
    args = parser.parse_args()
    if args.processes > 1:
        return concurrent(args)
    sys.path.insert(0, args.code_dir)
    import train_danceopd

    stamps: list[float] = []
    profiler = cProfile.Profile() if args.profile else None
    device_profile: dict = {}

    def stamp(optimizer, *_):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if profiler is None:
            return
        n = len(stamps)
        if n == args.warmup:
            profiler.enable()
        elif n == args.steps - args.profile_steps - 1:
            profiler.disable()
            device_profile["prof"] = start_device_profile()
            device_profile["start"] = time.perf_counter()
        elif n == args.steps - 1 and "prof" in device_profile:
            device_profile["wall"] = time.perf_counter() - device_profile["start"]
            device_profile["prof"].__exit__(None, None, None)

    register_optimizer_step_post_hook(stamp)
    with tempfile.TemporaryDirectory() as out:
        flags = student_args(args.data, args.steps, out, args.batch_size)
        train_danceopd.main(train_danceopd.parse_args(flags + ["--cuda_graphs"] * args.cuda_graphs))
    times = [b - a for a, b in zip(stamps[args.warmup :], stamps[args.warmup + 1 :])]
    if profiler is not None:
        write_profile(Path(args.profile), profiler, device_profile, args.profile_steps)
    result = {
        "label": args.label + (" + --cuda_graphs" if args.cuda_graphs else ""),
        "code_dir": args.code_dir,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "batch_size": args.batch_size,
        "measured_steps": len(times),
        "steps_per_s": len(times) / sum(times),
        "median_step_s": statistics.median(times),
    }
    print(json.dumps(result), flush=True)


def write_profile(path: Path, profiler: cProfile.Profile, device_profile: dict, steps: int) -> None:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(70)
    prof = device_profile.get("prof")
    if prof is not None:
        text.write(device_profile_text(prof, device_profile["wall"], steps))
    path.write_text(text.getvalue())


def concurrent(args: argparse.Namespace) -> None:
    """``--processes`` runs of this benchmark at once; each prints its line, then the sum."""
    threads = str(max(1, (os.cpu_count() or 1) // args.processes))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    cmd = [
        sys.executable,
        __file__,
        "--data",
        args.data,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    cmd += ["--batch_size", str(args.batch_size), "--code_dir", args.code_dir, "--label", args.label]
    cmd += ["--cuda_graphs"] * args.cuda_graphs
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        for _ in range(args.processes)
    ]
    lines = []
    for proc in procs:
        out, _ = proc.communicate()
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if proc.returncode or not rows:
            raise SystemExit(f"a benchmark process failed (exit {proc.returncode})")
        lines.append(rows[-1])
        print(json.dumps(rows[-1]), flush=True)
    total = {
        "label": f"{args.processes} runs at once",
        "processes": args.processes,
        "steps_per_s_each": [round(r["steps_per_s"], 3) for r in lines],
        "steps_per_s_total": sum(r["steps_per_s"] for r in lines),
    }
    print(json.dumps(total), flush=True)


if __name__ == "__main__":
    main()
