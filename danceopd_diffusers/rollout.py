"""On-policy rollout through the real pipeline, with the fields queried from a pipeline callback.

The student's trajectory is the pipeline ``__call__`` itself (same scheduler, shift, steps and resolution as
inference). :class:`OnPolicyQueryCallback` sees each state as the pipeline produces it, keeps the states chosen
for querying, and interrupts the pipeline once the last needed state is reached; the routed fields are then
queried on all of them at once.
Candidate states are the N states *before* each step: index 0 is the pure noise, N - 1 the least noisy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from .families import euler_step

QUERY_STRATEGIES = ("low", "mid", "high", "uniform")
# Beta(a, b) of each strategy; integer parameters let us sample exactly from order statistics.
_BETA = {"low": (5, 2), "mid": (5, 5), "high": (2, 5)}


def _beta_integer(a: int, b: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Beta(a, b) for integer a, b: the a-th smallest of a + b - 1 uniforms (a seeded-generator friendly form)."""
    u = torch.rand((*shape, a + b - 1), generator=generator, dtype=torch.float64)
    return u.sort(dim=-1).values[..., a - 1]


def query_index_probabilities(num_steps: int, strategy: str) -> torch.Tensor:
    """P(index = i) of one draw of ``strategy`` over the N states: the Beta law binned as idx = min(int(u N), N - 1).

    For integer a, b the Beta CDF is a binomial tail, I_x(a, b) = P(Binomial(a + b - 1, x) >= a), so the bins
    are exact (float64).
    """
    if strategy not in QUERY_STRATEGIES:
        raise ValueError(f"Unknown query strategy {strategy!r}; use one of {QUERY_STRATEGIES}.")
    if strategy == "uniform":
        return torch.full((num_steps,), 1.0 / num_steps, dtype=torch.float64)
    a, b = _BETA[strategy]
    n = a + b - 1
    x = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    cdf = sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))
    return cdf[1:] - cdf[:-1]


def sample_query_indices(
    num_steps: int, batch_size: int, k: int, strategy: str, generator: torch.Generator
) -> torch.Tensor:
    """[B, K] distinct indices per row into the N pre-step states; ``low`` (Beta(5,2)) is the paper's default.

    The first index of a row is one draw of the strategy (for K = 1 this is all there is); the other K - 1 are
    drawn without replacement from the same binned law with the indices already drawn removed, which is the
    official sampler's rejection of repeats. K >= N queries every state once: [B, N].
    """
    if strategy not in QUERY_STRATEGIES:
        raise ValueError(f"Unknown query strategy {strategy!r}; use one of {QUERY_STRATEGIES}.")
    if k >= num_steps:
        return torch.arange(num_steps).repeat(batch_size, 1)
    if strategy == "uniform":
        first = torch.randint(0, num_steps, (batch_size, 1), generator=generator)
    else:
        a, b = _BETA[strategy]
        u = _beta_integer(a, b, (batch_size, 1), generator)
        first = (u * num_steps).long().clamp(max=num_steps - 1)
    if k == 1:
        return first
    probs = query_index_probabilities(num_steps, strategy).repeat(batch_size, 1).scatter_(1, first, 0.0)
    rest = torch.multinomial(probs, k - 1, replacement=False, generator=generator)
    return torch.cat([first, rest], dim=1).sort(dim=1).values


#: where a query law is drawn: over the rollout's step index (the paper's sampler), or over σ as the index law reaches
#: it on a reference grid, so that it queries the same noise levels on every pipeline's grid
QUERY_SPACES = ("step", "sigma")
#: the paper's grid: Z-Image's linspace(1, 1/N, N) with the static shift 3 (SD3.5 uses 3 as well)
PAPER_REFERENCE_SHIFT = 3.0
#: below this mean queried σ a run queries a less noisy regime than the paper (0.55 on its Z-Image grid)
LOW_QUERY_SIGMA = 0.4


