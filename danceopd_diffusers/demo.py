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
    "max_sequence_length": 32,
    "resolution": 64,
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


def report(output_dir: str, limit: int | None = None) -> dict:
    """Score the exported student (CFG-free, 16 steps) and print its table under the sources' tables."""
    from .shapesworld.evaluate import evaluate, examples_grid, format_table, load_pipeline

    pipe, family = load_pipeline(output_dir)
    result = evaluate(pipe, family, guidance_scale=1.0, num_steps=16, seed=0, batch_size=8, limit=limit)
    examples_grid(result).save(Path(output_dir, "shapesworld_eval.png"))
    scores = {k: v for k, v in result.items() if not k.startswith("_")}
    Path(output_dir, "shapesworld_eval.json").write_text(json.dumps(scores, indent=2))
    table = {f"{name} (recorded)": r for name, r in recorded_sources().items()}
    subset = "" if limit is None else f", first {limit} prompts / edits only"
    table[f"DanceOPD student (this run{subset})"] = result
    print("\n[danceopd] ShapesWorld evaluation (seed 0; sources with their CFG 3, student without CFG)")
    print(format_table(table), flush=True)
    return scores
