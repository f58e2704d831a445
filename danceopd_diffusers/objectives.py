"""Where the training states and targets come from, per method, and the loss on them.

- ``danceopd``: states from the student's own rollout (the pipeline call), K per sample, low-noise biased;
  target = the routed field there.
- ``dense``: every state of the rollout, weighted dt^2 / 2 (DiffusionOPD).
- ``offpolicy``: the routed field's own rollout, its endpoint forward-noised to the queried sigma.
- ``sft``: ordinary flow matching on dataset targets (joint training; training experts).
All methods end in :func:`velocity_mse` on detached states; the targets never carry gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .families import Conditioning, FamilyAdapter
from .fields import Field, FieldQuery
from .rollout import OnPolicyQueryCallback, field_rollout, gather_records, sample_query_indices

METHODS = ("danceopd", "dense", "offpolicy", "sft")


@dataclass
class TrainingStates:
    """Detached states with their targets; ``samples`` maps each row back to its batch sample."""

    samples: torch.Tensor
    x: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None
    steps_run: int = 0


def velocity_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    num_samples: int | None = None,
) -> torch.Tensor:
    """Plain MSE in fp32: the paper's objective.

    With per-row ``weight`` (dense), rows are summed with their weights and averaged over ``num_samples``
    trajectories, as DiffusionOPD sums its dt^2/2-weighted terms along a trajectory.
    """
    per_row = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weight is None:
        return per_row.mean()
    return (per_row * weight.to(per_row)).sum() / (num_samples or 1)


class RoutedTargets:
    """Evaluates, for each sample of a batch, the field it was routed to (grouping samples per field)."""

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
        self, samples: torch.Tensor, x: torch.Tensor, sigma: float | torch.Tensor, state_index: int = 0
    ):
        out = torch.empty_like(x)
        sigma_t = sigma if torch.is_tensor(sigma) else torch.full((len(samples),), float(sigma))
        groups: dict[int, list[int]] = {}
        for row, s in enumerate(samples.tolist()):
            groups.setdefault(id(self.fields[s]), []).append(row)
        for rows in groups.values():
            field = self.fields[int(samples[rows[0]])]
            rows_t = torch.tensor(rows)
            sel = samples[rows_t]
            query = FieldQuery(
                x=x[rows_t.to(x.device)],
                sigma=sigma_t[rows_t].to(x.device),
                cond=self.cond.select(sel),
                uncond=self.uncond.select(sel) if self.uncond is not None else None,
                step_index=state_index,
                num_steps=self.num_steps,
            )
            out[rows_t.to(x.device)] = field.velocity(query).to(out.dtype)
        return out


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
) -> TrainingStates:
    """Roll the student out through ``pipe`` and query the routed fields at ``query_indices`` ([B, K])."""
    callback = OnPolicyQueryCallback(query_indices, initial_latents, targets)
    pipe(
        **family.pipeline_condition_kwargs(cond),
        **family.unguided_call_kwargs(),
        latents=initial_latents,
        num_inference_steps=num_steps,
        height=height,
        width=width,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=callback.tensor_inputs,
    )
    samples, x, sigma, target = gather_records(callback.records)
    weight = None
    if dense:
        grid = pipe.scheduler.sigmas.float().cpu()
        dt = grid[:-1] - grid[1:]
        index = torch.cat([torch.full((len(r.samples),), r.state_index) for r in callback.records])
        weight = dt[index].pow(2) / 2
    return TrainingStates(samples, x, sigma, target, weight, steps_run=callback.steps_run)


def off_policy_states(
    family: FamilyAdapter,
    targets: RoutedTargets,
    initial_latents: torch.Tensor,
    sigmas: torch.Tensor,
    query_indices: torch.Tensor,
    generator: torch.Generator,
) -> TrainingStates:
    """The routed field's own rollout; its endpoint re-noised to the queried sigmas with fresh noise."""
    all_samples = torch.arange(initial_latents.shape[0])

    def velocity(x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        return targets(all_samples, x, sigma.cpu(), step)

    with torch.no_grad():
        x0 = field_rollout(velocity, initial_latents, sigmas)[-1]
    b, k = query_indices.shape
    samples = all_samples.repeat_interleave(k)
    sigma = sigmas[query_indices.reshape(-1)].float()
    noise = torch.randn(x0[samples].shape, generator=generator).to(x0)
    s = sigma.to(x0).reshape(-1, *([1] * (x0.dim() - 1)))
    x = ((1 - s) * x0[samples] + s * noise).to(x0.dtype)
    target = targets(samples, x, sigma, 0)
    return TrainingStates(samples, x, sigma, target)


def sft_states(x0: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> TrainingStates:
    """Flow matching on data: x_sigma = (1 - sigma) x0 + sigma noise, target v = noise - x0."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    s = sigma.to(x0).reshape(-1, *([1] * (x0.dim() - 1)))
    x = (1 - s) * x0 + s * noise
    return TrainingStates(torch.arange(x0.shape[0]), x, sigma, noise - x0)


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
    "METHODS",
    "RoutedTargets",
    "TrainingStates",
    "off_policy_states",
    "on_policy_states",
    "sample_query_indices",
    "sample_sft_sigmas",
    "sft_states",
    "velocity_mse",
]
