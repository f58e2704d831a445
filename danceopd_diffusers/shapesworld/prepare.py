"""Prepare ShapesWorld training: the VAE, the untrained pipeline and the data folders the script reads.

    python -m danceopd_diffusers.shapesworld.prepare --root sw --vae_steps 3000

Writes ``root/vae`` (trained on world renders), ``root/init`` (the untrained FluxKontextPipeline with that VAE)
and ``root/data/{t2i,local,global,all}/metadata.jsonl`` (+ PNGs; the fixed train split, seeds in the files).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .pipeline import save_shapesworld_pipeline
from .train_vae import train_vae
from .world import build_dataset, save_dataset_to_folder

BUCKETS = {
    "t2i": ("t2i",),
    "local": ("local_edit",),
    "global": ("global_edit",),
    "all": ("t2i", "local_edit", "global_edit"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--vae_steps", type=int, default=3000)
    parser.add_argument(
        "--n_per_category", type=int, default=None, help="train rows per category (default: world's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--buckets", nargs="+", default=list(BUCKETS), choices=list(BUCKETS))
    args = parser.parse_args(argv)
    root = Path(args.root)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (root / "vae" / "config.json").exists():
        vae, history = train_vae(args.vae_steps, seed=args.seed, device=device, log_every=500)
        vae.to("cpu").save_pretrained(root / "vae")
        (root / "vae" / "training.json").write_text(
            json.dumps({"steps": args.vae_steps, "seed": args.seed, "last_loss": sum(history[-50:]) / 50})
        )
    save_shapesworld_pipeline(root / "init", root / "vae")
    for name in args.buckets:
        tasks = BUCKETS[name]
        ds = build_dataset("train", tasks=tasks, n_per_category=args.n_per_category, seed=args.seed)
        save_dataset_to_folder(ds, root / "data" / name)
        print(f"{name}: {len(ds)} rows", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
