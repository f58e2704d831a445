"""``ship``: the main table's students (fp16 LoRAs) and every result of a study root into the shipped folder
(``shapesworld/study/``), and the CPU re-score of each shipped student that STUDY.md's last table reports.

The final tables come from a GPU on the large set; the re-score is what anyone can check on a CPU from the
shipped files alone (:data:`RESCORE_COMMAND`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .study_grid import best_merge, main_runs
from .study_results import collect, merge_collections
from .study_settings import HERE, SOURCES, Settings, read_json, write_json

#: where ``ship`` writes by default and ``report`` reads without ``--root``: the study's shipped results
SHIP_DIR = HERE / "study"
#: the CPU re-score of each shipped student: what `evaluate` prints for anyone who runs RESCORE_COMMAND
RESCORE_KEYS = ("t2i", "edit", "ci", "set", "per_category", "limit", "seed", "num_steps", "nfe_per_image")
RESCORE_COMMAND = (
    "python -m danceopd_diffusers.shapesworld.evaluate --pipeline danceopd_diffusers/shapesworld/sources/base "
    "--lora danceopd_diffusers/shapesworld/{dest}/{file} --device cpu"
)


def ship_stage(
    root: Path, settings: Settings, dest: Path = SHIP_DIR, log: Any = print, trained_on: str | None = None
) -> dict:
    """The main table's students (each run of settings A and B, and each setting's best merge) as fp16 LoRAs in
    ``dest``, and the whole collection in ``dest/results.json`` (what `report` reads without ``--root``).

    What ``dest`` already holds is kept where this root has nothing better (a run it lacks or got less far with, a
    teacher or merge it did not score): a study can be finished on another machine, or after one was lost, and
    shipped into the same place. Each ship is recorded in ``history`` (with ``trained_on``, the machine and date
    its runs were trained on, where given: a root carries neither); only files written now are re-scored."""
    from .ship import _to_fp16

    collection = collect(root, settings)
    previous = read_json(dest / "results.json")
    taken = {"runs": sorted(n for n, r in collection["runs"].items() if r.get("wall_s") or r.get("final"))}
    if previous is not None:
        collection, kept = merge_collections(previous, collection)
        for name in kept:
            log(
                f"[study] {name}: kept from the earlier {dest / 'results.json'} (this root has nothing better)"
            )
        taken["runs"] = [n for n in taken["runs"] if n not in kept]
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [r.name for r in main_runs() if (collection["runs"].get(r.name) or {}).get("done")]
    wanted += [best[0] for best in (best_merge(collection, s) for s in ("A", "B")) if best]
    shipped, written = {}, []
    for name in wanted:
        source = (root / "merges" if name in collection["merges"] else root / "runs") / name
        lora = source / "pytorch_lora_weights.safetensors"
        kept_file = (previous or {}).get("shipped", {}).get(name)
        if name in taken["runs"] or (name in collection["merges"] and lora.is_file()):
            _to_fp16(lora, dest / f"{name}.safetensors")
            written.append(name)
            log(f"[study] shipped {name} -> {dest / f'{name}.safetensors'}")
        elif not (kept_file and (dest / kept_file).is_file()):
            raise SystemExit(
                f"error: {name} is in the results but neither {lora} nor {dest / f'{name}.safetensors'} exists."
            )
        shipped[name] = f"{name}.safetensors"
    for stale in set((previous or {}).get("shipped", {})) - set(shipped):
        (dest / previous["shipped"][stale]).unlink(missing_ok=True)
    collection["shipped"] = shipped
    collection["rescored"] = {
        k: v for k, v in (collection.get("rescored") or {}).items() if k in shipped and k not in written
    }
    collection["settings"] = {k: v for k, v in collection["settings"].items() if k not in ("data", "sources")}
    entry = {"date": time.strftime("%Y-%m-%d"), "root": root.name, "runs": taken["runs"], "files": written}
    collection.setdefault("history", []).append({**entry, "trained_on": trained_on} if trained_on else entry)
    write_json(dest / "results.json", collection)
    return rescore_shipped(dest, Path(settings.sources), settings.eval_limit, log=log)


def rescore_one(dest: Path, file: str, sources: Path = SOURCES, limit: int | None = None) -> dict:
    """One shipped fp16 student on the quick set, on the CPU, without CFG: RESCORE_COMMAND's numbers."""
    from .evaluate import evaluate, load_pipeline

    pipe, family = load_pipeline(str(sources / "base"), str(dest / file), "cpu")
    result = evaluate(
        pipe, family, guidance_scale=1.0, num_steps=16, seed=0, batch_size=8, limit=limit, progress=False
    )
    return {k: result[k] for k in RESCORE_KEYS}


def rescore_shipped(dest: Path, sources: Path = SOURCES, limit: int | None = None, log: Any = print) -> dict:
    """Every shipped student re-scored from its file (``rescored`` in ``dest/results.json``; STUDY.md's last
    table): the final tables come from the GPU on the large set, this is what a CPU user can check."""
    path = dest / "results.json"
    collection = json.loads(path.read_text())
    rescored = collection.setdefault("rescored", {})
    for name, file in collection.get("shipped", {}).items():
        if name in rescored:  # shipped earlier and not rewritten since
            continue
        rescored[name] = rescore_one(dest, file, sources, limit)
        edit = rescored[name]["edit"].get("average", float("nan"))
        log(
            f"[study] re-scored {file} on the CPU: T2I {rescored[name]['t2i']['overall']:.3f}, edit {edit:.2f}"
        )
        write_json(path, collection)  # each one as it is done: a cut re-score keeps what it did
    return collection
