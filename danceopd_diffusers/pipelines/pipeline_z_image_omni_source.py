"""``ZImageOmniPipeline`` that also takes per-sample, pre-encoded sources: the Z-Image omni family's rollout pipeline.

The stock omni pipeline encodes one list of source images for the whole batch, inside ``__call__``. The rollout
needs per-sample, pre-encoded sources, so this subclass's ``__call__`` also takes ``source_latents`` /
``source_siglip`` and returns them from the two ``prepare_*`` hooks; the stock denoising loop is untouched.
"""

from __future__ import annotations

import torch
from diffusers import ZImageOmniPipeline


class ZImageOmniSourcePipeline(ZImageOmniPipeline):
    """The stock omni pipeline; ``source_latents`` ``[B, C, H, W]`` (and ``source_siglip`` ``[B, h, w, C]``)
    replace its in-call encoding of one shared ``image`` list, so every sample edits its own source.

    SigLIP is optional: without it (or without ``source_siglip``) edits condition on the VAE latents only.
    """

    _optional_components = ["siglip", "siglip_processor"]
    _danceopd_sources: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __init__(
        self, scheduler, vae, text_encoder, tokenizer, transformer, siglip=None, siglip_processor=None
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            siglip=siglip,
            siglip_processor=siglip_processor,
        )

    def __call__(self, *args, source_latents=None, source_siglip=None, **kwargs):
        if source_latents is not None and kwargs.get("image") is not None:
            raise ValueError("Pass either `image` or pre-encoded `source_latents`, not both.")
        self._danceopd_sources = None if source_latents is None else (source_latents, source_siglip)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._danceopd_sources = None

    def _sources_for(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        latents, siglip = self._danceopd_sources
        if latents.shape[0] != batch_size:
            raise ValueError(
                f"source_latents has {latents.shape[0]} samples but the call generates {batch_size}."
            )
        return latents, siglip

    def prepare_image_latents(self, images, batch_size, device, dtype):
        if self._danceopd_sources is None:
            return super().prepare_image_latents(images, batch_size, device, dtype)
        latents, _ = self._sources_for(batch_size)
        return [[latents[i].unsqueeze(1).to(device=device, dtype=dtype)] for i in range(batch_size)]

    def prepare_siglip_embeds(self, images, batch_size, device, dtype):
        if self._danceopd_sources is None:
            return super().prepare_siglip_embeds(images, batch_size, device, dtype)
        _, siglip = self._sources_for(batch_size)
        if siglip is None:
            return [[] for _ in range(batch_size)]
        return [[siglip[i].to(device=device, dtype=dtype)] for i in range(batch_size)]


__all__ = ["ZImageOmniSourcePipeline"]
