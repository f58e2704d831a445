"""``carry``: start a new edition of the study (another query space on the same grid) from a shipped one.

Runs whose training draws no query state (dense, joint), the weight merges and the teachers are the same under
either query law, so they are carried with a note saying where they come from; every run that draws a query is
trained again. Their student files are not copied when the editions are shipped side by side
(``shapesworld/study`` and ``shapesworld/study2``): the new edition's ``results.json`` names the first edition's
file (``../study/<run>.safetensors``), so the package ships each student once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .study_settings import read_json, write_json

#: methods whose training draws no query state (dense queries every state, sft rolls nothing out): their runs are
#: the same under either query space on the same grid
QUERY_FREE_METHODS = ("dense", "sft")


def query_free_part(collection: dict, query_space: str) -> dict:
    """What of a shipped collection holds under another query space on the same grid: the runs of
    :data:`QUERY_FREE_METHODS`, the merges and the teachers, with their shipped files; the rest is to be run again.
    The result is a collection of ``query_space`` that records where these rows come from."""
    runs = {n: r for n, r in collection["runs"].items() if r.get("method") in QUERY_FREE_METHODS}
    shipped = {
        n: f for n, f in collection.get("shipped", {}).items() if n in runs or n in collection["merges"]
    }
    # the best trained baselines (which seeds run) are chosen again from the new edition's own results
    settings = {**collection["settings"], "query_space": query_space, "best_baselines": {}}
    first = collection["settings"].get("query_space", "step")
    note = (
        f"Carried over from the {first}-space study: {', '.join(sorted(runs))}, the weight merges and the teachers. "
        "Their training draws no query state (DiffusionOPD queries all 16 states, joint training rolls nothing "
        "out, merges and teachers are not trained), so the query law does not change them; every run that draws "
        f"a query is trained again with --query_space {query_space} (the report says which are, and which are not run "
        "yet)."
    )
    return {
        "settings": settings,
        "runs": runs,
        "merges": collection["merges"],
        "teachers": collection["teachers"],
        "shipped": shipped,
        "notes": [note],
        "rescored": {k: v for k, v in (collection.get("rescored") or {}).items() if k in shipped},
        "history": [],
        # what the report names as carried, and from which edition
        "carried": {
            "edition": collection.get("carried", {}).get("edition", 1) + 1,
            "query_space": first,
            "runs": sorted(runs),
        },
    }


def carry_stage(source: Path, dest: Path, query_space: str, log: Any = print) -> dict:
    """Start ``dest`` (a new edition of the study on the same grid) from ``source``'s query-free results."""
    previous = read_json(source / "results.json")
    if previous is None:
        raise SystemExit(
            f"error: {source / 'results.json'} does not exist: pass --carry_from a shipped study folder."
        )
    if read_json(dest / "results.json") is not None:
        raise SystemExit(f"error: {dest / 'results.json'} exists already: carry starts a new --dest only.")
    carried = query_free_part(previous, query_space)
    carried["carried"]["from"] = source.resolve().name
    dest.mkdir(parents=True, exist_ok=True)
    sibling = source.resolve().parent == dest.resolve().parent
    for name, file in carried["shipped"].items():
        if sibling:  # editions shipped side by side (in the package): the new one points at the first's file
            carried["shipped"][name] = f"../{source.resolve().name}/{file}"
            log(f"[study] carried {name}: {dest / carried['shipped'][name]}")
        else:  # anywhere else, a copy: the folder must stand alone (and name no machine path)
            (dest / file).write_bytes((source / file).read_bytes())
            log(f"[study] carried {name} -> {dest / file}")
    write_json(dest / "results.json", carried)
    return carried
