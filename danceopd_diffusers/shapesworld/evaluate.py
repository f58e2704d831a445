"""Score a pipeline on the ShapesWorld evaluation set: the paper-style table, a picture grid, JSON.

    python -m danceopd_diffusers.shapesworld.evaluate --pipeline PATH [--lora PATH] [--guidance_scale S] [--json F]

Sampling goes through the library's fields on the family adapter (the same code the field-equivalence tests
check against each stock pipeline): the pipeline's own sigma grid, Euler steps, and for ``--guidance_scale``
α > 1 the CFG field ``u + α (c − u)`` (uncond = empty prompt; an edit's keeps its source image). α is in that
one convention for every family (Z-Image's own ``guidance_scale`` g is α − 1). NFE per image = steps × (2 with
CFG, else 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..caches import PromptCache, SourceCache
from ..families import FamilyAdapter, family_for_pipeline_class
from ..fields import CFGField, Field, FieldQuery, TransformerField
from ..rollout import field_rollout
from ..stock_loading import load_stock_pipeline, split_class_name
from ..validation import image_grid
from .scorer import score_edit, score_t2i, summarize_edit, summarize_t2i
from .world import EDIT_CATEGORIES, T2I_CATEGORIES, build_edit_dataset, build_t2i_dataset


def prompt_length(path: str, override: int | None = None) -> int | None:
    """The text length the model was trained with: prompts are padded to it, and a transformer trained on
    32 text tokens is out of distribution on 512. From ``--max_sequence_length``, else the exported folder's
    ``danceopd_config.json``, else the T5 tokenizer's own ``model_max_length`` when it is below 512."""
    if override is not None:
        return override
    config = Path(path, "danceopd_config.json")
    if config.is_file():
        length = json.loads(config.read_text()).get("args", {}).get("max_sequence_length")
        if length:
            return int(length)
    tokenizer_config = Path(path, "tokenizer_2", "tokenizer_config.json")
    if tokenizer_config.is_file():
        length = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(length, int) and length < 512:
            return length
    return None


def load_pipeline(
    path: str,
    lora: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int | None = None,
):
    """Any supported pipeline folder (stock or exported) and its family adapter; a LoRA is fused in if given."""
    from diffusers import DiffusionPipeline

    class_name, _ = split_class_name(DiffusionPipeline.load_config(path), path)
    family_cls = family_for_pipeline_class(class_name)
    length = prompt_length(path, max_sequence_length)
    family = family_cls(max_sequence_length=length) if length else family_cls()
    # an exported folder is loaded by the stock class: its pipeline_danceopd.py is never imported
    pipe = load_stock_pipeline(family.pipeline_class(), path, torch_dtype=dtype)
    if lora:
        pipe.load_lora_weights(lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family


@torch.no_grad()
def sample(
    pipe: Any,
    family: FamilyAdapter,
    field: Field,
    cond: Any,
    uncond: Any,
    height: int,
    width: int,
    seeds: Sequence[int],
    num_steps: int,
) -> list[Image.Image]:
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    shape = family.latent_shape(pipe, 1, height, width)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
        device, dtype
    )
    sigmas = family.sigmas(pipe, num_steps, noise.shape, device)

    def velocity(x, sigma, step):
        return field.velocity(FieldQuery(x, sigma.to(dtype), cond, uncond, step, num_steps))

    x0 = field_rollout(velocity, noise, sigmas)[-1]
    return family.decode_latents(pipe, x0, height, width)


