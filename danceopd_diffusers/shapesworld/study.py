"""The ShapesWorld study (issue 10): DanceOPD against the paper's baselines in its two settings, the ablations,
CFG absorption, training length and seeds, stage by stage, many runs at once on one GPU.

    python -m danceopd_diffusers.shapesworld.study STAGE --root R [--jobs N] [--budget_s S] [--only PATTERN ...]

``R`` holds ``data/`` from ``VAE=<sources>/base/vae bash train_sources.sh data R``; the study writes ``R/configs``
(fields configs), ``R/runs/<name>`` (one train_danceopd.py output folder per run), ``R/merges/<name>`` (merged
LoRAs), ``R/evals/<name>/*.json`` and ``R/study.json`` (the settings, so later calls need no flags). Stages, in
order; each skips what is done, so a stage cut by a device-call limit is simply called again:

=========  =================================================================================================
plan       print every run, merge and evaluation with its command; runs nothing
merge      the weight-merging baselines (grid below) and setting B's merged init, with ``lora_merge``
main       settings A and B, one run per method: danceopd, dense, offpolicy, joint, soft (10 runs)
ablations  setting B: query mid / high, K = 4, init merged / global / base (6 runs; low, K = 1, init local and
           hard routing are main's B-danceopd, soft is B-soft)
cfg        CFG absorption from the T2I base, one field each: CFG α 1.5 / 3 / 5, APG and CFG-Zero* at 3 (5 runs)
train      main, ablations and cfg in one queue (main first), ``--jobs`` at a time
seeds      DanceOPD and each setting's best trained baseline at training seeds 1 and 2 (needs ``eval`` of main;
           baselines scored in the shipped ``results.json`` of ``--dest`` count too)
eval       score what is finished and not scored yet: each run's final LoRA and each teacher on the final set
           (``--eval_preset``, default large on a GPU), CFG students also with CFG β = 2; every checkpoint of the
           main runs and every merge on the curve set (``--curve_per_category``, default 64 per category), and
           then each setting's best merge on the final set
report     ``shapesworld/STUDY.md`` and its PNG plots from ``R`` (or, without ``--root``, from the shipped
           ``shapesworld/study/results.json``)
carry      start a new ``--dest`` (another query space on the same grid) from ``--carry_from``'s results that the
           query law does not change: dense, joint, merges, teachers (``--query_space`` names the new space)
ship       the main table's students (fp16 LoRAs) and every result into ``shapesworld/study/``, keeping what is
           there where the root has nothing better (a study finished on another machine); re-scores new files
=========  =================================================================================================

A training stage runs ``--jobs`` train_danceopd.py processes at once, every one with ``--resume_from_checkpoint
latest``. The default on a GPU is 3/8 of the CPU cores, 6 on an H200's 16: each run is bound by its host thread.
On the study's data, one DanceOPD run alone made 2.53 steps/s, 3 at once 6.33 in all and 6 at once 8.46
(``benchmarks/RESULTS.md``). 14 at once, beside the merges and the scorer's workers, made 6.5. With
``--budget_s`` the stage stops launching and sends SIGTERM to its runs when the time is up: each saves a
checkpoint and the next call resumes it. A run is done when its folder holds the final LoRA of ``--steps``
steps; a larger ``--steps`` later continues done runs from their last checkpoint.

**The grid.** All students: LoRA r32 on the shipped T2I base (``sources/base``), batch 64, AdamW lr 5e-4, constant
after 100 warm-up steps, N = 16 rollout steps, K = 1 low-noise query, fp32 + tf32, ``--steps`` (default 600)
updates, a checkpoint every ``--checkpoint_every`` (150: the curve points), seed 0; no CFG at inference (NFE 16).

- Setting A (T2I + Edit): fields base CFG 3 and the edit source (``sources/edit_lora``) with CFG 3; routes
  t2i -> base_cfg, local_edit and global_edit -> edit_cfg; init = the edit source LoRA.
- Setting B (Local + Global): fields the local and global experts, each with CFG 3; routes local_edit ->
  local_cfg, global_edit -> global_cfg, and t2i -> base_cfg. The paper's table B reports GenEval beside GEdit, and
  its experts keep T2I (0.79 / 0.81); ours lose it (0.38 / 0.06), so T2I keeps a route to the base's CFG, as in
  every other setting, rather than being measured untrained. Init = the local expert LoRA.
- Methods, same init, steps, batch, lr and data (``R/data/all``: t2i + local + global rows, one route per bucket,
  equal weights) in both settings: ``danceopd``; ``dense`` (DiffusionOPD, uniform weighting); ``offpolicy``;
  ``joint`` = ``--method sft`` on the same buckets (caption dropout 0.1, as the sources); ``soft`` =
  ``--routing soft`` (every sample's target the mean of the setting's fields, by route weight).
- Weight merging (no training; ``lora_merge``): A merges the base (a zero delta) with the edit source, so a
  merge is the edit delta scaled by λ: ``cat`` λ ∈ {0.25, 0.5, 0.75}; ``ties_svd`` and ``dare_linear_svd`` at
  density ∈ {0.3, 0.7} x λ ∈ {0.5, 1}. B merges the local and global experts with equal weights w: ``cat`` w ∈
  {0.5, 1}; ``ties_svd`` and ``dare_linear_svd`` at density ∈ {0.3, 0.7} x w ∈ {0.5, 1}. DARE draws with torch
  seed 0. The grid is scored on the curve set; its best point by the selection score (T2I overall + edit average
  / 10) / 2 is scored on the final set (which it was not chosen on) for the table; the report lists the grid. The merged init of the ablation is ``svd`` of local and global at 0.5 each, rank 32.
- Ablations (B): ``--query_strategy mid`` / ``high``; ``--query_k 4``; init merged / global / base (a fresh r32).
- CFG absorption: T2I data only, init = the base (fresh r32), one route t2i -> the field. The table: the teacher
  at its guidance (NFE 32), the student at guidance 1 (NFE 16), the student with CFG β = 2 (NFE 32).
- Seeds: DanceOPD and the best trained baseline of each setting by the selection score (dense, offpolicy or
  joint) at seeds 1 and 2, beside the main run's seed 0.
- Length: the main runs' checkpoints on the curve set give edit average and T2I against step.

Evaluation: ``shapesworld.evaluate`` with its 95 % bootstrap intervals; DanceOPD against each baseline with
``evaluate.compare`` (paired bootstrap over the same samples).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources"
SHIP_DIR = HERE / "study"
STUDY_MD = HERE / "STUDY.md"
#: the trainer, run as ``python -m train_danceopd``: the top-level module that ships in the wheel (and sits at the
#: root of a checkout), so the study runs from any install, not only from a checkout
TRAIN_MODULE = "train_danceopd"
#: the source LoRAs a study run starts from or merges (shipped in SOURCES)
SOURCE_LORAS = {
    "edit": "edit_lora.safetensors",
    "local": "local_edit_lora.safetensors",
    "global": "global_edit_lora.safetensors",
}
SETTINGS_NAMES = {"A": "Setting A: T2I + Edit", "B": "Setting B: Local + Global"}
SETTING_INIT = {"A": "edit", "B": "local"}
#: main-table methods: key -> (row label, method, extra flags)
METHODS = {
    "danceopd": ("DanceOPD", "danceopd", ()),
    "dense": ("DiffusionOPD (dense)", "dense", ()),
    "offpolicy": ("off-policy", "offpolicy", ()),
    "joint": ("joint training (sft)", "sft", ("--caption_dropout_prob", "0.1")),
    "soft": ("soft routing", "danceopd", ("--routing", "soft")),
}
TRAINED_BASELINES = ("dense", "offpolicy", "joint")
#: setting B ablations: name -> (group, row label, init key or None for a fresh LoRA, extra flags)
ABLATIONS = {
    "B-query-mid": ("query", "mid noise, Beta(5, 5)", "local", ("--query_strategy", "mid")),
    "B-query-high": ("query", "high noise, Beta(2, 5)", "local", ("--query_strategy", "high")),
    "B-k4": ("K", "K = 4 distinct states", "local", ("--query_k", "4")),
    "B-init-merged": ("init", "init merged (svd 0.5 / 0.5)", "merged", ()),
    "B-init-global": ("init", "init global expert", "global", ()),
    "B-init-base": ("init", "init base (fresh LoRA)", None, ()),
}
#: which main run is the reference row of each ablation group, and soft routing's row
ABLATION_REFERENCE = {
    "query": ("B-danceopd", "low noise, Beta(5, 2)"),
    "K": ("B-danceopd", "K = 1"),
    "init": ("B-danceopd", "init local expert"),
    "routing": ("B-danceopd", "hard routing"),
}
#: CFG absorption: run name -> (row label, teacher field spec on `base`)
CFG_FIELDS = {
    "cfg-1.5": ("CFG α = 1.5", {"type": "cfg", "of": "base", "scale": 1.5}),
    "cfg-3": ("CFG α = 3", {"type": "cfg", "of": "base", "scale": 3.0}),
    "cfg-5": ("CFG α = 5", {"type": "cfg", "of": "base", "scale": 5.0}),
    "cfg-apg": (
        "APG, scale 3",
        {
            "type": "guider",
            "of": "base",
            "guider": "AdaptiveProjectedGuidance",
            "guider_kwargs": {"guidance_scale": 3.0},
        },
    ),
    "cfg-zero": (
        "CFG-Zero*, scale 3",
        {
            "type": "guider",
            "of": "base",
            "guider": "ClassifierFreeZeroStarGuidance",
            "guider_kwargs": {"guidance_scale": 3.0},
        },
    ),
}
STUDENT_CFG_BETA = 2.0
MERGE_DENSITIES = (0.3, 0.7)


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


@dataclass(frozen=True)
class Run:
    name: str
    group: str  # A, B, ablation, cfg, seeds
    label: str
    method: str = "danceopd"
    fields: str | None = None  # config name under R/configs (None: sft's one route per bucket)
    data: str = "all"
    init: str | None = None  # a SOURCE_LORAS key, "merged", or None for a fresh LoRA on the base
    seed: int = 0
    flags: tuple[str, ...] = ()
    setting: str | None = None
    key: str | None = None  # METHODS key / ablation group / CFG_FIELDS key


@dataclass(frozen=True)
class Merge:
    name: str
    setting: str  # A, B or init
    label: str
    experts: tuple[str, ...]
    weights: tuple[float, ...]
    combination: str
    density: float | None = None
    svd_rank: int | None = None


@dataclass(frozen=True)
class Teacher:
    name: str
    label: str
    lora: str | None  # a SOURCE_LORAS key
    guidance_scale: float = 1.0
    guider: str | None = None
    guider_kwargs: tuple[tuple[str, float], ...] = ()


# ---------------------------------------------------------------------------------------------------------- plan
def fields_configs(settings: Settings) -> dict[str, dict]:
    """Every fields config of the study, by name (written to R/configs/<name>.yaml)."""
    src, cfg = Path(settings.sources), settings.source_cfg

    def setting(experts: dict[str, str | None]) -> dict:
        """Route each bucket to its expert's CFG field (None: the base's)."""
        config: dict = {"fields": {"base": {"type": "base"}}, "routes": []}
        for task, key in experts.items():
            name = key or "base"
            if key:
                config["fields"][key] = {"type": "lora", "path": str(src / SOURCE_LORAS[key])}
            config["fields"][f"{name}_cfg"] = {"type": "cfg", "of": name, "scale": cfg}
            config["routes"].append({"field": f"{name}_cfg", "task": task})
        return config

    configs = {
        "setting_a": setting({"t2i": None, "local_edit": "edit", "global_edit": "edit"}),
        "setting_b": setting({"t2i": None, "local_edit": "local", "global_edit": "global"}),
    }
    for name, (_, spec) in CFG_FIELDS.items():
        configs[name] = {
            "fields": {"base": {"type": "base"}, "teacher": spec},
            "routes": [{"field": "teacher"}],
        }
    return configs


def main_runs() -> list[Run]:
    runs = []
    for setting in ("A", "B"):
        for key, (label, method, flags) in METHODS.items():
            runs.append(
                Run(
                    f"{setting}-{key}",
                    setting,
                    label,
                    method,
                    None if method == "sft" else f"setting_{setting.lower()}",
                    init=SETTING_INIT[setting],
                    flags=flags,
                    setting=setting,
                    key=key,
                )
            )
    return runs


def ablation_runs() -> list[Run]:
    return [
        Run(name, "ablation", label, "danceopd", "setting_b", init=init, flags=flags, setting="B", key=group)
        for name, (group, label, init, flags) in ABLATIONS.items()
    ]


def cfg_runs() -> list[Run]:
    return [
        Run(name, "cfg", label, "danceopd", name, data="t2i", init=None, key=name)
        for name, (label, _) in CFG_FIELDS.items()
    ]


def seed_runs(settings: Settings) -> list[Run]:
    """Seeds 1 and 2 of DanceOPD and of each setting's best trained baseline (chosen by ``seeds``)."""
    runs = []
    for setting, best in sorted(settings.best_baselines.items()):
        for key in ("danceopd", best):
            main = next(r for r in main_runs() if r.name == f"{setting}-{key}")
            for seed in (1, 2):
                runs.append(
                    Run(
                        f"{main.name}-seed{seed}",
                        "seeds",
                        main.label,
                        main.method,
                        main.fields,
                        main.data,
                        main.init,
                        seed,
                        main.flags,
                        setting,
                        key,
                    )
                )
    return runs


