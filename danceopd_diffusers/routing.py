"""Hard routing: each sample goes to exactly one field, drawn by route weight.

Randomness is a pure function of ``(seed, step, micro_step, process)`` (:func:`step_generator`), so a run
resumed from a checkpoint draws exactly what the uninterrupted run drew, with no generator state to save.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from .config import RouteSpec


def step_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator seeded from the run seed and any keys (step, micro-step, rank, purpose)."""
    text = ":".join(str(k) for k in (seed, *keys))
    derived = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(derived)


class Router:
    def __init__(self, routes: Sequence[RouteSpec]):
        if not routes:
            raise ValueError("A router needs at least one route.")
        self.routes = list(routes)
        self.weights = torch.tensor([r.weight for r in self.routes], dtype=torch.float64)

    def draw(self, generator: torch.Generator, n: int = 1) -> list[int]:
        """Route indices, by weight."""
        return torch.multinomial(self.weights, n, replacement=True, generator=generator).tolist()

    def draw_step_route(self, seed: int, step: int, accelerator=None) -> int:
        """One route for the whole optimizer step: drawn on the main process, broadcast to all processes."""
        route = self.draw(step_generator(seed, "route", step))[0]
        if accelerator is None or accelerator.num_processes == 1:
            return route
        from accelerate.utils import broadcast

        value = torch.tensor([route if accelerator.is_main_process else -1], device=accelerator.device)
        return int(broadcast(value, from_process=0).item())
