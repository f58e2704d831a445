"""Every pipeline class of the project, as explicit module-level subclasses of diffusers pipelines.

- :mod:`.pipeline_danceopd`: the exported ``DanceOPD<Stock>`` classes. The file is copied verbatim into every
  exported folder and loaded there with diffusers alone (``trust_remote_code=True``), so it imports nothing from
  this package.
- :mod:`.pipeline_qwenimage_edit_latents`, :mod:`.pipeline_flux2_source`, :mod:`.pipeline_z_image_omni_source`:
  the training-time subclasses whose ``__call__`` also takes per-sample, pre-encoded source images (the rollout
  hands every sample its own source, encoded once).

This ``__init__`` imports none of them: each imports its diffusers pipelines, and a family loads its own only when
it needs it.
"""

from __future__ import annotations

from pathlib import Path

#: the exported pipeline file, shipped inside the package (exports copy it next to ``model_index.json``)
EXPORTED_PIPELINE_FILE = Path(__file__).with_name("pipeline_danceopd.py")
#: the module name exported folders give in ``model_index.json``'s ``_class_name`` (the file reads its own name
#: off ``__file__`` under the same constant name, since it cannot import this package)
EXPORTED_PIPELINE_MODULE = EXPORTED_PIPELINE_FILE.stem

__all__ = ["EXPORTED_PIPELINE_FILE", "EXPORTED_PIPELINE_MODULE"]
