"""Checks that need the model's *configuration* but not its weights.

Reading ``model_index.json``, the scheduler config and the transformer config (a few KB, downloaded for Hub
ids) is enough to know the family, that the scheduler is flow matching, and every module name, so a LoRA
that targets modules the model lacks, or whose rank contradicts its weights, fails in seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, FieldsConfig
from .families import FamilyAdapter, family_for_pipeline_class
from .lora_io import LoraHeader, inspect_lora, resolve_lora_file

#: the module name (``pipelines/pipeline_danceopd.py``) that exported folders put in their model_index.json
EXPORTED_PIPELINE_MODULE = "pipeline_danceopd"


@dataclass
class ModelInfo:
    path: str
    pipeline_class_name: str
    family_cls: type[FamilyAdapter]
    scheduler_class_name: str
    module_names: set[str]
    transformer_config: dict
    custom_pipeline: str | None = None  # the module an exported DanceOPD folder names for its pipeline class


def _load_json_config(path: str, subfolder: str | None = None, revision: str | None = None) -> dict:
    from diffusers import ConfigMixin

    class _Reader(ConfigMixin):
        config_name = "config.json"

    return dict(_Reader.load_config(path, subfolder=subfolder, revision=revision))


def inspect_pipeline(path: str, revision: str | None = None) -> ModelInfo:
    """Family, scheduler and module names of a pipeline folder or Hub id, from its configs only."""
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except Exception as exc:
        raise ConfigError(
            f"Cannot read model_index.json of {path!r} ({exc}). Pass a diffusers pipeline folder or Hub id "
            "with --pretrained_model_name_or_path."
        ) from exc
    class_name = index.get("_class_name")
    custom_pipeline = None
    if isinstance(class_name, (list, tuple)):
        custom_pipeline, class_name = class_name[0], class_name[-1]
        if custom_pipeline != EXPORTED_PIPELINE_MODULE:
            raise ConfigError(
                f"{path!r} uses custom pipeline code ({custom_pipeline}.{class_name}), which this script does "
                f"not run. Pass the stock diffusers pipeline it was built on, or a folder exported by "
                "train_danceopd.py."
            )
    try:
        family_cls = family_for_pipeline_class(class_name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    scheduler_entry = index.get("scheduler") or [None, ""]
    scheduler_name = (
        scheduler_entry[1] if isinstance(scheduler_entry, (list, tuple)) else str(scheduler_entry)
    )
    if "FlowMatch" not in (scheduler_name or ""):
        raise ConfigError(
            f"The scheduler of {path!r} is {scheduler_name!r}, not a flow-matching scheduler. DanceOPD distils "
            "velocity fields of flow-matching pipelines (FlowMatchEulerDiscreteScheduler); use such a pipeline "
            "or replace its scheduler."
        )
    transformer_config = _load_json_config(path, subfolder="transformer", revision=revision)
    family = family_cls()
    with init_empty_weights():
        model = family.transformer_class().from_config(transformer_config)
    module_names = {name for name, _ in model.named_modules()}
    return ModelInfo(
        path, class_name, family_cls, scheduler_name, module_names, transformer_config, custom_pipeline
    )


def check_lora_targets(target_modules: Sequence[str], module_names: set[str], what: str) -> None:
    """Each peft target (a module-name suffix) must match a module of the model."""
    for target in target_modules:
        if not any(n == target or n.endswith("." + target) for n in module_names):
            examples = sorted(n for n in module_names if n.count(".") >= 3)[:6]
            raise ConfigError(
                f"{what}: target module {target!r} does not exist in the transformer. Use names such as "
                f"{examples} (or their suffixes, e.g. 'attn.to_q')."
            )


def check_lora_file(
    header: LoraHeader, module_names: set[str], what: str, expected_rank: int | None = None
) -> None:
    if not header.modules:
        raise ConfigError(f"{what}: {header.file} holds no transformer LoRA weights (no *.lora_A.* keys).")
    missing = sorted(m for m in header.modules if m not in module_names)
    if missing:
        raise ConfigError(
            f"{what}: {header.file} targets {len(missing)} module(s) the transformer does not have, e.g. "
            f"{missing[:3]}. It was trained for another model; use a LoRA of this base model."
        )
    ranks = sorted(set(header.modules.values()))
    if (
        header.declared_rank is not None
        and len(ranks) == 1
        and ranks[0] != header.declared_rank
        and not header.rank_pattern
    ):
        raise ConfigError(
            f"{what}: {header.file} declares rank r={header.declared_rank} but its weights have rank {ranks[0]}. "
            "The file is inconsistent; re-save it with the right metadata."
        )
    if expected_rank is not None and lora_base_rank(header) != expected_rank:
        raise ConfigError(
            f"{what}: the LoRA in {header.file} has rank {lora_base_rank(header)}, but --rank is "
            f"{expected_rank}. Pass --rank {lora_base_rank(header)} to continue training it."
        )


def lora_base_rank(header: LoraHeader) -> int:
    """The file's ``r``: declared, else the most common rank of its weights (what diffusers infers)."""
    if header.declared_rank is not None:
        return int(header.declared_rank)
    return Counter(header.modules.values()).most_common(1)[0][0]


