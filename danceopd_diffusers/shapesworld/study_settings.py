"""A study root's settings: what every run and evaluation of it shares, kept in ``R/study.json`` so later calls
need no flags, checked before a stage does anything, and the small file and device helpers every stage uses.

The lowest layer of the study (:mod:`.study` is the command line): it knows no run, merge or report, so the grid,
the scheduler, the evaluation queue and the report all build on it without importing each other in a circle.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: the ShapesWorld folder (the shipped sources, the study's shipped results and STUDY.md live in it)
HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources"


@dataclass
class Settings:
    """What every run and evaluation of a study root shares (kept in ``R/study.json``)."""

    steps: int = 600
    checkpoint_every: int = 150
    batch_size: int = 64
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    rank: int = 32
    num_rollout_steps: int = 16
    source_cfg: float = 3.0
    jobs: int | None = None  # None: 3/8 of the cores on a GPU (6 of 16), 1 on a CPU
    eval_preset: str | None = None  # None: large on a GPU, quick on a CPU
    eval_per_category: int | None = None
    eval_limit: int | None = None
    curve_per_category: int = 64
    eval_inference_steps: int = 16
    device: str | None = None
    data: str | None = None  # default R/data
    sources: str = str(SOURCES)
    best_baselines: dict[str, str] = field(default_factory=dict)  # written by `seeds`
    #: where the runs that choose a state draw their query (``--query_space`` of the script): ``step`` is the
    #: paper's index law on ShapesWorld's unshifted grid (the first edition, mean σ 0.32); ``sigma`` reads it on
    #: the paper's shift-3 grid (mean σ 0.55, the second edition's calibration)
    query_space: str = "step"


#: the range of each numeric setting (None: open); checked before a stage does anything
SETTING_RANGES: dict[str, tuple[float, float | None]] = {
    "steps": (1, None),
    "checkpoint_every": (1, None),
    "batch_size": (1, None),
    "learning_rate": (1e-12, 1.0),
    "warmup_steps": (0, None),
    "rank": (1, None),
    "num_rollout_steps": (2, None),
    "source_cfg": (1e-12, None),
    "jobs": (1, 1024),
    "eval_per_category": (1, None),
    "eval_limit": (1, None),
    "curve_per_category": (1, None),
    "eval_inference_steps": (1, None),
}


def check_settings(settings: Settings) -> None:
    """Every setting of the right type and in range, as one ``error:`` line naming the flag (a value kept in
    ``R/study.json`` by an earlier call is named as such)."""
    for name, (low, high) in SETTING_RANGES.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SystemExit(f"error: --{name} is {value!r}; it must be a finite number.")
        if value < low or (high is not None and value > high):
            bounds = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise SystemExit(f"error: --{name} is {value}; it must be {bounds}.")
    if settings.eval_preset is not None and settings.eval_preset not in ("quick", "large"):
        raise SystemExit(f"error: --eval_preset {settings.eval_preset}: use quick or large")
    if settings.device is not None:
        import torch

        try:
            device = torch.device(settings.device)
        except (RuntimeError, ValueError):
            raise SystemExit(
                f"error: --device {settings.device!r} is not a device; pass cpu or cuda."
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(
                f"error: --device {settings.device} but torch sees no CUDA device; pass --device cpu."
            )
    for name in ("sources", "data"):
        value = getattr(settings, name)
        if value is not None and not Path(value).is_dir():
            raise SystemExit(f"error: --{name} {value} is not a folder; pass an existing one.")


def load_settings(root: Path, overrides: dict[str, Any], write: bool = True) -> Settings:
    """``R/study.json``'s settings with the flags given now on top; written back (``write``), so later calls
    need no flags. A damaged study.json or a bad value is one ``error:`` line, and nothing is written."""
    path = root / "study.json"
    known = {f.name for f in fields(Settings)}
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"error: {path} is not valid JSON ({' '.join(str(exc).split())[:200]}); fix or delete it (the flags "
            "of the next call rewrite it)."
        ) from exc
    if not isinstance(saved, dict):
        raise SystemExit(f"error: {path} must hold a JSON object of settings; fix or delete it.")
    values = {k: v for k, v in saved.items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    try:
        settings = Settings(**values)
    except TypeError as exc:
        raise SystemExit(f"error: {path}: {exc}; fix or delete it.") from exc
    check_settings(settings)
    if write:
        root.mkdir(parents=True, exist_ok=True)
        save_settings(root, settings)
    return settings


def save_settings(root: Path, settings: Settings) -> None:
    write_json(root / "study.json", asdict(settings))


def write_json(path: Path, data: Any) -> None:
    """Written whole or not at all (a temporary file renamed): a stage cut short never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def device_of(settings: Settings) -> str:
    """The device the study's runs and evaluations use: ``--device``, else CUDA where torch sees it."""
    import torch

    return settings.device or ("cuda" if torch.cuda.is_available() else "cpu")


def data_dir(root: Path, settings: Settings) -> Path:
    """Where the training buckets are: ``--data``, else ``R/data``."""
    return Path(settings.data) if settings.data else root / "data"


def check_inputs(root: Path, settings: Settings, buckets: set[str]) -> None:
    """The data folders and shipped sources a stage needs, before anything is launched."""
    data = data_dir(root, settings)
    missing = [b for b in sorted(buckets) if not (data / b / "metadata.jsonl").is_file()]
    if missing:
        raise SystemExit(
            f"error: {data}/{missing[0]}/metadata.jsonl does not exist: write the data first with "
            f"`VAE={Path(settings.sources) / 'base' / 'vae'} bash danceopd_diffusers/shapesworld/train_sources.sh "
            f"data {root}` (or pass --data)."
        )
    if not (Path(settings.sources) / "base" / "model_index.json").is_file():
        raise SystemExit(f"error: --sources {settings.sources} holds no base/ pipeline folder.")


def read_json(path: Path) -> dict | None:
    """A JSON result or record; a damaged one is an ``error:`` line naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"error: {path} is not valid JSON ({' '.join(str(exc).split())[:160]}); delete it and run the stage "
            "that writes it again."
        ) from exc
    return data if isinstance(data, dict) else None


def set_sizes(settings: Settings, curve: bool, device: str) -> tuple[tuple[int, int], int | None]:
    """(per-category sizes of T2I and edit, limit) of the curve set (``curve``) or of the final set: what every
    evaluation of a root is scored on, and what a result must have been scored on to count."""
    from .evaluate import PRESETS

    if curve:
        n = settings.curve_per_category
        return (n, n), settings.eval_limit
    if settings.eval_per_category:
        n = settings.eval_per_category
        return (n, n), settings.eval_limit
    preset = settings.eval_preset or ("large" if device.startswith("cuda") else "quick")
    return PRESETS[preset], settings.eval_limit
