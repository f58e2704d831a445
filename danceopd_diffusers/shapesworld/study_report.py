"""STUDY.md from a collection: the main tables, paired comparisons, the paper's claims checked, the merge grid,
training length, ablations, CFG absorption, seeds, compute and the CPU re-score of the shipped students, with the
PNG plots beside it.

Only text and plots: the numbers come from :func:`.study_results.collect` (a study root) or the shipped
``results.json``, so the shipped STUDY.md can be written again on any machine, byte for byte.
"""

from __future__ import annotations

import posixpath
import statistics
from dataclasses import fields
from pathlib import Path

from .study_grid import (
    ABLATION_REFERENCE,
    ABLATIONS,
    CFG_FIELDS,
    METHODS,
    SETTINGS_NAMES,
    STUDENT_CFG_BETA,
    all_runs,
    best_merge,
)
from .study_settings import Settings
from .study_ship import RESCORE_COMMAND


def _rescore_command(file: str, ship_dir: str) -> str:
    """The command that re-scores one shipped student; a file carried from another edition (``../study/...``)
    is named by its own folder."""
    folder, name = posixpath.split(posixpath.normpath(f"{ship_dir}/{file}"))
    return RESCORE_COMMAND.format(file=name, dest=folder)


#: what each query space means on ShapesWorld's unshifted grid (``../shared/audits/query_sigma.md``)
QUERY_REGIMES = {
    "step": "Queries: the paper's index law over the 16 states of ShapesWorld's unshifted grid (`--query_space "
    "step`): the default low-noise query reaches a mean σ of 0.32 (p10 / p50 / p90 = 0.125 / 0.312 / 0.562), a less "
    "noisy regime than the paper's 0.55 on its shift-3 Z-Image grid.",
    "sigma": "Queries: the paper's law read in σ on a shift-3 grid (`--query_space sigma`): the default low-noise "
    "query reaches a mean σ of 0.55 (p10 / p50 / p90 = 0.30 / 0.58 / 0.79), the paper's regime; mid and high are "
    "the paper's mid_t and high_t in σ as well.",
}


def _headline(result: dict | None, task: str, name: str, digits: int, ci: bool = True) -> str:
    if not result or name not in result.get(task, {}):
        return "not run"
    text = f"{result[task][name]:.{digits}f}"
    interval = result.get("ci", {}).get(task, {}).get(name)
    if ci and interval:
        text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return text


def _wall(seconds: float | None, jobs: int | None = None) -> str:
    if not seconds:
        return "-"
    text = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return text + (f" ({jobs} at once)" if jobs and jobs > 1 else "")


def _setting_rows(collection: dict, setting: str) -> list[tuple[str, dict | None, str]]:
    """(row label, final result, wall time) of a setting's table: its sources, then the methods."""
    sources = [("source-base", None), ("source-edit", None)] if setting == "A" else [
        ("source-base", None), ("source-local", None), ("source-global", None)]  # fmt: skip
    rows = []
    for name, _ in sources:
        t = collection["teachers"].get(name) or {}
        rows.append((f"*source:* {t.get('label', name)}", t.get("final"), "-"))
    steps = collection["settings"]["steps"]
    for key in METHODS:
        run = collection["runs"].get(f"{setting}-{key}") or {}
        label = _mark(collection, f"{setting}-{key}", METHODS[key][0])
        if run and not run.get("done"):
            label += f" (unfinished: step {run.get('reached', 0)} of {steps})"
        rows.append((label, run.get("final"), _wall(run.get("wall_s"), run.get("jobs"))))
        if key == "joint":
            best = best_merge(collection, setting)
            label = f"weight merge (best: {best[1]['label']})" if best else "weight merge"
            label = _mark(collection, best[0] if best else None, label)
            rows.append(
                (label, best[1]["final"] if best else None, _wall(best[1]["seconds"]) if best else "-")
            )
    return rows


