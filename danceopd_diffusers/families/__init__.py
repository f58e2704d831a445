"""Family adapters: the only place that knows a pipeline family's calling conventions.

Each family module registers its adapters itself (``@register_family``, see ``base.py``); this package only
imports the modules. Their order is the order families are registered, and so listed to users.
"""

from __future__ import annotations

# isort: off
from . import sd3, flux, z_image, qwen_image, flux2  # noqa: F401  (each registers its families on import)

# isort: on
from .base import (
    EMBEDDED_GUIDANCE,
    FAMILIES,
    SOURCE_PREFIX,
    TOKEN_GRID,
    Conditioning,
    FamilyAdapter,
    edit_size,
    editing_families,
    euler_step,
    family_for_pipeline_class,
    register_family,
)
from .sd3 import SD3Family

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
    "register_family",
]
