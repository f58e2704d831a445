"""Write trained ShapesWorld sources into the shipped folder, in fp16, and score what was written.

    python -m danceopd_diffusers.shapesworld.ship --root ROOT [--dest danceopd_diffusers/shapesworld/sources]
    python -m danceopd_diffusers.shapesworld.ship --rescore [--preset large] [--device cuda] [--dest ...]

``ROOT`` is a ``train_sources.sh`` root (``init``, ``base``, ``local``, ``global``, ``joint``, ``edit``). The evaluation runs
on the written fp16 files, so ``results.json`` describes exactly what ships (the embedded default prints it).
``--rescore`` scores the sources already in ``--dest`` again (after a scorer change, or on another set), each
with the guidance scale and steps its results.json row records, and rewrites results.json after every source:
a run cut short keeps the rows it finished, and running it again skips them (``--force`` redoes them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: results.json row name -> (LoRA file in dest, its training folder under ROOT); None: the base alone
SOURCES = {
    "T2I base": (None, None),
    "local-edit expert": ("local_edit_lora.safetensors", "local"),
    "global-edit expert": ("global_edit_lora.safetensors", "global"),
    "joint training (data mixing)": ("joint_lora.safetensors", "joint"),
    "edit source (local + global edits)": ("edit_lora.safetensors", "edit"),
}
LORA_FILE = "pytorch_lora_weights.safetensors"
TRANSFORMER_FILE = Path("transformer", "diffusion_pytorch_model.safetensors")
MAX_BYTES = 40 * 2**20


def _to_fp16(src: Path, dst: Path) -> None:
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    half = {k: t.half() if t.is_floating_point() else t for k, t in tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(dst), metadata=metadata)


def ship(
    root: str | Path,
    dest: str | Path,
    guidance_scale: float = 3.0,
    evaluate_sources: bool = True,
    limit: int | None = None,
) -> dict:
    """Copy the sources found under ``root`` into ``dest`` (fp16) and return their evaluation."""
    root, dest = Path(root), Path(dest)
    missing = [p for p in [root / "init", root / "base" / TRANSFORMER_FILE] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} does not exist: run train_sources.sh data and base first.")
    base = dest / "base"
    if base.exists():
        shutil.rmtree(base)
    shutil.copytree(root / "init", base, ignore=shutil.ignore_patterns("training.json"))
    for config in base.glob("*/config.json"):  # the training machine's paths mean nothing to a user
        fields = json.loads(config.read_text())
        if fields.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    _to_fp16(root / "base" / TRANSFORMER_FILE, base / TRANSFORMER_FILE)
    shipped = {"T2I base": None}
    for name, (file, folder) in SOURCES.items():
        if file is not None and (root / folder / LORA_FILE).is_file():
            _to_fp16(root / folder / LORA_FILE, dest / file)
            shipped[name] = dest / file
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    if size > MAX_BYTES:
        raise ValueError(f"{dest} holds {size / 2**20:.1f} MB; the shipped sources must stay within 40 MB.")
    results: dict[str, dict] = {}
    if evaluate_sources:
        from .evaluate import device_defaults, evaluate, load_pipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        batch_size, workers = device_defaults(device, 48, None)
        for name, lora in shipped.items():
            pipe, family = load_pipeline(str(base), str(lora) if lora else None, device)
            result = evaluate(
                pipe,
                family,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                limit=limit,
                score_workers=workers,
            )
            results[name] = {k: v for k, v in result.items() if not k.startswith("_")}
        _write_json(dest / "results.json", results)
    return results


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary file, so a run killed mid-write leaves the previous file intact."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def rescore(
    dest: str | Path,
    per_category: tuple[int, int] | None = None,
    device: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    score_workers: int | None = None,
    force: bool = False,
    limit: int | None = None,
    log: Any = print,
    results_file: str | Path | None = None,
) -> dict[str, dict]:
    """Score every source shipped in ``dest`` again and merge each row into ``dest/results.json`` as it finishes.

    A row keeps the guidance scale and step count it was recorded with (CFG 3, 16 steps by default). Rows already
    scored on this set, seed and scorer version are skipped unless ``force``. ``results_file`` writes elsewhere
    (default ``dest/results.json``, the file the embedded default prints).
    """
    from .evaluate import PRESETS, device_defaults, evaluate, load_pipeline
    from .scorer import SCORER_VERSION

    dest = Path(dest)
    base = dest / "base"
    if not (base / TRANSFORMER_FILE).is_file():
        raise FileNotFoundError(
            f"{base / TRANSFORMER_FILE} does not exist: --dest must hold shipped sources."
        )
    per_category = per_category or PRESETS["quick"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size, workers = device_defaults(device, batch_size, score_workers)
    path = Path(results_file) if results_file else dest / "results.json"
    recorded = dest / "results.json"
    results: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}
    settings = json.loads(recorded.read_text()) if recorded.is_file() else {}
    wanted = {"t2i": per_category[0], "edit": per_category[1]}
    for name, (file, _) in SOURCES.items():
        lora = None if file is None else dest / file
        if lora is not None and not lora.is_file():
            continue
        old = results.get(name, {})
        done = (old.get("per_category"), old.get("seed"), old.get("scorer_version"), old.get("limit"))
        recorded_row = settings.get(name, old)
        if not force and done == (wanted, seed, SCORER_VERSION, limit):
            log(f"{name}: already scored on this set, seed and scorer (--force redoes it)")
            continue
        pipe, family = load_pipeline(str(base), str(lora) if lora else None, device)
        result = evaluate(
            pipe,
            family,
            guidance_scale=float(recorded_row.get("guidance_scale", 3.0)),
            num_steps=int(recorded_row.get("num_steps", 16)),
            seed=seed,
            batch_size=batch_size,
            limit=limit,
            progress=False,
            per_category=per_category,
            score_workers=workers,
        )
        results[name] = {k: v for k, v in result.items() if not k.startswith("_")}
        _write_json(path, results)
        log(
            f"{name}: T2I {result['t2i']['overall']:.3f}, edit average {result['edit']['average']:.2f} "
            f"({result['wall_time_s']:.1f} s) -> {path}"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", default=None, help="the train_sources.sh root holding init/ base/ local/ ..."
    )
    parser.add_argument("--dest", default=str(Path(__file__).resolve().parent / "sources"))
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="the sources' CFG in results.json")
    parser.add_argument(
        "--rescore", action="store_true", help="score the sources already in --dest again (no --root)"
    )
    parser.add_argument("--preset", choices=["quick", "large"], default="quick", help="evaluation set")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=None, help="images per device batch")
    parser.add_argument("--force", action="store_true", help="with --rescore: redo rows already scored")
    parser.add_argument(
        "--results", default=None, help="with --rescore: write here instead of DEST/results.json"
    )
    args = parser.parse_args(argv)
    from .evaluate import PRESETS, format_table

    if args.rescore == (args.root is not None):
        parser.error("give either --root (ship trained sources) or --rescore (score the shipped ones again)")
    if args.rescore:
        if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {args.device} but torch sees no CUDA device; pass --device cpu")
        results = rescore(
            args.dest,
            PRESETS[args.preset],
            args.device,
            args.seed,
            args.batch_size,
            force=args.force,
            results_file=args.results,
        )
    else:
        results = ship(args.root, args.dest, args.guidance_scale)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
