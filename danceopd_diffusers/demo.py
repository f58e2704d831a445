"""The embedded default: what ``accelerate launch train_danceopd.py`` runs with no model argument.

DanceOPD on ShapesWorld from the shipped sources (``shapesworld/sources``), in the paper's setting A (T2I + Edit,
``shapesworld/setting_a.yaml``): the student starts from the edit source (a LoRA that edits but draws poorly from
text) and learns text-to-image from the T2I base with CFG 3, while its edits are routed to the edit source with
CFG 3; it needs no CFG itself. The study (``shapesworld/STUDY.md``) found this setting working at full length;
a student fused from the base instead (``shapesworld/fusion.yaml``) learns no edits in a CPU budget, as the
paper's init ablation predicts. It is short on CPU, but every step is the real method; the run ends by scoring
the student on ShapesWorld's evaluation set next to the recorded sources, its starting point and the expected
student.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHAPESWORLD = Path(__file__).resolve().parent / "shapesworld"
SOURCES = SHAPESWORLD / "sources"
FUSION_CONFIG = SHAPESWORLD / "fusion.yaml"
SETTING_A_CONFIG = SHAPESWORLD / "setting_a.yaml"
STUDENT_INIT = SOURCES / "edit_lora.safetensors"
#: train rows per category written for the demo (its prompts and source images; the targets go unused)
DEMO_ROWS_PER_CATEGORY = 40

#: flag -> value used when the user did not set that flag (printed at start)
DEMO_DEFAULTS: dict[str, Any] = {
    "fields_config": str(SETTING_A_CONFIG),
    "student_init": str(STUDENT_INIT),  # its rank (32) and alpha come from the file
    "max_train_steps": 100,
    "train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4,  # at batch 4, 5e-4 gains T2I (0.375) but loses edits (3.29): measured, see README
    "num_rollout_steps": 16,
    "seed": 0,
    "validation_steps": 100,
    "checkpointing_steps": 100,
    "cache_latents": True,
    "validation_prompt": ["a photo of a red circle and a blue square", "a photo of three yellow crosses"],
}
#: flags that declare fields: given by the user, they replace the demo's fields config and its student init
FIELD_FLAGS = ("fields_config", "cfg_scale", "expert_lora", "expert_checkpoint")
#: demo defaults that belong to its fields config (dropped with it)
FIELDS_DEFAULTS = ("fields_config", "student_init")
#: flags that ask for a fresh student: given by the user, the demo starts from the base, not the edit source
FRESH_STUDENT_FLAGS = ("rank", "lora_alpha", "full_finetune")


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


#: the student before training: the edit source without CFG (what the LoRA it starts from does alone)
STUDENT_START: dict[str, Any] = {
    "where": "the edit source without CFG, NFE 16; quick set, CPU, scorer version 2",
    "t2i": 0.271,
    "local": 4.27,
    "global": 4.48,
}
#: DanceOPD students of this default (seed 0) by length, as README.md's columns: measured, where and how
EXPECTED_STUDENTS: dict[int, dict[str, Any]] = {
    100: {
        "where": "this default, seed 0, quick set, 2 CPU cores, scorer version 2",
        "t2i": 0.323,
        "local": 4.26,
        "global": 5.09,
    },
    600: {
        "where": "shapesworld/STUDY.md's setting-A student: batch 64, one H200, large set",
        "t2i": 0.765,
        "local": 5.68,
        "global": 4.10,
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
    cells = [f"{STUDENT_START['t2i']:.3f}", f"{STUDENT_START['local']:.2f}", f"{STUDENT_START['global']:.2f}"]
    lines.append(f"| the student's start ({STUDENT_START['where']}) | " + " | ".join(cells) + " |")
    for length in sorted(EXPECTED_STUDENTS):
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
    Path(output_dir, "shapesworld_eval.json").write_text(json.dumps(scores, indent=2), encoding="utf-8")
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
