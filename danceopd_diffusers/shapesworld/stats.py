"""Uncertainty of ShapesWorld headlines: stratified bootstrap CIs and paired-bootstrap comparisons.

A headline is a mean of category means (GenEval's ``overall``, GEdit's ``average``), so resampling is stratified:
each category's samples are redrawn with replacement within that category, and the headline is recomputed from
the redrawn category means. Two evaluations on the same set and seed are compared sample by sample (the same
redraw for both), which removes the prompt-difficulty variance the two share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .world import EDIT_CATEGORIES, GLOBAL_EDIT_CATEGORIES, LOCAL_EDIT_CATEGORIES, T2I_CATEGORIES

N_BOOTSTRAP: int = 2000
CONFIDENCE: float = 0.95


def _ordered(per_category: Mapping[str, Any], known: Sequence[str]) -> list[str]:
    return [c for c in known if c in per_category] + sorted(set(per_category) - set(known))


def headlines(task: str, means: Mapping[str, Any]) -> dict[str, Any]:
    """Every headline of ``task`` ("t2i" or "edit") from category means (floats, or arrays of resampled means).

    T2I: each category and ``overall`` (their mean). Edits: each category, ``local`` / ``global`` (the mean of
    their categories, where present) and ``average`` (the mean of all categories).
    """
    if task == "t2i":
        order = _ordered(means, T2I_CATEGORIES)
        out = {c: means[c] for c in order}
        out["overall"] = np.mean([means[c] for c in order], axis=0)
        return out
    order = _ordered(means, EDIT_CATEGORIES)
    out = {c: means[c] for c in order}
    for name, group in (("local", LOCAL_EDIT_CATEGORIES), ("global", GLOBAL_EDIT_CATEGORIES)):
        present = [means[c] for c in group if c in means]
        if present:
            out[name] = np.mean(present, axis=0)
    out["average"] = np.mean([means[c] for c in order], axis=0)
    return out


def _resampled_means(
    samples: Mapping[str, Sequence[float]], n_boot: int, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per category: the (n_boot, n) redraw indices and the (n_boot,) resampled means."""
    idx, means = {}, {}
    for c, values in samples.items():
        v = np.asarray(values, dtype=np.float64)
        idx[c] = rng.integers(0, len(v), size=(n_boot, len(v)))
        means[c] = v[idx[c]].mean(axis=1)
    return idx, means


def _interval(draws: np.ndarray) -> list[float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_ci(
    task: str, samples: Mapping[str, Sequence[float]], n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> dict[str, list[float]]:
    """95 % percentile interval of every headline of ``task``; ``samples`` maps a category to its scores."""
    samples = {c: v for c, v in samples.items() if len(v)}
    if not samples:
        return {}
    _, means = _resampled_means(samples, n_boot, np.random.default_rng(seed))
    return {name: _interval(draws) for name, draws in headlines(task, means).items()}


def paired_bootstrap(
    task: str,
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """B - A for every headline: the difference, its 95 % interval and a two-sided p-value.

    ``a`` and ``b`` hold the same samples in the same order (same set and seed); both are redrawn with the same
    indices. The p-value is the bootstrap test of no difference: the share of redrawn differences, centred on the
    observed one, at least as far from it as the observed difference is from 0.
    """
    if set(a) != set(b) or any(len(a[c]) != len(b[c]) for c in a):
        raise ValueError("paired comparison needs the same samples in both results")
    rng = np.random.default_rng(seed)
    diffs = {
        c: np.asarray(b[c], dtype=np.float64) - np.asarray(a[c], dtype=np.float64) for c in a if len(a[c])
    }
    _, means = _resampled_means(diffs, n_boot, rng)
    observed = headlines(task, {c: float(np.mean(d)) for c, d in diffs.items()})
    draws = headlines(task, means)
    out = {}
    for name, d in observed.items():
        d = float(d)
        extreme = np.abs(draws[name] - d) >= abs(d) - 1e-12
        p = (1 + int(extreme.sum())) / (n_boot + 1) if d != 0 else 1.0
        out[name] = {"difference": d, "ci": _interval(draws[name]), "p": float(p)}
    return out