def reference_sigmas(num_steps: int, shift: float = PAPER_REFERENCE_SHIFT) -> torch.Tensor:
    """σ of the N pre-step states of ``linspace(1, 1/N, N)`` under the static shift ``σ' = sσ / (1 + (s - 1)σ)``
    (FlowMatchEulerDiscreteScheduler's ``shift``), float64: the grid the paper's index law is read on."""
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class QueryLaw:
    """Which state(s) of a rollout are queried.

    ``strategy`` is the Beta law of the paper's sampler, binned over N indices (:func:`sample_query_indices`). In
    ``space="step"`` (the paper's, the default) the index is a state of the run's own grid, so the σ it means
    depends on the pipeline's shift and resolution (σ ≈ 0.55 on the paper's shift-3 grid, 0.32 on an unshifted
    one). In ``space="sigma"`` the same index is read on the reference grid of shift ``reference_shift`` and the
    rollout is queried at that σ on whatever grid it runs: between two states of the grid, the query is the point
    of the student's own Euler step at that σ (see :func:`locate_sigmas`). Both spaces draw the same numbers from
    the generator.
    """

    strategy: str = "low"
    space: str = "step"
    reference_shift: float = PAPER_REFERENCE_SHIFT

    def __post_init__(self):
        if self.strategy not in QUERY_STRATEGIES:
            raise ValueError(f"Unknown query strategy {self.strategy!r}; use one of {QUERY_STRATEGIES}.")
        if self.space not in QUERY_SPACES:
            raise ValueError(f"Unknown query space {self.space!r}; use one of {QUERY_SPACES}.")
        if not (math.isfinite(self.reference_shift) and self.reference_shift > 0):
            raise ValueError(f"The reference shift must be a positive number, got {self.reference_shift}.")

    def sample(
        self, num_steps: int, batch_size: int, k: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, K] indices of the law, and in σ space the [B, K] σ they mean (None in step space)."""
        indices = sample_query_indices(num_steps, batch_size, k, self.strategy, generator)
        if self.space == "step":
            return indices, None
        return indices, reference_sigmas(num_steps, self.reference_shift)[indices].float()

    def distribution(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queried σ (values, probabilities) of one draw on a run whose grid is ``grid`` (N + 1 sigmas)."""
        num_steps = len(grid) - 1
        probs = query_index_probabilities(num_steps, self.strategy)
        if self.space == "step":
            return grid[:num_steps].double(), probs
        return reference_sigmas(num_steps, self.reference_shift), probs

    def describe(self, grid: torch.Tensor) -> dict[str, float]:
        """Mean, p10, p50 and p90 of the queried σ on ``grid`` (exact, from the binned law)."""
        values, probs = self.distribution(grid)
        order = values.argsort()
        values, cdf = values[order], probs[order].cumsum(0)

        def quantile(q: float) -> float:
            return float(values[int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype) - 1e-12))])

        return {
            "mean": float((values * probs[order]).sum()),
            "p10": quantile(0.1),
            "p50": quantile(0.5),
            "p90": quantile(0.9),
        }

    def report(self, grid: torch.Tensor) -> tuple[dict[str, float], str, str | None]:
        """What the law means on a run's own grid: the queried σ rounded for the run's records, the line the run
        prints, and a warning with the fix when the paper's low law reaches a much less noisy regime than on the
        paper's grid (the index law on an unshifted or small dynamic-shift grid), else None."""
        queried = {k: round(v, 4) for k, v in self.describe(grid).items()}
        line = (
            f"query law: {self.label()}; queried sigma on this run's grid: mean {queried['mean']:.3f}, "
            f"p10 / p50 / p90 = {queried['p10']:.3f} / {queried['p50']:.3f} / {queried['p90']:.3f}"
        )
        warning = None
        if queried["mean"] < LOW_QUERY_SIGMA and self.strategy == "low":
            warning = (
                f"the queries reach a mean sigma of {queried['mean']:.2f}, a less noisy regime than the paper's 0.55 "
                "on its shift-3 grid; pass --query_space sigma to query the paper's noise levels on this grid."
            )
        return queried, line, warning

    def label(self) -> str:
        beta = {"low": "Beta(5, 2)", "mid": "Beta(5, 5)", "high": "Beta(2, 5)", "uniform": "uniform"}
        where = (
            "over the run's steps"
            if self.space == "step"
            else f"in σ, as on a shift-{self.reference_shift:g} grid"
        )
        return f"{self.strategy} {beta[self.strategy]} {where}"


