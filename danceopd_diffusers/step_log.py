"""The run's record of each optimizer step: the routes log, the per-route losses and what trackers receive.

The routes log (``logs/routes_rank<k>.jsonl``, one JSON line per optimizer step and process) is what curves and the
study's equal-compute table read without a tracker: the step's loss, its route, the routes of the last micro-step's
samples and the transformer rows the step ran (:func:`~danceopd_diffusers.objectives.step_rows`). Losses are also
kept per routed field, because the routes' losses differ by an order of magnitude and one mean hides a route that
does not learn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from .objectives import TrainingStates, step_rows


def run_banner(
    args: Any,
    family: str,
    fields: Sequence[str],
    routes: Sequence[Any],
    total_batch: int,
    resolution: int,
    query: str,
) -> list[str]:
    """The lines a run starts its training with: the method and what it trains towards, with only the settings that
    apply to the method (sft has no rollout, dense no query law)."""
    if args.method == "sft":  # flow-matching fine-tuning: no field, no rollout
        lines = ["***** Running flow-matching fine-tuning (sft) *****"]
        lines.append(f"  family = {family}, buckets = {[r.task for r in routes]}")
        rollout = f"timestep weighting = {args.weighting_scheme}"
    else:
        lines = [
            f"***** Running {args.method} distillation *****",
            f"  family = {family}, fields = {list(fields)}",
        ]
        lines.append(f"  routes = {[(r.field, r.task, r.weight) for r in routes]}")
        rollout = f"N = {args.num_rollout_steps}"
        if args.method != "dense":
            rollout += f", K = {args.query_k}, query = {query}"
        else:
            rollout += f", every state, weighting = {args.dense_weighting}"
    lines.append(
        f"  total batch = {total_batch}, steps = {args.max_train_steps}, {rollout}, resolution = {resolution}, "
        f"text tokens = {args.max_sequence_length}"
    )
    return lines


def first_last(history: Sequence[float]) -> str:
    """The mean of the first and of the last tenth of a loss history."""
    k = max(1, len(history) // 10)
    first, last = sum(history[:k]) / k, sum(history[-k:]) / k
    return f"first {k} steps {first:.5f} -> last {k} steps {last:.5f}"


class StepLog:
    """Appends to the routes log at ``path`` and keeps the loss histories of a run with ``routes``."""

    def __init__(self, path: str | os.PathLike, routes: Sequence[Any], method: str, num_steps: int, k: int):
        self.file = open(path, "a")
        self.routes, self.method, self.num_steps, self.k = list(routes), method, num_steps, k
        self.losses: list[float] = []
        self.route_losses: dict[str, list[float]] = {}
        #: the last step's mean loss per routed field, as trackers receive it (``loss/<field>``)
        self.last: dict[str, float] = {}

    def record(
        self,
        step: int,
        step_route: int,
        results: Sequence[tuple[list[int], tuple[float, list[tuple[int, float]]]]],
        states: Sequence[TrainingStates],
    ) -> float:
        """One optimizer step: ``results`` holds, per micro-step, its samples' route indices and its loss with the
        error of each of its rows. Returns the step's loss (the micro-steps' mean)."""
        loss = 0.0
        for _, result in results:  # accumulated as the micro-steps' gradients are
            loss += result[0] / len(results)
        per_route: dict[str, list[float]] = {}
        for sample_routes, (_, errors) in results:
            for sample, error in errors:
                per_route.setdefault(self.routes[sample_routes[sample]].field, []).append(error)
        record = {
            "step": step,
            "loss": loss,
            "route": self.routes[step_route].field,
            "sample_routes": [self.routes[r].field for r in results[-1][0]],
            "rows": step_rows(states, self.method, self.num_steps, self.k),
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.losses.append(loss)
        self.last = {f"loss/{name}": sum(v) / len(v) for name, v in per_route.items()}
        for name, value in self.last.items():
            self.route_losses.setdefault(name[len("loss/") :], []).append(value)
        return loss

    def summary(self) -> list[str]:
        """The run's loss, first against last steps, and each route's when there are several."""
        lines = [f"loss: {first_last(self.losses)}"] if self.losses else []
        if len(self.routes) > 1:
            for name, history in self.route_losses.items():
                lines.append(f"loss of route {name} ({len(history)} steps): {first_last(history)}")
        return lines

    def close(self) -> None:
        self.file.close()
