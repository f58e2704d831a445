"""Validation samples: the student without CFG beside each routed field, same prompts, seeds and noise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .caches import PromptCache
from .families import FamilyAdapter
from .fields import Field, FieldQuery
from .rollout import field_rollout


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2) -> Image.Image:
    """Rows of equally sized images on one white canvas."""
    w, h = rows[0][0].size
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
    fields: Sequence[Field],
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int,
    height: int,
    width: int,
) -> tuple[Image.Image, list[str]]:
    """Rows: one (prompt, seed) pair each. Columns: ``student`` then each field. Returns grid and column names."""
    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    rows = []
    for prompt in prompts:
        for seed in seeds:
            shape = family.latent_shape(pipe, 1, height, width)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
            cond = prompt_cache([prompt])
            uncond = prompt_cache.empty(1)
            latents = pipe(
                **family.pipeline_condition_kwargs(cond),
                **family.unguided_call_kwargs(),
                latents=noise,
                num_inference_steps=num_steps,
                height=height,
                width=width,
                output_type="latent",
            ).images
            row = family.decode_latents(pipe, latents, height, width)
            sigmas = family.sigmas(pipe, num_steps, shape, device)
            for field in fields:

                def velocity(x, sigma, step, field=field, cond=cond, uncond=uncond):
                    return field.velocity(FieldQuery(x, sigma.to(dtype), cond, uncond, step, num_steps))

                x0 = field_rollout(velocity, noise, sigmas)[-1]
                row += family.decode_latents(pipe, x0, height, width)
            rows.append(row)
    return image_grid(rows), ["student"] + [f.name for f in fields]


def log_grid(accelerator: Any, grid: Image.Image, step: int, tag: str = "validation") -> None:
    """Send the grid to every active tracker (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(grid)]}, step=step)
