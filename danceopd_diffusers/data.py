"""Training data through ``datasets``: buckets of rows per task, checked before any model loads.

Columns (names configurable): ``prompt``, ``task`` (the bucket a route draws from; absent -> every row is
``t2i``), ``source_image`` (edits), ``target_image`` (``sft``). Image cells may be images (the ``Image``
feature) or paths, which are taken relative to the data file's folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import ConfigError, RouteSpec, hub_offline, looks_like_hub_id, offline_error

LOCAL_BUILDERS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


@dataclass
class DataColumns:
    prompt: str = "prompt"
    task: str = "task"
    source_image: str = "source_image"
    target_image: str = "target_image"


def load_training_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
):
    """Returns (dataset, folder that relative image paths are taken from). Every problem with the data
    source is a :class:`ConfigError` naming the flag and the file."""
    if train_data_dir is not None and dataset_name is not None:
        raise ConfigError("--dataset_name and --train_data_dir both given; pass one.")
    source = train_data_dir or dataset_name
    if source is None:
        raise ConfigError("No training data: pass --dataset_name (Hub id or local file) or --train_data_dir.")
    flag = "--train_data_dir" if train_data_dir is not None else "--dataset_name"
    path = Path(source)
    if path.is_file():
        return _load_data_file(path, flag, cache_dir), path.resolve().parent
    if path.is_dir():
        for name in ("train.jsonl", "train.json", "train.csv", "train.parquet"):
            if (path / name).is_file():  # a table whose image paths are relative to this folder
                return _load_data_file(path / name, flag, cache_dir), path.resolve()
        ds = _load(flag, str(path), "imagefolder", data_dir=str(path), split="train", cache_dir=cache_dir)
        return ds, path.resolve()
    if train_data_dir is not None:
        raise ConfigError(f"--train_data_dir {train_data_dir} does not exist.")
    if path.suffix.lower() in (*LOCAL_BUILDERS, ".txt", ".tsv") or not looks_like_hub_id(
        dataset_name, owner_required=False
    ):
        raise ConfigError(
            f"--dataset_name {dataset_name} does not exist (and is not a Hub dataset id). Pass a local "
            f"{'/'.join(sorted(LOCAL_BUILDERS))} file, a Hub dataset id, or --train_data_dir."
        )
    from .network import check_hub_reachable

    check_hub_reachable(flag, dataset_name, "README.md", repo_type="dataset")
    ds = _load(flag, dataset_name, dataset_name, dataset_config_name, split="train", cache_dir=cache_dir)
    return ds, None


def _load_data_file(path: Path, flag: str, cache_dir: str | None):
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(
            f"{flag} {path}: unsupported data file; use one of {sorted(LOCAL_BUILDERS)} or an image folder."
        )
    if path.stat().st_size == 0:
        raise ConfigError(f"{flag} {path} is empty: add one row per prompt (a `prompt` column or key).")
    if path.suffix.lower() == ".csv" and len(_first_lines(path, 2)) < 2:
        raise ConfigError(f"{flag} {path} has a header but no rows: add one row per prompt.")
    ds = _load(flag, str(path), builder, data_files=str(path), split="train", cache_dir=cache_dir)
    if len(ds) == 0:
        raise ConfigError(f"{flag} {path} holds no rows: add one row per prompt.")
    return ds


def _first_lines(path: Path, n: int) -> list[str]:
    """Up to ``n`` non-blank lines, read lazily (data files can be large)."""
    found: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                found.append(line)
                if len(found) == n:
                    break
    return found


def _load(flag: str, name: str, *args: Any, **kwargs: Any):
    """``datasets.load_dataset`` whose failures (malformed files, offline Hub ids) are one clear line."""
    import logging

    from datasets import load_dataset

    # the file readers log their parse errors with a traceback; the error below says the same in one line
    readers = logging.getLogger("datasets.packaged_modules")
    level = readers.level
    readers.setLevel(logging.CRITICAL)
    try:
        return load_dataset(*args, **kwargs)
    except Exception as exc:
        if not Path(name).exists() and hub_offline():
            raise offline_error(flag, name) from exc
        cause = exc.__cause__ or exc  # datasets wraps the parser's error in a generic one
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(
            f"{flag} {name} cannot be read ({type(cause).__name__}: {detail[:300]}). Fix the file (one row per "
            f"prompt, valid {'/'.join(sorted(LOCAL_BUILDERS))}) or pass another one."
        ) from exc
    finally:
        readers.setLevel(level)


def open_image(value: Any, base_dir: Path | None) -> Image.Image:
    """An image cell (PIL image, ``{"bytes", "path"}`` dict or path) as an RGB PIL image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            import io

            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    with Image.open(path) as img:
        return img.convert("RGB")


