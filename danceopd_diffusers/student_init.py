"""Where the student starts, and the student built from it.

``--student_init`` names a LoRA (file, folder or Hub id) or a full transformer checkpoint. Which one it is decides
the student's rank, alpha and target modules (a LoRA student continues a LoRA at the file's own scale), and it must
be known before any weights load, so that a mismatch is one clear error. :func:`plan_student` reads only configs and
file headers; :func:`build_student` applies the plan to the loaded pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ConfigError
from .lora_io import inspect_lora, load_lora_for_diffusers, resolve_lora_file
from .preflight import (
    ModelInfo,
    check_lora_file,
    check_lora_targets,
    check_transformer_checkpoint,
    load_errors,
    lora_base_rank,
    student_init_lora_config,
)
from .student import (
    STUDENT_ADAPTER,
    AdapterScope,
    add_student_lora,
    load_lora_into_adapter,
)

#: the rank of a fresh student LoRA when neither --rank nor a --student_init LoRA sets one
DEFAULT_RANK = 128


@dataclass
class StudentPlan:
    """The student this run trains: a LoRA of ``rank`` / ``lora_alpha`` on ``targets`` (None for a full fine-tune)
    over the base or over ``init`` (a LoRA file when ``init_lora_file`` is set, else a transformer checkpoint)."""

    full_finetune: bool
    targets: list[str]
    rank: int | None = None
    lora_alpha: float | None = None
    init: str | None = None
    init_lora_file: str | None = None
    init_lora_config: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def init_is_checkpoint(self) -> bool:
        return bool(self.init) and self.init_lora_file is None


def plan_student(info: ModelInfo, default_targets: list[str], args: Any) -> StudentPlan:
    """The student from the run's flags (``--full_finetune``, ``--lora_layers``, ``--rank``, ``--lora_alpha``,
    ``--student_init``) and the model's configs, no weights loaded: targets are checked against the model's
    modules, a LoRA init against its shapes and rank, a checkpoint init against the base transformer."""
    full_finetune, lora_layers, student_init = args.full_finetune, args.lora_layers, args.student_init
    rank, lora_alpha = args.rank, args.lora_alpha
    targets = [t.strip() for t in lora_layers.split(",")] if lora_layers else list(default_targets)
    if not full_finetune:
        check_lora_targets(targets, info.module_names, "--lora_layers")
    plan = StudentPlan(full_finetune, targets, rank, lora_alpha, student_init)
    if not student_init:
        if plan.rank is None and not full_finetune:
            plan.rank = DEFAULT_RANK
        return plan
    if not os.path.exists(student_init) and student_init.count("/") != 1:
        raise ConfigError(
            f"--student_init {student_init} does not exist: pass a LoRA (file, folder or Hub id) or a "
            "transformer checkpoint (diffusers folder or .safetensors file)."
        )
    header = None
    try:
        init_file = resolve_lora_file(student_init, what="--student_init")
        header = inspect_lora(init_file, "--student_init")
    except FileNotFoundError:
        pass
    if header is None or not header.modules:
        if plan.rank is None and not full_finetune:
            plan.rank = DEFAULT_RANK
        check_transformer_checkpoint(student_init, None, info, "--student_init")
        return plan
    plan.init_lora_file = init_file
    if plan.rank is None and not full_finetune:
        plan.rank = lora_base_rank(header)
    check_lora_file(
        header,
        info.module_names,
        "--student_init",
        expected_rank=None if full_finetune else plan.rank,
        linear_features=info.linear_features,
    )
    if not full_finetune:
        plan.targets = header.target_modules or sorted(header.modules)
        # the student continues the file's LoRA at the file's own scale (alpha and patterns)
        plan.init_lora_config = student_init_lora_config(header, plan.rank, lora_alpha)
        plan.lora_alpha = plan.init_lora_config["lora_alpha"]
    return plan


def build_student(
    pipe: Any,
    family: Any,
    plan: StudentPlan,
    dtype: torch.dtype,
    device: torch.device,
    config_source: str,
) -> AdapterScope | None:
    """The student in ``pipe.transformer``, on ``device``: the init's weights (a checkpoint replaces the transformer,
    a LoRA is fused into a full fine-tune or continued as the student adapter), then what trains made trainable.
    Returns the adapter scope of a LoRA student (None for a full fine-tune)."""
    from .field_loading import load_transformer
    from .stopping import check_loaded_finite

    if plan.init_is_checkpoint:
        with load_errors("--student_init", plan.init):
            pipe.transformer = load_transformer(family, plan.init, None, dtype, config_source=config_source)
        pipe.transformer.requires_grad_(False)
        check_loaded_finite(pipe.transformer, f"--student_init {plan.init}")
    pipe.to(device)
    transformer = pipe.transformer
    if plan.full_finetune:
        if plan.init_lora_file:
            load_lora_into_adapter(
                transformer, *load_lora_for_diffusers(plan.init_lora_file), adapter_name="init"
            )
            transformer.fuse_lora(adapter_names=["init"])
            transformer.unload_lora()
        transformer.requires_grad_(True)
        return None
    if plan.init_lora_file:
        state, _ = load_lora_for_diffusers(plan.init_lora_file)
        load_lora_into_adapter(transformer, state, plan.init_lora_config, adapter_name=STUDENT_ADAPTER)
    else:
        add_student_lora(transformer, plan.rank, plan.lora_alpha or plan.rank, plan.targets)
    return AdapterScope(transformer)
