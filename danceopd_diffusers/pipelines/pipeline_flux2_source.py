"""Flux.2 pipelines that also take packed ``latents`` and per-sample pre-encoded ``source_latents``: the rollout
pipelines of the Flux.2 [dev] and [klein] families (``Flux2PipelineWithSources``, ``Flux2KleinPipelineWithSources``).

The stock pipelines encode one shared list of reference images inside ``__call__`` and take unpacked latents;
the rollout hands every sample its own reference, encoded once, and its states in the library's packed layout.
Both classes add only the hooks of :class:`_Flux2Sources`; the denoising loop is the stock one.
"""

from __future__ import annotations

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline


def unpack(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Packed tokens ``[B, h·w, C]`` -> ``[B, C, h, w]`` for a known token grid: the inverse of the pipelines'
    ``_pack_latents``, which the tokens alone cannot undo (two grids of one area have as many tokens)."""
    b, n, c = tokens.shape
    if n != grid_h * grid_w:
        raise ValueError(f"{n} tokens do not fill a {grid_h}x{grid_w} grid.")
    return tokens.transpose(1, 2).reshape(b, c, grid_h, grid_w)


class _Flux2Sources:
    """The stock pipeline; ``latents`` may be packed tokens ``[B, h·w, 4C]`` (the library's state layout), and
    ``source_latents`` ``[B, 4C, h', w']`` (patchified, normalised) replace the in-call encoding of one shared
    ``image`` list, so every sample is conditioned on its own reference. The denoising loop is the stock one.
    """

    _danceopd_sources: torch.Tensor | None = None

    def __call__(self, *args, source_latents: torch.Tensor | None = None, **kwargs):
        if source_latents is not None:
            if args:
                raise TypeError("With `source_latents`, pass every other argument by keyword.")
            if kwargs.get("image") is not None:
                raise ValueError("Pass either `image` or pre-encoded `source_latents`, not both.")
            # the stock __call__ encodes references only when it is given some: a blank image stands in for
            # them (never encoded: prepare_image_latents returns source_latents), sized to pass its checks;
            # as with a real reference, the output defaults to the reference's size
            from PIL import Image

            kwargs["image"] = [Image.new("RGB", (64, 64))]
            multiple = self.vae_scale_factor * 2
            kwargs["height"] = kwargs.get("height") or source_latents.shape[-2] * multiple
            kwargs["width"] = kwargs.get("width") or source_latents.shape[-1] * multiple
        self._danceopd_sources = source_latents
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._danceopd_sources = None

    def prepare_latents(
        self, batch_size, num_latents_channels, height, width, dtype, device, generator, latents=None
    ):
        if latents is not None and latents.ndim == 3:
            multiple = self.vae_scale_factor * 2
            latents = unpack(latents, int(height) // multiple, int(width) // multiple)
        return super().prepare_latents(
            batch_size, num_latents_channels, height, width, dtype, device, generator, latents
        )

    def prepare_image_latents(self, images, batch_size, generator, device, dtype):
        sources = self._danceopd_sources
        if sources is None:
            return super().prepare_image_latents(images, batch_size, generator, device, dtype)
        if sources.shape[0] != batch_size:
            raise ValueError(
                f"source_latents has {sources.shape[0]} samples but the call generates {batch_size}."
            )
        ids = self._prepare_image_ids([sources[:1]]).repeat(batch_size, 1, 1).to(device)
        return self._pack_latents(sources).to(device), ids


class Flux2PipelineWithSources(_Flux2Sources, Flux2Pipeline):
    """``Flux2Pipeline`` (FLUX.2 [dev]) with the per-sample sources and packed latents of :class:`_Flux2Sources`."""


class Flux2KleinPipelineWithSources(_Flux2Sources, Flux2KleinPipeline):
    """``Flux2KleinPipeline`` with the per-sample sources and packed latents of :class:`_Flux2Sources`."""


__all__ = ["Flux2KleinPipelineWithSources", "Flux2PipelineWithSources", "unpack"]
