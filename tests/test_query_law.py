"""The query law in σ (issue 21, item 1): it means the same noise levels on every pipeline's grid.

The paper draws its query over the step index (Beta(5, 2) over N = 16 states), which reaches σ ≈ 0.55 on its shift-3
Z-Image grid but σ ≈ 0.32 on an unshifted one (``../shared/audits/query_sigma.md``). ``--query_space sigma`` reads
the same index law on a reference grid and queries that σ on the run's own grid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_train
from diffusers import FlowMatchEulerDiscreteScheduler
from test_fields import FAMILY, _inputs
from test_train import SHORT, _prompts

from danceopd_diffusers.config import ConfigError
from danceopd_diffusers.families.base import linspace_grid, scheduler_sigmas, token_count_mu
from danceopd_diffusers.fields import Field, FieldQuery
from danceopd_diffusers.flag_checks import check_numbers
from danceopd_diffusers.objectives import RoutedTargets, off_policy_states, on_policy_states
from danceopd_diffusers.rollout import (
    QUERY_STRATEGIES,
    QueryLaw,
    field_rollout,
    locate_sigmas,
    reference_sigmas,
    sample_query_indices,
)
from danceopd_diffusers.tiny.flux import FLUX_DEV_SCHEDULER_CONFIG

SHAPESWORLD_SCHEDULER = Path(__file__).resolve().parents[1] / "danceopd_diffusers/shapesworld/sources/base"


def _static_grid(shift: float) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(16)
    return scheduler.sigmas.float()


def _z_image_grid() -> torch.Tensor:
    """Z-Image's pipeline: linspace(1, 1/N, N) through the static shift 3 (the paper's grid)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return scheduler_sigmas(scheduler, 16, "cpu", linspace_grid(scheduler, 16))


def _flux_grid(tokens: int) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
    return scheduler_sigmas(
        scheduler, 16, "cpu", linspace_grid(scheduler, 16), token_count_mu(scheduler, tokens)
    )


def _shapesworld_grid() -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(SHAPESWORLD_SCHEDULER, subfolder="scheduler")
    mu = token_count_mu(scheduler, 16) if scheduler.config.use_dynamic_shifting else None
    return scheduler_sigmas(scheduler, 16, "cpu", linspace_grid(scheduler, 16), mu)


#: name -> (grid, its σ at index 1 in the audit's table, mean σ of the paper's low law over its steps)
GRIDS = {
    "sd3.5-medium": (lambda: _static_grid(3.0), 0.977, 0.484),
    "z-image": (_z_image_grid, 0.978, 0.547),
    "flux-64": (lambda: _flux_grid(16), 0.960, 0.410),
    "flux-1024": (lambda: _flux_grid(4096), 0.979, 0.558),
    "shapesworld": (_shapesworld_grid, 0.938, 0.317),
}
#: the paper's low query on its shift-3 Z-Image grid (mean, p10, p50, p90; the audit's table)
PAPER_LOW = (0.547, 0.300, 0.577, 0.794)


def _wasserstein(a: torch.Tensor, b_values: torch.Tensor, b_probs: torch.Tensor) -> float:
    """W1 between the empirical law of ``a`` and a discrete law: the integral of |F_a - F_b|."""
    points = torch.cat([a.double(), b_values.double()]).unique().sort().values
    f_a = (a.double().unsqueeze(0) <= points.unsqueeze(1)).double().mean(1)
    f_b = ((b_values.double().unsqueeze(0) <= points.unsqueeze(1)).double() * b_probs.double()).sum(1)
    return float(((f_a - f_b).abs()[:-1] * (points[1:] - points[:-1])).sum())


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_grids_are_the_pipelines(grid_name):
    make, second, step_mean = GRIDS[grid_name]
    grid = make()
    assert len(grid) == 17 and grid[0] == pytest.approx(1.0) and grid[-1] == 0
    assert float(grid[1]) == pytest.approx(second, abs=1.5e-3)
    # the trap: the paper's index law means another noise level on each grid
    assert QueryLaw("low").describe(grid)["mean"] == pytest.approx(step_mean, abs=2e-3)