def student_init_lora_config(header: LoraHeader, rank: int, lora_alpha: float | None) -> dict:
    """The adapter config of a student that continues the LoRA ``header`` describes (``--student_init``).

    Its scale is the file's: alpha, ``rank_pattern``, ``alpha_pattern`` (and rsLoRA / DoRA flags) come from the
    file's declared config, so step 0 is exactly base + that LoRA. An explicit ``--lora_alpha`` that contradicts
    the file is refused. A file that declares no alpha is read as diffusers reads it (alpha = r) unless
    ``--lora_alpha`` says otherwise.
    """
    declared = header.config
    if declared is None or declared.get("lora_alpha") is None:
        return {
            "r": rank,
            "lora_alpha": lora_alpha if lora_alpha is not None else rank,
            "target_modules": sorted(header.modules),
            "rank_pattern": {m: r for m, r in header.modules.items() if r != rank},
        }
    file_alpha = declared["lora_alpha"]
    if lora_alpha is not None and (float(lora_alpha) != float(file_alpha) or header.alpha_pattern):
        pattern = f" and alpha_pattern {header.alpha_pattern}" if header.alpha_pattern else ""
        raise ConfigError(
            f"--student_init: the LoRA in {header.file} was trained with lora_alpha={file_alpha}{pattern}, but "
            f"--lora_alpha is {lora_alpha}. A different alpha would rescale the warm start. Drop --lora_alpha "
            "(the file's alpha is used)"
            + ("." if header.alpha_pattern else f" or pass --lora_alpha {file_alpha}.")
        )
    config = dict(declared)
    config["lora_dropout"] = 0.0  # the student trains without dropout, as a fresh student LoRA does
    return config


def check_fields_against_model(config: FieldsConfig, info: ModelInfo) -> dict[str, LoraHeader]:
    """LoRA experts: files found and consistent with the model. Returns their headers by field name."""
    headers: dict[str, LoraHeader] = {}
    for spec in config.fields.values():
        if spec.embedded_guidance is not None and not info.family_cls.has_embedded_guidance:
            raise ConfigError(
                f"Field {spec.name!r} sets `embedded_guidance`, an input of guidance-distilled Flux models; the "
                f"{info.family_cls.name} family has none. Remove it (use a cfg field for classifier-free guidance)."
            )
        if spec.type != "lora":
            continue
        try:
            file = resolve_lora_file(spec.path, spec.weight_name)
        except Exception as exc:
            raise ConfigError(f"Field {spec.name!r}: cannot find its LoRA ({exc}).") from exc
        header = inspect_lora(file)
        check_lora_file(header, info.module_names, f"Field {spec.name!r}")
        headers[spec.name] = header
    return headers


def describe_model_info(info: ModelInfo) -> dict[str, Any]:
    return {
        "pipeline": info.pipeline_class_name,
        "scheduler": info.scheduler_class_name,
        "family": info.family_cls.name,
    }
