"""Prepare ShapesWorld training: the VAE, the untrained pipeline and the data folders the script reads.

    python -m danceopd_diffusers.shapesworld.prepare --root sw --vae_steps 3000

Writes ``root/vae`` (trained on world renders, or copied from ``--vae``), ``root/init`` (the untrained
FluxKontextPipeline with that VAE) and ``root/data/{t2i,local,global}/metadata.jsonl`` + PNGs (the fixed train
split; row ``i`` of a category is the same for every ``--n_per_category`` and worker count). ``root/data/all``
and ``root/data/edits`` hold only a ``metadata.jsonl`` that points at the others' images: ``all`` is the
data-mixing baseline's data, ``edits`` (local + global) the edit source's.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .world import GLOBAL_EDIT_CATEGORIES, LOCAL_EDIT_CATEGORIES, T2I_CATEGORIES, edit_rows, t2i_rows

#: bucket folder -> (task, categories); ``all`` is written last, from the others
BUCKETS = {
    "t2i": ("t2i", T2I_CATEGORIES),
    "local": ("local_edit", LOCAL_EDIT_CATEGORIES),
    "global": ("global_edit", GLOBAL_EDIT_CATEGORIES),
}
#: buckets made of other buckets' rows (no images of their own); edits first: the JSON reader infers column types
#: from the first rows, and a first block whose source_image is always null would type the column as null
COMBINED = {"all": ("local", "global", "t2i"), "edits": ("local", "global")}


def _write_category(folder: str, task: str, category: str, n: int, seed: int) -> list[dict[str, Any]]:
    """One category's rows as PNGs + metadata records (run in a worker process)."""
    if task == "t2i":
        rows = t2i_rows("train", n, categories=[category], seed=seed)
    else:
        rows = edit_rows("train", task.split("_")[0], n, categories=[category], seed=seed)
    records = []
    for i, row in enumerate(rows):
        rec: dict[str, Any] = {k: row[k] for k in ("prompt", "task", "category")}
        for col, suffix in (("source_image", "source"), ("target_image", "target")):
            if row[col] is None:
                rec[col] = None
                continue
            rel = f"images/{category}_{i:06d}_{suffix}.png"
            row[col].save(os.path.join(folder, rel))
            rec[col] = rel
        rec["spec"] = row["spec"]
        records.append(rec)
    return records


def write_buckets(
    root: str | os.PathLike, names: list[str], n_per_category: int, seed: int = 0, workers: int | None = None
) -> dict[str, int]:
    """The bucket folders under ``root/data``; returns rows per bucket."""
    data = Path(root, "data")
    jobs = []
    for name in names:
        if name in COMBINED:
            continue
        task, categories = BUCKETS[name]
        (data / name / "images").mkdir(parents=True, exist_ok=True)
        jobs += [(name, str(data / name), task, c, n_per_category, seed) for c in categories]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        futures = [(job[0], pool.submit(_write_category, *job[1:])) for job in jobs]
        records: dict[str, list[dict[str, Any]]] = {}
        for name, future in futures:  # submission order: metadata rows are category-major
            records.setdefault(name, []).extend(future.result())
    for name, recs in records.items():
        with open(data / name / "metadata.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    counts = {name: len(recs) for name, recs in records.items()}
    for combined in (n for n in names if n in COMBINED):
        (data / combined).mkdir(parents=True, exist_ok=True)
        counts[combined] = 0
        with open(data / combined / "metadata.jsonl", "w", encoding="utf-8") as f:
            for name in COMBINED[combined]:
                meta = data / name / "metadata.jsonl"
                if not meta.exists():
                    raise FileNotFoundError(
                        f"{meta} is missing: prepare the {name!r} bucket with {combined!r}."
                    )
                for line in meta.read_text().splitlines():
                    rec = json.loads(line)
                    for col in ("source_image", "target_image"):
                        if rec[col]:
                            rec[col] = f"../{name}/{rec[col]}"
                    f.write(json.dumps(rec) + "\n")
                    counts[combined] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--vae_steps", type=int, default=3000)
    parser.add_argument("--vae", default=None, help="reuse this trained VAE folder instead of training one")
    parser.add_argument("--n_per_category", type=int, default=1000, help="train rows per category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=int, default=None, help="processes writing data (default: all cores)"
    )
    parser.add_argument("--buckets", nargs="+", default=[*BUCKETS, *COMBINED], choices=[*BUCKETS, *COMBINED])
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.vae is not None and not Path(args.vae, "config.json").is_file():
        parser.error(
            f"--vae {args.vae} has no config.json: pass a folder written by AutoencoderKL.save_pretrained."
        )
    from .pipeline import save_shapesworld_pipeline

    vae_path = Path(args.vae) if args.vae else root / "vae"
    if not (vae_path / "config.json").exists():
        from .train_vae import train_vae

        device = "cuda" if torch.cuda.is_available() else "cpu"
        vae, history = train_vae(args.vae_steps, seed=args.seed, device=device, log_every=500)
        vae.to("cpu").save_pretrained(vae_path)
        (vae_path / "training.json").write_text(
            json.dumps({"steps": args.vae_steps, "seed": args.seed, "last_loss": sum(history[-50:]) / 50})
        )
    save_shapesworld_pipeline(root / "init", vae_path)
    for name, n in write_buckets(root, args.buckets, args.n_per_category, args.seed, args.workers).items():
        print(f"{name}: {n} rows", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
