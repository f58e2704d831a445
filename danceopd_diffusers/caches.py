"""Encodings computed once while the encoders are frozen: prompts per unique text, source images per row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .families import Conditioning, FamilyAdapter

#: images of a batch, or a callable giving those at the given batch positions: only uncached ones are opened
Images = Sequence[Any] | Callable[[list[int]], Sequence[Any]]


def _images_at(images: Images, positions: list[int]) -> list[Any]:
    return list(images(positions)) if callable(images) else [images[i] for i in positions]


class PromptCache:
    """Prompt conditioning per unique prompt.

    Families whose text encoder also sees the source image (``prompt_uses_source``, e.g. a VL encoder) key the
    cache by (prompt, sample) and receive the sample's source image.
    """

    def __init__(self, pipe: Any, family: FamilyAdapter, device: torch.device, max_entries: int = 100_000):
        self.pipe = pipe
        self.family = family
        self.device = device
        self.max_entries = max_entries
        self._cache: dict[Any, Conditioning] = {}
        self.encoded = 0  # how many prompts went through the text encoders (tests count it)

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        source_keys: Sequence[Any] | None = None,
        source_images: Images = (),
    ) -> Conditioning:
        with_source = source_keys is not None and self.family.prompt_uses_source
        keys = [(p, k) for p, k in zip(prompts, source_keys)] if with_source else list(prompts)
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        missing = list({keys[i]: i for i in missing}.values())
        if missing:
            # one prompt per encoder call: a batched call rounds differently with the batch it is in, and which
            # prompts share a batch depends on the cache's history, so a resumed run would not be bit-exact
            images = _images_at(source_images, missing) if with_source else [None] * len(missing)
            if len(self._cache) + len(missing) > self.max_entries:
                self._cache.clear()
            for i, image in zip(missing, images):
                extra = {"source_images": [image]} if with_source else {}
                self._cache[keys[i]] = self.family.encode_prompts(
                    self.pipe, [prompts[i]], self.device, **extra
                )
            self.encoded += len(missing)
        return Conditioning.cat([self._cache[key] for key in keys])

    def empty(
        self,
        batch_size: int,
        source_keys: Sequence[Any] | None = None,
        source_images: Images = (),
    ):
        """The unconditional (empty-prompt) conditioning of CFG, repeated over the batch."""
        return self([""] * batch_size, source_keys, source_images)


class SourceCache:
    """Source-image conditioning per data row and edit size: each sample's image is encoded once."""

    encode = "encode_sources"

    def __init__(self, pipe: Any, family: FamilyAdapter, device: torch.device, max_entries: int = 4096):
        self.pipe = pipe
        self.family = family
        self.device = device
        self.max_entries = max_entries
        self._cache: dict[tuple[int, int, int], Conditioning] = {}
        self.encoded = 0

    @torch.no_grad()
    def __call__(
        self,
        rows: Sequence[int],
        images: Images,
        height: int,
        width: int,
    ) -> Conditioning:
        from .data import images_to_tensor

        first = {}  # row -> its first batch position, for the rows not cached yet
        for i, r in enumerate(rows):
            if (r, height, width) not in self._cache:
                first.setdefault(r, i)
        missing = list(zip(first, _images_at(images, list(first.values())))) if first else []
        if missing:
            if len(self._cache) + len(missing) > self.max_entries:
                self._cache.clear()
            for (
                row,
                img,
            ) in missing:  # one image per call, like prompts: the result never depends on the batch
                pixels = images_to_tensor([img], height, width).to(self.device)
                generator = torch.Generator().manual_seed(0)  # the encoding of a sample never changes
                cond = getattr(self.family, self.encode)(self.pipe, pixels, generator)
                if isinstance(cond, torch.Tensor):
                    cond = Conditioning({"latents": cond})
                self._cache[(row, height, width)] = cond
            self.encoded += len(missing)
        return Conditioning.cat([self._cache[(r, height, width)] for r in rows])


class TargetCache(SourceCache):
    """``sft`` target latents per data row and size (``--cache_latents``): the VAE sees each image once.

    One posterior sample is kept per row, as the cached-latent diffusers examples do; for a deterministic VAE
    (ShapesWorld's) this is exact.
    """

    encode = "encode_images"

    def __call__(
        self,
        rows: Sequence[int],
        images: Images,
        height: int,
        width: int,
    ) -> torch.Tensor:
        return super().__call__(rows, images, height, width).tensors["latents"]
