"""The study's grid: every run, merge and teacher it scores, and how its best merge and baseline are chosen.

What the module docstring of :mod:`.study` describes in words, as data: the methods of the main tables, setting
B's ablations, the CFG-absorption fields, the seeds, the weight-merging grid and the teachers, each with the
fields config, init and flags it runs with. Everything else (the scheduler, the evaluation queue, the report)
reads its names and choices from here, so they cannot disagree on what the study is.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

from .study_settings import Settings

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
    """The names matching any of the ``--only`` glob patterns (all of them without patterns)."""
    if not only:
        return names
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in only)]


def selection_score(result: dict | None) -> float:
    """How `best` is chosen among merges and baselines: the mean of T2I overall and edit average / 10."""
    if not result or "overall" not in result["t2i"] or "average" not in result["edit"]:
        return -math.inf
    return (result["t2i"]["overall"] + result["edit"]["average"] / 10) / 2


def best_merge(collection: dict, setting: str) -> tuple[str, dict] | None:
    """The grid point chosen on the selection set (the curve set), reported on the final set."""
    rows = [(n, m) for n, m in collection["merges"].items() if m["setting"] == setting and m.get("select")]
    return max(rows, key=lambda row: merge_rank(selection_score(row[1]["select"]), row[0])) if rows else None


def merge_rank(score: float, name: str) -> tuple[float, str]:
    """Best selection score first; ties (TIES and DARE of one LoRA at one weight can be the same merge) go to the
    last name in sort order, so `eval` and the report pick the same point."""
    return score, name


def best_trained_baseline(collection: dict, setting: str) -> str | None:
    """The trained baseline (dense, offpolicy or joint) of a setting with the best selection score: the one
    `seeds` trains again at seeds 1 and 2 beside DanceOPD."""
    scored = [
        (selection_score((collection["runs"].get(f"{setting}-{k}") or {}).get("final")), k)
        for k in TRAINED_BASELINES
    ]
    scored = [row for row in scored if row[0] > -math.inf]
    return max(scored)[1] if scored else None
