"""Tiny, deterministic pipelines built offline (tokenizers in memory, small configs, fixed seeds).

One module per family; :func:`tiny_pipeline_path` builds a family's pipeline folder once and returns it, so
tests and the benchmarks go through ``from_pretrained`` exactly like a Hub id.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..paths import cache_root
from .sd3 import build_tiny_sd3_pipeline

#: family name -> (module in this package, builder function, recipe version)
TINY_BUILDERS: dict[str, tuple[str, str, str]] = {
    "sd3": (".sd3", "build_tiny_sd3_pipeline", "1"),
    "flux": (".flux", "build_tiny_flux_pipeline", "1"),
    "flux-kontext": (".flux", "build_tiny_flux_kontext_pipeline", "1"),
    "z-image": (".z_image", "build_tiny_z_image_pipeline", "1"),
    "z-image-omni": (".z_image", "build_tiny_z_image_omni_pipeline", "1"),
    "qwen-image": (".qwen_image", "build_tiny_qwen_image_pipeline", "1"),
    "qwen-image-edit": (".qwen_image", "build_tiny_qwen_image_edit_pipeline", "2"),
    "flux2": (".flux2", "build_tiny_flux2_pipeline", "1"),
    "flux2-klein": (".flux2", "build_tiny_flux2_klein_pipeline", "1"),
}


def _builder(family: str) -> tuple[Callable, str]:
    if family not in TINY_BUILDERS:
        raise ValueError(f"No tiny pipeline for family {family!r}; known: {sorted(TINY_BUILDERS)}.")
    module, name, version = TINY_BUILDERS[family]
    return getattr(importlib.import_module(module, __name__), name), version


def tiny_pipeline_path(family: str = "sd3", root: str | os.PathLike | None = None) -> str:
    """Build (once) and return a local folder holding the family's tiny pipeline.

    The folder name carries the recipe version, so a changed recipe never reuses a stale copy; it is written
    under a temporary name and renamed, so a crash never leaves a half-written pipeline behind.
    """
    build, version = _builder(family)
    root = cache_root(root)
    path = root / f"tiny-{family}-v{version}"
    if (path / "model_index.json").exists():
        return str(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=root))
    build().save_pretrained(tmp)
    (tmp / "DANCEOPD_TINY.json").write_text(json.dumps({"family": family, "version": version}))
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def tiny_sd3_path(root: str | os.PathLike | None = None) -> str:
    return tiny_pipeline_path("sd3", root)


__all__ = ["TINY_BUILDERS", "build_tiny_sd3_pipeline", "tiny_pipeline_path", "tiny_sd3_path"]
