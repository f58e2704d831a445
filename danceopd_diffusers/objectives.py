"""Where the training states and targets come from, per method, and the loss on them.

- ``danceopd``: states from the student's own rollout (the pipeline call), K per sample, low-noise biased;
  target = the routed field there.
- ``dense``: every state of the rollout, weighted and summed per trajectory (DiffusionOPD, :func:`dense_weights`).
- ``offpolicy``: the routed field's own rollout, its endpoint forward-noised to the queried sigma.
- ``sft``: ordinary flow matching on dataset targets (joint training; training experts), with the loss weight of
  diffusers' SD3/Flux examples for ``sigma_sqrt`` / ``cosmap``.
All methods end in :func:`velocity_mse` on detached states; the targets never carry gradients.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .families import Conditioning, FamilyAdapter
from .fields import Field, FieldQuery
from .rollout import (
    OnPolicyQueryCallback,
    execution_device,
    field_rollout,
    gather_records,
    interpolate_records,
    locate_sigmas,
    sample_query_indices,
)

METHODS = ("danceopd", "dense", "offpolicy", "sft")
DENSE_WEIGHTINGS = ("uniform", "step")
#: sft weighting schemes that weight the loss (the others only shape how sigma is drawn)
LOSS_WEIGHTED_SCHEMES = ("sigma_sqrt", "cosmap")


@dataclass
class TrainingStates:
    """Detached states with their targets; ``samples`` maps each row back to its batch sample."""

    samples: torch.Tensor
    x: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None
    steps_run: int = 0
    #: transformer rows the rollout ran (less than steps_run x batch where it drops finished samples)
    sample_steps: int = 0


def velocity_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    num_samples: int | None = None,
) -> torch.Tensor:
    """Plain MSE in fp32: the paper's objective.

    With per-row ``weight``, rows are summed with their weights and averaged over ``num_samples``: DiffusionOPD
    sums its weighted terms along each trajectory; sft (one row per sample) gets the weighted mean.
    """
    per_row = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weight is None:
        return per_row.mean()
    return (per_row * weight.to(per_row)).sum() / (num_samples or 1)


def part_losses(
    pred: torch.Tensor, states: TrainingStates, sizes: Sequence[int]
) -> tuple[torch.Tensor, list[tuple[float, list[tuple[int, float]]]]]:
    """The velocity MSE of each part of a joint forward (micro-steps whose samples were batched: ``sizes`` samples
    each, in order), stacked for the backward; and, brought to the host in one sync, each part's loss with the
    (sample within the part, error) of each of its rows: the per-route losses the run logs."""
    losses, starts, start = [], [], 0
    for size in sizes:
        mask = (states.samples >= start) & (states.samples < start + size)
        rows = mask.nonzero()[:, 0].to(pred.device)
        weight = None if states.weight is None else states.weight[mask.to(states.weight.device)]
        losses.append(velocity_mse(pred[rows], states.target[rows], weight, num_samples=size))
        starts.append(start)
        start += size
    stacked = torch.stack(losses)
    with torch.no_grad():
        per_row = (pred.detach().float() - states.target.float()).pow(2).flatten(1).mean(1)
        on_host = torch.cat([stacked.detach().float(), per_row]).cpu().tolist()
    out: list[tuple[float, list[tuple[int, float]]]] = [(value, []) for value in on_host[: len(sizes)]]
    for sample, error in zip(states.samples.tolist(), on_host[len(sizes) :]):
        part = bisect.bisect_right(starts, sample) - 1
        out[part][1].append((sample - starts[part], error))
    return stacked, out


def step_rows(states: Sequence[TrainingStates], method: str, num_steps: int, k: int) -> dict[str, int]:
    """Transformer rows of one optimizer step: the student's rollout (no grad), the fields' queries (an off-policy
    field also rolls itself out over all N states; sft queries none) and the student's forward and backward. The
    measure of compute of the study's equal-compute comparison."""
    queried = sum(len(s.samples) for s in states)
    field = queried
    if method == "offpolicy":
        field += sum(len(s.samples) // k for s in states) * num_steps
    elif method == "sft":
        field = 0
    return {"rollout": sum(s.sample_steps for s in states), "field": field, "student": queried}


class RoutedTargets:
    """Evaluates, for each sample of a batch, the field it was routed to (grouping rows per field).

    ``state_index`` is the index of the queried state in the N-step rollout, one for all rows or one per row
    ([rows]); a field sees it as ``FieldQuery.step_index``. Rows of different states go to a field in one call
    unless the field depends on the step (:attr:`Field.step_dependent`: guiders with start/stop windows).
    ``max_rows`` caps the rows of one call (the rollout's own batch size keeps the rollout's memory peak).
    """

    def __init__(
        self,
        fields: Sequence[Field],
        cond: Conditioning,
        uncond: Conditioning | None,
        num_steps: int,
    ):
        self.fields = list(fields)
        self.cond = cond
        self.uncond = uncond
        self.num_steps = num_steps

    @torch.no_grad()
    def __call__(
        self,
        samples: torch.Tensor,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        state_index: int | torch.Tensor = 0,
        max_rows: int | None = None,
    ):
        out = torch.empty_like(x)
        sigma_t = sigma if torch.is_tensor(sigma) else torch.full((len(samples),), float(sigma))
        steps = state_index.tolist() if torch.is_tensor(state_index) else [state_index] * len(samples)
        groups: dict[tuple[int, int], list[int]] = {}
        for row, (s, step) in enumerate(zip(samples.tolist(), steps)):
            field = self.fields[s]
            groups.setdefault((id(field), int(step) if field.step_dependent else -1), []).append(row)
        for (_, step), group in groups.items():
            field = self.fields[int(samples[group[0]])]
            chunk = max_rows or len(group)
            for start in range(0, len(group), chunk):
                rows = group[start : start + chunk]
                rows_t = torch.tensor(rows)
                sel = samples[rows_t]
                query = FieldQuery(
                    x=x[rows_t.to(x.device)],
                    sigma=sigma_t[rows_t].to(x.device),
                    cond=self.cond.select(sel),
                    uncond=self.uncond.select(sel) if self.uncond is not None else None,
                    step_index=step if step >= 0 else int(steps[rows[0]]),
                    num_steps=self.num_steps,
                )
                out[rows_t.to(x.device)] = field.velocity(query).to(out.dtype)
        return out


def dense_weights(sigmas: torch.Tensor, weighting: str = "uniform") -> torch.Tensor:
    """Weight of each of the N states in DiffusionOPD's per-trajectory sum; ``sigmas`` is the N + 1 point grid.

    ``uniform``: 0.5 / N^2 for every state (dt^2 / 2 with dt = 1 / N), the weight of the official DiffusionOPD
    code, which produced the paper's baseline numbers. ``step``: (sigma_i - sigma_{i+1})^2 / 2 of the actual,
    shifted grid (the formula read literally); on a shifted grid it varies a lot across states (380x on
    SD3.5-Medium's 16 steps).
    """
    if weighting not in DENSE_WEIGHTINGS:
        raise ValueError(f"Unknown dense weighting {weighting!r}; use one of {DENSE_WEIGHTINGS}.")
    num_states = len(sigmas) - 1
    if weighting == "uniform":
        return torch.full((num_states,), 0.5 / num_states**2)
    return (sigmas[:-1] - sigmas[1:]).float().pow(2) / 2


def on_policy_states(
    pipe: Any,
    family: FamilyAdapter,
    targets: RoutedTargets,
    cond: Conditioning,
    initial_latents: torch.Tensor,
    num_steps: int,
    query_indices: torch.Tensor,
    height: int,
    width: int,
    dense: bool = False,
    dense_weighting: str = "uniform",
    ragged: bool = True,
    query_sigmas: torch.Tensor | None = None,
) -> TrainingStates:
    """Roll the student out through ``pipe`` and query the routed fields at ``query_indices`` ([B, K]).

    ``dense`` weights each state by :func:`dense_weights` of ``dense_weighting`` (DiffusionOPD). ``ragged``: each
    sample leaves the rollout's batch after its last query, where the family's pipeline allows it.
    ``query_sigmas`` ([B, K], a σ-space :class:`~danceopd_diffusers.rollout.QueryLaw`): query at these σ instead,
    on the student's own Euler step wherever a σ falls between two states of the grid.
    """
    needed = query_indices
    if query_sigmas is not None:
        grid = family.sigmas(pipe, num_steps, tuple(initial_latents.shape), initial_latents.device)
        lower, frac = locate_sigmas(query_sigmas, grid)
        needed = torch.cat([lower, torch.where(frac > 0, lower + 1, lower)], dim=1)
    callback = OnPolicyQueryCallback(needed, initial_latents, family.ragged_inputs if ragged else None)
    with execution_device(pipe, initial_latents.device):  # no module walk per call
        pipe(
            **family.pipeline_condition_kwargs(cond),
            **family.unguided_call_kwargs(),
            **family.size_call_kwargs(height, width),
            latents=initial_latents,
            num_inference_steps=num_steps,
            height=height,
            width=width,
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=callback.tensor_inputs,
        )
    if query_sigmas is None:
        samples, x, sigma, index = gather_records(callback.records)
    else:
        samples, x, sigma, index = interpolate_records(callback.records, lower, frac, query_sigmas)
    target = targets(samples, x, sigma, index, max_rows=initial_latents.shape[0])
    weight = None
    if dense:
        weight = dense_weights(pipe.scheduler.sigmas.float().cpu(), dense_weighting)[index]
    return TrainingStates(
        samples, x, sigma, target, weight, steps_run=callback.steps_run, sample_steps=callback.sample_steps
    )


def _gaussian(noise: torch.Generator | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``noise`` as given (draws made by the caller for its global batch), or drawn from it with ``like``'s shape;
    on ``like``'s device and dtype."""
    if isinstance(noise, torch.Generator):
        noise = torch.randn(like.shape, generator=noise)
    return noise.to(like)


def off_policy_states(
    family: FamilyAdapter,
    targets: RoutedTargets,
    initial_latents: torch.Tensor,
    sigmas: torch.Tensor,
    query_indices: torch.Tensor,
    noise: torch.Generator | torch.Tensor,
    query_sigmas: torch.Tensor | None = None,
) -> TrainingStates:
    """The routed field's own rollout; its endpoint re-noised to the queried sigmas with fresh noise (``noise``:
    the [B·K, ...] draws, sample-major, or a generator to draw them from). ``query_sigmas`` ([B, K]): the σ of a
    σ-space query law, instead of the grid's σ at ``query_indices``."""
    all_samples = torch.arange(initial_latents.shape[0])

    def velocity(x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        return targets(all_samples, x, sigma.cpu(), step)

    with torch.no_grad():
        x0 = field_rollout(velocity, initial_latents, sigmas)[-1]
    b, k = query_indices.shape
    samples = all_samples.repeat_interleave(k)
    index = query_indices.reshape(-1)
    sigma = sigmas[index].float()
    if query_sigmas is not None:
        sigma = query_sigmas.reshape(-1).float()
        index = locate_sigmas(sigma, sigmas)[0]
    noise = _gaussian(noise, x0[samples])
    s = sigma.to(x0).reshape(-1, *([1] * (x0.dim() - 1)))
    x = ((1 - s) * x0[samples] + s * noise).to(x0.dtype)
    target = targets(samples, x, sigma, index)
    return TrainingStates(samples, x, sigma, target)


def sft_states(
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Generator | torch.Tensor,
    weighting_scheme: str = "none",
) -> TrainingStates:
    """Flow matching on data: x_sigma = (1 - sigma) x0 + sigma noise, target v = noise - x0.

    ``sigma_sqrt`` and ``cosmap`` also weight each row's loss by diffusers' ``compute_loss_weighting_for_sd3``
    at its sigma, as the SD3/Flux training examples do; the other schemes leave the loss unweighted.
    """
    noise = _gaussian(noise, x0)
    s = sigma.to(x0).reshape(-1, *([1] * (x0.dim() - 1)))
    x = (1 - s) * x0 + s * noise
    weight = None
    if weighting_scheme in LOSS_WEIGHTED_SCHEMES:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        weight = compute_loss_weighting_for_sd3(weighting_scheme, sigma.float())
    return TrainingStates(torch.arange(x0.shape[0]), x, sigma, noise - x0, weight)


def sample_sft_sigmas(
    scheduler: Any, batch_size: int, generator: torch.Generator, weighting_scheme: str = "logit_normal"
):
    """Training sigmas as diffusers' SD3/Flux examples draw them (density over the scheduler's shifted grid)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=batch_size,
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        generator=generator,
    )
    num_train = scheduler.config.num_train_timesteps
    index = (u * num_train).long().clamp(0, num_train - 1)
    train_sigmas = scheduler.__class__.from_config(scheduler.config).sigmas  # full, shifted training grid
    return train_sigmas[index].float()


__all__ = [
    "DENSE_WEIGHTINGS",
    "LOSS_WEIGHTED_SCHEMES",
    "METHODS",
    "RoutedTargets",
    "TrainingStates",
    "dense_weights",
    "off_policy_states",
    "on_policy_states",
    "sample_query_indices",
    "sample_sft_sigmas",
    "sft_states",
    "velocity_mse",
]
