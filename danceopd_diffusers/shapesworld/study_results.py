"""A study's results in one collection: what ``report`` writes STUDY.md from and ``ship`` ships as results.json.

:func:`collect` reads a study root (runs, merges, teachers and their scores on the current sets);
:func:`merge_collections` puts one root's collection on top of another's, so a study finished on another machine,
or after one was lost, ships into the same place and reports as one.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .study_grid import all_runs, merges, teachers
from .study_settings import Settings, device_of, read_json, set_sizes
from .study_train import run_done

#: the settings two study roots must share for their results to sit in one report
SHARED_SETTINGS = (
    "steps",
    "checkpoint_every",
    "batch_size",
    "learning_rate",
    "warmup_steps",
    "rank",
    "num_rollout_steps",
    "source_cfg",
    "eval_preset",
    "eval_per_category",
    "eval_limit",
    "curve_per_category",
    "eval_inference_steps",
    "query_space",
)


#: settings a root may lack because it predates them, and the value it had
SETTING_DEFAULTS = {"query_space": "step"}


def has_results(collection: dict[str, Any]) -> bool:
    """Whether a collection holds any scored result (a run, a merge or a teacher evaluated)."""
    runs = collection.get("runs", {}).values()
    merges_ = collection.get("merges", {}).values()
    teachers_ = collection.get("teachers", {}).values()
    return (
        any(r.get("final") or r.get("cfg2") or r.get("curve") for r in runs)
        or any(m.get("final") or m.get("select") for m in merges_)
        or any(t.get("final") for t in teachers_)
    )


def collect(root: Path, settings: Settings) -> dict[str, Any]:
    """Every result of a study root in one JSON-ready mapping: what `report` reads and `ship` ships."""
    from ..checkpointing import checkpoint_step, list_checkpoints

    device = device_of(settings)
    final_sizes, final_limit = set_sizes(settings, False, device)
    curve_sizes, curve_limit = set_sizes(settings, True, device)

    def final(name: str, kind: str = "final") -> dict | None:
        result = read_json(root / "evals" / name / f"{kind}.json")
        if result is None or result.get("per_category") != {"t2i": final_sizes[0], "edit": final_sizes[1]}:
            return None
        return result if result.get("limit") == final_limit else None

    runs = {}
    for run in all_runs(settings):
        folder = root / "runs" / run.name
        if not folder.is_dir():
            continue
        record = read_json(folder / "study_run.json") or {"launches": []}
        curve = {}
        for path in sorted((root / "evals" / run.name).glob("step-*.json")):
            result = read_json(path)
            if result.get("per_category") == {"t2i": curve_sizes[0], "edit": curve_sizes[1]}:
                curve[int(path.stem.split("-")[1])] = result
        done = run_done(root, run, settings)
        steps = [checkpoint_step(c) for c in list_checkpoints(folder)]
        runs[run.name] = {
            **{k: v for k, v in asdict(run).items() if k != "flags"},
            "flags": list(run.flags),
            "done": done,
            "reached": settings.steps if done else max(steps, default=0),
            "wall_s": round(sum(x["seconds"] for x in record["launches"]), 1),
            "jobs": max((x["jobs"] for x in record["launches"]), default=None),
            "launches": len(record["launches"]),
            "final": final(run.name),
            "cfg2": final(run.name, "cfg2"),
            "curve": curve,
        }
    merged = {}
    for m in merges():
        if m.setting == "init":
            continue
        record = read_json(root / "merges" / m.name / "study_merge.json") or {}
        select = read_json(root / "evals" / m.name / "select.json")
        if select and select.get("per_category") != {"t2i": curve_sizes[0], "edit": curve_sizes[1]}:
            select = None
        merged[m.name] = {
            **asdict(m),
            "seconds": record.get("seconds"),
            "select": select,
            "final": final(m.name),
        }
    return {
        "settings": asdict(settings),
        "runs": runs,
        "merges": merged,
        "teachers": {t.name: {"label": t.label, "final": final(t.name)} for t in teachers(settings)},
    }


def merge_collections(previous: dict, new: dict) -> tuple[dict, list[str]]:
    """``new`` on top of ``previous`` (two roots of one study): a run is taken from ``new`` when it finished there
    or got further than before; a teacher or merge when ``new`` scored it. Returns the merge and what was kept."""

    def setting(collection: dict, k: str) -> Any:
        return collection["settings"].get(k, SETTING_DEFAULTS.get(k))

    differ = [k for k in SHARED_SETTINGS if setting(previous, k) != setting(new, k)]
    if differ:
        k = differ[0]
        raise SystemExit(
            f"error: the shipped results were made with {k} = {setting(previous, k)!r} and this root with "
            f"{setting(new, k)!r}: one report cannot mix them. Ship to another --dest, or run the root with "
            f"--{k} {setting(previous, k)}."
        )
    out = {**previous, "settings": {**previous["settings"], **new["settings"]}}
    out["settings"]["best_baselines"] = new["settings"].get("best_baselines") or previous["settings"].get(
        "best_baselines", {}
    )
    kept, runs = [], dict(previous["runs"])
    for name, run in new["runs"].items():
        old = runs.get(name)
        better = (
            old is None or run["done"] or (not old["done"] and run.get("reached", 0) > old.get("reached", 0))
        )
        if better:
            # a run resumed on this root from another's checkpoint keeps the other's earlier curve points (same
            # steps, same keys: a run restarted from 0 that got this far overwrites every one of them)
            curve = {str(k): v for k, v in ((old or {}).get("curve") or {}).items()}
            curve.update({str(k): v for k, v in (run.get("curve") or {}).items()})
            runs[name] = {**run, "curve": curve}
        elif run.get("wall_s") or run.get("final"):
            kept.append(name)
    out["runs"] = runs
    for part, scored in (("teachers", ("final",)), ("merges", ("select", "final"))):
        out[part] = dict(previous.get(part, {}))
        for name, entry in new[part].items():
            if name not in out[part] or any(entry.get(k) for k in scored):
                out[part][name] = entry
    return out, kept