def all_runs(settings: Settings) -> list[Run]:
    return main_runs() + ablation_runs() + cfg_runs() + seed_runs(settings)


def merges() -> list[Merge]:
    out = []
    for lam in (0.25, 0.5, 0.75):
        out.append(Merge(f"A-merge-cat-w{lam}", "A", f"linear (cat), λ = {lam}", ("edit",), (lam,), "cat"))
    for setting, experts in (("A", ("edit",)), ("B", ("local", "global"))):
        if setting == "B":
            for w in (0.5, 1.0):
                out.append(Merge(f"B-merge-cat-w{w}", "B", f"linear (cat), w = {w}", experts, (w, w), "cat"))
        for combination in ("ties_svd", "dare_linear_svd"):
            for density in MERGE_DENSITIES:
                for w in (0.5, 1.0):
                    name = f"{setting}-merge-{combination}-d{density}-w{w}"
                    label = f"{combination}, density {density}, {'λ' if setting == 'A' else 'w'} = {w}"
                    out.append(
                        Merge(name, setting, label, experts, (w,) * len(experts), combination, density)
                    )
    out.append(Merge("init-merged", "init", "svd of local + global, 0.5 each, rank 32", ("local", "global"),
                     (0.5, 0.5), "svd", svd_rank=32))  # fmt: skip
    return out


def teachers(settings: Settings) -> list[Teacher]:
    cfg = settings.source_cfg
    out = [
        Teacher("base-nocfg", "T2I base, no CFG", None),
        Teacher("source-base", f"T2I base, CFG {cfg:g}", None, cfg),
        Teacher("source-edit", f"edit source, CFG {cfg:g}", "edit", cfg),
        Teacher("source-local", f"local-edit expert, CFG {cfg:g}", "local", cfg),
        Teacher("source-global", f"global-edit expert, CFG {cfg:g}", "global", cfg),
    ]
    for name, (label, spec) in CFG_FIELDS.items():
        if spec["type"] == "cfg":
            out.append(Teacher(f"teacher-{name}", label, None, spec["scale"]))
        else:
            out.append(
                Teacher(f"teacher-{name}", label, None, guider=spec["guider"],
                        guider_kwargs=tuple(sorted(spec["guider_kwargs"].items())))
            )  # fmt: skip
    return out


def selected(names: list[str], only: list[str] | None) -> list[str]:
    if not only:
        return names
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in only)]


# ------------------------------------------------------------------------------------------------------ settings
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


def has_results(collection: dict[str, Any]) -> bool:
    """Whether a collection holds any scored result (a run, a merge or a teacher evaluated)."""
    runs = collection.get("runs", {}).values()
    merges_ = collection.get("merges", {}).values()
    teachers_ = collection.get("teachers", {}).values()
    return (
        any(r.get("final") or r.get("cfg2") or r.get("curve") for r in runs)
        or any(m.get("final") or m.get("select") for m in merges_)
        or any(t.get("final") for t in teachers_)
    )


def save_settings(root: Path, settings: Settings) -> None:
    _write_json(root / "study.json", asdict(settings))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _device(settings: Settings) -> str:
    import torch

    return settings.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _data_dir(root: Path, settings: Settings) -> Path:
    return Path(settings.data) if settings.data else root / "data"


def check_inputs(root: Path, settings: Settings, buckets: set[str]) -> None:
    """The data folders and shipped sources a stage needs, before anything is launched."""
    data = _data_dir(root, settings)
    missing = [b for b in sorted(buckets) if not (data / b / "metadata.jsonl").is_file()]
    if missing:
        raise SystemExit(
            f"error: {data}/{missing[0]}/metadata.jsonl does not exist: write the data first with "
            f"`VAE={Path(settings.sources) / 'base' / 'vae'} bash danceopd_diffusers/shapesworld/train_sources.sh "
            f"data {root}` (or pass --data)."
        )
    if not (Path(settings.sources) / "base" / "model_index.json").is_file():
        raise SystemExit(f"error: --sources {settings.sources} holds no base/ pipeline folder.")


# ---------------------------------------------------------------------------------------------------- training
def init_path(root: Path, settings: Settings, init: str | None) -> Path | None:
    if init is None:
        return None
    if init == "merged":
        return root / "merges" / "init-merged" / "pytorch_lora_weights.safetensors"
    return Path(settings.sources) / SOURCE_LORAS[init]


def trainer_search_path() -> str:
    """The folder from which this interpreter imports ``train_danceopd`` (site-packages for an install, the
    checkout for a source tree on ``sys.path``): prepended to each run's ``PYTHONPATH``, so the runs execute the
    module this process would import, whatever their working directory."""
    import importlib.util

    spec = importlib.util.find_spec(TRAIN_MODULE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"error: the trainer module {TRAIN_MODULE} is not importable: install the package (`pip install "
            "danceopd-diffusers` from a wheel, or `pip install -e .` in a checkout) and run the study again."
        )
    return str(Path(spec.origin).resolve().parent)


