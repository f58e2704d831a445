"""The embedded default: what ``accelerate launch train_danceopd.py`` runs with no model argument.

DanceOPD on ShapesWorld from the shipped sources (``shapesworld/sources``): one student (a LoRA on the T2I
base, no CFG) learns text-to-image from the base with CFG 3, local edits from the local-edit expert and global
edits from the global-edit expert (``shapesworld/fusion.yaml``). It is short on CPU, but every step is the real
method; the run ends by scoring the student on ShapesWorld's evaluation set next to the recorded sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHAPESWORLD = Path(__file__).resolve().parent / "shapesworld"
SOURCES = SHAPESWORLD / "sources"
FUSION_CONFIG = SHAPESWORLD / "fusion.yaml"
#: train rows per category written for the demo (its prompts and source images; the targets go unused)
DEMO_ROWS_PER_CATEGORY = 40

#: flag -> value used when the user did not set that flag (printed at start)
DEMO_DEFAULTS: dict[str, Any] = {
    "fields_config": str(FUSION_CONFIG),
    "max_train_steps": 100,
    "train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "rank": 32,
    "learning_rate": 5e-4,
    "num_rollout_steps": 16,
    "seed": 0,
    "validation_steps": 100,
    "checkpointing_steps": 100,
    "cache_latents": True,
    "validation_prompt": ["a photo of a red circle and a blue square", "a photo of three yellow crosses"],
}
#: flags that declare fields: given by the user, they replace the demo's fusion config
FIELD_FLAGS = ("fields_config", "cfg_scale", "expert_lora", "expert_checkpoint")


def base_path() -> str:
    return str(SOURCES / "base")


def demo_data_file(root: str | None = None) -> str:
    """ShapesWorld train rows of every task (written once into the cache): the demo's prompts and sources."""
    from .shapesworld.prepare import write_buckets
    from .tiny import cache_root

    folder = cache_root(root) / f"shapesworld-demo-{DEMO_ROWS_PER_CATEGORY}"
    meta = folder / "data" / "all" / "metadata.jsonl"
    if not meta.is_file():
        write_buckets(folder, ["t2i", "local", "global", "all"], DEMO_ROWS_PER_CATEGORY, workers=2)
    return str(meta)


def recorded_sources() -> dict[str, dict]:
    """The sources' evaluation, measured once with ``shapesworld.evaluate`` (RESULTS.md has the commands)."""
    return json.loads((SOURCES / "results.json").read_text())


#: DanceOPD students of this default (seed 0) by length, as README.md's columns: measured, where and how
EXPECTED_STUDENTS: dict[int, dict[str, Any]] = {
    100: {
        "where": "this default, seed 0, quick set, scorer version 2; the edits need a longer run",
        "t2i": 0.729,
        "local": 0.0,
        "global": 0.0,
    },
    1200: {
        "where": "`train_sources.sh student`, shapesworld/RESULTS.md; scorer version 1, quick set",
        "t2i": 0.802,
        "local": 1.55,
        "global": 1.87,
    },
}
SUMMARY_COLUMNS = ("T2I overall", "local edits", "global edits")


def summary_cells(result: dict[str, Any]) -> list[str]:
    """README.md's columns for one :func:`evaluate` result; "-" where a column's categories were not all scored
    (a limited evaluation), never an average of a subset passed off as the whole."""
    from .shapesworld.world import GLOBAL_EDIT_CATEGORIES, LOCAL_EDIT_CATEGORIES, T2I_CATEGORIES

    t2i, edit = result.get("t2i", {}), result.get("edit", {})
    cells = [f"{t2i['overall']:.3f}" if all(c in t2i for c in T2I_CATEGORIES) else "-"]
    for key, categories in (("local", LOCAL_EDIT_CATEGORIES), ("global", GLOBAL_EDIT_CATEGORIES)):
        cells.append(f"{edit[key]:.2f}" if all(c in edit for c in categories) else "-")
    return cells


def summary_table(results: dict[str, dict[str, Any]], steps: int) -> str:
    """The sources as recorded, the expected student of this length (or every recorded length), then ``results``."""
    lines = ["| model | " + " | ".join(SUMMARY_COLUMNS) + " |", "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    for name, recorded in recorded_sources().items():
        where = f"recorded, {recorded['set']} set" if "set" in recorded else "recorded"
        lines.append(f"| {name} ({where}) | " + " | ".join(summary_cells(recorded)) + " |")
    lengths = [steps] if steps in EXPECTED_STUDENTS else sorted(EXPECTED_STUDENTS)
    for length in lengths:
        e = EXPECTED_STUDENTS[length]
        label = "expected" if length == steps else "recorded"
        cells = [f"{e['t2i']:.3f}", f"{e['local']:.2f}", f"{e['global']:.2f}"]
        lines.append(
            f"| DanceOPD student, {length} steps ({label}: {e['where']}) | " + " | ".join(cells) + " |"
        )
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(summary_cells(result)) + " |")
    return "\n".join(lines)


def report(output_dir: str, limit: int | None = None, steps: int | None = None) -> dict:
    """Score the exported student (CFG-free, 16 steps) and print it under the sources and the expected student,
    in README.md's columns, then per category."""
    from .shapesworld.evaluate import evaluate, examples_grid, format_table, load_pipeline

    pipe, family = load_pipeline(output_dir)
    result = evaluate(pipe, family, guidance_scale=1.0, num_steps=16, seed=0, batch_size=8, limit=limit)
    examples_grid(result).save(Path(output_dir, "shapesworld_eval.png"))
    scores = {k: v for k, v in result.items() if not k.startswith("_")}
    Path(output_dir, "shapesworld_eval.json").write_text(json.dumps(scores, indent=2))
    subset = "" if limit is None else f", {limit} prompts / edits spread over the categories"
    name = f"DanceOPD student (this run, {result.get('set', 'quick')} set{subset})"
    print("\n[danceopd] ShapesWorld evaluation (seed 0; sources with their CFG 3, students without CFG)")
    print(summary_table({name: result}, steps or DEMO_DEFAULTS["max_train_steps"]))
    if "-" in summary_cells(result):
        print("(-: the limited set does not cover every category of that column; drop --demo_eval_limit)")
    table = {f"{n} (recorded)": r for n, r in recorded_sources().items()}
    table[name] = result
    print("\nPer category:\n" + format_table(table), flush=True)
    return scores
