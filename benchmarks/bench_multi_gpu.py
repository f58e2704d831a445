#!/usr/bin/env python
"""Multi-GPU figures on one host, through accelerate's engines and the shipped configs (issue 14).

    python benchmarks/bench_multi_gpu.py --processes 2 --json multi.json     # a host with 2 GPUs
    python benchmarks/bench_multi_gpu.py --tiny --processes 2                # checks the script (CPU: gloo)

Three stages, each an ``accelerate launch`` of the training script (random SD3.5-Medium-shaped weights built once
under ``--work_dir`` by ``bench_train_step.py``'s builder, the paper recipe of that benchmark):

1. **scaling**: ``bench_train_step.py`` at ``--resolution`` under ``accelerate_configs/ddp.yaml`` with 1 and with
   ``--processes`` processes, each at batch 1 x accumulation 4 per process. Prints samples/s of each and the ratio.
2. **loss curve**: ``train_danceopd.py`` for ``--curve_steps`` optimizer steps with the same global batch: one
   process at batch ``--processes`` against ``--processes`` processes at batch 1 (accumulation 4, the same seed).
   The step's loss of the multi-process run is the mean of its ranks' losses (``logs/routes_rank<r>.jsonl``).
   Prints the largest difference, relative to the loss, and whether it is within ``--loss_rtol``.
3. **memory**: ``bench_train_step.py --full_finetune`` under ``fsdp2_full.yaml`` and under ``ddp.yaml`` with
   ``--processes`` processes: each rank's peak memory (``torch.cuda.max_memory_allocated``). Needs GPUs:
   accelerate runs FSDP only on accelerator devices; ``--tiny`` on a CPU skips it.

Prints one JSON line per stage and writes them all to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train_step as bench  # noqa: E402
from bench_models import build_work_dir  # noqa: E402


def launch(
    processes: int, config: str | None, script: Path, args: list[str], port: int, timeout: int
) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``script``: with a shipped config on GPUs; on a CPU as gloo processes (``config``
    None), as the tests do."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config is not None:
        cmd += ["--config_file", str(REPO / "accelerate_configs" / config)]
    else:
        cmd += ["--multi_gpu"] * (processes > 1) + ["--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--num_machines", "1"]
    cmd += ["--num_processes", str(processes), "--main_process_port", str(port), str(script), *args]
    threads = str(max(1, (os.cpu_count() or 2) // processes))
    env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def rank_results(path: Path, processes: int) -> list[dict]:
    """Each rank's result at the first resolution (``bench_train_step --json``; ``.rank<r>`` with N > 1)."""
    files = [path] if processes == 1 else [Path(f"{path}.rank{r}") for r in range(processes)]
    return [json.loads(f.read_text())[0] for f in files]


