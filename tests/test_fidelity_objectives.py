"""The baselines and options match their published definitions (issue: fidelity to the algorithm audit).

DiffusionOPD's dense weights, distinct K > 1 queries, guider fields at the queried step with fresh state, and the
sft loss weighting of diffusers' SD3/Flux examples.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_train
from diffusers import FlowMatchEulerDiscreteScheduler
from test_fields import FAMILY, _inputs
from test_train import SHORT, _image_data, _prompts

from danceopd_diffusers.config import parse_fields_config
from danceopd_diffusers.field_loading import build_fields
from danceopd_diffusers.fields import Field, FieldQuery
from danceopd_diffusers.objectives import (
    RoutedTargets,
    dense_weights,
    off_policy_states,
    on_policy_states,
    sft_states,
    velocity_mse,
)
from danceopd_diffusers.rollout import QUERY_STRATEGIES, query_index_probabilities, sample_query_indices


def _sd35_medium_grid(num_steps: int = 16) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3.5-Medium's scheduler config
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas


def _guider_fields(pipe, tiny_path, **guiders):
    fields = {"base": {"type": "base"}}
    for name, (cls, kwargs) in guiders.items():
        fields[name] = {"type": "guider", "of": "base", "guider": cls, "guider_kwargs": kwargs}
    config = parse_fields_config({"fields": fields, "routes": [{"field": "base"}]})
    return build_fields(config, FAMILY, tiny_path, pipe.transformer, None, torch.float32, "cpu")


# ------------------------------------------------------------------------------------------ dense weighting
def test_dense_weights_on_the_sd35_medium_grid():
    """The audit's anchor: per-step dt^2/2 sums to 0.0470 on SD3.5-M's 16-step grid, the official 0.5/N^2 to 1/32."""
    grid = _sd35_medium_grid()
    uniform = dense_weights(grid)  # the default
    step = dense_weights(grid, "step")
    assert uniform.shape == step.shape == (16,)
    assert torch.allclose(uniform, torch.full((16,), 0.5 / 16**2))
    assert uniform.sum().item() == pytest.approx(0.03125)
    assert step.sum().item() == pytest.approx(0.0470, abs=5e-4)
    assert 370 < (step.max() / step.min()).item() < 390
    with pytest.raises(ValueError, match="dense weighting"):
        dense_weights(grid, "dt")


def test_dense_states_are_weighted_uniformly_by_default(tiny_pipe):
    """A dense rollout weights every state 0.5/N^2 (summed per trajectory); ``step`` keeps the grid's dt^2/2."""
    cond, uncond, x = _inputs(tiny_pipe)
    n = 4
    targets = RoutedTargets([_ConstantField()] * 2, cond, uncond, n)
    indices = torch.arange(n).repeat(2, 1)
    size = x.shape[-1] * tiny_pipe.vae_scale_factor
    kwargs = dict(num_steps=n, query_indices=indices, height=size, width=size, dense=True)
    default = on_policy_states(tiny_pipe, FAMILY, targets, cond, x, **kwargs)
    step = on_policy_states(tiny_pipe, FAMILY, targets, cond, x, **kwargs, dense_weighting="step")
    assert torch.equal(default.x, step.x)
    assert torch.allclose(default.weight, torch.full((2 * n,), 0.5 / n**2))
    grid = tiny_pipe.scheduler.sigmas.float()  # the tiny pipeline's grid is shifted (shift 3)
    expected_step = ((grid[:-1] - grid[1:]) ** 2 / 2)[torch.cat([torch.full((2,), i) for i in range(n)])]
    assert torch.allclose(step.weight, expected_step)
    assert not torch.allclose(default.weight, step.weight)
    # the loss sums the weighted states of a trajectory and averages the trajectories
    pred = torch.zeros_like(default.target)
    per_row = default.target.float().pow(2).flatten(1).mean(1)
    loss = velocity_mse(pred, default.target, default.weight, num_samples=2)
    assert loss.item() == pytest.approx((per_row.sum() * 0.5 / n**2 / 2).item(), rel=1e-6)