class TaskBuckets:
    """Row indices per task, and row access with images opened on demand."""

    def __init__(self, dataset: Any, columns: DataColumns, base_dir: Path | None = None):
        self.dataset = dataset
        self.columns = columns
        self.base_dir = base_dir
        names = dataset.column_names
        if columns.prompt not in names:
            raise ConfigError(
                f"The dataset has no prompt column {columns.prompt!r} (columns: {names}); pass --caption_column."
            )
        if columns.target_image not in names and "image" in names:  # imagefolder
            columns.target_image = "image"
        self._prompts = [str(p or "") for p in dataset[columns.prompt]]
        tasks = dataset[columns.task] if columns.task in names else ["t2i"] * len(dataset)
        self.buckets: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            self.buckets.setdefault(str(task), []).append(i)

    def has_column(self, name: str) -> bool:
        return name in self.dataset.column_names

    def is_edit_bucket(self, task: str) -> bool:
        col = self.columns.source_image
        if not self.has_column(col):
            return False
        rows = self.buckets.get(task, [])
        return any(v is not None and v != "" for v in self.dataset.select(rows)[col])

    def check_routes(
        self, routes: Sequence[RouteSpec], need_target: bool, can_edit: bool, editing_families: list[str]
    ):
        """Every routed bucket non-empty, its images present and readable, edits only where the family edits."""
        for task in dict.fromkeys(r.task for r in routes):
            rows = self.buckets.get(task, [])
            fields = sorted({r.field for r in routes if r.task == task})
            if not rows:
                raise ConfigError(
                    f"Bucket {task!r} (routed to {fields}) is empty: no row has {self.columns.task} == {task!r}. "
                    f"Buckets in the data: {sorted(self.buckets)}. Fix the route's `task` or add rows."
                )
            if self.is_edit_bucket(task) and not can_edit:
                others = ", ".join(editing_families) or "none in this version"
                raise ConfigError(
                    f"Bucket {task!r} (routed to {fields}) holds edit samples (rows with {self.columns.source_image}), "
                    f"but this pipeline family cannot edit. Families that can edit: {others}."
                )
            image_cols = [
                c for c in (self.columns.source_image, self.columns.target_image) if self.has_column(c)
            ]
            if need_target and self.columns.target_image not in image_cols:
                raise ConfigError(
                    f"--method sft needs target images, but the dataset has no {self.columns.target_image!r} column; "
                    "pass --image_column."
                )
            subset = self.dataset.select(rows)
            for col in image_cols:
                for row, value in zip(rows, subset[col]):
                    if value is None or value == "":
                        if col == self.columns.target_image and need_target:
                            raise ConfigError(
                                f"Row {row} of bucket {task!r} has no {col}; sft needs one per row."
                            )
                        continue
                    try:
                        if isinstance(value, Image.Image):
                            continue
                        open_image(value, self.base_dir)
                    except Exception as exc:
                        raise ConfigError(
                            f"Row {row} of bucket {task!r}: {col} {value!r} cannot be opened ({exc}). "
                            "Fix the path (relative paths are taken from the data file's folder) or remove the row."
                        ) from exc

    def sample(self, task: str, n: int, generator: torch.Generator) -> list[int]:
        rows = self.buckets[task]
        picks = torch.randint(0, len(rows), (n,), generator=generator).tolist()
        return [rows[i] for i in picks]

    def prompts(self, rows: Sequence[int]) -> list[str]:
        return [self._prompts[r] for r in rows]

    def images(self, rows: Sequence[int], column: str) -> list[Image.Image | None]:
        if not self.has_column(column):
            return [None] * len(rows)
        return [
            None if v is None or v == "" else open_image(v, self.base_dir)
            for v in self.dataset.select(rows)[column]
        ]


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize keeping the aspect ratio so the image covers (height, width), then centre-crop to it."""
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def images_to_tensor(images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1] at (height, width) (aspect kept, centre crop)."""
    arrays = [np.asarray(fit_image(img, height, width), dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