def train_command(run: Run, root: Path, settings: Settings, cuda: bool) -> list[str]:
    """The train_danceopd.py command line of a run (always resumable)."""
    s = settings
    cmd = [
        sys.executable,
        "-m",
        TRAIN_MODULE,
        "--pretrained_model_name_or_path",
        str(Path(s.sources) / "base"),
    ]
    cmd += ["--dataset_name", str(_data_dir(root, s) / run.data / "metadata.jsonl")]
    cmd += ["--output_dir", str(root / "runs" / run.name), "--method", run.method]
    if run.fields:
        cmd += ["--fields_config", str(root / "configs" / f"{run.fields}.yaml")]
    init = init_path(root, s, run.init)
    cmd += ["--student_init", str(init)] if init else ["--rank", str(s.rank)]
    cmd += [
        "--resolution",
        "64",
        "--max_sequence_length",
        "32",
        "--num_rollout_steps",
        str(s.num_rollout_steps),
    ]
    cmd += ["--train_batch_size", str(s.batch_size), "--gradient_accumulation_steps", "1"]
    cmd += ["--learning_rate", str(s.learning_rate), "--lr_scheduler", "constant_with_warmup"]
    cmd += ["--lr_warmup_steps", str(s.warmup_steps), "--max_train_steps", str(s.steps)]
    cmd += ["--checkpointing_steps", str(s.checkpoint_every), "--validation_steps", "1000000"]
    cmd += ["--cache_latents", "--allow_tf32", "--report_to", "none", "--seed", str(run.seed)]
    cmd += ["--skip_pipeline_export", "--resume_from_checkpoint", "latest"]
    if cuda:
        cmd.append("--cuda_graphs")
    if s.query_space != "step" and run.method in ("danceopd", "offpolicy"):
        cmd += ["--query_space", s.query_space]
    return cmd + list(run.flags)


def run_done(root: Path, run: Run, settings: Settings) -> bool:
    out = root / "runs" / run.name
    config = out / "danceopd_config.json"
    if not (out / "pytorch_lora_weights.safetensors").is_file() or not config.is_file():
        return False
    return json.loads(config.read_text()).get("args", {}).get("max_train_steps", 0) >= settings.steps


def write_configs(root: Path, settings: Settings) -> None:
    import yaml

    for name, config in fields_configs(settings).items():
        path = root / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))


