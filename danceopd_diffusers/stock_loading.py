"""Load a folder exported by this project with the stock diffusers class, never with the folder's own code.

An exported folder's ``model_index.json`` names ``pipeline_danceopd.<DanceOPD...Pipeline>`` so that users can
load it with ``trust_remote_code=True``. Training and evaluation never do: the exported class is a thin
subclass of a stock pipeline, so the components are loaded by the stock class of the same family, from a view
of the folder whose index names that class. Any other custom code in an index is refused.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import ConfigError
from .families import family_for_pipeline_class
from .preflight import EXPORTED_PIPELINE_MODULE


def split_class_name(index: dict, path: str) -> tuple[str, str | None]:
    """``(class name, exported module or None)`` of a ``model_index.json``; other custom code is refused."""
    class_name = index.get("_class_name")
    if not isinstance(class_name, (list, tuple)):
        return class_name, None
    module, class_name = class_name[0], class_name[-1]
    if module != EXPORTED_PIPELINE_MODULE:
        raise ConfigError(
            f"{path!r} uses custom pipeline code ({module}.{class_name}), which danceopd-diffusers does not run. "
            "Pass the stock diffusers pipeline it was built on, or a folder exported by train_danceopd.py."
        )
    return class_name, module


def _local_folder(path: str, index: dict, revision: str | None) -> Path:
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple))]
    return Path(
        snapshot_download(
            path, revision=revision, allow_patterns=["model_index.json", *[f"{c}/*" for c in components]]
        )
    )


@contextmanager
def stock_view(path: str, revision: str | None = None) -> Iterator[str]:
    """A temporary folder that links ``path``'s components under an index naming the stock pipeline class.

    The folder's own ``.py`` files are not linked, so nothing in it can be imported.
    """
    from diffusers import DiffusionPipeline

    index = dict(DiffusionPipeline.load_config(path, revision=revision))
    class_name, _ = split_class_name(index, path)
    stock = family_for_pipeline_class(class_name)().pipeline_class()
    folder = _local_folder(path, index, revision)
    view = Path(tempfile.mkdtemp(prefix="danceopd-stock-view-"))
    try:
        for name, entry in index.items():
            if not name.startswith("_") and isinstance(entry, (list, tuple)) and (folder / name).is_dir():
                os.symlink((folder / name).resolve(), view / name, target_is_directory=True)
        # the stock class's own index: its name, and only what its __init__ takes (not the exported class's
        # settings such as absorbed_guidance_scale, which diffusers would warn about)
        accepted = inspect.signature(stock.__init__).parameters
        index = {k: v for k, v in index.items() if k.startswith("_") or k in accepted}
        index["_class_name"] = stock.__name__
        (view / "model_index.json").write_text(json.dumps(index, indent=2))
        yield str(view)
    finally:
        shutil.rmtree(view, ignore_errors=True)


def load_stock_pipeline(pipeline_cls: type, path: str, revision: str | None = None, **kwargs: Any) -> Any:
    """``pipeline_cls.from_pretrained(path)``, also for a folder or Hub repo this project exported."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(path, revision=revision)
    kwargs.setdefault("use_safetensors", True)  # never a pickle (.bin): unpickling can run code
    if split_class_name(index, path)[1] is None:
        return pipeline_cls.from_pretrained(path, revision=revision, **kwargs)
    with stock_view(path, revision) as view:
        return pipeline_cls.from_pretrained(view, **kwargs)
