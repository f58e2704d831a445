"""Family adapters: the only place that knows a pipeline family's calling conventions.

Adapters are registered by module so a family whose module is absent (or whose diffusers classes are missing
from an older diffusers) simply is not offered.
"""

from __future__ import annotations

import importlib

from .base import (
    EMBEDDED_GUIDANCE,
    SOURCE_PREFIX,
    TOKEN_GRID,
    Conditioning,
    FamilyAdapter,
    edit_size,
    euler_step,
)
from .sd3 import SD3Family

#: module (in this package) -> adapter class names it defines
_FAMILY_MODULES = {
    ".sd3": ("SD3Family",),
    ".flux": ("FluxFamily", "FluxKontextFamily"),
    ".z_image": ("ZImageFamily", "ZImageOmniFamily"),
    ".qwen_image": ("QwenImageFamily", "QwenImageEditFamily"),
    ".flux2": ("Flux2Family", "Flux2KleinFamily"),
}


def _load_families() -> dict[str, type[FamilyAdapter]]:
    found: dict[str, type[FamilyAdapter]] = {}
    for module_name, class_names in _FAMILY_MODULES.items():
        try:
            module = importlib.import_module(module_name, __name__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(__name__):
                continue  # that family is not part of this version
            raise
        for class_name in class_names:
            cls = getattr(module, class_name, None)
            if cls is not None:
                found[cls.name] = cls
    return found


FAMILIES: dict[str, type[FamilyAdapter]] = _load_families()


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
    "EMBEDDED_GUIDANCE",
    "TOKEN_GRID",
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
