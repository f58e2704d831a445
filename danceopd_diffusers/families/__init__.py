"""Family adapters: the only place that knows a pipeline family's calling conventions."""

from __future__ import annotations

from .base import SOURCE_PREFIX, Conditioning, FamilyAdapter, edit_size, euler_step
from .sd3 import SD3Family

FAMILIES: dict[str, type[FamilyAdapter]] = {SD3Family.name: SD3Family}


def family_for_pipeline_class(class_name: str) -> type[FamilyAdapter]:
    """Map a ``model_index.json`` ``_class_name`` to its adapter, or say which pipelines are supported."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            return family
    supported = ", ".join(name for f in FAMILIES.values() for name in f.pipeline_class_names)
    raise ValueError(
        f"Pipeline class {class_name!r} is not supported by danceopd-diffusers. Supported pipelines: {supported}."
    )


def editing_families() -> list[str]:
    return [name for name, family in FAMILIES.items() if family.can_edit]


__all__ = [
    "FAMILIES",
    "SOURCE_PREFIX",
    "Conditioning",
    "FamilyAdapter",
    "SD3Family",
    "edit_size",
    "editing_families",
    "euler_step",
    "family_for_pipeline_class",
]