class _ConstantField(Field):
    """A field with a known answer, so the dense test needs no second model."""

    name = "constant"

    def velocity(self, query: FieldQuery) -> torch.Tensor:
        return torch.ones_like(query.x) * query.sigma.reshape(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------ query indices
@pytest.mark.parametrize("strategy", QUERY_STRATEGIES)
@pytest.mark.parametrize("k", [2, 5, 15])
def test_k_queries_are_distinct_per_row(strategy, k):
    idx = sample_query_indices(16, 2000, k, strategy, torch.Generator().manual_seed(0))
    assert idx.shape == (2000, k)
    assert idx.min() >= 0 and idx.max() <= 15
    assert all(len(set(row)) == k for row in idx.tolist())


@pytest.mark.parametrize("k", [16, 40])
def test_k_at_least_n_queries_every_state_once(k):
    idx = sample_query_indices(16, 3, k, "low", torch.Generator().manual_seed(0))
    assert torch.equal(idx, torch.arange(16).repeat(3, 1))


def test_single_query_draws_are_unchanged():
    """K = 1 is the same draw as before (resumed and recorded runs stay reproducible): Beta by order statistics."""
    for strategy, (a, b) in {"low": (5, 2), "mid": (5, 5), "high": (2, 5)}.items():
        gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        u = torch.rand((64, 1, a + b - 1), generator=ref, dtype=torch.float64).sort(dim=-1).values[..., a - 1]
        assert torch.equal(sample_query_indices(16, 64, 1, strategy, gen), (u * 16).long().clamp(max=15))
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    uniform = sample_query_indices(16, 64, 1, "uniform", gen)
    assert torch.equal(uniform, torch.randint(0, 16, (64, 1), generator=ref))


def test_query_index_law_and_sampling_without_replacement():
    """One draw follows the binned Beta law; K = 2 is the official sampler's (repeats rejected, i.e. renormalised)."""
    p = query_index_probabilities(16, "low")
    assert p.sum().item() == pytest.approx(1.0)
    single = sample_query_indices(16, 100_000, 1, "low", torch.Generator().manual_seed(1))
    assert (torch.bincount(single.reshape(-1), minlength=16) / 100_000 - p).abs().max() < 0.005
    pairs = sample_query_indices(16, 40_000, 2, "low", torch.Generator().manual_seed(2))
    included = torch.bincount(pairs.reshape(-1), minlength=16) / 40_000
    # P(i in a pair drawn without replacement) = p_i + sum_{j != i} p_j p_i / (1 - p_j)
    expected = p + p * ((p / (1 - p)).sum() - p / (1 - p))
    assert (included - expected).abs().max() < 0.01
    again = sample_query_indices(16, 40_000, 2, "low", torch.Generator().manual_seed(2))
    assert torch.equal(pairs, again)  # deterministic with the step's generator


# ------------------------------------------------------------------------------------------ guider fields
def test_off_policy_guider_target_is_taken_at_the_queried_step(tiny_pipe, tiny_path):
    """A CFG guider active on the second half of the steps: each off-policy row uses its own step's branches."""
    fields = _guider_fields(
        tiny_pipe, tiny_path, late=("ClassifierFreeGuidance", {"guidance_scale": 4.0, "start": 0.5})
    )
    cond, uncond, x = _inputs(tiny_pipe)
    n = 4
    targets = RoutedTargets([fields["late"]] * 2, cond, uncond, n)
    sigmas = FAMILY.sigmas(tiny_pipe, n, x.shape, "cpu")
    indices = torch.tensor([[3], [1]])  # sample 0 inside the window, sample 1 before it
    with torch.no_grad():
        states = off_policy_states(FAMILY, targets, x, sigmas, indices, torch.Generator().manual_seed(5))
        for row, step in enumerate(indices.reshape(-1).tolist()):
            q = FieldQuery(
                states.x[row : row + 1],
                states.sigma[row : row + 1],
                cond.select(states.samples[row : row + 1]),
                uncond.select(states.samples[row : row + 1]),
                step_index=step,
                num_steps=n,
            )
            assert torch.allclose(states.target[row : row + 1], fields["late"].velocity(q), atol=1e-6), row
            unguided = fields["base"].velocity(q)
            assert torch.allclose(states.target[row : row + 1], unguided, atol=1e-6) == (step < 2), row


def test_apg_momentum_field_keeps_no_state_across_queries(tiny_pipe, tiny_path):
    """APG with momentum: a sample's target does not depend on which unrelated samples were queried before it."""
    apg = {"guidance_scale": 3.0, "eta": 0.0}
    momentum = ("AdaptiveProjectedGuidance", {**apg, "adaptive_projected_guidance_momentum": -0.5})
    fields = _guider_fields(tiny_pipe, tiny_path, momentum=momentum, plain=("AdaptiveProjectedGuidance", apg))
    cond, uncond, x = _inputs(tiny_pipe)
    a, b = cond.select(torch.tensor([0])), cond.select(torch.tensor([1]))
    u = uncond.select(torch.tensor([0]))
    sigma = torch.full((1,), 0.6)

    def query(field, c, xx, step):
        return field.velocity(FieldQuery(xx, sigma, c, u, step_index=step, num_steps=8))

    with torch.no_grad():
        alone = query(fields["momentum"], a, x[:1], 3)
        fresh = _guider_fields(tiny_pipe, tiny_path, momentum=momentum)["momentum"]
        query(fresh, b, x[1:], 0)  # an unrelated sample first, at step 0 (where APG starts its momentum)
        after_other = query(fresh, a, x[:1], 3)
        assert torch.equal(alone, after_other)
        # with no memory, momentum APG at a query is APG itself
        assert torch.allclose(alone, query(fields["plain"], a, x[:1], 3), atol=1e-6)
        assert not torch.allclose(alone, query(fields["base"], a, x[:1], 3), atol=1e-4)


# ------------------------------------------------------------------------------------------ sft weighting
@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_sft_loss_weighting(scheme):
    """sigma_sqrt / cosmap weight each row as diffusers' SD3 example; other schemes leave the loss unweighted."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    pred = torch.randn(3, 4, 8, 8, generator=gen)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    weighted = sft_states(x0, sigma, torch.Generator().manual_seed(1), scheme)
    plain = sft_states(x0, sigma, torch.Generator().manual_seed(1), "none")
    assert plain.weight is None and torch.equal(weighted.x, plain.x)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    per_row = (pred - (noise - x0)).pow(2).flatten(1).mean(1)
    if scheme == "sigma_sqrt":
        w = sigma**-2
    else:
        w = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    loss = velocity_mse(pred, weighted.target, weighted.weight, num_samples=3)
    assert loss.item() == pytest.approx((w * per_row).mean().item(), rel=1e-5)
    unweighted = velocity_mse(pred, plain.target, plain.weight, num_samples=3)
    assert unweighted.item() == pytest.approx(per_row.mean().item(), rel=1e-5)
    assert abs(loss.item() - unweighted.item()) > 1e-3 * unweighted.item()


# ------------------------------------------------------------------------------------------ the script's flags
@pytest.mark.parametrize(
    "method,flags,spied,check",
    [
        ("dense", ["--dense_weighting", "step"], "on_policy_states", "dense_weighting"),
        ("sft", ["--weighting_scheme", "sigma_sqrt"], "sft_states", "weighting"),
        ("danceopd", ["--query_k", "4"], "on_policy_states", "every_state"),
    ],
)
def test_script_passes_the_choices_to_the_library(
    tiny_path, tmp_path, monkeypatch, method, flags, spied, check
):
    import train_danceopd

    real = getattr(train_danceopd, spied)
    seen = []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((args, kwargs, out))
        return out

    monkeypatch.setattr(train_danceopd, spied, spy)
    data = ["--dataset_name", _image_data(tmp_path)]
    if method != "sft":
        data = ["--dataset_name", _prompts(tmp_path), "--cfg_scale", "3"]
    one_step = f"--method {method} --max_train_steps 1 --report_to none --skip_pipeline_export".split()
    model = ["--pretrained_model_name_or_path", tiny_path, "--output_dir", str(tmp_path / "o")]
    run_train([*model, *one_step, *data, *flags, *SHORT])
    assert seen
    args, kwargs, out = seen[0]
    recorded = json.loads((tmp_path / "o" / "danceopd_config.json").read_text())["args"]
    assert {"dense": "dense_weighting", "sft": "weighting_scheme"}.get(method, "query_k") in recorded
    if check == "dense_weighting":  # SHORT: N = 4 on the tiny pipeline's shifted grid
        assert kwargs["dense_weighting"] == "step"
        assert not torch.allclose(out.weight, torch.full_like(out.weight, 0.5 / 16))
    elif check == "weighting":
        assert torch.allclose(out.weight, out.sigma.float() ** -2)
    else:  # K = N = 4: every state once (K > N is refused before weights load)
        indices = args[6]  # on_policy_states(pipe, family, targets, cond, noise, N, query_indices, ...)
        assert torch.equal(indices, torch.arange(4).repeat(len(indices), 1))
        assert kwargs["query_sigmas"] is None  # the paper's index law unless --query_space sigma


def test_routes_log_records_each_steps_compute(tiny_path, tmp_path):
    """The equal-compute comparison counts transformer rows per optimizer step, measured by the run: a dense update
    queries all N states (N field and student rows per sample), a DanceOPD update one, and its rollout stops at
    the last queried state."""
    rows = {}
    for method in ("danceopd", "dense"):
        out = tmp_path / method
        model = ["--pretrained_model_name_or_path", tiny_path, "--output_dir", str(out), "--method", method]
        data = ["--dataset_name", _prompts(tmp_path), "--cfg_scale", "3", "--skip_pipeline_export"]
        run_train([*model, *data, *SHORT, "--max_train_steps", "2", "--report_to", "none"])
        logged = [json.loads(line) for line in (out / "logs" / "routes_rank0.jsonl").read_text().splitlines()]
        rows[method] = [entry["rows"] for entry in logged]
    samples = 2 * 2  # SHORT: batch 2, accumulation 2, N = 4
    for entry in rows["dense"]:
        # the rollout stops once state N - 1 is reached: N - 1 steps
        assert entry == {"rollout": samples * 3, "field": samples * 4, "student": samples * 4}
    for entry in rows["danceopd"]:
        assert entry["field"] == entry["student"] == samples
        assert 0 <= entry["rollout"] <= samples * 3