@pytest.mark.parametrize("strategy", QUERY_STRATEGIES)
@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_sigma_law_queries_its_target_on_every_grid(grid_name, strategy):
    """The states queried on each grid (where the located Euler step puts them) follow the target σ law."""
    grid = GRIDS[grid_name][0]()
    law = QueryLaw(strategy, "sigma")
    _, sigma = law.sample(16, 20_000, 1, torch.Generator().manual_seed(0))
    lower, frac = locate_sigmas(sigma, grid)
    queried = grid.double()[lower] - frac * (grid.double()[lower] - grid.double()[lower + 1])
    assert torch.allclose(queried.float(), sigma, atol=1e-6)  # each state sits at its σ
    assert ((frac >= 0) & (frac < 1)).all()
    values, probs = law.distribution(grid)
    assert torch.equal(values, reference_sigmas(16, 3.0))  # the same target whatever the run's grid
    assert _wasserstein(queried.reshape(-1), values, probs) <= 0.03


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_sigma_law_describes_the_papers_regime_on_every_grid(grid_name):
    d = QueryLaw("low", "sigma").describe(GRIDS[grid_name][0]())
    assert (d["mean"], d["p10"], d["p50"], d["p90"]) == pytest.approx(PAPER_LOW, abs=2e-3)


@pytest.mark.parametrize("strategy", QUERY_STRATEGIES)
@pytest.mark.parametrize("k", [1, 3, 16])
def test_index_law_draws_are_bit_identical(strategy, k):
    """The default (step space) is today's sampler, draw for draw; σ space draws the same indices."""
    step = QueryLaw(strategy).sample(16, 64, k, torch.Generator().manual_seed(5))
    sigma = QueryLaw(strategy, "sigma").sample(16, 64, k, torch.Generator().manual_seed(5))
    today = sample_query_indices(16, 64, k, strategy, torch.Generator().manual_seed(5))
    assert step[1] is None and torch.equal(step[0], today) and torch.equal(sigma[0], today)
    assert torch.equal(sigma[1], reference_sigmas(16)[today].float())


def test_locate_on_grid_points_is_exact():
    grid = _static_grid(3.0)
    lower, frac = locate_sigmas(grid[:16].clone(), grid)
    assert torch.equal(lower, torch.arange(16)) and torch.equal(frac, torch.zeros(16, dtype=frac.dtype))


class _StateField(Field):
    """A field whose target is the queried state itself: the test reads the states from the targets."""

    name = "state"

    def velocity(self, query: FieldQuery) -> torch.Tensor:
        return query.x.clone()


@pytest.mark.parametrize("ragged", [True, False])
def test_sigma_queries_are_points_of_the_students_own_euler_steps(tiny_pipe, ragged):
    """A σ between two states is x_i + (σ - σ_i) v_i, v_i the student's velocity at state i; a σ on the grid is
    that state exactly."""
    cond, uncond, x = _inputs(tiny_pipe)
    n = 4
    size = x.shape[-1] * tiny_pipe.vae_scale_factor
    grid = FAMILY.sigmas(tiny_pipe, n, tuple(x.shape), "cpu")
    query_sigmas = torch.tensor([[0.9], [float(grid[2])]])  # between states 0 and 1; exactly state 2
    targets = RoutedTargets([_StateField()] * 2, cond, uncond, n)
    states = on_policy_states(
        tiny_pipe,
        FAMILY,
        targets,
        cond,
        x,
        n,
        torch.zeros(2, 1, dtype=torch.long),
        size,
        size,
        ragged=ragged,
        query_sigmas=query_sigmas,
    )
    assert states.samples.tolist() == [0, 1]
    assert torch.equal(states.sigma, query_sigmas.reshape(-1))
    with torch.no_grad():
        trajectory = field_rollout(
            lambda xx, s, i: FAMILY.velocity(tiny_pipe.transformer, xx, s, cond), x, grid
        )
        v0 = FAMILY.velocity(tiny_pipe.transformer, x[:1], grid[:1], cond.select([0]))
    expected_0 = x[:1] + (0.9 - float(grid[0])) * v0
    assert torch.allclose(states.x[:1], expected_0, atol=1e-5)
    assert torch.allclose(states.x[1:], trajectory[2][1:], atol=1e-5)
    assert torch.equal(states.target, states.x)  # the field saw exactly these states


