"""What each micro-step trains on: its samples, their routes, their conditioning and their random draws.

Every process draws the *global* batch from one generator keyed by (seed, step, micro-step) and keeps its own
slice, so N processes at batch B train on exactly what one process at batch N·B does, and a resumed run draws
what the uninterrupted one did. The draws happen in a fixed order (routes, rows, then what the method needs),
which is why the method-specific draws go through :meth:`BatchDrawer.noise` on the micro-step's own generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .caches import PromptCache, SourceCache, TargetCache, precompute_encodings
from .data import DataColumns, TaskBuckets, fit_image, images_to_tensor
from .families import Conditioning, FamilyAdapter, edit_size
from .objectives import RoutedTargets
from .routing import Router, step_generator


@dataclass
class MicroBatch:
    """One micro-step on this process: its rows and their routes (indices into the run's routes), its generator,
    and what the training step adds to it (conditioning, noise, queried indices, states, result)."""

    generator: torch.Generator
    sample_routes: list[int]
    rows: list[int]
    prompts: list[str]
    edit: bool
    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    height: int = 0
    width: int = 0
    # the method's own draws and results, set by the training step
    targets: Any = None
    shape: tuple[int, ...] | None = None
    noise: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    query_sigmas: torch.Tensor | None = None
    renoise: torch.Tensor | None = None
    states: Any = None
    result: Any = None

    @classmethod
    def joined(cls, micros: list[MicroBatch], num_steps: int) -> MicroBatch:
        """The micro-steps of one optimizer step as one batch (``--batch_rollouts``): their conditionings, fields,
        noise and queried indices concatenated in order, so that one rollout serves them all. They must share
        their kind (edit or not) and size."""
        first = micros[0]
        joint = cls(first.generator, [], [], [], first.edit, height=first.height, width=first.width)
        joint.cond = Conditioning.cat([m.cond for m in micros])
        uncond = Conditioning.cat([m.uncond for m in micros])
        joint.targets = RoutedTargets(
            [f for m in micros for f in m.targets.fields], joint.cond, uncond, num_steps
        )
        joint.noise = torch.cat([m.noise for m in micros])
        joint.indices = torch.cat([m.indices for m in micros])
        if first.query_sigmas is not None:
            joint.query_sigmas = torch.cat([m.query_sigmas for m in micros])
        return joint


class BatchDrawer:
    """Draws micro-steps from the data buckets of the run's routes (one route per step, drawn by the router, or one
    per sample) and encodes them through its caches.

    ``world_batch`` samples are drawn for every micro-step, ``batch_size`` of them (those of ``rank``) kept. An
    edit is trained at its source's aspect ratio (area ≈ ``resolution``²), and its source travels with both
    conditionings (with and without the prompt) as does the state's size (packed families cannot read it off
    the tokens)."""

    def __init__(
        self,
        pipe: Any,
        family: FamilyAdapter,
        buckets: TaskBuckets,
        columns: DataColumns,
        routes: list[Any],
        resolution: int,
        *,
        seed: int,
        batch_size: int,
        num_processes: int,
        rank: int,
        per_sample_routing: bool,
        device: torch.device,
        cache_everything: bool = False,
    ) -> None:
        self.pipe, self.family, self.buckets, self.columns = pipe, family, buckets, columns
        self.routes, self.router = routes, Router(routes)
        # encodings are cached per row: all of them with --cache_latents, else the most recent ones
        size = len(buckets.dataset) + 1 if cache_everything else 4096
        self.prompt_cache = PromptCache(pipe, family, device)
        self.source_cache = SourceCache(pipe, family, device, max_entries=size)
        self.target_cache = TargetCache(pipe, family, device, max_entries=size)
        self.resolution, self.seed = resolution, seed
        self.batch_size, self.world_batch, self.rank = batch_size, batch_size * num_processes, rank
        self.per_sample_routing = per_sample_routing
        self.edit_tasks = {r.task for r in routes if buckets.is_edit_bucket(r.task)}
        self._source_sizes: dict[int, tuple[int, int]] = {}

    def precompute(self, targets: bool) -> str:
        """Every routed row's encodings before training (``--cache_latents``; the targets for sft); a log line."""
        tasks = [r.task for r in self.routes]
        target_cache = self.target_cache if targets else None
        return precompute_encodings(
            self.buckets, tasks, self.resolution, self.prompt_cache, self.source_cache, target_cache
        )

    def mine(self, world: Any) -> Any:
        """This process's slice of a global-batch draw."""
        return world[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def draw(self, step: int, micro: int, step_route: int) -> MicroBatch:
        """The micro-step's routes (the step's, or one per sample) and rows; nothing encoded yet."""
        gen = step_generator(
            self.seed, "sample", step, micro, 0
        )  # the trailing 0 keeps 1-process runs as before
        if self.per_sample_routing:
            world_routes = self.router.draw(gen, self.world_batch)
        else:
            world_routes = [step_route] * self.world_batch
        world_rows = []
        for r in world_routes:
            world_rows += self.buckets.sample(self.routes[r].task, 1, gen)
        rows = self.mine(world_rows)
        routes = self.mine(world_routes)
        edit = self.routes[routes[0]].task in self.edit_tasks
        return MicroBatch(gen, routes, rows, self.buckets.prompts(rows), edit)

    def noise(self, m: MicroBatch, shape: tuple[int, ...], per_sample: int = 1) -> torch.Tensor:
        """Gaussian draws for the global batch (``per_sample`` rows each, sample-major); this process's rows."""
        n = self.batch_size * per_sample
        world = torch.randn((self.world_batch * per_sample, *shape), generator=m.generator)
        return world[self.rank * n : (self.rank + 1) * n]

    def drop_captions(self, m: MicroBatch, probability: float) -> None:
        """Empty prompts for a random share of the global batch (sft's caption dropout)."""
        dropped = self.mine(torch.rand(self.world_batch, generator=m.generator) < probability)
        m.prompts = ["" if drop else p for drop, p in zip(dropped.tolist(), m.prompts)]

    def encode(self, m: MicroBatch) -> None:
        """``m.cond`` / ``m.uncond`` (the prompts', the empty prompt's) and the size ``m`` trains at."""
        family, pipe, n = self.family, self.pipe, len(m.prompts)
        if not m.edit:
            size = family.size_conditioning(pipe, n, self.resolution, self.resolution)
            m.cond = self.prompt_cache(m.prompts).merge(size)
            m.uncond = self.prompt_cache.empty(n).merge(size)
            m.height = m.width = self.resolution
            return
        rows = m.rows
        if rows[0] not in self._source_sizes:
            first = self.buckets.images(rows[:1], self.columns.source_image)[0]
            self._source_sizes[rows[0]] = (first.width, first.height)
        height, width = edit_size(*self._source_sizes[rows[0]], self.resolution)
        keys = [(row, height, width) for row in rows]

        def fitted(positions: list[int]):  # called only for rows whose encodings are not cached yet
            images = self.buckets.images([rows[i] for i in positions], self.columns.source_image)
            return [fit_image(img, height, width) for img in images]

        cond, uncond = self.prompt_cache(m.prompts, keys, fitted), self.prompt_cache.empty(n, keys, fitted)
        source = self.source_cache(rows, fitted, height, width).merge(
            family.size_conditioning(pipe, len(rows), height, width)
        )
        m.cond, m.uncond, m.height, m.width = cond.merge(source), uncond.merge(source), height, width

    def target_latents(self, m: MicroBatch, cached: bool, dtype: torch.dtype) -> torch.Tensor:
        """The VAE latents of the rows' target images (sft), from the target cache or encoded now."""
        column = self.columns.target_image
        if cached:

            def targets(positions: list[int]):
                return self.buckets.images([m.rows[i] for i in positions], column)

            return self.target_cache(m.rows, targets, m.height, m.width).to(dtype)
        with torch.no_grad():
            pixels = images_to_tensor(self.buckets.images(m.rows, column), m.height, m.width)
            return self.family.encode_images(self.pipe, pixels, m.generator).to(dtype)
