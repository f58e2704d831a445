#!/usr/bin/env python
"""Times the official DanceOPD toolkit on bench_train_step.py's pipeline folder, experts and recipe.

    python benchmarks/run_official.py --official_dir OFFICIAL_CHECKOUT --resolutions 1024 512 --steps 3 --warmup 1

``OFFICIAL_CHECKOUT`` is a separate checkout of https://github.com/worldbench/DanceOPD (read at ``4440ab5``);
none of its code is part of this repository. Its dependencies (diffusers, peft, accelerate, transformers, PyYAML)
are ours too. The runner writes the toolkit's YAML config for the folder that ``bench_train_step.py`` builds under
``--work_dir`` (built here if absent): teachers ``expert_a`` and ``expert_b`` (``lora_dir``: the same PEFT
adapters our fields read, which it merges into full copies of the transformer) and ``base``, one route each at
weight 1, at one global ``training.teacher_cfg_scale`` (1.0 by default: it cannot give CFG 3.5 to the base route
alone; ``--teacher_cfg_scale 3.5`` applies it to every route). The recipe: resolution, 16 rollout steps, k = 1,
``low_t``, student LoRA r = alpha = 128 (its default targets), lr 2e-4, grad_accum 4, bf16, clip 1.0,
max_sequence_length 256. It always checkpoints the student's gradients and has no batch setting (batch 1).

Its engine then runs in this process, with timing wrappers on its SD3.5 backend (``cuda.synchronize`` at every
edge): ``optimizer_step`` marks the optimizer steps (the first ``--warmup`` are not counted), ``_rollout`` is the
rollout, the teachers' ``_cfg_velocity`` calls are the targets, and the rest of a step is the student (prompt
encoding, student forward, backward, optimizer). Peak memory is ``torch.cuda.max_memory_allocated``, reset once
``prepare()`` has loaded the models. It prints the JSON fields of ``bench_train_step.py`` (with the same FLOP
limit: the recipe's, the same for both toolkits), so the two tabulate side by side.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import build_work_dir  # noqa: E402
from bench_train_step import (  # noqa: E402
    measured_window,
    recipe_flops,
    run_resolutions,
    sync,
)


def official_config(paths: dict, args: argparse.Namespace, resolution: int, output_dir: str) -> dict:
    """The official toolkit's config for the benchmark's folder, experts, prompts and recipe."""
    teachers = [
        {"name": n, "base_ckpt": None, "lora_dir": str(d), "weight": 1.0} for n, d in paths["experts"].items()
    ]
    teachers.append({"name": "base", "base_ckpt": None, "lora_dir": None, "weight": 1.0})
    return {
        "backend": "sd35",
        "model": {"pretrained_model": str(paths["model"])},
        "student": {
            "init": "base",
            "lora_rank": args.rank,
            "lora_alpha": args.rank,
            "lora_target_modules": None,
        },
        "teachers": teachers,
        "routing": {
            "routes": [{"teacher": t["name"], "dataset": "default", "weight": 1.0} for t in teachers]
        },
        "data": {"prompts_csv": str(paths["prompts_csv"]), "prompt_column": "prompt"},
        "training": {
            "method": "danceopd",
            "output_dir": output_dir,
            "resolution": resolution,
            "rollout_steps": 16,
            "k": 1,
            "query_bias": "low_t",
            "lr": 2.0e-4,
            "weight_decay": 0.0,
            "grad_accum": args.gradient_accumulation_steps,
            "max_train_steps": args.warmup + args.steps,
            "save_steps": 1_000_000,
            "mixed_precision": args.mixed_precision,
            "gradient_clip": 1.0,
            "max_sequence_length": 256,
            "log_every": 1,
            "teacher_cfg_scale": args.teacher_cfg_scale,
        },
    }


class OfficialProbe:
    """Timing wrappers on the official SD3.5 backend's methods (the class, so the engine's instance uses them)."""

    def __init__(self, backend_cls):
        self.cls = backend_cls
        self.stamps: list[float] = []
        self.calls: list[tuple[int, str, float, int | None]] = []
        self.routes: list[tuple[int, str]] = []
        self.in_rollout = False
        self.originals = {
            n: getattr(backend_cls, n)
            for n in ("prepare", "_rollout", "_cfg_velocity", "optimizer_step", "compute_loss")
        }
        o, probe = self.originals, self

        def prepare(backend):
            o["prepare"](backend)
            if torch.cuda.is_available():
                sync()
                torch.cuda.reset_peak_memory_stats()  # the models are loaded; their weights stay counted

        def _rollout(backend, *args, **kwargs):
            sync()
            t0 = time.perf_counter()
            probe.in_rollout = True
            try:
                trajectory, latents = o["_rollout"](backend, *args, **kwargs)
            finally:
                probe.in_rollout = False
            sync()
            probe.calls.append((len(probe.stamps), "rollout", time.perf_counter() - t0, len(trajectory)))
            return trajectory, latents

        def _cfg_velocity(backend, transformer, *args, **kwargs):
            teacher = not probe.in_rollout and any(transformer is t for t in backend.teachers.values())
            if not teacher:
                return o["_cfg_velocity"](backend, transformer, *args, **kwargs)
            sync()
            t0 = time.perf_counter()
            out = o["_cfg_velocity"](backend, transformer, *args, **kwargs)
            sync()
            probe.calls.append((len(probe.stamps), "targets", time.perf_counter() - t0, None))
            return out

        def optimizer_step(backend):
            o["optimizer_step"](backend)
            sync()
            probe.stamps.append(time.perf_counter())

        def compute_loss(backend, sample, route):
            probe.routes.append((len(probe.stamps), route.teacher))
            return o["compute_loss"](backend, sample=sample, route=route)

        for name, fn in (("prepare", prepare), ("_rollout", _rollout), ("_cfg_velocity", _cfg_velocity),
                         ("optimizer_step", optimizer_step), ("compute_loss", compute_loss)):  # fmt: skip
            setattr(backend_cls, name, fn)

    def reset(self) -> None:
        self.stamps.clear()
        self.calls.clear()
        self.routes.clear()

    def measured(self, warmup: int) -> tuple[list[float], float, float, list[int]]:
        return measured_window(self.stamps, self.calls, warmup, targets_inside_rollout=False)

    def measured_routes(self, warmup: int) -> list[str]:
        """The route of each measured optimizer step, named as the recipe's route for that teacher (the base's is
        ``base_cfg``), so the limit charges the recipe's cost of the routes drawn whatever the global CFG scale."""
        names: dict[int, str] = {}
        for step, teacher in self.routes:
            names.setdefault(step, teacher)
        return [{"base": "base_cfg"}.get(t, t) for s, t in sorted(names.items()) if s >= warmup]

    def remove(self) -> None:
        for name, fn in self.originals.items():
            setattr(self.cls, name, fn)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official_dir", required=True, help="a checkout of worldbench/DanceOPD")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not counted")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument(
        "--expert_rank", type=int, default=64, help="of the experts built if --work_dir is empty"
    )
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--teacher_cfg_scale", type=float, default=1.0, help="the toolkit's one CFG scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "danceopd-bench"))
    parser.add_argument("--label", default="official")
    parser.add_argument("--matmul_tflops", type=float, default=780.0)
    parser.add_argument("--json", default=None, help="also write the results to this file (a JSON list)")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer model of bench_train_step.py --tiny")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the first step's start is not marked)")
    official = Path(args.official_dir).expanduser().resolve()
    if not (official / "danceopd" / "core" / "engine.py").is_file():
        parser.error(
            f"--official_dir {args.official_dir} is not a checkout of worldbench/DanceOPD (no danceopd/core/engine.py)"
        )
    args.official_dir = str(official)
    args.family, args.train_batch_size = "sd3", 1  # its SD3.5 backend is text-to-image only, at batch 1
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    import yaml

    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.tiny and device != "cuda":
        raise SystemExit("This benchmark needs a CUDA GPU (use --tiny to check the runner on CPU).")
    work_dir = Path(args.work_dir).expanduser().resolve()
    paths = build_work_dir(work_dir, "sd3", args.tiny, args.expert_rank, device)
    recipes = {res: recipe_flops(args, res) for res in args.resolutions}
    sys.path.insert(0, args.official_dir)
    from danceopd.backends.sd35_diffusers import SD35Backend
    from danceopd.core.config import load_config
    from danceopd.core.engine import DanceOPDEngine

    probe = OfficialProbe(SD35Backend)

    def train_once(resolution: int, out: str) -> tuple[dict, list[str]]:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        config = Path(out, "official.yaml")
        config.write_text(yaml.safe_dump(official_config(paths, args, resolution, str(Path(out, "run")))))
        DanceOPDEngine(load_config(str(config))).run()
        run = {
            "toolkit": "official DanceOPD",
            "label": f"{args.label} (teacher_cfg_scale {args.teacher_cfg_scale:g})",
            "code_dir": args.official_dir,
            "family": "sd3",
            "gradient_checkpointing": True,  # always on in the toolkit
            "cuda_graphs": False,
        }
        return run, probe.measured_routes(args.warmup)

    return run_resolutions(args, work_dir, recipes, probe, train_once)


if __name__ == "__main__":
    main()