def locate_sigmas(query_sigmas: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each queried σ lies on a rollout's grid (N + 1 decreasing sigmas, N pre-step states).

    Returns the index i of the state before it (σ_i >= σ > σ_{i+1}) and the fraction f = (σ_i - σ) / (σ_i -
    σ_{i+1}) of that Euler step: the queried state is x_i + f (x_{i+1} - x_i), the point of the student's step
    x_i + (σ - σ_i) v_i. f = 0 exactly where σ is a state of the grid.
    """
    grid = grid.double().cpu()
    num_steps = len(grid) - 1
    sigma = query_sigmas.double().cpu()
    lower = ((grid[:num_steps] >= sigma.unsqueeze(-1)).sum(-1) - 1).clamp(0, num_steps - 1)
    hi, lo = grid[lower], grid[lower + 1]
    frac = ((hi - sigma) / (hi - lo)).clamp(0, 1)
    frac = torch.where(sigma >= hi, torch.zeros_like(frac), frac)
    return lower, frac


def interpolate_records(
    records: list[QueryRecord], lower: torch.Tensor, frac: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, x, sigma, state index) rows of σ-space queries ([B, K] each), from the recorded states on both
    sides of each queried σ; rows are sample-major."""
    states: dict[tuple[int, int], torch.Tensor] = {}
    for record in records:
        for j, sample in enumerate(record.samples.tolist()):
            states.setdefault((sample, record.state_index), record.x[j])
    xs, samples = [], []
    for b in range(lower.shape[0]):
        for j in range(lower.shape[1]):
            i, f = int(lower[b, j]), float(frac[b, j])
            x = states[(b, i)]
            if f > 0:
                nxt = states[(b, i + 1)]
                x = (x.float() + f * (nxt.float() - x.float())).to(x.dtype)
            xs.append(x)
            samples.append(b)
    return torch.tensor(samples), torch.stack(xs), sigma.reshape(-1).float(), lower.reshape(-1)


_PINNED: dict[type, type] = {}  # pipeline class -> its subclass with a fixed _execution_device


@contextmanager
def execution_device(pipe: Any, device: torch.device) -> Iterator[Any]:
    """The pipeline's calls inside run with ``_execution_device`` fixed to ``device``.

    diffusers derives it on every call by walking every module of every component, looking for offloading hooks.
    That costs 6.7 ms for the ShapesWorld pipeline on a 2-core CPU, once per rollout step's pipeline call. A
    training rollout has no offloading and runs where its latents are. The class is swapped for a subclass of the
    same name while inside, and swapped back on exit.

    This subclass stays generic (made here per pipeline class, once) rather than an explicit class in
    ``pipelines/``: ``_execution_device`` is a property of ``DiffusionPipeline`` (a data descriptor, which an
    instance attribute cannot shadow), so only a class can pin it, and the pipe may be of any pipeline class,
    stock or ours, of any family (the student's, and every field's loaded by ``field_loading``). An explicit
    class per pipeline class would be a second copy of every family's class list for a 3-line override.
    """
    cls = type(pipe)
    if cls in _PINNED.values():  # nested: already pinned
        yield pipe
        return
    if cls not in _PINNED:
        _PINNED[cls] = type(
            cls.__name__,
            (cls,),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "_execution_device": property(lambda self: self.__dict__["_danceopd_execution_device"]),
            },
        )
    pipe.__dict__["_danceopd_execution_device"] = torch.device(device)
    pipe.__class__ = _PINNED[cls]
    try:
        yield pipe
    finally:
        pipe.__class__ = cls
        pipe.__dict__.pop("_danceopd_execution_device", None)


@dataclass
class QueryRecord:
    """Detached states of one index, for the samples that asked for it."""

    samples: torch.Tensor  # [M] sample indices into the rollout batch
    state_index: int
    sigma: float
    x: torch.Tensor  # [M, ...] detached states


