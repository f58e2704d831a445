"""Hard routing: each sample goes to exactly one field, drawn by route weight; :func:`soft_routes` is the soft-mixing
ablation.

Randomness is a pure function of ``(seed, step, micro_step, process)`` (:func:`step_generator`), so a run
resumed from a checkpoint draws exactly what the uninterrupted run drew, with no generator state to save.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from .config import ConfigError, FieldsConfig, FieldSpec, RouteSpec, config_from_flags, parse_fields_config

ROUTINGS = ("hard", "soft")


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


def soft_routes(config: FieldsConfig) -> FieldsConfig:
    """The soft-mixing ablation of a config: every route keeps its data bucket and weight, but its field becomes
    the mix of all routed fields, each weighted by the total weight of the routes to it (the chance that hard
    routing sends a sample there), so a sample's target is the mean of hard routing's targets.

    One mix field per bucket, ``soft_<task>``, so the route log and the per-route losses still say which bucket a
    step drew; all of them blend the same fields with the same weights.
    """
    weights: dict[str, float] = {}
    for route in config.routes:
        weights[route.field] = weights.get(route.field, 0.0) + route.weight
    fields = dict(config.fields)
    routes = []
    for route in config.routes:
        name = f"soft_{route.task}"
        if name in config.fields:
            raise ConfigError(
                f"--routing soft names its mix field {name!r}, but the fields config already declares a field of "
                "that name: rename it."
            )
        fields[name] = FieldSpec(name, "mix", of=list(weights), weights=list(weights.values()))
        routes.append(RouteSpec(field=name, task=route.task, weight=route.weight))
    return FieldsConfig(fields=fields, routes=routes)


def run_fields_config(
    method: str,
    fields_config: str | None = None,
    cfg_scale: float | None = None,
    expert_lora: str | None = None,
    expert_checkpoint: str | None = None,
    routing: str = "hard",
) -> FieldsConfig:
    """A run's fields and routes: the config file, or the one field the flags declare, soft-mixed for
    ``routing="soft"``. sft queries no field: its routes (one per data bucket) are filled once the data is read."""
    if method == "sft":
        if fields_config:
            return parse_fields_config(fields_config)
        return FieldsConfig(fields={"base": FieldSpec("base", "base")}, routes=[])
    if fields_config:
        config = parse_fields_config(fields_config)
    else:
        config = config_from_flags(cfg_scale, expert_lora, expert_checkpoint)
    return soft_routes(config) if routing == "soft" else config
