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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .families import FamilyAdapter, family_for_pipeline_class
from .pipelines import EXPORTED_PIPELINE_MODULE


@dataclass(frozen=True)
class IndexedPipeline:
    """What a ``model_index.json`` says about its pipeline: the class, its family, and whether it is an export."""

    class_name: str
    family_cls: type[FamilyAdapter]
    #: the module an exported DanceOPD folder names for its class (:data:`EXPORTED_PIPELINE_MODULE`), else None
    exported_module: str | None = None


def family_of_index(index: dict, path: str, where: str | None = None) -> IndexedPipeline:
    """The one reading of a ``model_index.json``'s ``_class_name``: its family, from a stock class name or an
    exported ``[module, class]`` pair. Other custom code is refused (it is never run); ``where`` prefixes the
    messages (default: the path)."""
    where = where or repr(path)
    class_name, module = index.get("_class_name"), None
    if (
        isinstance(class_name, (list, tuple))
        and len(class_name) == 2
        and all(isinstance(c, str) for c in class_name)
    ):
        module, class_name = class_name
        if module != EXPORTED_PIPELINE_MODULE:
            raise ConfigError(
                f"{path!r} uses custom pipeline code ({module}.{class_name}), which danceopd-diffusers does not "
                "run. Pass the stock diffusers pipeline it was built on, or a folder exported by train_danceopd.py."
            )
    if not isinstance(class_name, str):
        raise ConfigError(
            f"{where}: model_index.json names the pipeline class {str(class_name)[:80]!r}, which is not a "
            "class name; download or export the folder again."
        )
    try:
        family_cls = family_for_pipeline_class(class_name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return IndexedPipeline(class_name, family_cls, module)


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
    stock = family_of_index(index, path).family_cls.pipeline_class()
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
    if family_of_index(index, path).exported_module is None:
        return pipeline_cls.from_pretrained(path, revision=revision, **kwargs)
    with stock_view(path, revision) as view:
        return pipeline_cls.from_pretrained(view, **kwargs)
