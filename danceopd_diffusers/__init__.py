"""danceopd-diffusers: DanceOPD, on-policy generative field distillation, for diffusers flow-matching pipelines.

The public API, importable from the package itself (``from danceopd_diffusers import QueryLaw``): the fields the
student learns from, their routing, the rollout and its query law, the objectives, the family adapters, and what a
run hands over. Names resolve on first use (PEP 562), as in diffusers: importing the package loads neither torch nor
diffusers, and no submodule imports the package's own ``__init__`` for them (the import graph stays one-way).
The training script is ``train_danceopd.py``; ShapesWorld, the offline benchmark, is ``danceopd_diffusers.shapesworld``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module (in this package) that defines it
_EXPORTS = {
    # fields and routes: what the student is distilled from
    "ConfigError": "config",
    "FieldSpec": "config",
    "FieldsConfig": "config",
    "RouteSpec": "config",
    "parse_fields_config": "config",
    "Field": "fields",
    "FieldQuery": "fields",
    "build_fields": "field_loading",
    "load_pipeline": "field_loading",
    "Router": "routing",
    "run_fields_config": "routing",
    "soft_routes": "routing",
    "step_generator": "routing",
    # the rollout, its queries and the objectives
    "QueryLaw": "rollout",
    "field_rollout": "rollout",
    "RoutedTargets": "objectives",
    "TrainingStates": "objectives",
    "off_policy_states": "objectives",
    "on_policy_states": "objectives",
    "sft_states": "objectives",
    "velocity_mse": "objectives",
    "BatchDrawer": "batches",
    # pipeline families
    "Conditioning": "families",
    "FamilyAdapter": "families",
    # the student and what a run hands over
    "StudentPlan": "student_init",
    "build_student": "student_init",
    "plan_student": "student_init",
    "OutputFolder": "output_dir",
    "export_student": "export",
    "render_model_card": "export",
    "save_pipeline_folder": "export",
    "get_logger": "logging_utils",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
