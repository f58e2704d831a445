"""The study's evaluation queue: what is finished and not scored yet, most important first, scored in turn.

Each item is one LoRA (a run's final or a checkpoint, a merge, or none for a teacher) on one set, written to
``R/evals/<name>/<kind>.json``. An item counts as scored when its file was made on the current set and after its
LoRA, so a stage cut by its budget, or a set changed by a flag, is simply called again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .study_grid import (
    SOURCE_LORAS,
    STUDENT_CFG_BETA,
    all_runs,
    merge_rank,
    merges,
    selected,
    selection_score,
    teachers,
)
from .study_settings import Settings, device_of, read_json, save_settings, set_sizes, write_json
from .study_train import run_done


@dataclass
class EvalItem:
    """One evaluation to make: a LoRA (None: the base alone) with its guidance, on the curve or the final set."""

    name: str  # run, merge or teacher name
    kind: str  # final, cfg2 or step-XXXXXX
    lora: Path | None
    guidance_scale: float = 1.0
    guider: tuple[str, dict] | None = None
    curve: bool = False

    def path(self, root: Path) -> Path:
        """Where the result is written (and found by the next call)."""
        return root / "evals" / self.name / f"{self.kind}.json"


def eval_items(root: Path, settings: Settings, only: list[str] | None) -> list[EvalItem]:
    """Everything to score, most important first: finals, teachers, merges, CFG β = 2, then the curves."""
    runs = {r.name: r for r in all_runs(settings)}
    names = selected(list(runs), only)
    finals, extra, curves = [], [], []
    for name in names:
        run = runs[name]
        out = root / "runs" / name
        if run_done(root, run, settings):
            finals.append(EvalItem(name, "final", out / "pytorch_lora_weights.safetensors"))
            if run.group == "cfg":
                extra.append(
                    EvalItem(name, "cfg2", out / "pytorch_lora_weights.safetensors", STUDENT_CFG_BETA)
                )
        if run.group in ("A", "B"):
            from ..checkpointing import checkpoint_step, list_checkpoints

            for ckpt in list_checkpoints(out) if out.is_dir() else []:
                lora = ckpt / "pytorch_lora_weights.safetensors"
                # regular checkpoints only (a run stopped by SIGTERM also saves one where it stopped)
                if lora.is_file() and checkpoint_step(ckpt) % settings.checkpoint_every == 0:
                    curves.append(EvalItem(name, f"step-{checkpoint_step(ckpt):06d}", lora, curve=True))
    teacher_items = []
    for t in teachers(settings):
        if selected([t.name], only):
            lora = Path(settings.sources) / SOURCE_LORAS[t.lora] if t.lora else None
            guider = (t.guider, dict(t.guider_kwargs)) if t.guider else None
            teacher_items.append(EvalItem(t.name, "final", lora, t.guidance_scale, guider))
    merge_items = []
    device = device_of(settings)
    select_sizes, select_limit = set_sizes(settings, True, device)
    for setting in ("A", "B"):
        grid = [m for m in merges() if m.setting == setting and selected([m.name], only)]
        loras = [(m.name, root / "merges" / m.name / "pytorch_lora_weights.safetensors") for m in grid]
        loras = [(name, lora) for name, lora in loras if lora.is_file()]
        scored = []
        for name, lora in loras:
            item = EvalItem(name, "select", lora, curve=True)
            merge_items.append(item)
            if _eval_current(item, root, select_sizes, select_limit):
                scored.append((selection_score(read_json(item.path(root))), name, lora))
        if loras and len(scored) == len(loras):  # the best point of the grid merged so far: on the final set
            _, name, lora = max(scored, key=lambda row: merge_rank(row[0], row[1]))
            merge_items.append(EvalItem(name, "final", lora))
    return finals + teacher_items + merge_items + extra + curves


def _eval_current(item: EvalItem, root: Path, sizes: tuple[int, int], limit: int | None) -> bool:
    path = item.path(root)
    if not path.is_file():
        return False
    result = json.loads(path.read_text())
    same_set = (
        result.get("per_category") == {"t2i": sizes[0], "edit": sizes[1]} and result.get("limit") == limit
    )
    newer = item.lora is None or path.stat().st_mtime >= item.lora.stat().st_mtime
    return same_set and newer


def eval_stage(
    root: Path,
    settings: Settings,
    only: list[str] | None = None,
    budget_s: float | None = None,
    log: Any = print,
) -> int:
    """Score every item not scored yet on its set; returns how many are still to do (0 = all done)."""
    from .evaluate import device_defaults

    device = device_of(settings)
    batch_size, workers = device_defaults(device, None, None)
    base = str(Path(settings.sources) / "base")
    start = time.monotonic()
    left, done_now = 0, 1
    while done_now and not left:  # again, for items that scoring others made due (a merge grid's best point)
        done_now, left = _eval_items_once(
            root, settings, only, budget_s, start, base, batch_size, workers, log
        )
    if left:
        log(f"[study] eval: {left} evaluations left for the next call (budget spent)")
    return left


def _eval_items_once(
    root: Path,
    settings: Settings,
    only: list[str] | None,
    budget_s: float | None,
    start: float,
    base: str,
    batch_size: int,
    workers: int,
    log: Any,
) -> tuple[int, int]:
    """One pass over the items due; returns (scored now, left for lack of time)."""
    from .evaluate import evaluate, load_pipeline

    device = device_of(settings)
    left = done = 0
    for item in eval_items(root, settings, only):
        sizes, limit = set_sizes(settings, item.curve, device)
        if _eval_current(item, root, sizes, limit):
            continue
        if budget_s is not None and time.monotonic() - start > budget_s:
            left += 1
            continue
        done += 1
        guider = None
        if item.guider is not None:
            from diffusers import guiders

            guider = getattr(guiders, item.guider[0])(**item.guider[1])
        pipe, family = load_pipeline(base, str(item.lora) if item.lora else None, device)
        result = evaluate(
            pipe,
            family,
            guidance_scale=item.guidance_scale,
            num_steps=settings.eval_inference_steps,
            batch_size=batch_size,
            limit=limit,
            progress=False,
            per_category=sizes,
            score_workers=workers,
            guider=guider,
        )
        result = {k: v for k, v in result.items() if not k.startswith("_")}
        write_json(item.path(root), result)
        edit = result["edit"].get("average", float("nan"))
        log(f"[study] eval {item.name} {item.kind}: T2I {result['t2i']['overall']:.3f}, edit {edit:.2f}")
    return done, left


def record_eval_set(root: Path, settings: Settings) -> None:
    """The final set's preset, recorded once (large on a GPU, quick on a CPU), so a report written later on another
    machine, or results shipped from another root, read the same set."""
    if settings.eval_preset is None and settings.eval_per_category is None:
        settings.eval_preset = "large" if device_of(settings).startswith("cuda") else "quick"
        save_settings(root, settings)
