"""Write trained ShapesWorld sources into the shipped folder, in fp16, and score what was written.

    python -m danceopd_diffusers.shapesworld.ship --root ROOT [--dest danceopd_diffusers/shapesworld/sources]

``ROOT`` is a ``train_sources.sh`` root (``init``, ``base``, ``local``, ``global``, ``joint``, ``edit``). The evaluation runs
on the written fp16 files, so ``results.json`` describes exactly what ships (the embedded default prints it).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

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
        from .evaluate import evaluate, load_pipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        for name, lora in shipped.items():
            pipe, family = load_pipeline(str(base), str(lora) if lora else None, device)
            result = evaluate(pipe, family, guidance_scale=guidance_scale, batch_size=48, limit=limit)
            results[name] = {k: v for k, v in result.items() if not k.startswith("_")}
        (dest / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", required=True, help="the train_sources.sh root holding init/ base/ local/ ..."
    )
    parser.add_argument("--dest", default=str(Path(__file__).resolve().parent / "sources"))
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="the sources' CFG in results.json")
    args = parser.parse_args(argv)
    from .evaluate import format_table

    results = ship(args.root, args.dest, args.guidance_scale)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
