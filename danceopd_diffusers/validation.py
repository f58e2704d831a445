"""Validation samples: the student without CFG beside each routed field, same prompts, seeds and noise."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from .caches import PromptCache, SourceCache
from .data import fit_image
from .families import FamilyAdapter, edit_size
from .fields import Field, FieldQuery
from .logging_utils import get_logger
from .rollout import field_rollout

logger = get_logger(__name__)


@dataclass
class ValidationExample:
    """One row of the grid: a prompt (an instruction for edits, with its source image) and the fields to show."""

    prompt: str
    fields: list[Field] = field(default_factory=list)
    source_image: Image.Image | None = None
    key: Any = None  # cache key of the source (any hashable, unique per source image)


def validation_examples(
    routes: Sequence[Any],
    fields: dict[str, Field],
    buckets: Any,
    source_column: str,
    prompts: Sequence[str],
    edit_tasks: set[str],
    show_fields: bool = True,
) -> list[ValidationExample]:
    """The validation prompts against the fields of the text-to-image routes, and the first row of each edit
    bucket (its source image shown first) against its edit routes' fields. Without ``show_fields`` (sft: no field
    is trained towards) the student alone."""

    def routed_to(tasks: set[str]) -> list[Field]:
        names = dict.fromkeys(r.field for r in routes if r.task in tasks)
        return [fields[n] for n in names] if show_fields else []

    t2i_fields = routed_to({r.task for r in routes} - edit_tasks)
    examples = [ValidationExample(p, t2i_fields) for p in prompts]
    for task in sorted(edit_tasks):
        row = buckets.buckets[task][0]
        source = buckets.images([row], source_column)[0]
        examples.append(ValidationExample(buckets.prompts([row])[0], routed_to({task}), source, row))
    return examples


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # FreeType: scalable
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _fit(text: str, font: ImageFont.ImageFont, width: int) -> str:
    while len(text) > 1 and font.getlength(text) > width:
        text = text[:-2] + "…"
    return text


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    pad: int = 4,
    titles: Sequence[str] | None = None,
    labels: Sequence[Sequence[str]] | None = None,
    min_cell: int = 192,
    font_size: int = 16,
) -> Image.Image:
    """Rows of images on one white canvas (cells sized by the largest image), each row under its ``titles`` line
    (wrapped) and each image under its ``labels`` header. Small images are enlarged by an integer factor with
    nearest-neighbour sampling, so a 64 px sample shows its pixels at a size a person can read."""
    cell_w = max(img.width for row in rows for img in row)
    cell_h = max(img.height for row in rows for img in row)
    scale = max(1, math.ceil(min_cell / max(cell_w, cell_h)))
    cell_w, cell_h = cell_w * scale, cell_h * scale
    cols = max(len(r) for r in rows)
    width = cols * cell_w + (cols + 1) * pad
    font, line_h = _font(font_size), font_size + 6
    title_lines = [_wrap(t, font, width - 2 * pad) for t in titles] if titles else [[] for _ in rows]
    label_h = line_h if labels else 0
    height = pad + sum(len(lines) * line_h + label_h + cell_h + pad for lines in title_lines)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    y = pad
    for i, row in enumerate(rows):
        for line in title_lines[i]:
            draw.text((pad, y), line, fill="black", font=font)
            y += line_h
        if labels:
            for j, text in enumerate(labels[i]):
                draw.text(
                    (pad + j * (cell_w + pad), y), _fit(text, font, cell_w), fill=(70, 70, 70), font=font
                )
            y += line_h
        for j, img in enumerate(row):
            img = img.convert("RGB")
            if scale > 1:
                img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
            grid.paste(img, (pad + j * (cell_w + pad), y))
        y += cell_h + pad
    return grid


@torch.no_grad()
def validation_grid(
    pipe: Any,
    family: FamilyAdapter,
    prompt_cache: PromptCache,
    source_cache: SourceCache,
    examples: Sequence[ValidationExample],
    seeds: Sequence[int],
    num_steps: int,
    resolution: int,
) -> tuple[Image.Image, list[str]]:
    """One row per (example, seed): [source,] student, then each of the example's fields.

    Returns the grid and a caption per row.
    """
    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    rows, captions, titles, labels = [], [], [], []
    for example in examples:
        height = width = resolution
        cond, uncond = prompt_cache([example.prompt]), prompt_cache.empty(1)
        row_head: list[Image.Image] = []
        if example.source_image is not None:
            height, width = edit_size(example.source_image.width, example.source_image.height, resolution)
            fitted = fit_image(example.source_image, height, width)
            keys = [example.key]
            cond = prompt_cache([example.prompt], keys, [fitted])
            uncond = prompt_cache.empty(1, keys, [fitted])
            source = source_cache(keys, [fitted], height, width)
            cond, uncond = cond.merge(source), uncond.merge(source)
            row_head = [fitted]
        size = family.size_conditioning(pipe, 1, height, width)
        cond, uncond = cond.merge(size), uncond.merge(size)
        shape = family.latent_shape(pipe, 1, height, width)
        for seed in seeds:
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
            latents = pipe(
                **family.pipeline_condition_kwargs(cond),
                **family.unguided_call_kwargs(),
                **family.size_call_kwargs(height, width),
                latents=noise,
                num_inference_steps=num_steps,
                height=height,
                width=width,
                output_type="latent",
            ).images
            row = row_head + family.decode_latents(pipe, latents, height, width)
            sigmas = family.sigmas(pipe, num_steps, shape, device)
            for fld in example.fields:

                def velocity(x, sigma, step, fld=fld, cond=cond, uncond=uncond):
                    return fld.velocity(FieldQuery(x, sigma.to(dtype), cond, uncond, step, num_steps))

                x0 = field_rollout(velocity, noise, sigmas)[-1]
                row += family.decode_latents(pipe, x0, height, width)
            rows.append(row)
            head = ["source"] if row_head else []
            labels.append(head + ["student (no CFG)"] + [f.name for f in example.fields])
            kind = "edit" if row_head else "prompt"
            titles.append(f"{kind}: {example.prompt!r}  (seed {seed})")
            captions.append(f"{example.prompt!r} seed {seed}: " + ", ".join(labels[-1]))
    return image_grid(rows, titles=titles, labels=labels), captions


def log_grid(accelerator: Any, grid: Image.Image, step: int, tag: str = "validation") -> None:
    """Send the grid to every active tracker (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(grid)]}, step=step)


def save_validation(
    pipe: Any,
    family: FamilyAdapter,
    caches: tuple[PromptCache, SourceCache],
    examples: Sequence[ValidationExample],
    seeds: Sequence[int],
    num_steps: int,
    resolution: int,
    output_dir: str | os.PathLike,
    accelerator: Any,
    step: int,
) -> Image.Image:
    """The validation grid at ``step``, sampled in eval mode (the student returns to training after), saved as
    ``validation/step-<step>.png`` and sent to the trackers."""
    pipe.transformer.eval()
    grid, captions = validation_grid(pipe, family, *caches, examples, seeds, num_steps, resolution)
    pipe.transformer.train()
    out = Path(output_dir, "validation")
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / f"step-{step:06d}.png")
    log_grid(accelerator, grid, step)
    logger.info(f"validation grid at step {step}: rows {captions}")
    return grid