def step_losses(output_dir: Path, processes: int) -> list[float]:
    """The optimizer steps' losses, averaged over the ranks (each logs its own slice's loss)."""
    ranks = [
        [
            json.loads(line)["loss"]
            for line in (output_dir / "logs" / f"routes_rank{r}.jsonl").read_text().splitlines()
        ]
        for r in range(processes)
    ]
    return [sum(values) / processes for values in zip(*ranks)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None, help="default 1024 (64 with --tiny)")
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps of the timed stages")
    parser.add_argument("--curve_steps", type=int, default=20)
    parser.add_argument("--loss_rtol", type=float, default=0.02, help="the loss-curve verdict's tolerance")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "danceopd-bench"))
    parser.add_argument("--stages", nargs="+", default=["scaling", "curve", "memory"])
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--tiny", action="store_true", help="the 2-layer model on any device: checks the script"
    )
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per launch")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    cuda = torch.cuda.is_available()
    if not args.tiny and torch.cuda.device_count() < args.processes:
        raise SystemExit(
            f"--processes {args.processes} needs as many GPUs; this host has {torch.cuda.device_count()} "
            "(use --tiny to check the script on CPU)."
        )
    ddp = "ddp.yaml" if cuda else None
    work_dir = Path(args.work_dir).expanduser().resolve()
    paths = build_work_dir(work_dir, "sd3", args.tiny, 64, "cuda" if cuda else "cpu")
    tiny = ["--tiny"] * args.tiny
    precision = [] if cuda else ["--mixed_precision", "no"]
    n, results = args.processes, []
    runs = work_dir / "multi"
    shutil.rmtree(runs, ignore_errors=True)
    bench_script = REPO / "benchmarks" / "bench_train_step.py"

    def timed(name: str, processes: int, config: str | None, extra: list[str], port: int) -> list[dict]:
        out = runs / name
        out.mkdir(parents=True)
        flags = [
            "--work_dir",
            str(work_dir),
            "--resolutions",
            str(args.resolution),
            "--steps",
            str(args.steps),
        ]
        flags += ["--warmup", "1", "--json", str(out / "result.json"), "--output_dir", str(out / "train")]
        launch(processes, config, bench_script, flags + tiny + precision + extra, port, args.timeout)
        return rank_results(out / "result.json", processes)

    if "scaling" in args.stages:
        one = timed("scaling-1", 1, ddp, [], args.port)[0]
        many = timed(f"scaling-{n}", n, ddp, [], args.port + 1)[0]
        results.append(
            {
                "stage": "scaling",
                "resolution": args.resolution,
                "device": one["device"],
                "samples_per_s": {"1": one["samples_per_s"], str(n): many["samples_per_s"]},
                "speedup": many["samples_per_s"] / one["samples_per_s"],
                "s_per_sample": {"1": one["s_per_sample"], str(n): many["s_per_sample"]},
                "percent_of_limit": {"1": one["percent_of_limit"], str(n): many["percent_of_limit"]},
                "peak_memory_gib": {"1": one["peak_memory_gib"], str(n): many["peak_memory_gib"]},
            }
        )
        print(json.dumps(results[-1]), flush=True)

    if "curve" in args.stages:
        recipe = SimpleNamespace(
            family="sd3",
            train_batch_size=1,
            gradient_accumulation_steps=4,
            rank=128 if not args.tiny else 4,
            mixed_precision="bf16" if cuda else "no",
            warmup=0,
            steps=args.curve_steps,
            seed=0,
            gradient_checkpointing=True,
            cuda_graphs=False,
            script_args=[],
        )
        curves = {}
        for processes, batch, port in ((1, n, args.port + 2), (n, 1, args.port + 3)):
            recipe.train_batch_size = batch
            out = runs / f"curve-{processes}"
            flags = bench.script_flags(recipe, paths, args.resolution, str(out))
            launch(processes, ddp, REPO / "train_danceopd.py", flags, port, args.timeout)
            curves[processes] = step_losses(out, processes)
        gaps = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(curves[1], curves[n])]
        results.append(
            {
                "stage": "curve",
                "resolution": args.resolution,
                "global_batch": n * recipe.gradient_accumulation_steps,
                "steps": len(curves[1]),
                "loss_1": curves[1],
                f"loss_{n}": curves[n],
                "max_relative_difference": max(gaps),
                "loss_rtol": args.loss_rtol,
                "within_tolerance": max(gaps) <= args.loss_rtol,
            }
        )
        print(json.dumps(results[-1]), flush=True)

    if "memory" in args.stages and cuda:
        peaks = {}
        for name, config, port in (
            ("fsdp2_full", "fsdp2_full.yaml", args.port + 4),
            ("ddp", ddp, args.port + 5),
        ):
            ranks = timed(f"memory-{name}", n, config, ["--full_finetune"], port)
            peaks[name] = [r["peak_memory_gib"] for r in ranks]
        results.append(
            {
                "stage": "memory",
                "resolution": args.resolution,
                "processes": n,
                "full_finetune": True,
                "peak_memory_gib_per_rank": peaks,
                "fsdp_over_ddp": max(peaks["fsdp2_full"]) / max(peaks["ddp"]),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
