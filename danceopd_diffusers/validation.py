"""Validation samples: the student without CFG beside each routed field, same prompts, seeds and noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .caches import PromptCache, SourceCache
from .data import fit_image
from .families import FamilyAdapter, edit_size
from .fields import Field, FieldQuery
from .rollout import field_rollout


@dataclass
class ValidationExample:
    """One row of the grid: a prompt (an instruction for edits, with its source image) and the fields to show."""

    prompt: str
    fields: list[Field] = field(default_factory=list)
    source_image: Image.Image | None = None
    key: Any = None  # cache key of the source (any hashable, unique per source image)


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2) -> Image.Image:
    """Rows of images on one white canvas (cells sized by the largest image)."""
    w = max(img.width for row in rows for img in row)
    h = max(img.height for row in rows for img in row)
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, len(rows) * h + (len(rows) + 1) * pad), "white")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(img, (pad + j * (w + pad), pad + i * (h + pad)))
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
    rows, captions = [], []
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
        shape = family.latent_shape(pipe, 1, height, width)
        for seed in seeds:
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
            latents = pipe(
                **family.pipeline_condition_kwargs(cond),
                **family.unguided_call_kwargs(),
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
            head = "source, " if row_head else ""
            captions.append(
                f"{example.prompt!r} seed {seed}: {head}student, " + ", ".join(f.name for f in example.fields)
            )
    return image_grid(rows), captions


def log_grid(accelerator: Any, grid: Image.Image, step: int, tag: str = "validation") -> None:
    """Send the grid to every active tracker (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(grid)]}, step=step)
