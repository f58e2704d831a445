"""Encodings computed once while the encoders are frozen: prompts per unique text, source images per row.

On first use an encoding is computed alone (one prompt or image per encoder call), so it never depends on which
other rows happened to miss the cache with it and a resumed run is exact. ``--cache_latents`` fills the caches
before training instead (:func:`precompute_encodings`), in fixed chunks of the data's own order: one encoder call
per chunk where a small model spends most of its step on per-image calls, and still the same for a resumed run.
"""

from __future__ import annotations

import time
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

    @torch.no_grad()
    def fill(self, prompts: Sequence[str], chunk: int = 64, max_bytes: int = 4 << 30) -> int:
        """Encode ``prompts`` (deduplicated, first-seen order) ``chunk`` per encoder call; returns how many.

        Stops once the cache holds ``max_bytes`` (text embeddings of large models are megabytes per prompt): the
        rest are encoded on first use. Families whose prompt encoding sees the source image are not filled.
        """
        if self.family.prompt_uses_source:
            return 0
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        todo = todo[: max(0, self.max_entries - len(self._cache))]
        done = held = 0
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            cond = self.family.encode_prompts(self.pipe, part, self.device)
            for i, prompt in enumerate(part):
                self._cache[prompt] = cond.select([i])
            done += len(part)
            held += sum(t.numel() * t.element_size() for t in cond.tensors.values())
            if held >= max_bytes:
                break
        self.encoded += done
        return done

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
    sample_per_row = False

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
                self._cache[(row, height, width)] = self._encode([img], height, width)
            self.encoded += len(missing)
        return Conditioning.cat([self._cache[(r, height, width)] for r in rows])

    def _encode(self, images: Sequence[Any], height: int, width: int) -> Conditioning:
        """PIL images -> their conditioning, each with the posterior draw of a generator seeded 0 (the encoding of
        a row never changes). For several images, diffusers' randn_tensor takes one generator per row; source
        encoders take the mode, and a list would make them encode row by row, so they get one."""
        from .data import images_to_tensor

        pixels = images_to_tensor(images, height, width).to(self.device)
        seeded = [torch.Generator().manual_seed(0) for _ in images]
        generator = seeded if self.sample_per_row and len(images) > 1 else seeded[0]
        cond = getattr(self.family, self.encode)(self.pipe, pixels, generator)
        return Conditioning({"latents": cond}) if isinstance(cond, torch.Tensor) else cond

    @torch.no_grad()
    def fill(
        self,
        rows: Sequence[int],
        images: Callable[[list[int]], Sequence[Any]],
        size: Callable[[int, Any], tuple[int, int]],
        chunk: int = 64,
    ) -> int:
        """Encode ``rows`` ``chunk`` per VAE call, each at its own ``size(row, image)`` = (height, width); returns
        how many. ``images(rows)`` gives the PIL images of rows; a chunk's rows of one size share a call."""
        todo = list(dict.fromkeys(rows))[: max(0, self.max_entries - len(self._cache))]
        done = 0
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            by_size: dict[tuple[int, int], list[tuple[int, Any]]] = {}
            for row, image in zip(part, images(part)):
                if image is not None:
                    by_size.setdefault(size(row, image), []).append((row, image))
            for (height, width), members in by_size.items():
                cond = self._encode([img for _, img in members], height, width)
                for i, (row, _) in enumerate(members):
                    self._cache[(row, height, width)] = cond.select([i])
                done += len(members)
        self.encoded += done
        return done


class TargetCache(SourceCache):
    """``sft`` target latents per data row and size (``--cache_latents``): the VAE sees each image once.

    One posterior sample is kept per row, as the cached-latent diffusers examples do; for a deterministic VAE
    (ShapesWorld's) this is exact.
    """

    encode = "encode_images"
    sample_per_row = True

    def __call__(
        self,
        rows: Sequence[int],
        images: Images,
        height: int,
        width: int,
    ) -> torch.Tensor:
        return super().__call__(rows, images, height, width).tensors["latents"]


def precompute_encodings(
    buckets: Any,
    tasks: Sequence[str],
    resolution: int,
    prompt_cache: PromptCache,
    source_cache: SourceCache,
    target_cache: TargetCache | None = None,
    chunk: int = 64,
) -> str:
    """``--cache_latents``: every prompt (and the empty one), edit source and, for sft, target image of the routed
    ``tasks``, encoded before training in chunks of the data's order. An edit is encoded at its own source's edit
    size, the size the training loop uses for a batch that starts with it; a batch of mixed sizes encodes its
    other rows on first use, as without the flag. Returns a line for the log."""
    from .families import edit_size

    start = time.monotonic()
    tasks = list(dict.fromkeys(tasks))
    rows = [r for task in tasks for r in buckets.buckets.get(task, [])]
    prompts = prompt_cache.fill([""] + buckets.prompts(rows), chunk)
    edit_rows = [r for task in tasks if buckets.is_edit_bucket(task) for r in buckets.buckets[task]]
    column = buckets.columns
    sizes: dict[int, tuple[int, int]] = {}

    def source_size(row: int, image: Any) -> tuple[int, int]:
        sizes[row] = edit_size(image.width, image.height, resolution)
        return sizes[row]

    sources = source_cache.fill(
        edit_rows, lambda part: buckets.images(part, column.source_image), source_size, chunk
    )
    targets = 0
    if target_cache is not None:
        targets = target_cache.fill(
            rows,
            lambda part: buckets.images(part, column.target_image),
            lambda row, image: sizes.get(row, (resolution, resolution)),
            chunk,
        )
    return (
        f"--cache_latents: {prompts} prompts, {sources} edit sources and {targets} targets encoded before training "
        f"({chunk} per encoder call) in {time.monotonic() - start:.1f} s"
    )