class OnPolicyQueryCallback(PipelineCallback):
    """Record chosen states of the student's rollout and stop it once the last one is reached.

    The fields are queried after the rollout, on every recorded state at once (:func:`gather_records`): one call
    per field instead of one per state index, with the same states. A sample that lists the same index several
    times is recorded once per listing (:func:`sample_query_indices` itself draws distinct indices).

    ``ragged_inputs`` (the family's :attr:`~danceopd_diffusers.families.base.FamilyAdapter.ragged_inputs`): the
    pipeline's other per-sample loop tensors that a callback may replace. When given, a sample leaves the batch
    once its last query state is recorded, so a batch costs the sum of its samples' rollouts rather than batch
    size x the largest index. Every row's arithmetic is unchanged: only the batch it shares a call with shrinks.
    """

    tensor_inputs = ["latents"]

    def __init__(
        self,
        query_indices: torch.Tensor,
        initial_latents: torch.Tensor,
        ragged_inputs: tuple[str, ...] | None = None,
    ):
        super().__init__(cutoff_step_ratio=1.0)
        self.query_indices = query_indices.cpu()
        self.initial_latents = initial_latents
        self.last_index = int(self.query_indices.max())
        self.ragged_inputs = ragged_inputs
        if ragged_inputs:
            self.tensor_inputs = ["latents", *ragged_inputs]
        self.rows = torch.arange(len(self.query_indices))  # the sample each row of the shrinking batch holds
        self.row_last = self.query_indices.max(dim=1).values
        self.records: list[QueryRecord] = []
        self.steps_run = 0
        self.sample_steps = 0  # transformer rows run: steps_run x batch without dropping, less with it

    def _record(self, pipeline: Any, state_index: int, latents: torch.Tensor) -> None:
        hits = (self.query_indices[self.rows] == state_index).nonzero()
        if len(hits) == 0:
            return
        positions = hits[:, 0]
        sigma = float(pipeline.scheduler.sigmas[state_index])
        # accelerate's mixed precision returns the student's output in fp32, which drifts the pipeline's latents
        # to fp32 after the first step: keep states in the rollout's own dtype
        x = latents[positions.to(latents.device)].detach().to(self.initial_latents.dtype, copy=True)
        self.records.append(QueryRecord(self.rows[positions], state_index, sigma, x))

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.steps_run = step_index + 1
        self.sample_steps += len(self.rows)
        if step_index == 0:
            self._record(pipeline, 0, self.initial_latents)
        state_index = step_index + 1  # the callback runs after scheduler.step
        # accelerate's mixed precision returns the student's output in fp32, which would turn the latents fp32
        # from here on; inference keeps them in the rollout's dtype (Flux and Qwen cast the timestep to it), so
        # does the rollout
        callback_kwargs["latents"] = callback_kwargs["latents"].to(self.initial_latents.dtype)
        if state_index <= self.last_index:
            self._record(pipeline, state_index, callback_kwargs["latents"])
        if state_index >= self.last_index:
            pipeline._interrupt = True
        elif self.ragged_inputs:
            keep = (self.row_last[self.rows] > state_index).nonzero()[:, 0]
            if len(keep) < len(self.rows):
                for name in ("latents", *self.ragged_inputs):
                    callback_kwargs[name] = _take_rows(callback_kwargs[name], keep)
                self.rows = self.rows[keep]
        return callback_kwargs


def _take_rows(value: Any, rows: torch.Tensor) -> Any:
    """Rows of a batched pipeline tensor, or items of a per-sample list (Z-Image's unpadded prompts)."""
    if isinstance(value, (list, tuple)):
        return [value[i] for i in rows.tolist()]
    return value[rows.to(value.device)]


def gather_records(
    records: list[QueryRecord],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten records into (sample index, x, sigma, state index) rows for the fields and one student forward."""
    samples = torch.cat([r.samples for r in records])
    x = torch.cat([r.x for r in records])
    sigma = torch.cat([torch.full((len(r.samples),), r.sigma) for r in records])
    index = torch.cat([torch.full((len(r.samples),), r.state_index) for r in records])
    return samples, x, sigma, index


def field_rollout(
    velocity: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    x_t: torch.Tensor,
    sigmas: torch.Tensor,
) -> list[torch.Tensor]:
    """Euler ODE from ``x_t`` along ``sigmas`` with any velocity ``velocity(x, sigma_batch, step)``.

    Returns the N + 1 states (the last one clean). Used for teacher rollouts (off-policy baseline), validation
    samples of fields and the field-equivalence tests.
    """
    states = [x_t]
    x = x_t
    for i in range(len(sigmas) - 1):
        sigma = torch.full((x.shape[0],), float(sigmas[i]), device=x.device)
        v = velocity(x, sigma, i)
        x = euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        states.append(x)
    return states