def _main_table(rows: list[tuple[str, dict | None, str]]) -> list[str]:
    lines = [
        "| method | T2I overall [95 % CI] | local avg | global avg | edit avg [95 % CI] | NFE | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, result, wall in rows:
        nfe = result["nfe_per_image"] if result else "-"
        lines.append(
            f"| {label} | {_headline(result, 't2i', 'overall', 3)} | {_headline(result, 'edit', 'local', 2, False)} | "
            f"{_headline(result, 'edit', 'global', 2, False)} | {_headline(result, 'edit', 'average', 2)} | {nfe} | "
            f"{wall} |"
        )
    return lines


def _comparisons(collection: dict, setting: str) -> list[str]:
    ours = (collection["runs"].get(f"{setting}-danceopd") or {}).get("final")
    baselines = [
        (
            _mark(collection, f"{setting}-{k}", METHODS[k][0]),
            (collection["runs"].get(f"{setting}-{k}") or {}).get("final"),
        )
        for k in METHODS
        if k != "danceopd"
    ]
    best = best_merge(collection, setting)
    baselines.append(
        (
            _mark(collection, best[0] if best else None, "weight merge (best)"),
            best[1]["final"] if best else None,
        )
    )
    return _comparison_rows(ours, baselines)


def _comparison_rows(ours: dict | None, baselines: list[tuple[str, dict | None]]) -> list[str]:
    """Paired-bootstrap differences (DanceOPD − baseline) over the same samples, one row per baseline."""
    from .evaluate import compare

    lines = [
        "| baseline | Δ edit avg (DanceOPD − baseline) [95 % CI] | p | Δ T2I overall [95 % CI] | p |",
        "|---|---|---|---|---|",
    ]
    for label, theirs in baselines:
        if ours is None or theirs is None or "samples" not in ours or "samples" not in theirs:
            lines.append(f"| {label} | no result to compare | | | |")
            continue
        try:
            diff = compare(theirs, ours)
        except ValueError as exc:
            lines.append(f"| {label} | not comparable: {exc} | | | |")
            continue
        cells = []
        for task, name, digits in (("edit", "average", 2), ("t2i", "overall", 3)):
            d = diff[task].get(name)
            if d is None:
                cells += ["-", "-"]
                continue
            lo, hi = d["ci"]
            cells += [f"{d['difference']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]", f"{d['p']:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _equal_updates(collection: dict, setting: str) -> list[str]:
    """Every method of a setting at the last step all of them reached (their checkpoints on the curve set), beside
    the merge grid's best point on that same set: a like-for-like table while some runs are unfinished."""
    curves = {
        k: {
            int(step): r
            for step, r in ((collection["runs"].get(f"{setting}-{k}") or {}).get("curve") or {}).items()
        }
        for k in METHODS
    }
    shared = set.intersection(*(set(c) for c in curves.values())) if all(curves.values()) else set()
    if not shared:
        return []
    step = max(shared)
    size = collection["settings"]["curve_per_category"]
    rows = [(_mark(collection, f"{setting}-{k}", METHODS[k][0]), curves[k][step], "-") for k in METHODS]
    best = best_merge(collection, setting)
    if best:
        label = _mark(collection, best[0], f"weight merge (best: {best[1]['label']}; no training)")
        rows.append((label, best[1]["select"], "-"))
    lines = [
        "",
        f"Every method after the same {step} updates (setting {setting}; curve set, {size} per category):",
        "",
    ]
    lines += _main_table(rows)
    ours = curves["danceopd"][step]
    if "samples" in ours:
        lines += ["", f"DanceOPD against each baseline at step {step}:", ""]
        lines += _comparison_rows(ours, [(label, r) for label, r, _ in rows[1:]])
    return lines


def _paired(ours: dict | None, theirs: dict | None) -> dict | None:
    """DanceOPD (``ours``) − ``theirs`` on edit average and T2I overall over the same samples, or None."""
    from .evaluate import compare

    if not ours or not theirs or "samples" not in ours or "samples" not in theirs:
        return None
    try:
        diff = compare(theirs, ours)
    except ValueError:
        return None
    return {"edit": diff["edit"].get("average"), "t2i": diff["t2i"].get("overall")}


def _ahead(d: dict | None) -> str:
    """The verdict of one paired edit-average difference: ahead / not significant / behind."""
    if d is None:
        return "not run"
    lo, hi = d["ci"]
    text = f"{d['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}], p = {d['p']:.3f}"
    if d["difference"] > 0 and d["p"] < 0.05:
        return f"ahead: {text}"
    if d["difference"] < 0 and d["p"] < 0.05:
        return f"**behind**: {text}"
    return f"**not significant**: {text}"


def _claims_section(collection: dict) -> list[str]:
    """The paper's claims (the issue's target), each checked on the final set with paired comparisons: what holds,
    what does not, and what is not run yet."""
    runs = collection["runs"]
    final = lambda name: (runs.get(name) or {}).get("final")  # noqa: E731
    lines = [
        "## The paper's claims, checked",
        "",
        "Final set, DanceOPD minus the other row on the edit average, paired bootstrap (95 % CI, two-sided p); a "
        "claim holds when the difference is positive with p < 0.05.",
        "",
        "| claim | against | verdict |",
        "|---|---|---|",
    ]
    for setting in ("A", "B"):
        ours = final(f"{setting}-danceopd")
        rows = [
            (_mark(collection, f"{setting}-{k}", METHODS[k][0]), final(f"{setting}-{k}"))
            for k in METHODS
            if k != "danceopd"
        ]
        best = best_merge(collection, setting)
        rows.append(
            (
                _mark(collection, best[0] if best else None, "weight merge (best)"),
                best[1]["final"] if best else None,
            )
        )
        for label, theirs in rows:
            d = _paired(ours, theirs)
            lines.append(f"| {setting}: DanceOPD ahead on edits | {label} | {_ahead(d and d['edit'])} |")
        scored = [(label, r) for label, r in rows if r and "overall" in r["t2i"]]
        if ours and scored:
            label, strongest = max(scored, key=lambda row: row[1]["t2i"]["overall"])
            d = (_paired(ours, strongest) or {}).get("t2i")
            if d is not None:
                lo, hi = d["ci"]
                worse = hi < 0
                verdict = (
                    f"{'**worse**' if worse else 'no worse'}: {d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                )
                lines.append(
                    f"| {setting}: T2I no worse than the best baseline | {label} (best T2I) | {verdict} |"
                )
    ablations = [
        ("B: hard routing > soft", "B-soft", "soft routing"),
        ("B: low-noise queries > mid", "B-query-mid", "mid noise"),
        ("B: low-noise queries > high", "B-query-high", "high noise"),
        ("B: K = 1 ≥ K = 4", "B-k4", "K = 4"),
        ("B: local-expert init best", "B-init-merged", "init merged"),
        ("B: local-expert init best", "B-init-global", "init global expert"),
        ("B: local-expert init best", "B-init-base", "init base"),
    ]
    ours = final("B-danceopd")
    for claim, name, label in ablations:
        d = _paired(ours, final(name))
        verdict = _ahead(d and d["edit"])
        if claim.startswith("B: K = 1") and d is not None and not verdict.startswith("**behind"):
            verdict = "holds (" + verdict.split(": ", 1)[1] + ")"  # ≥: a tie is enough
        lines.append(f"| {claim} | {label} | {verdict} |")
    return lines + [""]


def _status_section(collection: dict) -> list[str]:
    """Which runs are done, unfinished (and where they stopped) or not started: a partial study says so."""
    steps = collection["settings"]["steps"]
    done, unfinished, missing = [], [], []
    for run in _run_names(collection):
        r = collection["runs"].get(run)
        if r and r.get("done"):
            done.append(run)
        elif r:
            unfinished.append(f"{run} (step {r.get('reached', 0)})")
        else:
            missing.append(run)
    if not unfinished and not missing:
        return []
    lines = ["## Status of the runs", ""]
    lines.append(f"- done ({steps} steps): {', '.join(done) or 'none'}")
    lines.append(f"- unfinished: {', '.join(unfinished) or 'none'}")
    lines.append(f"- not started: {', '.join(missing) or 'none'}")
    return lines + [""]


def _run_names(collection: dict) -> list[str]:
    settings = Settings(
        **{k: v for k, v in collection["settings"].items() if k in {f.name for f in fields(Settings)}}
    )
    return [r.name for r in all_runs(settings)]


def _carried(collection: dict) -> set[str]:
    """The runs and merges a later edition took from an earlier one (``carry``): empty for a first edition."""
    carried = collection.get("carried")
    if not carried:
        return set()
    return set(carried.get("runs", [])) | set(collection.get("merges", {}))


def _mark(collection: dict, name: str | None, label: str, plain: bool = False) -> str:
    """A row's label, marked where its result was carried from the earlier edition (``plain``: for a plot)."""
    if name not in _carried(collection):
        return label
    return f"{label} (carried)" if plain else f"{label} *(carried)*"


ORDINALS = {2: "second", 3: "third", 4: "fourth"}


def _edition_title(collection: dict) -> str:
    carried = collection.get("carried")
    if not carried:
        return ""
    n = carried.get("edition", 2)
    return f", {ORDINALS.get(n, f'edition {n}')} edition"


def _edition_section(collection: dict) -> list[str]:
    """A later edition (``carry``) in words: what changed, what is new, what is carried and what is not run yet."""
    carried = collection.get("carried")
    if not carried:
        return []
    s = collection["settings"]
    space, first = s.get("query_space", "step"), carried.get("query_space", "step")
    n = carried.get("edition", 2)
    earlier = "the first edition" if n == 2 else "the earlier edition"
    where = f" (`{carried['from']}/results.json`)" if carried.get("from") else ""
    lines = [
        "## This edition",
        "",
        f"The {ORDINALS.get(n, f'edition {n}')} edition of the study: the grid, data, training settings and "
        f"evaluation of {earlier}{where}, with one change: every run that draws a query state (DanceOPD, "
        "off-policy, soft routing, the ablations, CFG absorption and the seeds) reads the query law with "
        f"`--query_space {space}` instead of `--query_space {first}`."
        + (
            " This is the paper's regime: the paper's law read in σ on a shift-3 grid, where the first edition read "
            "it over the step index of ShapesWorld's unshifted grid and so queried much less noisy states (mean σ "
            "0.32 instead of the paper's 0.55)."
            if (first, space) == ("step", "sigma")
            else ""
        ),
        "",
    ]
    carried_runs = set(carried.get("runs", []))
    for h in collection.get("history", []):
        new = [r for r in h["runs"] if r not in carried_runs]
        if not new:
            continue
        trained = f" on {h['trained_on']}" if h.get("trained_on") else f" (shipped on {h['date']})"
        lines.append(
            f"- **New in this edition** ({len(new)} runs, {s['steps']} steps each from step 0, trained with "
            f"`--query_space {space}`{trained}, scored on the {s.get('eval_preset') or 'final'} set there): "
            f"{', '.join(new)}."
        )
    merges_, teachers_ = collection.get("merges", {}), collection.get("teachers", {})
    lines.append(
        f"- **Carried from {earlier}** (query-free: their training draws no query state, so the query law does not "
        f"change them; their numbers, files and wall times are {earlier}'s, and they are marked *(carried)* in the "
        f"tables): {', '.join(sorted(carried_runs)) or 'no run'}, the {len(merges_)} weight merges and the "
        f"{len(teachers_)} teachers."
    )
    runs = collection["runs"]
    missing: dict[str, list[str]] = {}
    for run in _run_names_and_groups(collection):
        name, group = run
        if name in runs and (runs[name].get("done") or runs[name].get("final")):
            continue
        if group == "ablation":
            missing.setdefault(f"{ABLATIONS[name][1]} ({name})", [])
        elif group == "cfg":
            missing.setdefault("CFG absorption", []).append(name)
        elif group == "seeds":
            missing.setdefault("seeds", []).append(name)
        else:
            missing.setdefault(name, [])
    if not any(group == "seeds" for _, group in _run_names_and_groups(collection)):
        missing["seeds (seeds 1 and 2 of DanceOPD and of each setting's best trained baseline)"] = []
    if missing:
        parts = [f"{k} ({', '.join(v)})" if v else k for k, v in missing.items()]
        lines.append(
            f'- **Not run yet** in this edition: {"; ".join(parts)}. Their rows read "not run"; {earlier}\'s '
            "numbers for them were measured with the other query law and are not carried."
        )
    return lines + [""]


def _run_names_and_groups(collection: dict) -> list[tuple[str, str]]:
    settings = Settings(
        **{k: v for k, v in collection["settings"].items() if k in {f.name for f in fields(Settings)}}
    )
    return [(r.name, r.group) for r in all_runs(settings)]


def _ci(result: dict | None, task: str, name: str) -> tuple[float, float] | None:
    interval = (result or {}).get("ci", {}).get(task, {}).get(name)
    return tuple(interval) if interval else None


def write_report(
    collection: dict, out: Path, backend: str = "auto", source: str = "", ship_dir: str = "study"
) -> Path:
    """STUDY.md and its plots from a collection. The plots go to a folder named for the report, beside it
    (``STUDY.md``'s to ``study/plots``, ``STUDY2.md``'s to ``study2/plots``), so editions keep their own;
    ``ship_dir`` names the shipped folder of the students the re-score section points at."""
    from .plots import line_chart

    rel = f"{out.stem.lower()}/plots"
    plots = out.parent / rel
    plots.mkdir(parents=True, exist_ok=True)
    s = collection["settings"]
    runs = collection["runs"]
    lines = [
        f"# The ShapesWorld study (issue 10){_edition_title(collection)}",
        "",
        f"Written by `python -m danceopd_diffusers.shapesworld.study report` from {source or 'a study root'}; "
        "the module docstring of `shapesworld/study.py` gives the grid and the commands. Do not edit by hand.",
        "",
        f"Students: LoRA r{s['rank']}, {s['steps']} steps, batch {s['batch_size']}, lr {s['learning_rate']:g} "
        f"(constant after {s['warmup_steps']} warm-up steps), N = {s['num_rollout_steps']}, sources with CFG "
        f"{s['source_cfg']:g}; students sampled without CFG, {s['eval_inference_steps']} steps. Intervals: 95 % "
        "stratified bootstrap; p: paired bootstrap over the same samples (`evaluate compare`). Wall time: training "
        "time of the run, start-up included, with the number of runs sharing the GPU.",
        "",
        QUERY_REGIMES[s.get("query_space", "step")],
        "",
    ]
    lines += _edition_section(collection)
    history = [
        f"Shipped on {h['date']} from the study root `{h['root']}`: "
        + (f"runs {', '.join(h['runs'])}" if h["runs"] else "no runs")
        + (f"; files written: {', '.join(h['files'])}." if h["files"] else "; no files written.")
        for h in collection.get("history", [])
    ]
    if collection.get("notes") or history:  # where results did not come from one study root
        lines += ["Provenance:", ""] + [f"- {note}" for note in collection.get("notes", []) + history] + [""]
    for setting in ("A", "B"):
        lines += (
            [f"## {SETTINGS_NAMES[setting]}", ""] + _main_table(_setting_rows(collection, setting)) + [""]
        )
        lines += [f"DanceOPD against each baseline (setting {setting}):", ""] + _comparisons(
            collection, setting
        )
        lines += _equal_updates(collection, setting)
        grid = [
            (m["label"], m.get("select"), _wall(m["seconds"]))
            for m in collection["merges"].values()
            if m["setting"] == setting
        ]
        lines += [
            "",
            f"Weight-merging grid (setting {setting}), scored on the selection set ({s['curve_per_category']} per "
            "category, the curve set); the point with the best (T2I + edit / 10) / 2 there is the table's row, "
            "scored on the final set:",
            "",
        ]
        lines += _main_table(grid) + [""]
        series_edit, series_t2i = {}, {}
        for key in METHODS:
            curve = (runs.get(f"{setting}-{key}") or {}).get("curve") or {}
            points = sorted((int(step), r) for step, r in curve.items())
            if points:
                label = _mark(collection, f"{setting}-{key}", METHODS[key][0], plain=True)
                series_edit[label] = [(x, r["edit"].get("average", 0.0)) for x, r in points]
                series_t2i[label] = [(x, r["t2i"].get("overall", 0.0)) for x, r in points]
        if series_edit:
            tag = setting.lower()
            line_chart(
                plots / f"length_edit_{tag}.png",
                f"{SETTINGS_NAMES[setting]}: edit average",
                "step",
                "edit average (0-10)",
                series_edit,
                backend,
            )
            line_chart(
                plots / f"length_t2i_{tag}.png",
                f"{SETTINGS_NAMES[setting]}: T2I overall",
                "step",
                "T2I overall (0-1)",
                series_t2i,
                backend,
            )
            lines += [f"Training length (curve set: {s['curve_per_category']} per category):", ""]
            steps = sorted({x for points in series_edit.values() for x, _ in points})
            lines += ["| method | " + " | ".join(f"step {x}" for x in steps) + " |"]
            lines += ["|---" * (1 + len(steps)) + "|"]
            for label in series_edit:
                at = {x: (e, t) for (x, e), (_, t) in zip(series_edit[label], series_t2i[label])}
                cells = [f"{at[x][0]:.2f} / {at[x][1]:.3f}" if x in at else "-" for x in steps]
                lines.append(f"| {label} (edit / T2I) | " + " | ".join(cells) + " |")
            lines += ["", f"![edit average vs step]({rel}/length_edit_{tag}.png) "
                      f"![T2I vs step]({rel}/length_t2i_{tag}.png)", ""]  # fmt: skip
    lines += _claims_section(collection)
    lines += _status_section(collection)
    lines += _ablation_section(collection, plots, backend, rel)
    lines += _cfg_section(collection)
    lines += _seeds_section(collection)
    lines += _compute_section(collection)
    lines += _rescored_section(collection, ship_dir)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _ablation_section(collection: dict, plots: Path, backend: str, rel: str = "study/plots") -> list[str]:
    from .plots import bar_chart

    runs = collection["runs"]
    groups: dict[str, list[tuple[str, dict | None]]] = {}
    for group, (reference, label) in ABLATION_REFERENCE.items():
        groups[group] = [(label, (runs.get(reference) or {}).get("final"))]
    for name, (group, label, _, _) in ABLATIONS.items():
        groups[group].append((label, (runs.get(name) or {}).get("final")))
    groups["routing"].append(("soft routing", (runs.get("B-soft") or {}).get("final")))
    lines = [
        "## Ablations (setting B)",
        "",
        "| ablation | variant | T2I overall [95 % CI] | local avg | global avg | edit avg [95 % CI] |",
        "|---|---|---|---|---|---|",
    ]
    bars = []
    for group, rows in groups.items():
        for label, result in rows:
            lines.append(
                f"| {group} | {label} | {_headline(result, 't2i', 'overall', 3)} | {_headline(result, 'edit', 'local', 2, False)} | "
                f"{_headline(result, 'edit', 'global', 2, False)} | {_headline(result, 'edit', 'average', 2)} |"
            )
            if result and "average" in result["edit"]:
                bars.append((f"{group}: {label}", result["edit"]["average"], _ci(result, "edit", "average")))
    if bars:
        bar_chart(
            plots / "ablations.png",
            "Setting B ablations: edit average (95 % CI)",
            "edit average (0-10)",
            bars,
            backend,
        )
        lines += ["", f"![ablations]({rel}/ablations.png)"]
    return lines + [""]


def _cfg_section(collection: dict) -> list[str]:
    runs, teacher_rows = collection["runs"], collection["teachers"]
    lines = [
        "## CFG absorption (T2I base, one field each)",
        "",
        f"| field | teacher at its guidance | student, no CFG | student + CFG β = {STUDENT_CFG_BETA:g} |",
        "|---|---|---|---|",
    ]

    def cell(result: dict | None) -> str:
        text = _headline(result, "t2i", "overall", 3)
        return text + (f" (NFE {result['nfe_per_image']})" if result else "")

    base = (teacher_rows.get("base-nocfg") or {}).get("final")
    lines.append(f"| none: the T2I base without CFG | {cell(base)} | | |")
    for name, (label, _) in CFG_FIELDS.items():
        teacher = (teacher_rows.get(f"teacher-{name}") or {}).get("final")
        run = runs.get(name) or {}
        lines.append(f"| {label} | {cell(teacher)} | {cell(run.get('final'))} | {cell(run.get('cfg2'))} |")
    return lines + [
        "",
        "T2I overall [95 % CI] (NFE per image). CFG-Zero* and APG are diffusers guiders (`guider` fields).",
        "",
    ]


def _seeds_section(collection: dict) -> list[str]:
    runs = collection["runs"]
    best = collection["settings"].get("best_baselines") or {}
    lines = ["## Seeds", ""]
    if not best:
        return lines + ["Not run yet (`study seeds`, after `eval` of the main runs).", ""]
    lines += [
        "| setting | method | seeds | T2I overall, mean ± sd | edit avg, mean ± sd | edit avg of seed 0 / 1 / 2 |",
        "|---|---|---|---|---|---|",
    ]
    for setting, baseline in sorted(best.items()):
        for key in ("danceopd", baseline):
            names = [f"{setting}-{key}"] + [f"{setting}-{key}-seed{i}" for i in (1, 2)]
            results = [(runs.get(n) or {}).get("final") for n in names]
            per_seed = " / ".join(
                f"{r['edit']['average']:.2f}" if r and "average" in r["edit"] else "not run" for r in results
            )
            results = [r for r in results if r and "average" in r["edit"]]
            if not results:
                continue
            t2i = [r["t2i"]["overall"] for r in results]
            edit = [r["edit"]["average"] for r in results]
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            lines.append(
                f"| {setting} | {METHODS[key][0]} | {len(results)} | {statistics.mean(t2i):.3f} ± {sd(t2i):.3f} | "
                f"{statistics.mean(edit):.2f} ± {sd(edit):.2f} | {per_seed} |"
            )
    return lines + ["", "The best trained baseline of each setting is chosen by (T2I + edit / 10) / 2.", ""]


def _rescored_section(collection: dict, ship_dir: str = "study") -> list[str]:
    rescored = collection.get("rescored") or {}
    if not rescored:
        return []
    first = next(iter(rescored))
    lines = [
        "## Re-score a shipped student on a CPU",
        "",
        f"The students of the main tables ship as fp16 LoRAs in `shapesworld/{ship_dir}/`. Scored from those files "
        "on the quick set, on a CPU, without CFG (NFE 16), each gives the row below"
        + (" (a test re-scores one):" if ship_dir == "study" else ":"),
        "",
        "```bash",
        _rescore_command(collection["shipped"][first], ship_dir)
        + (f" --limit {rescored[first]['limit']}" if rescored[first].get("limit") else ""),
        "```",
        "",
        "| file | T2I overall [95 % CI] | local avg | global avg | edit avg [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for name, result in rescored.items():
        lines.append(
            f"| `{collection['shipped'][name]}` | {_headline(result, 't2i', 'overall', 3)} | "
            f"{_headline(result, 'edit', 'local', 2, False)} | {_headline(result, 'edit', 'global', 2, False)} | "
            f"{_headline(result, 'edit', 'average', 2)} |"
        )
    return lines + [""]


def _compute_section(collection: dict) -> list[str]:
    carried = _carried(collection)
    runs = [r for n, r in collection["runs"].items() if r.get("wall_s") and n not in carried]
    if not runs:
        return ["## Compute", "", "No run recorded yet.", ""]
    jobs = max(r["jobs"] or 1 for r in runs)
    total = sum(r["wall_s"] for r in runs)
    steps = collection["settings"]["steps"]
    lines = [
        "## Compute",
        "",
        f"{len(runs)} runs, up to {jobs} at once on one device; {total / 3600:.2f} run-hours in all (start-ups "
        f"included)" + ("; the carried runs' times are the earlier edition's, on its device, and not in this sum"
                        if carried else "") + f". Per run ({steps} steps):",
        "",
        "| run | wall time | launches | steps/s |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for name, r in collection["runs"].items():
        if r.get("wall_s"):
            rate = f"{steps / r['wall_s']:.2f}" if r.get("done") else "-"
            label = _mark(collection, name, name)
            lines.append(f"| {label} | {_wall(r['wall_s'], r['jobs'])} | {r['launches']} | {rate} |")
    return lines + [""]
