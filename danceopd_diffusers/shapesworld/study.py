"""The ShapesWorld study (issue 10): DanceOPD against the paper's baselines in its two settings, the ablations,
CFG absorption, training length and seeds, stage by stage, many runs at once on one GPU.

    python -m danceopd_diffusers.shapesworld.study STAGE --root R [--jobs N] [--budget_s S] [--only PATTERN ...]

``R`` holds ``data/`` from ``VAE=<sources>/base/vae bash train_sources.sh data R``; the study writes ``R/configs``
(fields configs), ``R/runs/<name>`` (one train_danceopd.py output folder per run), ``R/merges/<name>`` (merged
LoRAs), ``R/evals/<name>/*.json`` and ``R/study.json`` (the settings, so later calls need no flags). Stages, in
order; each skips what is done, so a stage cut by a device-call limit is simply called again:

=========  =================================================================================================
plan       print every run, merge and evaluation with its command; runs nothing
merge      the weight-merging baselines (grid below) and setting B's merged init, with ``lora_merge``
main       settings A and B, one run per method: danceopd, dense, offpolicy, joint, soft (10 runs)
ablations  setting B: query mid / high, K = 4, init merged / global / base (6 runs; low, K = 1, init local and
           hard routing are main's B-danceopd, soft is B-soft)
cfg        CFG absorption from the T2I base, one field each: CFG α 1.5 / 3 / 5, APG and CFG-Zero* at 3 (5 runs)
train      main, ablations and cfg in one queue (main first), ``--jobs`` at a time
seeds      DanceOPD and each setting's best trained baseline at training seeds 1 and 2 (needs ``eval`` of main;
           baselines scored in the shipped ``results.json`` of ``--dest`` count too)
eval       score what is finished and not scored yet: each run's final LoRA and each teacher on the final set
           (``--eval_preset``, default large on a GPU), CFG students also with CFG β = 2; every checkpoint of the
           main runs and every merge on the curve set (``--curve_per_category``, default 64 per category), and
           then each setting's best merge on the final set
report     ``shapesworld/STUDY.md`` and its PNG plots from ``R`` (or, without ``--root``, from the shipped
           ``shapesworld/study/results.json``; ``--dest`` another shipped folder, ``--out`` another report,
           whose plots go to a folder named for it: ``STUDY2.md``'s to ``study2/plots``)
carry      start a new ``--dest`` (another query space on the same grid) from ``--carry_from``'s results that the
           query law does not change: dense, joint, merges, teachers (``--query_space`` names the new space)
ship       the main table's students (fp16 LoRAs) and every result into ``shapesworld/study/``, keeping what is
           there where the root has nothing better (a study finished on another machine); re-scores new files
=========  =================================================================================================

A training stage runs ``--jobs`` train_danceopd.py processes at once, every one with ``--resume_from_checkpoint
latest``. The default on a GPU is 3/8 of the CPU cores, 6 on an H200's 16: each run is bound by its host thread.
On the study's data, one DanceOPD run alone made 2.53 steps/s, 3 at once 6.33 in all and 6 at once 8.46
(``benchmarks/RESULTS.md``). 14 at once, beside the merges and the scorer's workers, made 6.5. With
``--budget_s`` the stage stops launching and sends SIGTERM to its runs when the time is up: each saves a
checkpoint and the next call resumes it. A run is done when its folder holds the final LoRA of ``--steps``
steps; a larger ``--steps`` later continues done runs from their last checkpoint.

**The grid.** All students: LoRA r32 on the shipped T2I base (``sources/base``), batch 64, AdamW lr 5e-4, constant
after 100 warm-up steps, N = 16 rollout steps, K = 1 low-noise query, fp32 + tf32, ``--steps`` (default 600)
updates, a checkpoint every ``--checkpoint_every`` (150: the curve points), seed 0; no CFG at inference (NFE 16).

- Setting A (T2I + Edit): fields base CFG 3 and the edit source (``sources/edit_lora``) with CFG 3; routes
  t2i -> base_cfg, local_edit and global_edit -> edit_cfg; init = the edit source LoRA.
- Setting B (Local + Global): fields the local and global experts, each with CFG 3; routes local_edit ->
  local_cfg, global_edit -> global_cfg, and t2i -> base_cfg. The paper's table B reports GenEval beside GEdit, and
  its experts keep T2I (0.79 / 0.81); ours lose it (0.38 / 0.06), so T2I keeps a route to the base's CFG, as in
  every other setting, rather than being measured untrained. Init = the local expert LoRA.
- Methods, same init, steps, batch, lr and data (``R/data/all``: t2i + local + global rows, one route per bucket,
  equal weights) in both settings: ``danceopd``; ``dense`` (DiffusionOPD, uniform weighting); ``offpolicy``;
  ``joint`` = ``--method sft`` on the same buckets (caption dropout 0.1, as the sources); ``soft`` =
  ``--routing soft`` (every sample's target the mean of the setting's fields, by route weight).
- Weight merging (no training; ``lora_merge``): A merges the base (a zero delta) with the edit source, so a
  merge is the edit delta scaled by λ: ``cat`` λ ∈ {0.25, 0.5, 0.75}; ``ties_svd`` and ``dare_linear_svd`` at
  density ∈ {0.3, 0.7} x λ ∈ {0.5, 1}. B merges the local and global experts with equal weights w: ``cat`` w ∈
  {0.5, 1}; ``ties_svd`` and ``dare_linear_svd`` at density ∈ {0.3, 0.7} x w ∈ {0.5, 1}. DARE draws with torch
  seed 0. The grid is scored on the curve set; its best point by the selection score (T2I overall + edit average
  / 10) / 2 is scored on the final set (which it was not chosen on) for the table; the report lists the grid. The merged init of the ablation is ``svd`` of local and global at 0.5 each, rank 32.
- Ablations (B): ``--query_strategy mid`` / ``high``; ``--query_k 4``; init merged / global / base (a fresh r32).
- CFG absorption: T2I data only, init = the base (fresh r32), one route t2i -> the field. The table: the teacher
  at its guidance (NFE 32), the student at guidance 1 (NFE 16), the student with CFG β = 2 (NFE 32).
- Seeds: DanceOPD and the best trained baseline of each setting by the selection score (dense, offpolicy or
  joint) at seeds 1 and 2, beside the main run's seed 0.
- Length: the main runs' checkpoints on the curve set give edit average and T2I against step.

Evaluation: ``shapesworld.evaluate`` with its 95 % bootstrap intervals; DanceOPD against each baseline with
``evaluate.compare`` (paired bootstrap over the same samples).

This module is the command line; the stages live beside it, each in a module named for what it holds:
:mod:`.study_settings` (``R/study.json``), :mod:`.study_grid` (the grid above, as data), :mod:`.study_train` (the
scheduler: runs and merges), :mod:`.study_eval` (the evaluation queue), :mod:`.study_results` (a root's results in
one collection), :mod:`.study_report` (STUDY.md), :mod:`.study_ship` and :mod:`.study_carry`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from .study_carry import carry_stage
from .study_eval import eval_items, eval_stage, record_eval_set
from .study_grid import (
    ablation_runs,
    all_runs,
    best_trained_baseline,
    cfg_runs,
    main_runs,
    merges,
    seed_runs,
    selected,
)
from .study_report import write_report
from .study_results import collect, has_results, merge_collections
from .study_settings import HERE, Settings, check_inputs, device_of, load_settings, read_json, save_settings
from .study_ship import SHIP_DIR, ship_stage
from .study_train import merge_stage, run_done, train_command, train_stage

STUDY_MD = HERE / "STUDY.md"
STAGES = ("plan", "merge", "main", "ablations", "cfg", "train", "seeds", "eval", "report", "ship", "carry")


def _plan(root: Path, settings: Settings, only: list[str] | None, log: Any) -> None:
    import torch

    cuda = device_of(settings).startswith("cuda") and torch.cuda.is_available()
    for run in all_runs(settings):
        if selected([run.name], only):
            state = "done" if run_done(root, run, settings) else "to run"
            log(
                f"{run.name} [{run.group}, {state}]: {' '.join(train_command(run, root, settings, cuda)[1:])}"
            )
    for m in merges():
        if selected([m.name], only):
            log(
                f"{m.name} [merge]: {m.combination} of {list(m.experts)} weights {list(m.weights)} density {m.density}"
            )
    for item in eval_items(root, settings, only):
        log(
            f"eval {item.name} {item.kind}: lora {item.lora}, guidance {item.guidance_scale}, guider {item.guider}"
        )


def default_report_path() -> Path:
    """Where ``report`` writes by default: the shipped ``shapesworld/STUDY.md`` of a source checkout, but
    ``./STUDY.md`` when the package is installed (site-packages is no place for a user's report, and may not be
    writable)."""
    if any(part in ("site-packages", "dist-packages") for part in HERE.parts):
        return Path.cwd() / "STUDY.md"
    return STUDY_MD


def main(argv: list[str] | None = None) -> int:
    """The command line: a bad argument or input is one ``error:`` line and exit status 2, never a traceback."""
    try:
        return _main(argv)
    except SystemExit as exc:  # messages raised as SystemExit("error: ...") by the stages and checks
        if isinstance(exc.code, str):
            print(exc.code if exc.code.startswith("error:") else f"error: {exc.code}", file=sys.stderr)
            return 2
        raise


def _check_out(flag: str, path: Path) -> None:
    """``path`` can be written as a file: not a folder, and its folder exists."""
    if path.is_dir():
        raise SystemExit(f"error: {flag} {path} is a folder; pass the path of a file.")
    if os.path.lexists(path) and not path.is_file():
        raise SystemExit(f"error: {flag} {path} exists and is not a regular file; pass another path.")
    existing = path.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # the folders are created, but not under a file
        raise SystemExit(f"error: {flag} {path}: {existing} is not a folder; pass another path.")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m danceopd_diffusers.shapesworld.study",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--root", default=None, help="the study folder (holds data/ unless --data)")
    parser.add_argument(
        "--only", nargs="+", default=None, help="glob patterns of run / merge / teacher names"
    )
    parser.add_argument(
        "--budget_s", type=float, default=None, help="stop launching / scoring after this long"
    )
    parser.add_argument(
        "--out",
        default=str(default_report_path()),
        help="report: where STUDY.md goes (plots beside it; default: shapesworld/STUDY.md in a checkout, "
        "./STUDY.md for an installed package)",
    )
    parser.add_argument("--dest", default=str(SHIP_DIR), help="ship: where the students and results.json go")
    parser.add_argument("--plot_backend", default="auto", choices=["auto", "matplotlib", "pil"])
    parser.add_argument(
        "--carry_from",
        default=None,
        help="carry: a shipped study folder whose query-free results (dense, joint, merges, teachers) start --dest",
    )
    parser.add_argument(
        "--trained_on",
        default=None,
        help="ship: the machine and date the root's runs were trained on, for the report (e.g. 'one NVIDIA H100 on "
        "2026-12-07')",
    )
    for f in fields(Settings):
        if f.name == "best_baselines":
            continue
        kind = {"int | None": int, "str | None": str, "float": float, "int": int, "str": str}.get(
            str(f.type), str
        )
        parser.add_argument(
            f"--{f.name}", type=kind, default=None, help=f"(recorded in R/study.json; default {f.default})"
        )
    args = parser.parse_args(argv)
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s > 0):
        parser.error(f"--budget_s must be a finite number of seconds > 0, got {args.budget_s}")
    if args.stage == "report":
        _check_out("--out", Path(args.out))
    if args.stage == "report" and args.root is None:
        shipped = Path(args.dest) / "results.json"
        if not shipped.is_file():
            parser.error(f"report without --root reads {shipped}, which does not exist: pass --root")
        try:
            collection = json.loads(shipped.read_text())
        except (OSError, ValueError) as exc:
            parser.error(
                f"{shipped} is not valid JSON ({' '.join(str(exc).split())[:200]}); ship the study again"
            )
        if not isinstance(collection, dict) or not has_results(collection):
            parser.error(f"{shipped} holds no results; nothing to report (STUDY.md is left as it is)")
        dest = Path(args.dest)
        named = shipped.name if dest.resolve() == SHIP_DIR else f"{dest.name}/{shipped.name}"
        write_report(
            collection, Path(args.out), args.plot_backend, source=f"the shipped `{named}`", ship_dir=dest.name
        )
        print(f"[study] wrote {args.out}")
        return 0
    if args.stage == "carry":
        if args.carry_from is None or args.query_space is None:
            parser.error("carry needs --carry_from (a shipped study folder), --dest and --query_space")
        carry_stage(Path(args.carry_from), Path(args.dest), args.query_space)
        return 0
    if args.root is None:
        parser.error(f"the {args.stage} stage needs --root")
    root = Path(args.root).resolve()
    if os.path.lexists(root) and not root.is_dir():
        parser.error(f"--root {args.root} is not a folder; pass the study folder")
    if args.stage in ("report", "ship", "eval", "seeds") and not root.is_dir():
        parser.error(f"--root {args.root} does not exist; the {args.stage} stage reads a study folder")
    overrides = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    settings = load_settings(root, overrides, write=args.stage != "report")
    if args.stage == "plan":
        _plan(root, settings, args.only, print)
        return 0
    if args.stage == "merge":
        merge_stage([m for m in merges() if selected([m.name], args.only)], root, settings)
        return 0
    if args.stage in ("main", "ablations", "cfg", "train", "seeds"):
        if args.stage == "seeds":
            record_eval_set(root, settings)
            collection = collect(root, settings)
            shipped = read_json(Path(args.dest) / "results.json")
            if shipped is not None:  # baselines finished on another root count too
                collection, _ = merge_collections(shipped, collection)
            for setting in ("A", "B"):
                best = best_trained_baseline(collection, setting)
                if best is None:
                    raise SystemExit(
                        f"error: no trained baseline of setting {setting} is scored yet: run `main` and `eval` first."
                    )
                settings.best_baselines[setting] = best
            save_settings(root, settings)
        runs = {
            "main": main_runs,
            "ablations": ablation_runs,
            "cfg": cfg_runs,
            "train": lambda: main_runs() + ablation_runs() + cfg_runs(),
        }.get(args.stage)
        runs = runs() if runs else seed_runs(settings)
        runs = [r for r in runs if selected([r.name], args.only)]
        check_inputs(root, settings, {r.data for r in runs})
        failed = train_stage(runs, root, settings, args.budget_s)
        return 1 if failed else 0
    if args.stage == "eval":
        record_eval_set(root, settings)
        eval_stage(root, settings, args.only, args.budget_s)
        return 0
    if args.stage == "report":
        collection = collect(root, settings)
        if not has_results(collection):  # never overwrite the shipped STUDY.md with an empty report
            parser.error(
                f"--root {args.root} holds no results (no run, merge or teacher is scored); nothing to report, "
                f"{args.out} is left as it is. Run the eval stage first."
            )
        write_report(
            collection,
            Path(args.out),
            args.plot_backend,
            source=f"`{root.name}`",
            ship_dir=Path(args.dest).name,
        )
        print(f"[study] wrote {args.out}")
        return 0
    ship_stage(root, settings, Path(args.dest), trained_on=args.trained_on)
    return 0


if __name__ == "__main__":
    sys.exit(main())