def evaluate(
    pipe: Any,
    family: FamilyAdapter,
    guidance_scale: float = 1.0,
    num_steps: int = 16,
    seed: int = 0,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate and score the eval split; returns per-category numbers, NFE and a few examples for the grid."""
    from tqdm.auto import tqdm

    base = TransformerField("model", family, pipe.transformer)
    field: Field = CFGField("model_cfg", base, guidance_scale) if guidance_scale != 1.0 else base
    device = pipe.transformer.device
    prompts, sources = PromptCache(pipe, family, device), SourceCache(pipe, family, device)
    t2i = build_t2i_dataset("eval")
    edits = build_edit_dataset("eval") if family.can_edit else None
    n_t2i = len(t2i) if limit is None else min(limit, len(t2i))
    n_edit = 0 if edits is None else (len(edits) if limit is None else min(limit, len(edits)))
    bar = tqdm(total=n_t2i + n_edit, desc="ShapesWorld eval", disable=not progress)
    t2i_results, edit_results, examples = [], [], {}
    for start in range(0, n_t2i, batch_size):
        rows = t2i.select(range(start, min(start + batch_size, n_t2i)))
        size = rows[0]["target_image"].width
        cond, uncond = prompts(rows["prompt"]), prompts.empty(len(rows))
        images = sample(
            pipe,
            family,
            field,
            cond,
            uncond,
            size,
            size,
            [seed + start + i for i in range(len(rows))],
            num_steps,
        )
        for row, image in zip(rows, images):
            image = image.resize((size, size), Image.NEAREST) if image.size != (size, size) else image
            result = score_t2i(image, row["spec"])
            t2i_results.append(result)
            examples.setdefault(row["category"], [image, row["target_image"]])
        bar.update(len(rows))
    for start in range(0, n_edit, batch_size):
        rows = edits.select(range(start, min(start + batch_size, n_edit)))
        size = rows[0]["source_image"].width
        keys = [("eval-edit", start + i) for i in range(len(rows))]
        srcs = [img.convert("RGB") for img in rows["source_image"]]
        cond = prompts(rows["prompt"], keys, srcs)
        uncond = prompts.empty(len(rows), keys, srcs)
        source = sources(keys, srcs, size, size)
        images = sample(
            pipe,
            family,
            field,
            cond.merge(source),
            uncond.merge(source),
            size,
            size,
            [seed + 10_000 + start + i for i in range(len(rows))],
            num_steps,
        )
        for row, src, image in zip(rows, srcs, images):
            result = score_edit(src, image, row["spec"])
            edit_results.append(result)
            examples.setdefault(row["category"], [src, image, row["target_image"]])
        bar.update(len(rows))
    bar.close()
    return {
        "t2i": summarize_t2i(t2i_results) if t2i_results else {},
        "edit": summarize_edit(edit_results) if edit_results else {},
        "nfe_per_image": num_steps * (2 if guidance_scale != 1.0 else 1),
        "guidance_scale": guidance_scale,
        "num_steps": num_steps,
        "n_t2i": len(t2i_results),
        "n_edit": len(edit_results),
        "can_edit": family.can_edit,
        "_examples": examples,
    }


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Paper-style table; ``results`` maps a model name to :func:`evaluate`'s output."""
    t2i_cols = list(T2I_CATEGORIES) + ["overall"]
    edit_cols = list(EDIT_CATEGORIES) + ["average"]
    lines = [
        "T2I (GenEval rules, accuracy 0-1)",
        "| model | " + " | ".join(t2i_cols) + " | NFE |",
        "|---" * (len(t2i_cols) + 2) + "|",
    ]
    for name, r in results.items():
        vals = [f"{r['t2i'][c]:.3f}" if c in r["t2i"] else "-" for c in t2i_cols]
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {r['nfe_per_image']} |")
    lines += [
        "",
        "Edits (GEdit scheme, overall 0-10)",
        "| model | " + " | ".join(edit_cols) + " |",
        "|---" * (len(edit_cols) + 1) + "|",
    ]
    for name, r in results.items():
        if not r["edit"]:
            lines.append(f"| {name} | " + " | ".join(["n/a"] * len(edit_cols)) + " |")
            continue
        lines.append(
            f"| {name} | " + " | ".join(f"{r['edit'].get(c, float('nan')):.2f}" for c in edit_cols) + " |"
        )
    return "\n".join(lines)


def examples_grid(result: dict[str, Any]) -> Image.Image:
    return image_grid(list(result["_examples"].values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score a pipeline on ShapesWorld's evaluation set.")
    parser.add_argument(
        "--pipeline", required=True, help="pipeline folder (stock or exported by train_danceopd.py)"
    )
    parser.add_argument("--lora", default=None, help="a LoRA to fuse in first (file or folder)")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="CFG α (u + α(c-u)); 1 = no CFG")
    parser.add_argument("--num_inference_steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="text tokens per prompt (default: the value the pipeline folder was trained with)",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N prompts / edits")
    parser.add_argument(
        "--grid", default=None, help="where to write the picture grid (default: next to --json)"
    )
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--name", default=None, help="row name in the table")
    args = parser.parse_args(argv)
    if not Path(args.pipeline).exists():
        print(f"error: --pipeline {args.pipeline} does not exist", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe, family = load_pipeline(
        args.pipeline, args.lora, device, max_sequence_length=args.max_sequence_length
    )
    result = evaluate(
        pipe, family, args.guidance_scale, args.num_inference_steps, args.seed, args.batch_size, args.limit
    )
    name = args.name or Path(args.pipeline).name + (f" + {Path(args.lora).name}" if args.lora else "")
    print(format_table({name: result}))
    if not family.can_edit:
        print(f"(the {family.name} family cannot edit: edit categories are n/a)")
    grid_path = args.grid or (
        str(Path(args.json).with_suffix(".png")) if args.json else "shapesworld_eval.png"
    )
    examples_grid(result).save(grid_path)
    print(f"grid: {grid_path}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