def train_stage(
    runs: list[Run], root: Path, settings: Settings, budget_s: float | None = None, log: Any = print
) -> int:
    """Run ``runs`` ``jobs`` at a time; returns the number of failed runs. Finished runs are skipped; with a
    budget, runs still going when it is spent get SIGTERM (they checkpoint and stop) and resume next call."""
    import torch

    cuda = _device(settings).startswith("cuda") and torch.cuda.is_available()
    jobs = settings.jobs or (max(1, (os.cpu_count() or 4) * 3 // 8) if cuda else 1)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    trainer_path = trainer_search_path()
    write_configs(root, settings)
    pending = []
    for run in runs:
        if run_done(root, run, settings):
            log(f"[study] {run.name}: done ({settings.steps} steps), skipped")
        elif run.init == "merged" and not init_path(root, settings, "merged").is_file():
            log(f"[study] {run.name}: needs the merged init: run the `merge` stage first; skipped")
        else:
            pending.append(run)
    start = time.monotonic()
    running: dict[str, tuple[subprocess.Popen, float, Run, Any]] = {}
    failed = 0
    stop = {"signal": None}
    stopping: set[str] = set()

    def on_signal(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            out_of_time = budget_s is not None and time.monotonic() - start > budget_s
            if out_of_time or stop["signal"]:
                pending.clear()
                for name, (proc, *_) in running.items():
                    if proc.poll() is None and name not in stopping:  # once: a second SIGTERM kills
                        proc.send_signal(signal.SIGTERM)
                        stopping.add(name)
            while pending and len(running) < jobs:
                run = pending.pop(0)
                out = root / "runs" / run.name
                out.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [trainer_path, env.get("PYTHONPATH")]))
                logfile = open(out / "train.log", "a", encoding="utf-8")
                cmd = train_command(run, root, settings, cuda)
                logfile.write(f"\n[study] {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {' '.join(cmd)}\n")
                logfile.flush()
                proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, cwd=root)
                running[run.name] = (proc, time.monotonic(), run, logfile)
                log(f"[study] {run.name}: launched ({len(running)} running, {len(pending)} waiting)")
            for name, (proc, started, _run, logfile) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                logfile.close()
                seconds = time.monotonic() - started
                _record_launch(root / "runs" / name, seconds, rc, jobs)
                del running[name]
                if rc == 0:
                    log(f"[study] {name}: finished in {seconds:.0f} s")
                elif name in stopping or rc in (128 + signal.SIGTERM, 128 + signal.SIGINT):
                    log(
                        f"[study] {name}: stopped after {seconds:.0f} s with its state saved; call the stage again"
                    )
                else:
                    failed += 1
                    tail = (root / "runs" / name / "train.log").read_text().splitlines()[-15:]
                    log(f"[study] {name}: FAILED (exit {rc}); the end of its train.log:\n" + "\n".join(tail))
            time.sleep(0.5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return failed


def _record_launch(folder: Path, seconds: float, rc: int, jobs: int) -> None:
    path = folder / "study_run.json"
    record = json.loads(path.read_text()) if path.is_file() else {"launches": []}
    record["launches"].append({"seconds": round(seconds, 1), "exit": rc, "jobs": jobs})
    _write_json(path, record)


# ------------------------------------------------------------------------------------------------------- merges
def merge_stage(items: list[Merge], root: Path, settings: Settings, log: Any = print) -> None:
    import torch

    from ..lora_merge import merge_and_save

    for merge in items:
        out = root / "merges" / merge.name
        if (out / "pytorch_lora_weights.safetensors").is_file():
            log(f"[study] {merge.name}: merged already, skipped")
            continue
        started = time.monotonic()
        torch.manual_seed(0)  # DARE's random drops
        loras = [str(Path(settings.sources) / SOURCE_LORAS[e]) for e in merge.experts]
        merge_and_save(
            str(Path(settings.sources) / "base"),
            loras,
            list(merge.weights),
            out,
            merge.combination,
            merge.density,
            merge.svd_rank,
        )
        _write_json(out / "study_merge.json", {"seconds": round(time.monotonic() - started, 1)})
        log(f"[study] {merge.name}: merged ({merge.label})")


# --------------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalItem:
    name: str  # run, merge or teacher name
    kind: str  # final, cfg2 or step-XXXXXX
    lora: Path | None
    guidance_scale: float = 1.0
    guider: tuple[str, dict] | None = None
    curve: bool = False

    def path(self, root: Path) -> Path:
        return root / "evals" / self.name / f"{self.kind}.json"


def _set_sizes(settings: Settings, curve: bool, device: str) -> tuple[tuple[int, int], int | None]:
    from .evaluate import PRESETS

    if curve:
        n = settings.curve_per_category
        return (n, n), settings.eval_limit
    if settings.eval_per_category:
        n = settings.eval_per_category
        return (n, n), settings.eval_limit
    preset = settings.eval_preset or ("large" if device.startswith("cuda") else "quick")
    return PRESETS[preset], settings.eval_limit


def eval_items(root: Path, settings: Settings, only: list[str] | None) -> list[EvalItem]:
    """Everything to score, most important first: finals, teachers, merges, CFG β = 2, then the curves."""
    runs = {r.name: r for r in all_runs(settings)}
    names = selected(list(runs), only)
    finals, extra, curves = [], [], []
    for name in names:
        run = runs[name]
        out = root / "runs" / name
        if run_done(root, run, settings):
            finals.append(EvalItem(name, "final", out / "pytorch_lora_weights.safetensors"))
            if run.group == "cfg":
                extra.append(
                    EvalItem(name, "cfg2", out / "pytorch_lora_weights.safetensors", STUDENT_CFG_BETA)
                )
        if run.group in ("A", "B"):
            from ..checkpointing import checkpoint_step, list_checkpoints

            for ckpt in list_checkpoints(out) if out.is_dir() else []:
                lora = ckpt / "pytorch_lora_weights.safetensors"
                # regular checkpoints only (a run stopped by SIGTERM also saves one where it stopped)
                if lora.is_file() and checkpoint_step(ckpt) % settings.checkpoint_every == 0:
                    curves.append(EvalItem(name, f"step-{checkpoint_step(ckpt):06d}", lora, curve=True))
    teacher_items = []
    for t in teachers(settings):
        if selected([t.name], only):
            lora = Path(settings.sources) / SOURCE_LORAS[t.lora] if t.lora else None
            guider = (t.guider, dict(t.guider_kwargs)) if t.guider else None
            teacher_items.append(EvalItem(t.name, "final", lora, t.guidance_scale, guider))
    merge_items = []
    device = _device(settings)
    select_sizes, select_limit = _set_sizes(settings, True, device)
    for setting in ("A", "B"):
        grid = [m for m in merges() if m.setting == setting and selected([m.name], only)]
        loras = [(m.name, root / "merges" / m.name / "pytorch_lora_weights.safetensors") for m in grid]
        loras = [(name, lora) for name, lora in loras if lora.is_file()]
        scored = []
        for name, lora in loras:
            item = EvalItem(name, "select", lora, curve=True)
            merge_items.append(item)
            if _eval_current(item, root, select_sizes, select_limit):
                scored.append((selection_score(_read(item.path(root))), name, lora))
        if loras and len(scored) == len(loras):  # the best point of the grid merged so far: on the final set
            _, name, lora = max(scored, key=lambda row: _merge_rank(row[0], row[1]))
            merge_items.append(EvalItem(name, "final", lora))
    return finals + teacher_items + merge_items + extra + curves


def _eval_current(item: EvalItem, root: Path, sizes: tuple[int, int], limit: int | None) -> bool:
    path = item.path(root)
    if not path.is_file():
        return False
    result = json.loads(path.read_text())
    same_set = (
        result.get("per_category") == {"t2i": sizes[0], "edit": sizes[1]} and result.get("limit") == limit
    )
    newer = item.lora is None or path.stat().st_mtime >= item.lora.stat().st_mtime
    return same_set and newer


def eval_stage(
    root: Path,
    settings: Settings,
    only: list[str] | None = None,
    budget_s: float | None = None,
    log: Any = print,
) -> int:
    """Score every item not scored yet on its set; returns how many are still to do (0 = all done)."""
    from .evaluate import device_defaults

    device = _device(settings)
    batch_size, workers = device_defaults(device, None, None)
    base = str(Path(settings.sources) / "base")
    start = time.monotonic()
    left, done_now = 0, 1
    while done_now and not left:  # again, for items that scoring others made due (a merge grid's best point)
        done_now, left = _eval_items_once(
            root, settings, only, budget_s, start, base, batch_size, workers, log
        )
    if left:
        log(f"[study] eval: {left} evaluations left for the next call (budget spent)")
    return left


def _eval_items_once(
    root: Path,
    settings: Settings,
    only: list[str] | None,
    budget_s: float | None,
    start: float,
    base: str,
    batch_size: int,
    workers: int,
    log: Any,
) -> tuple[int, int]:
    """One pass over the items due; returns (scored now, left for lack of time)."""
    from .evaluate import evaluate, load_pipeline

    device = _device(settings)
    left = done = 0
    for item in eval_items(root, settings, only):
        sizes, limit = _set_sizes(settings, item.curve, device)
        if _eval_current(item, root, sizes, limit):
            continue
        if budget_s is not None and time.monotonic() - start > budget_s:
            left += 1
            continue
        done += 1
        guider = None
        if item.guider is not None:
            from diffusers import guiders

            guider = getattr(guiders, item.guider[0])(**item.guider[1])
        pipe, family = load_pipeline(base, str(item.lora) if item.lora else None, device)
        result = evaluate(
            pipe,
            family,
            guidance_scale=item.guidance_scale,
            num_steps=settings.eval_inference_steps,
            batch_size=batch_size,
            limit=limit,
            progress=False,
            per_category=sizes,
            score_workers=workers,
            guider=guider,
        )
        result = {k: v for k, v in result.items() if not k.startswith("_")}
        _write_json(item.path(root), result)
        edit = result["edit"].get("average", float("nan"))
        log(f"[study] eval {item.name} {item.kind}: T2I {result['t2i']['overall']:.3f}, edit {edit:.2f}")
    return done, left


# ------------------------------------------------------------------------------------------------------ collect
def _read(path: Path) -> dict | None:
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


def collect(root: Path, settings: Settings) -> dict[str, Any]:
    """Every result of a study root in one JSON-ready mapping: what `report` reads and `ship` ships."""
    from ..checkpointing import checkpoint_step, list_checkpoints

    device = _device(settings)
    final_sizes, final_limit = _set_sizes(settings, False, device)
    curve_sizes, curve_limit = _set_sizes(settings, True, device)

    def final(name: str, kind: str = "final") -> dict | None:
        result = _read(root / "evals" / name / f"{kind}.json")
        if result is None or result.get("per_category") != {"t2i": final_sizes[0], "edit": final_sizes[1]}:
            return None
        return result if result.get("limit") == final_limit else None

    runs = {}
    for run in all_runs(settings):
        folder = root / "runs" / run.name
        if not folder.is_dir():
            continue
        record = _read(folder / "study_run.json") or {"launches": []}
        curve = {}
        for path in sorted((root / "evals" / run.name).glob("step-*.json")):
            result = _read(path)
            if result.get("per_category") == {"t2i": curve_sizes[0], "edit": curve_sizes[1]}:
                curve[int(path.stem.split("-")[1])] = result
        done = run_done(root, run, settings)
        steps = [checkpoint_step(c) for c in list_checkpoints(folder)]
        runs[run.name] = {
            **{k: v for k, v in asdict(run).items() if k != "flags"},
            "flags": list(run.flags),
            "done": done,
            "reached": settings.steps if done else max(steps, default=0),
            "wall_s": round(sum(x["seconds"] for x in record["launches"]), 1),
            "jobs": max((x["jobs"] for x in record["launches"]), default=None),
            "launches": len(record["launches"]),
            "final": final(run.name),
            "cfg2": final(run.name, "cfg2"),
            "curve": curve,
        }
    merged = {}
    for m in merges():
        if m.setting == "init":
            continue
        record = _read(root / "merges" / m.name / "study_merge.json") or {}
        select = _read(root / "evals" / m.name / "select.json")
        if select and select.get("per_category") != {"t2i": curve_sizes[0], "edit": curve_sizes[1]}:
            select = None
        merged[m.name] = {
            **asdict(m),
            "seconds": record.get("seconds"),
            "select": select,
            "final": final(m.name),
        }
    return {
        "settings": asdict(settings),
        "runs": runs,
        "merges": merged,
        "teachers": {t.name: {"label": t.label, "final": final(t.name)} for t in teachers(settings)},
    }


# ------------------------------------------------------------------------------------------------------- report
def selection_score(result: dict | None) -> float:
    """How `best` is chosen among merges and baselines: the mean of T2I overall and edit average / 10."""
    if not result or "overall" not in result["t2i"] or "average" not in result["edit"]:
        return -math.inf
    return (result["t2i"]["overall"] + result["edit"]["average"] / 10) / 2


def _headline(result: dict | None, task: str, name: str, digits: int, ci: bool = True) -> str:
    if not result or name not in result.get(task, {}):
        return "not run"
    text = f"{result[task][name]:.{digits}f}"
    interval = result.get("ci", {}).get(task, {}).get(name)
    if ci and interval:
        text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return text


def _wall(seconds: float | None, jobs: int | None = None) -> str:
    if not seconds:
        return "-"
    text = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return text + (f" ({jobs} at once)" if jobs and jobs > 1 else "")


def best_merge(collection: dict, setting: str) -> tuple[str, dict] | None:
    """The grid point chosen on the selection set (the curve set), reported on the final set."""
    rows = [(n, m) for n, m in collection["merges"].items() if m["setting"] == setting and m.get("select")]
    return max(rows, key=lambda row: _merge_rank(selection_score(row[1]["select"]), row[0])) if rows else None


def _merge_rank(score: float, name: str) -> tuple[float, str]:
    """Best selection score first; ties (TIES and DARE of one LoRA at one weight can be the same merge) go to the
    last name in sort order, so `eval` and the report pick the same point."""
    return score, name


def best_trained_baseline(collection: dict, setting: str) -> str | None:
    scored = [
        (selection_score((collection["runs"].get(f"{setting}-{k}") or {}).get("final")), k)
        for k in TRAINED_BASELINES
    ]
    scored = [row for row in scored if row[0] > -math.inf]
    return max(scored)[1] if scored else None


def _setting_rows(collection: dict, setting: str) -> list[tuple[str, dict | None, str]]:
    """(row label, final result, wall time) of a setting's table: its sources, then the methods."""
    sources = [("source-base", None), ("source-edit", None)] if setting == "A" else [
        ("source-base", None), ("source-local", None), ("source-global", None)]  # fmt: skip
    rows = []
    for name, _ in sources:
        t = collection["teachers"].get(name) or {}
        rows.append((f"*source:* {t.get('label', name)}", t.get("final"), "-"))
    steps = collection["settings"]["steps"]
    for key in METHODS:
        run = collection["runs"].get(f"{setting}-{key}") or {}
        label = METHODS[key][0]
        if run and not run.get("done"):
            label += f" (unfinished: step {run.get('reached', 0)} of {steps})"
        rows.append((label, run.get("final"), _wall(run.get("wall_s"), run.get("jobs"))))
        if key == "joint":
            best = best_merge(collection, setting)
            label = f"weight merge (best: {best[1]['label']})" if best else "weight merge"
            rows.append(
                (label, best[1]["final"] if best else None, _wall(best[1]["seconds"]) if best else "-")
            )
    return rows


def _main_table(rows: list[tuple[str, dict | None, str]]) -> list[str]:
    lines = [
        "| method | T2I overall [95 % CI] | local avg | global avg | edit avg [95 % CI] | NFE | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, result, wall in rows:
        nfe = result["nfe_per_image"] if result else "-"
        lines.append(
            f"| {label} | {_headline(result, 't2i', 'overall', 3)} | {_headline(result, 'edit', 'local', 2, False)} | "
            f"{_headline(result, 'edit', 'global', 2, False)} | {_headline(result, 'edit', 'average', 2)} | {nfe} | "
            f"{wall} |"
        )
    return lines


def _comparisons(collection: dict, setting: str) -> list[str]:
    ours = (collection["runs"].get(f"{setting}-danceopd") or {}).get("final")
    baselines = [
        (METHODS[k][0], (collection["runs"].get(f"{setting}-{k}") or {}).get("final"))
        for k in METHODS
        if k != "danceopd"
    ]
    best = best_merge(collection, setting)
    baselines.append(("weight merge (best)", best[1]["final"] if best else None))
    return _comparison_rows(ours, baselines)


def _comparison_rows(ours: dict | None, baselines: list[tuple[str, dict | None]]) -> list[str]:
    """Paired-bootstrap differences (DanceOPD − baseline) over the same samples, one row per baseline."""
    from .evaluate import compare

    lines = [
        "| baseline | Δ edit avg (DanceOPD − baseline) [95 % CI] | p | Δ T2I overall [95 % CI] | p |",
        "|---|---|---|---|---|",
    ]
    for label, theirs in baselines:
        if ours is None or theirs is None or "samples" not in ours or "samples" not in theirs:
            lines.append(f"| {label} | no result to compare | | | |")
            continue
        try:
            diff = compare(theirs, ours)
        except ValueError as exc:
            lines.append(f"| {label} | not comparable: {exc} | | | |")
            continue
        cells = []
        for task, name, digits in (("edit", "average", 2), ("t2i", "overall", 3)):
            d = diff[task].get(name)
            if d is None:
                cells += ["-", "-"]
                continue
            lo, hi = d["ci"]
            cells += [f"{d['difference']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]", f"{d['p']:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _equal_updates(collection: dict, setting: str) -> list[str]:
    """Every method of a setting at the last step all of them reached (their checkpoints on the curve set), beside
    the merge grid's best point on that same set: a like-for-like table while some runs are unfinished."""
    curves = {
        k: {
            int(step): r
            for step, r in ((collection["runs"].get(f"{setting}-{k}") or {}).get("curve") or {}).items()
        }
        for k in METHODS
    }
    shared = set.intersection(*(set(c) for c in curves.values())) if all(curves.values()) else set()
    if not shared:
        return []
    step = max(shared)
    size = collection["settings"]["curve_per_category"]
    rows = [(METHODS[k][0], curves[k][step], "-") for k in METHODS]
    best = best_merge(collection, setting)
    if best:
        rows.append((f"weight merge (best: {best[1]['label']}; no training)", best[1]["select"], "-"))
    lines = [
        "",
        f"Every method after the same {step} updates (setting {setting}; curve set, {size} per category):",
        "",
    ]
    lines += _main_table(rows)
    ours = curves["danceopd"][step]
    if "samples" in ours:
        lines += ["", f"DanceOPD against each baseline at step {step}:", ""]
        lines += _comparison_rows(ours, [(label, r) for label, r, _ in rows[1:]])
    return lines


def _paired(ours: dict | None, theirs: dict | None) -> dict | None:
    """DanceOPD (``ours``) − ``theirs`` on edit average and T2I overall over the same samples, or None."""
    from .evaluate import compare

    if not ours or not theirs or "samples" not in ours or "samples" not in theirs:
        return None
    try:
        diff = compare(theirs, ours)
    except ValueError:
        return None
    return {"edit": diff["edit"].get("average"), "t2i": diff["t2i"].get("overall")}


def _ahead(d: dict | None) -> str:
    """The verdict of one paired edit-average difference: ahead / not significant / behind."""
    if d is None:
        return "not run"
    lo, hi = d["ci"]
    text = f"{d['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}], p = {d['p']:.3f}"
    if d["difference"] > 0 and d["p"] < 0.05:
        return f"ahead: {text}"
    if d["difference"] < 0 and d["p"] < 0.05:
        return f"**behind**: {text}"
    return f"**not significant**: {text}"


def _claims_section(collection: dict) -> list[str]:
    """The paper's claims (the issue's target), each checked on the final set with paired comparisons: what holds,
    what does not, and what is not run yet."""
    runs = collection["runs"]
    final = lambda name: (runs.get(name) or {}).get("final")  # noqa: E731
    lines = [
        "## The paper's claims, checked",
        "",
        "Final set, DanceOPD minus the other row on the edit average, paired bootstrap (95 % CI, two-sided p); a "
        "claim holds when the difference is positive with p < 0.05.",
        "",
        "| claim | against | verdict |",
        "|---|---|---|",
    ]
    for setting in ("A", "B"):
        ours = final(f"{setting}-danceopd")
        rows = [(METHODS[k][0], final(f"{setting}-{k}")) for k in METHODS if k != "danceopd"]
        best = best_merge(collection, setting)
        rows.append(("weight merge (best)", best[1]["final"] if best else None))
        for label, theirs in rows:
            d = _paired(ours, theirs)
            lines.append(f"| {setting}: DanceOPD ahead on edits | {label} | {_ahead(d and d['edit'])} |")
        scored = [(label, r) for label, r in rows if r and "overall" in r["t2i"]]
        if ours and scored:
            label, strongest = max(scored, key=lambda row: row[1]["t2i"]["overall"])
            d = (_paired(ours, strongest) or {}).get("t2i")
            if d is not None:
                lo, hi = d["ci"]
                worse = hi < 0
                verdict = (
                    f"{'**worse**' if worse else 'no worse'}: {d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                )
                lines.append(
                    f"| {setting}: T2I no worse than the best baseline | {label} (best T2I) | {verdict} |"
                )
    ablations = [
        ("B: hard routing > soft", "B-soft", "soft routing"),
        ("B: low-noise queries > mid", "B-query-mid", "mid noise"),
        ("B: low-noise queries > high", "B-query-high", "high noise"),
        ("B: K = 1 ≥ K = 4", "B-k4", "K = 4"),
        ("B: local-expert init best", "B-init-merged", "init merged"),
        ("B: local-expert init best", "B-init-global", "init global expert"),
        ("B: local-expert init best", "B-init-base", "init base"),
    ]
    ours = final("B-danceopd")
    for claim, name, label in ablations:
        d = _paired(ours, final(name))
        verdict = _ahead(d and d["edit"])
        if claim.startswith("B: K = 1") and d is not None and not verdict.startswith("**behind"):
            verdict = "holds (" + verdict.split(": ", 1)[1] + ")"  # ≥: a tie is enough
        lines.append(f"| {claim} | {label} | {verdict} |")
    return lines + [""]


def _status_section(collection: dict) -> list[str]:
    """Which runs are done, unfinished (and where they stopped) or not started: a partial study says so."""
    steps = collection["settings"]["steps"]
    done, unfinished, missing = [], [], []
    for run in _run_names(collection):
        r = collection["runs"].get(run)
        if r and r.get("done"):
            done.append(run)
        elif r:
            unfinished.append(f"{run} (step {r.get('reached', 0)})")
        else:
            missing.append(run)
    if not unfinished and not missing:
        return []
    lines = ["## Status of the runs", ""]
    lines.append(f"- done ({steps} steps): {', '.join(done) or 'none'}")
    lines.append(f"- unfinished: {', '.join(unfinished) or 'none'}")
    lines.append(f"- not started: {', '.join(missing) or 'none'}")
    return lines + [""]


def _run_names(collection: dict) -> list[str]:
    settings = Settings(
        **{k: v for k, v in collection["settings"].items() if k in {f.name for f in fields(Settings)}}
    )
    return [r.name for r in all_runs(settings)]


def _ci(result: dict | None, task: str, name: str) -> tuple[float, float] | None:
    interval = (result or {}).get("ci", {}).get(task, {}).get(name)
    return tuple(interval) if interval else None


def write_report(collection: dict, out: Path, backend: str = "auto", source: str = "") -> Path:
    """STUDY.md and its plots (in ``out.parent/study/plots``) from a collection."""
    from .plots import line_chart

    plots = out.parent / "study" / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    s = collection["settings"]
    runs = collection["runs"]
    lines = [
        "# The ShapesWorld study (issue 10)",
        "",
        f"Written by `python -m danceopd_diffusers.shapesworld.study report` from {source or 'a study root'}; "
        "the module docstring of `shapesworld/study.py` gives the grid and the commands. Do not edit by hand.",
        "",
        f"Students: LoRA r{s['rank']}, {s['steps']} steps, batch {s['batch_size']}, lr {s['learning_rate']:g} "
        f"(constant after {s['warmup_steps']} warm-up steps), N = {s['num_rollout_steps']}, sources with CFG "
        f"{s['source_cfg']:g}; students sampled without CFG, {s['eval_inference_steps']} steps. Intervals: 95 % "
        "stratified bootstrap; p: paired bootstrap over the same samples (`evaluate compare`). Wall time: training "
        "time of the run, start-up included, with the number of runs sharing the GPU.",
        "",
        QUERY_REGIMES[s.get("query_space", "step")],
        "",
    ]
    history = [
        f"Shipped on {h['date']} from the study root `{h['root']}`: "
        + (f"runs {', '.join(h['runs'])}" if h["runs"] else "no runs")
        + (f"; files written: {', '.join(h['files'])}." if h["files"] else "; no files written.")
        for h in collection.get("history", [])
    ]
    if collection.get("notes") or history:  # where results did not come from one study root
        lines += ["Provenance:", ""] + [f"- {note}" for note in collection.get("notes", []) + history] + [""]
    for setting in ("A", "B"):
        lines += (
            [f"## {SETTINGS_NAMES[setting]}", ""] + _main_table(_setting_rows(collection, setting)) + [""]
        )
        lines += [f"DanceOPD against each baseline (setting {setting}):", ""] + _comparisons(
            collection, setting
        )
        lines += _equal_updates(collection, setting)
        grid = [
            (m["label"], m.get("select"), _wall(m["seconds"]))
            for m in collection["merges"].values()
            if m["setting"] == setting
        ]
        lines += [
            "",
            f"Weight-merging grid (setting {setting}), scored on the selection set ({s['curve_per_category']} per "
            "category, the curve set); the point with the best (T2I + edit / 10) / 2 there is the table's row, "
            "scored on the final set:",
            "",
        ]
        lines += _main_table(grid) + [""]
        series_edit, series_t2i = {}, {}
        for key in METHODS:
            curve = (runs.get(f"{setting}-{key}") or {}).get("curve") or {}
            points = sorted((int(step), r) for step, r in curve.items())
            if points:
                series_edit[METHODS[key][0]] = [(x, r["edit"].get("average", 0.0)) for x, r in points]
                series_t2i[METHODS[key][0]] = [(x, r["t2i"].get("overall", 0.0)) for x, r in points]
        if series_edit:
            tag = setting.lower()
            line_chart(
                plots / f"length_edit_{tag}.png",
                f"{SETTINGS_NAMES[setting]}: edit average",
                "step",
                "edit average (0-10)",
                series_edit,
                backend,
            )
            line_chart(
                plots / f"length_t2i_{tag}.png",
                f"{SETTINGS_NAMES[setting]}: T2I overall",
                "step",
                "T2I overall (0-1)",
                series_t2i,
                backend,
            )
            lines += [f"Training length (curve set: {s['curve_per_category']} per category):", ""]
            steps = sorted({x for points in series_edit.values() for x, _ in points})
            lines += ["| method | " + " | ".join(f"step {x}" for x in steps) + " |"]
            lines += ["|---" * (1 + len(steps)) + "|"]
            for label in series_edit:
                at = {x: (e, t) for (x, e), (_, t) in zip(series_edit[label], series_t2i[label])}
                cells = [f"{at[x][0]:.2f} / {at[x][1]:.3f}" if x in at else "-" for x in steps]
                lines.append(f"| {label} (edit / T2I) | " + " | ".join(cells) + " |")
            lines += ["", f"![edit average vs step](study/plots/length_edit_{tag}.png) "
                      f"![T2I vs step](study/plots/length_t2i_{tag}.png)", ""]  # fmt: skip
    lines += _claims_section(collection)
    lines += _status_section(collection)
    lines += _ablation_section(collection, plots, backend)
    lines += _cfg_section(collection)
    lines += _seeds_section(collection)
    lines += _compute_section(collection)
    lines += _rescored_section(collection)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _ablation_section(collection: dict, plots: Path, backend: str) -> list[str]:
    from .plots import bar_chart

    runs = collection["runs"]
    groups: dict[str, list[tuple[str, dict | None]]] = {}
    for group, (reference, label) in ABLATION_REFERENCE.items():
        groups[group] = [(label, (runs.get(reference) or {}).get("final"))]
    for name, (group, label, _, _) in ABLATIONS.items():
        groups[group].append((label, (runs.get(name) or {}).get("final")))
    groups["routing"].append(("soft routing", (runs.get("B-soft") or {}).get("final")))
    lines = [
        "## Ablations (setting B)",
        "",
        "| ablation | variant | T2I overall [95 % CI] | local avg | global avg | edit avg [95 % CI] |",
        "|---|---|---|---|---|---|",
    ]
    bars = []
    for group, rows in groups.items():
        for label, result in rows:
            lines.append(
                f"| {group} | {label} | {_headline(result, 't2i', 'overall', 3)} | {_headline(result, 'edit', 'local', 2, False)} | "
                f"{_headline(result, 'edit', 'global', 2, False)} | {_headline(result, 'edit', 'average', 2)} |"
            )
            if result and "average" in result["edit"]:
                bars.append((f"{group}: {label}", result["edit"]["average"], _ci(result, "edit", "average")))
    if bars:
        bar_chart(
            plots / "ablations.png",
            "Setting B ablations: edit average (95 % CI)",
            "edit average (0-10)",
            bars,
            backend,
        )
        lines += ["", "![ablations](study/plots/ablations.png)"]
    return lines + [""]


def _cfg_section(collection: dict) -> list[str]:
    runs, teacher_rows = collection["runs"], collection["teachers"]
    lines = [
        "## CFG absorption (T2I base, one field each)",
        "",
        f"| field | teacher at its guidance | student, no CFG | student + CFG β = {STUDENT_CFG_BETA:g} |",
        "|---|---|---|---|",
    ]

    def cell(result: dict | None) -> str:
        text = _headline(result, "t2i", "overall", 3)
        return text + (f" (NFE {result['nfe_per_image']})" if result else "")

    base = (teacher_rows.get("base-nocfg") or {}).get("final")
    lines.append(f"| none: the T2I base without CFG | {cell(base)} | | |")
    for name, (label, _) in CFG_FIELDS.items():
        teacher = (teacher_rows.get(f"teacher-{name}") or {}).get("final")
        run = runs.get(name) or {}
        lines.append(f"| {label} | {cell(teacher)} | {cell(run.get('final'))} | {cell(run.get('cfg2'))} |")
    return lines + [
        "",
        "T2I overall [95 % CI] (NFE per image). CFG-Zero* and APG are diffusers guiders (`guider` fields).",
        "",
    ]


def _seeds_section(collection: dict) -> list[str]:
    runs = collection["runs"]
    best = collection["settings"].get("best_baselines") or {}
    lines = ["## Seeds", ""]
    if not best:
        return lines + ["Not run yet (`study seeds`, after `eval` of the main runs).", ""]
    lines += [
        "| setting | method | seeds | T2I overall, mean ± sd | edit avg, mean ± sd | edit avg of seed 0 / 1 / 2 |",
        "|---|---|---|---|---|---|",
    ]
    for setting, baseline in sorted(best.items()):
        for key in ("danceopd", baseline):
            names = [f"{setting}-{key}"] + [f"{setting}-{key}-seed{i}" for i in (1, 2)]
            results = [(runs.get(n) or {}).get("final") for n in names]
            per_seed = " / ".join(
                f"{r['edit']['average']:.2f}" if r and "average" in r["edit"] else "not run" for r in results
            )
            results = [r for r in results if r and "average" in r["edit"]]
            if not results:
                continue
            t2i = [r["t2i"]["overall"] for r in results]
            edit = [r["edit"]["average"] for r in results]
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            lines.append(
                f"| {setting} | {METHODS[key][0]} | {len(results)} | {statistics.mean(t2i):.3f} ± {sd(t2i):.3f} | "
                f"{statistics.mean(edit):.2f} ± {sd(edit):.2f} | {per_seed} |"
            )
    return lines + ["", "The best trained baseline of each setting is chosen by (T2I + edit / 10) / 2.", ""]


def _rescored_section(collection: dict) -> list[str]:
    rescored = collection.get("rescored") or {}
    if not rescored:
        return []
    first = next(iter(rescored))
    lines = [
        "## Re-score a shipped student on a CPU",
        "",
        "The students of the main tables ship as fp16 LoRAs in `shapesworld/study/`. Scored from those files on the "
        "quick set, on a CPU, without CFG (NFE 16), each gives the row below (a test re-scores one):",
        "",
        "```bash",
        RESCORE_COMMAND.format(file=collection["shipped"][first])
        + (f" --limit {rescored[first]['limit']}" if rescored[first].get("limit") else ""),
        "```",
        "",
        "| file | T2I overall [95 % CI] | local avg | global avg | edit avg [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for name, result in rescored.items():
        lines.append(
            f"| `{collection['shipped'][name]}` | {_headline(result, 't2i', 'overall', 3)} | "
            f"{_headline(result, 'edit', 'local', 2, False)} | {_headline(result, 'edit', 'global', 2, False)} | "
            f"{_headline(result, 'edit', 'average', 2)} |"
        )
    return lines + [""]


def _compute_section(collection: dict) -> list[str]:
    runs = [r for r in collection["runs"].values() if r.get("wall_s")]
    if not runs:
        return ["## Compute", "", "No run recorded yet.", ""]
    jobs = max(r["jobs"] or 1 for r in runs)
    total = sum(r["wall_s"] for r in runs)
    steps = collection["settings"]["steps"]
    lines = [
        "## Compute",
        "",
        f"{len(runs)} runs, up to {jobs} at once on one device; {total / 3600:.2f} run-hours in all (start-ups "
        f"included). Per run ({steps} steps):",
        "",
        "| run | wall time | launches | steps/s |",
        "|---|---|---|---|",
    ]
    for name, r in collection["runs"].items():
        if r.get("wall_s"):
            rate = f"{steps / r['wall_s']:.2f}" if r.get("done") else "-"
            lines.append(f"| {name} | {_wall(r['wall_s'], r['jobs'])} | {r['launches']} | {rate} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------------------- ship
#: the settings two study roots must share for their results to sit in one report
SHARED_SETTINGS = (
    "steps",
    "checkpoint_every",
    "batch_size",
    "learning_rate",
    "warmup_steps",
    "rank",
    "num_rollout_steps",
    "source_cfg",
    "eval_preset",
    "eval_per_category",
    "eval_limit",
    "curve_per_category",
    "eval_inference_steps",
    "query_space",
)


def ship_stage(root: Path, settings: Settings, dest: Path = SHIP_DIR, log: Any = print) -> dict:
    """The main table's students (each run of settings A and B, and each setting's best merge) as fp16 LoRAs in
    ``dest``, and the whole collection in ``dest/results.json`` (what `report` reads without ``--root``).

    What ``dest`` already holds is kept where this root has nothing better (a run it lacks or got less far with, a
    teacher or merge it did not score): a study can be finished on another machine, or after one was lost, and
    shipped into the same place. Each ship is recorded in ``history``; only files written now are re-scored."""
    from .ship import _to_fp16

    collection = collect(root, settings)
    previous = _read(dest / "results.json")
    taken = {"runs": sorted(n for n, r in collection["runs"].items() if r.get("wall_s") or r.get("final"))}
    if previous is not None:
        collection, kept = merge_collections(previous, collection)
        for name in kept:
            log(
                f"[study] {name}: kept from the earlier {dest / 'results.json'} (this root has nothing better)"
            )
        taken["runs"] = [n for n in taken["runs"] if n not in kept]
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [r.name for r in main_runs() if (collection["runs"].get(r.name) or {}).get("done")]
    wanted += [best[0] for best in (best_merge(collection, s) for s in ("A", "B")) if best]
    shipped, written = {}, []
    for name in wanted:
        source = (root / "merges" if name in collection["merges"] else root / "runs") / name
        lora = source / "pytorch_lora_weights.safetensors"
        kept_file = (previous or {}).get("shipped", {}).get(name)
        if name in taken["runs"] or (name in collection["merges"] and lora.is_file()):
            _to_fp16(lora, dest / f"{name}.safetensors")
            written.append(name)
            log(f"[study] shipped {name} -> {dest / f'{name}.safetensors'}")
        elif not (kept_file and (dest / kept_file).is_file()):
            raise SystemExit(
                f"error: {name} is in the results but neither {lora} nor {dest / f'{name}.safetensors'} exists."
            )
        shipped[name] = f"{name}.safetensors"
    for stale in set((previous or {}).get("shipped", {})) - set(shipped):
        (dest / previous["shipped"][stale]).unlink(missing_ok=True)
    collection["shipped"] = shipped
    collection["rescored"] = {
        k: v for k, v in (collection.get("rescored") or {}).items() if k in shipped and k not in written
    }
    collection["settings"] = {k: v for k, v in collection["settings"].items() if k not in ("data", "sources")}
    collection.setdefault("history", []).append(
        {"date": time.strftime("%Y-%m-%d"), "root": root.name, "runs": taken["runs"], "files": written}
    )
    _write_json(dest / "results.json", collection)
    return rescore_shipped(dest, Path(settings.sources), settings.eval_limit, log=log)


#: what each query space means on ShapesWorld's unshifted grid (``../shared/audits/query_sigma.md``)
QUERY_REGIMES = {
    "step": "Queries: the paper's index law over the 16 states of ShapesWorld's unshifted grid (`--query_space "
    "step`): the default low-noise query reaches a mean σ of 0.32 (p10 / p50 / p90 = 0.125 / 0.312 / 0.562), a less "
    "noisy regime than the paper's 0.55 on its shift-3 Z-Image grid.",
    "sigma": "Queries: the paper's law read in σ on a shift-3 grid (`--query_space sigma`): the default low-noise "
    "query reaches a mean σ of 0.55 (p10 / p50 / p90 = 0.30 / 0.58 / 0.79), the paper's regime; mid and high are "
    "the paper's mid_t and high_t in σ as well.",
}
#: settings a root may lack because it predates them, and the value it had
SETTING_DEFAULTS = {"query_space": "step"}
#: methods whose training draws no query state (dense queries every state, sft rolls nothing out): their runs are
#: the same under either query space on the same grid
QUERY_FREE_METHODS = ("dense", "sft")


def query_free_part(collection: dict, query_space: str) -> dict:
    """What of a shipped collection holds under another query space on the same grid: the runs of
    :data:`QUERY_FREE_METHODS`, the merges and the teachers, with their shipped files; the rest is to be run again.
    The result is a collection of ``query_space`` that records where these rows come from."""
    runs = {n: r for n, r in collection["runs"].items() if r.get("method") in QUERY_FREE_METHODS}
    shipped = {
        n: f for n, f in collection.get("shipped", {}).items() if n in runs or n in collection["merges"]
    }
    settings = {**collection["settings"], "query_space": query_space}
    first = collection["settings"].get("query_space", "step")
    note = (
        f"Carried over from the {first}-space study: {', '.join(sorted(runs))}, the weight merges and the teachers. "
        "Their training draws no query state (DiffusionOPD queries all 16 states, joint training rolls nothing "
        "out, merges and teachers are not trained), so the query law does not change them; every run that draws "
        f"a query was trained again with --query_space {query_space}."
    )
    return {
        "settings": settings,
        "runs": runs,
        "merges": collection["merges"],
        "teachers": collection["teachers"],
        "shipped": shipped,
        "notes": [note],
        "rescored": {k: v for k, v in (collection.get("rescored") or {}).items() if k in shipped},
        "history": [],
    }


def carry_stage(source: Path, dest: Path, query_space: str, log: Any = print) -> dict:
    """Start ``dest`` (a new edition of the study on the same grid) from ``source``'s query-free results."""
    previous = _read(source / "results.json")
    if previous is None:
        raise SystemExit(
            f"error: {source / 'results.json'} does not exist: pass --carry_from a shipped study folder."
        )
    if _read(dest / "results.json") is not None:
        raise SystemExit(f"error: {dest / 'results.json'} exists already: carry starts a new --dest only.")
    carried = query_free_part(previous, query_space)
    dest.mkdir(parents=True, exist_ok=True)
    for name, file in carried["shipped"].items():
        (dest / file).write_bytes((source / file).read_bytes())
        log(f"[study] carried {name} -> {dest / file}")
    _write_json(dest / "results.json", carried)
    return carried


def merge_collections(previous: dict, new: dict) -> tuple[dict, list[str]]:
    """``new`` on top of ``previous`` (two roots of one study): a run is taken from ``new`` when it finished there
    or got further than before; a teacher or merge when ``new`` scored it. Returns the merge and what was kept."""

    def setting(collection: dict, k: str) -> Any:
        return collection["settings"].get(k, SETTING_DEFAULTS.get(k))

    differ = [k for k in SHARED_SETTINGS if setting(previous, k) != setting(new, k)]
    if differ:
        k = differ[0]
        raise SystemExit(
            f"error: the shipped results were made with {k} = {setting(previous, k)!r} and this root with "
            f"{setting(new, k)!r}: one report cannot mix them. Ship to another --dest, or run the root with "
            f"--{k} {setting(previous, k)}."
        )
    out = {**previous, "settings": {**previous["settings"], **new["settings"]}}
    out["settings"]["best_baselines"] = new["settings"].get("best_baselines") or previous["settings"].get(
        "best_baselines", {}
    )
    kept, runs = [], dict(previous["runs"])
    for name, run in new["runs"].items():
        old = runs.get(name)
        better = (
            old is None or run["done"] or (not old["done"] and run.get("reached", 0) > old.get("reached", 0))
        )
        if better:
            # a run resumed on this root from another's checkpoint keeps the other's earlier curve points (same
            # steps, same keys: a run restarted from 0 that got this far overwrites every one of them)
            curve = {str(k): v for k, v in ((old or {}).get("curve") or {}).items()}
            curve.update({str(k): v for k, v in (run.get("curve") or {}).items()})
            runs[name] = {**run, "curve": curve}
        elif run.get("wall_s") or run.get("final"):
            kept.append(name)
    out["runs"] = runs
    for part, scored in (("teachers", ("final",)), ("merges", ("select", "final"))):
        out[part] = dict(previous.get(part, {}))
        for name, entry in new[part].items():
            if name not in out[part] or any(entry.get(k) for k in scored):
                out[part][name] = entry
    return out, kept


#: the CPU re-score of each shipped student: what `evaluate` prints for anyone who runs RESCORE_COMMAND
RESCORE_KEYS = ("t2i", "edit", "ci", "set", "per_category", "limit", "seed", "num_steps", "nfe_per_image")
RESCORE_COMMAND = (
    "python -m danceopd_diffusers.shapesworld.evaluate --pipeline danceopd_diffusers/shapesworld/sources/base "
    "--lora danceopd_diffusers/shapesworld/study/{file} --device cpu"
)


def rescore_one(dest: Path, file: str, sources: Path = SOURCES, limit: int | None = None) -> dict:
    """One shipped fp16 student on the quick set, on the CPU, without CFG: RESCORE_COMMAND's numbers."""
    from .evaluate import evaluate, load_pipeline

    pipe, family = load_pipeline(str(sources / "base"), str(dest / file), "cpu")
    result = evaluate(
        pipe, family, guidance_scale=1.0, num_steps=16, seed=0, batch_size=8, limit=limit, progress=False
    )
    return {k: result[k] for k in RESCORE_KEYS}


def rescore_shipped(dest: Path, sources: Path = SOURCES, limit: int | None = None, log: Any = print) -> dict:
    """Every shipped student re-scored from its file (``rescored`` in ``dest/results.json``; STUDY.md's last
    table): the final tables come from the GPU on the large set, this is what a CPU user can check."""
    path = dest / "results.json"
    collection = json.loads(path.read_text())
    rescored = collection.setdefault("rescored", {})
    for name, file in collection.get("shipped", {}).items():
        if name in rescored:  # shipped earlier and not rewritten since
            continue
        rescored[name] = rescore_one(dest, file, sources, limit)
        edit = rescored[name]["edit"].get("average", float("nan"))
        log(
            f"[study] re-scored {file} on the CPU: T2I {rescored[name]['t2i']['overall']:.3f}, edit {edit:.2f}"
        )
        _write_json(path, collection)  # each one as it is done: a cut re-score keeps what it did
    return collection


# ---------------------------------------------------------------------------------------------------------- CLI
STAGES = ("plan", "merge", "main", "ablations", "cfg", "train", "seeds", "eval", "report", "ship", "carry")


def _record_eval_set(root: Path, settings: Settings) -> None:
    """The final set's preset, recorded once (large on a GPU, quick on a CPU), so a report written later on another
    machine, or results shipped from another root, read the same set."""
    if settings.eval_preset is None and settings.eval_per_category is None:
        settings.eval_preset = "large" if _device(settings).startswith("cuda") else "quick"
        save_settings(root, settings)


def _plan(root: Path, settings: Settings, only: list[str] | None, log: Any) -> None:
    import torch

    cuda = _device(settings).startswith("cuda") and torch.cuda.is_available()
    for run in all_runs(settings):
        if selected([run.name], only):
            state = "done" if run_done(root, run, settings) else "to run"
            log(
                f"{run.name} [{run.group}, {state}]: {' '.join(train_command(run, root, settings, cuda)[1:])}"
            )
    for m in merges():
        if selected([m.name], only):
            log(
                f"{m.name} [merge]: {m.combination} of {list(m.experts)} weights {list(m.weights)} density {m.density}"
            )
    for item in eval_items(root, settings, only):
        log(
            f"eval {item.name} {item.kind}: lora {item.lora}, guidance {item.guidance_scale}, guider {item.guider}"
        )


def default_report_path() -> Path:
    """Where ``report`` writes by default: the shipped ``shapesworld/STUDY.md`` of a source checkout, but
    ``./STUDY.md`` when the package is installed (site-packages is no place for a user's report, and may not be
    writable)."""
    if any(part in ("site-packages", "dist-packages") for part in HERE.parts):
        return Path.cwd() / "STUDY.md"
    return STUDY_MD


def main(argv: list[str] | None = None) -> int:
    """The command line: a bad argument or input is one ``error:`` line and exit status 2, never a traceback."""
    try:
        return _main(argv)
    except SystemExit as exc:  # messages raised as SystemExit("error: ...") by the stages and checks
        if isinstance(exc.code, str):
            print(exc.code if exc.code.startswith("error:") else f"error: {exc.code}", file=sys.stderr)
            return 2
        raise


def _check_out(flag: str, path: Path) -> None:
    """``path`` can be written as a file: not a folder, and its folder exists."""
    if path.is_dir():
        raise SystemExit(f"error: {flag} {path} is a folder; pass the path of a file.")
    if os.path.lexists(path) and not path.is_file():
        raise SystemExit(f"error: {flag} {path} exists and is not a regular file; pass another path.")
    existing = path.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # the folders are created, but not under a file
        raise SystemExit(f"error: {flag} {path}: {existing} is not a folder; pass another path.")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m danceopd_diffusers.shapesworld.study",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--root", default=None, help="the study folder (holds data/ unless --data)")
    parser.add_argument(
        "--only", nargs="+", default=None, help="glob patterns of run / merge / teacher names"
    )
    parser.add_argument(
        "--budget_s", type=float, default=None, help="stop launching / scoring after this long"
    )
    parser.add_argument(
        "--out",
        default=str(default_report_path()),
        help="report: where STUDY.md goes (plots beside it; default: shapesworld/STUDY.md in a checkout, "
        "./STUDY.md for an installed package)",
    )
    parser.add_argument("--dest", default=str(SHIP_DIR), help="ship: where the students and results.json go")
    parser.add_argument("--plot_backend", default="auto", choices=["auto", "matplotlib", "pil"])
    parser.add_argument(
        "--carry_from",
        default=None,
        help="carry: a shipped study folder whose query-free results (dense, joint, merges, teachers) start --dest",
    )
    for f in fields(Settings):
        if f.name == "best_baselines":
            continue
        kind = {"int | None": int, "str | None": str, "float": float, "int": int, "str": str}.get(
            str(f.type), str
        )
        parser.add_argument(
            f"--{f.name}", type=kind, default=None, help=f"(recorded in R/study.json; default {f.default})"
        )
    args = parser.parse_args(argv)
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s > 0):
        parser.error(f"--budget_s must be a finite number of seconds > 0, got {args.budget_s}")
    if args.stage == "report":
        _check_out("--out", Path(args.out))
    if args.stage == "report" and args.root is None:
        shipped = Path(args.dest) / "results.json"
        if not shipped.is_file():
            parser.error(f"report without --root reads {shipped}, which does not exist: pass --root")
        try:
            collection = json.loads(shipped.read_text())
        except (OSError, ValueError) as exc:
            parser.error(
                f"{shipped} is not valid JSON ({' '.join(str(exc).split())[:200]}); ship the study again"
            )
        if not isinstance(collection, dict) or not has_results(collection):
            parser.error(f"{shipped} holds no results; nothing to report (STUDY.md is left as it is)")
        write_report(collection, Path(args.out), args.plot_backend, source=f"the shipped `{shipped.name}`")
        print(f"[study] wrote {args.out}")
        return 0
    if args.stage == "carry":
        if args.carry_from is None or args.query_space is None:
            parser.error("carry needs --carry_from (a shipped study folder), --dest and --query_space")
        carry_stage(Path(args.carry_from), Path(args.dest), args.query_space)
        return 0
    if args.root is None:
        parser.error(f"the {args.stage} stage needs --root")
    root = Path(args.root).resolve()
    if os.path.lexists(root) and not root.is_dir():
        parser.error(f"--root {args.root} is not a folder; pass the study folder")
    if args.stage in ("report", "ship", "eval", "seeds") and not root.is_dir():
        parser.error(f"--root {args.root} does not exist; the {args.stage} stage reads a study folder")
    overrides = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    settings = load_settings(root, overrides, write=args.stage != "report")
    if args.stage == "plan":
        _plan(root, settings, args.only, print)
        return 0
    if args.stage == "merge":
        merge_stage([m for m in merges() if selected([m.name], args.only)], root, settings)
        return 0
    if args.stage in ("main", "ablations", "cfg", "train", "seeds"):
        if args.stage == "seeds":
            _record_eval_set(root, settings)
            collection = collect(root, settings)
            shipped = _read(Path(args.dest) / "results.json")
            if shipped is not None:  # baselines finished on another root count too
                collection, _ = merge_collections(shipped, collection)
            for setting in ("A", "B"):
                best = best_trained_baseline(collection, setting)
                if best is None:
                    raise SystemExit(
                        f"error: no trained baseline of setting {setting} is scored yet: run `main` and `eval` first."
                    )
                settings.best_baselines[setting] = best
            save_settings(root, settings)
        runs = {
            "main": main_runs,
            "ablations": ablation_runs,
            "cfg": cfg_runs,
            "train": lambda: main_runs() + ablation_runs() + cfg_runs(),
        }.get(args.stage)
        runs = runs() if runs else seed_runs(settings)
        runs = [r for r in runs if selected([r.name], args.only)]
        check_inputs(root, settings, {r.data for r in runs})
        failed = train_stage(runs, root, settings, args.budget_s)
        return 1 if failed else 0
    if args.stage == "eval":
        _record_eval_set(root, settings)
        eval_stage(root, settings, args.only, args.budget_s)
        return 0
    if args.stage == "report":
        collection = collect(root, settings)
        if not has_results(collection):  # never overwrite the shipped STUDY.md with an empty report
            parser.error(
                f"--root {args.root} holds no results (no run, merge or teacher is scored); nothing to report, "
                f"{args.out} is left as it is. Run the eval stage first."
            )
        write_report(collection, Path(args.out), args.plot_backend, source=f"`{root.name}`")
        print(f"[study] wrote {args.out}")
        return 0
    ship_stage(root, settings, Path(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