def test_off_policy_renoises_to_the_queried_sigma(tiny_pipe):
    cond, uncond, x = _inputs(tiny_pipe)
    grid = FAMILY.sigmas(tiny_pipe, 4, tuple(x.shape), "cpu")
    targets = RoutedTargets([_StateField()] * 2, cond, uncond, 4)
    query_sigmas = torch.tensor([[0.55], [0.3]])
    states = off_policy_states(
        FAMILY,
        targets,
        x,
        grid,
        torch.zeros(2, 1, dtype=torch.long),
        torch.Generator().manual_seed(0),
        query_sigmas,
    )
    assert torch.equal(states.sigma, query_sigmas.reshape(-1))


# ------------------------------------------------------------------------------------------------ the script
def _unshifted_copy(tiny_path: str, folder: Path) -> str:
    """The tiny SD3 pipeline with an unshifted grid (as ShapesWorld's): the paper's index law reaches low σ."""
    path = folder / "unshifted"
    shutil.copytree(tiny_path, path)
    config_path = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "shift": 1.0}))
    return str(path)


def test_script_prints_records_and_warns_about_the_queried_sigma(tiny_path, tmp_path, capsys):
    base = _unshifted_copy(tiny_path, tmp_path)
    common = [
        "--pretrained_model_name_or_path",
        base,
        "--dataset_name",
        _prompts(tmp_path),
        "--cfg_scale",
        "3",
    ]
    common += [*SHORT, "--max_train_steps", "1", "--num_rollout_steps", "16", "--skip_pipeline_export"]
    run_train([*common, "--output_dir", str(tmp_path / "step")])
    out = capsys.readouterr().out
    assert "query law: low Beta(5, 2) over the run's steps" in out
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(base)
    d = QueryLaw("low").describe(FAMILY.sigmas(pipe, 16, FAMILY.latent_shape(pipe, 1, 32, 32), "cpu"))
    assert d["mean"] < 0.3  # what the paper's law means on an unshifted grid
    assert f"mean {d['mean']:.3f}, p10 / p50 / p90 = {d['p10']:.3f} / {d['p50']:.3f} / {d['p90']:.3f}" in out
    assert "pass --query_space sigma" in out
    run_train([*common, "--output_dir", str(tmp_path / "sigma"), "--query_space", "sigma"])
    out = capsys.readouterr().out
    assert (
        "in σ, as on a shift-3 grid" in out and "mean 0.547, p10 / p50 / p90 = 0.300 / 0.577 / 0.794" in out
    )
    assert "warning" not in out
    card = (tmp_path / "sigma" / "README.md").read_text()
    assert "query_space" in card and "0.547" in card
    config = json.loads(next((tmp_path / "sigma").glob("*config*.json")).read_text())
    assert "0.547" in json.dumps(config)


def test_script_refuses_a_query_space_where_nothing_is_chosen(tiny_path, tmp_path):
    import train_danceopd

    args = [
        "--pretrained_model_name_or_path",
        tiny_path,
        "--dataset_name",
        _prompts(tmp_path),
        "--cfg_scale",
        "3",
    ]
    args += ["--output_dir", str(tmp_path / "out"), "--query_space", "sigma"]
    for method in ("dense", "sft"):
        extra = ["--cfg_scale", "3"] if method == "dense" else []
        argv = [a for a in args if a not in ("--cfg_scale", "3")] + extra + ["--method", method]
        with pytest.raises(ConfigError, match="Drop --query_space"):
            check_numbers(train_danceopd.parse_args(argv))


def test_the_audits_shapesworld_table():
    """``../shared/audits/query_sigma.md`` on ShapesWorld's grid: each strategy's mean queried σ over the steps, and
    its finding that there ``mid`` is the paper's low query in σ (W1 0.037) while ``low`` is far from it (0.230)."""
    grid = _shapesworld_grid()
    means = {s: QueryLaw(s).describe(grid)["mean"] for s in ("low", "mid", "high")}
    assert means == pytest.approx({"low": 0.317, "mid": 0.531, "high": 0.746}, abs=2e-3)
    paper_values, paper_probs = QueryLaw("low").distribution(_z_image_grid())
    for strategy, w1 in (("low", 0.230), ("mid", 0.037)):
        values, probs = QueryLaw(strategy).distribution(grid)
        draws = values[torch.multinomial(probs, 200_000, True, generator=torch.Generator().manual_seed(0))]
        assert _wasserstein(draws, paper_values, paper_probs) == pytest.approx(w1, abs=5e-3)
