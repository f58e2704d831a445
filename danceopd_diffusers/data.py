"""Training data through ``datasets``: buckets of rows per task, checked before any model loads.

Columns (names configurable): ``prompt``, ``task`` (the bucket a route draws from; absent -> every row is
``t2i``), ``source_image`` (edits), ``target_image`` (``sft``). Image cells may be images (the ``Image``
feature) or paths, which are taken relative to the data file's folder.

Every row is checked against that schema before any weights load (:meth:`TaskBuckets.check_rows` and
:meth:`TaskBuckets.check_routes`): a value of the wrong type or a missing one is an error naming the row, the
column and the fix, never dropped, emptied or converted to text. Images of any PIL mode become RGB by their
meaning (16-bit and float intensities scaled, transparency composited on white), and an image path that is
not a regular file (a FIFO, a device, a folder, a socket) is refused from ``os.stat`` without being opened.
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

from .config import (
    EDIT_ONLY_TYPES,
    ConfigError,
    FieldsConfig,
    RouteSpec,
    _short,
    hub_offline,
    looks_like_hub_id,
    offline_error,
    open_regular_file,
    regular_file_problem,
)
from .logging_utils import get_logger

logger = get_logger(__name__)

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


#: the flag that names each column (for the fix in an error message)
COLUMN_FLAGS = {
    "prompt": "--caption_column",
    "task": "--task_column",
    "source_image": "--source_image_column",
    "target_image": "--image_column",
}
#: image file suffixes datasets' imagefolder reads (and its metadata files): checked for non-regular files
_FOLDER_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".jsonl",
    ".csv",
    ".json",
)


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
    problem = regular_file_problem(path) if os.path.lexists(path) and not path.is_dir() else None
    if problem is not None and problem != "it does not exist":
        raise ConfigError(
            f"{flag} {source}: {problem}. Pass a data file ({'/'.join(sorted(LOCAL_BUILDERS))}), a folder or a "
            "Hub dataset id."
        )
    if path.is_file():
        return _load_data_file(path, flag, cache_dir), path.resolve().parent
    if path.is_dir():
        for name in ("train.jsonl", "train.json", "train.csv", "train.parquet"):
            if (path / name).is_file():  # a table whose image paths are relative to this folder
                return _load_data_file(path / name, flag, cache_dir), path.resolve()
        _check_folder_files(path, flag)
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
    kwargs: dict[str, Any] = {}
    if path.suffix.lower() == ".csv":
        lines = _first_lines(path, 2)
        if len(lines) < 2:
            raise ConfigError(f"{flag} {path} has a header but no rows: add one row per prompt.")
        kwargs["features"] = _csv_text_features(path, lines[0], flag)
    ds = _load(flag, str(path), builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    if len(ds) == 0:
        raise ConfigError(f"{flag} {path} holds no rows: add one row per prompt.")
    return ds


def _csv_text_features(path: Path, header: str, flag: str) -> Any:
    """Every CSV column read as text: a CSV has no types, and inferring them re-types cells silently (a prompt
    "007" becomes the number 7, a column of numbers loses its text). A duplicate header name, which the reader
    would rename, is refused; an empty one (a saved index) gets the reader's own name."""
    import csv

    from datasets import Features, Value

    names = next(csv.reader([header.lstrip("\ufeff").rstrip("\r\n")]), [])
    names = [
        n if n.strip() else f"Unnamed: {i}" for i, n in enumerate(names)
    ]  # pandas' name (an index column)
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{flag} {path}: the header names column {duplicate!r} twice. Rename one of them.")
    return Features({n: Value("string") for n in names})


def _check_folder_files(folder: Path, flag: str) -> None:
    """An image folder holds only regular files where datasets will read one (``os.scandir``, no open)."""
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                    continue
                if not entry.name.lower().endswith(_FOLDER_SUFFIXES):
                    continue
                problem = regular_file_problem(entry.path)
                if problem is not None:
                    raise ConfigError(
                        f"{flag} {folder}: {entry.path}: {problem}. Remove it or replace it by the file itself."
                    )


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


#: integer modes whose values are 16-bit intensities (``I`` is also 32-bit; see :func:`to_rgb`)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")
#: modes with an alpha channel (premultiplied ones included)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _intensity_scale(values: np.ndarray, mode: str) -> float:
    """The factor that maps a high-bit-depth or float image's values to 0-255, by what its range means."""
    if mode == "F" and not np.isfinite(values).all():
        raise ValueError("its pixel values include NaN or inf; save it as an 8-bit RGB image")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES:
        return 255.0 / 65535.0
    if low < 0:
        raise ValueError(f"its pixel values go down to {low:g}; save it as an 8-bit RGB image")
    if mode == "F" and high <= 1.0:
        return 255.0  # float intensities in [0, 1]
    if high <= 255:
        return 1.0
    if high <= 65535:
        return 255.0 / 65535.0  # 16-bit data in a 32-bit or float container (what 16-bit PNG/TIFF decode to)
    raise ValueError(f"its pixel values reach {high:g}, beyond 16 bits; save it as an 8-bit RGB image")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB by what its pixels mean, for every PIL mode.

    ``convert("RGB")`` alone clips 16-bit and 32-bit intensities (a 16-bit PNG becomes white), keeps the
    colour of fully transparent pixels (often black or garbage) and fails on premultiplied ``La``. Here:
    high-bit-depth and float images are scaled to 0-255, images with transparency (an alpha channel or a
    palette / ``tRNS`` transparent colour) are composited on white, the EXIF orientation is applied, and the
    other modes (1, L, P, CMYK, YCbCr, LAB, HSV, ...) go through PIL's own conversion.
    """
    from PIL import ImageOps

    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # a malformed EXIF block: the pixels are still usable as stored
        pass
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy() if image.readonly else image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        scaled = np.clip(np.rint(values * _intensity_scale(values, mode)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        if mode == "La":
            image = image.convert("LA")
        elif mode == "RGBa":
            image = image.convert("RGBA")
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(value: Any, base_dir: Path | None) -> Image.Image:
    """An image cell (PIL image, ``{"bytes", "path"}`` dict or path) as an RGB PIL image (:func:`to_rgb`).

    A path must be a regular file: it is checked with ``os.stat`` and opened non-blocking, so a FIFO, a device
    or a socket is refused instead of blocking or reading forever. Other cell types are refused: a number or a
    list is not an image.
    """
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            import io

            with Image.open(io.BytesIO(value["bytes"])) as img:
                img.load()
                return to_rgb(img)
        value = value.get("path")
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(
            f"{_short(value)} ({type(value).__name__}) is not an image: give a path, or an image cell"
        )
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    problem = regular_file_problem(path)
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
    from PIL import UnidentifiedImageError

    with open_regular_file(path, "image") as handle:
        try:
            img = Image.open(handle)
        except UnidentifiedImageError:
            raise ValueError(
                f"cannot identify image file {str(path)!r}: not an image format PIL reads"
            ) from None
        with img:
            img.load()
            return to_rgb(img)


def _describe_value(value: Any) -> str:
    """A cell's value in words, for error messages: what is wrong with it is visible at a glance."""
    if value is None:
        return "empty (null)"
    if isinstance(value, str):
        return "empty" if not value.strip() else f"{_short(value)}"
    if isinstance(value, bool):
        return f"{value} (a boolean)"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return f"{_short(value)} (a {type(value).__name__})"


def _column(dataset: Any, name: str) -> list:
    """A column's values; text that is not valid UTF-8 (which the reader keeps undecoded until read) is an
    error naming the column, not a traceback."""
    try:
        return list(dataset[name])
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"The data's column {name!r} holds text that is not valid UTF-8 ({exc.reason} at byte {exc.start}). "
            "Re-save the data file as UTF-8."
        ) from exc


def _is_image_feature(dataset: Any, column: str) -> bool:
    features = getattr(dataset, "features", None) or {}
    return type(features.get(column)).__name__ == "Image"


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


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
        roles = {k: getattr(columns, k) for k in COLUMN_FLAGS}
        shared = [
            (a, b) for a in roles for b in roles if a < b and roles[a] == roles[b] and roles[a] in names
        ]
        if shared:  # one column in two roles: a prompt that is an image path, a task that is a prompt, ...
            a, b = shared[0]
            raise ConfigError(
                f"{COLUMN_FLAGS[a]} and {COLUMN_FLAGS[b]} both name column {roles[a]!r}; each role needs its own "
                "column. Fix one of the flags."
            )
        defaults = DataColumns()
        for key in ("task", "source_image"):  # a column the user named must exist (the defaults are optional)
            name = getattr(columns, key)
            if name != getattr(defaults, key) and name not in names:
                raise ConfigError(
                    f"{COLUMN_FLAGS[key]} {name!r}: the dataset has no such column (columns: {names}). Pass the "
                    f"name of an existing column, or drop {COLUMN_FLAGS[key]}."
                )
        self._prompts = self.check_rows()
        tasks = _column(dataset, columns.task) if columns.task in names else ["t2i"] * len(dataset)
        self.buckets: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            self.buckets.setdefault(task, []).append(i)

    def check_rows(self) -> list[str]:
        """Every row's prompt is non-empty text, its task (if the column exists) a non-empty name, and its image
        cells an image, a path or empty: the first row that is not is an error naming the row, the column and
        the fix. Returns the prompts, unchanged."""
        names = self.dataset.column_names
        prompts = _column(self.dataset, self.columns.prompt)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(
                    f"Row {i}: its prompt (column {self.columns.prompt!r}) is {_describe_value(prompt)}; every row "
                    "needs a prompt that is non-empty text. Fix the row (write it as a quoted string) or remove it, "
                    "or point --caption_column at the column that holds the prompts."
                )
        if self.columns.task in names:
            for i, task in enumerate(_column(self.dataset, self.columns.task)):
                if not isinstance(task, str) or not task.strip():
                    raise ConfigError(
                        f"Row {i}: its task (column {self.columns.task!r}) is {_describe_value(task)}; every row "
                        "needs the name of its bucket (e.g. t2i, or the edit bucket a route draws from). Fix the "
                        "row or remove it."
                    )
        for key in ("source_image", "target_image"):
            column = getattr(self.columns, key)
            if column not in names or _is_image_feature(self.dataset, column):
                continue  # an Image column holds images by construction (and is decoded only when read)
            for i, value in enumerate(_column(self.dataset, column)):
                if _is_blank(value) or isinstance(value, (str, Image.Image)):
                    continue
                if isinstance(value, dict) and (value.get("bytes") or isinstance(value.get("path"), str)):
                    continue
                raise ConfigError(
                    f"Row {i}: its {key.replace('_', ' ')} (column {column!r}) is {_describe_value(value)}, not "
                    f"an image: give a path (relative to the data file's folder) or an image. Fix the row, or "
                    f"pass {COLUMN_FLAGS[key]} naming the image column."
                )
        return list(prompts)

    def has_column(self, name: str) -> bool:
        return name in self.dataset.column_names

    def is_edit_bucket(self, task: str) -> bool:
        col = self.columns.source_image
        if not self.has_column(col):
            return False
        rows = self.buckets.get(task, [])
        return any(not _is_blank(v) for v in self.dataset.select(rows)[col])

    def check_routes(
        self, routes: Sequence[RouteSpec], need_target: bool, can_edit: bool, editing_families: list[str]
    ):
        """Every routed bucket non-empty, its images present and readable, edits only where the family edits;
        rows in buckets no route draws from are named in one warning (never dropped silently)."""
        routed = list(dict.fromkeys(r.task for r in routes))
        for task in routed:
            rows = self.buckets.get(task, [])
            fields = sorted({r.field for r in routes if r.task == task})
            if not rows:
                raise ConfigError(
                    f"Bucket {task!r} (routed to {fields}) is empty: no row has {self.columns.task} == {task!r}. "
                    f"Buckets in the data: {_short(sorted(self.buckets), 200)}. Fix the route's `task` or add rows."
                )
        unrouted = [t for t in self.buckets if t not in routed]
        if (
            unrouted
        ):  # said, never silent: training on a subset of a shared dataset is legitimate, a typo is not
            counts = ", ".join(
                f"{t!r} ({len(self.buckets[t])} row(s), first row {self.buckets[t][0]})" for t in unrouted
            )
            logger.warning(
                f"no route draws from task(s) {counts[:300]}: those rows are not trained on (routed: "
                f"{_short(routed, 200)}). Route them (`task: NAME` in a route), fix their task, or remove them."
            )
        for task in routed:
            rows = self.buckets[task]
            fields = sorted({r.field for r in routes if r.task == task})
            edit = self.is_edit_bucket(task)
            if edit and not can_edit:
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
                    if _is_blank(value):
                        if col == self.columns.target_image and need_target:
                            raise ConfigError(
                                f"Row {row} of bucket {task!r} has no {col}; sft needs one per row. Add its target "
                                "image or remove the row."
                            )
                        if col == self.columns.source_image and edit:
                            raise ConfigError(
                                f"Row {row} of bucket {task!r} has no {col}, but the bucket's other rows are edits "
                                "(they have one); every edit row needs its source image. Add it, or move the row to "
                                "a text-to-image bucket (another task)."
                            )
                        continue
                    if col == self.columns.target_image and not need_target:
                        continue  # read by sft only
                    try:
                        open_image(value, self.base_dir)
                    except Exception as exc:
                        detail = " ".join(str(exc).split())[:300]
                        raise ConfigError(
                            f"Row {row} of bucket {task!r}: {col} {_short(value)} cannot be opened ({detail}). "
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
            None if _is_blank(v) else open_image(v, self.base_dir) for v in self.dataset.select(rows)[column]
        ]


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize keeping the aspect ratio so the image covers (height, width), then centre-crop to it."""
    image = to_rgb(image)
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def images_to_tensor(images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1] at (height, width) (aspect kept, centre crop)."""
    arrays = [np.asarray(fit_image(img, height, width), dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def check_routes_on_data(
    config: FieldsConfig, buckets: TaskBuckets, family: Any, per_sample_routing: bool, need_target: bool
) -> None:
    """The routes against the data, before any weights load: a batch never mixes edits and text-to-image
    (they cannot share a rollout), image guidance only on buckets with source images, and
    :meth:`TaskBuckets.check_routes` (every routed bucket present and readable, edits only where ``family``
    edits; ``need_target``: sft reads target images)."""
    if per_sample_routing and len({buckets.is_edit_bucket(r.task) for r in config.routes}) > 1:
        raise ConfigError(
            "--per_sample_routing would put edit and text-to-image samples in one batch, which cannot share a "
            "rollout. Use per-step routing (drop --per_sample_routing): each step then draws one bucket."
        )
    for route in config.routes:
        edit_only = [s.name for s in config.resolve_chain(route.field) if s.type in EDIT_ONLY_TYPES]
        if edit_only and not buckets.is_edit_bucket(route.task):
            raise ConfigError(
                f"Route to {route.field!r} uses image guidance ({edit_only[0]!r}) on bucket {route.task!r}, which "
                "has no source images. Route it to an edit bucket or use a cfg field."
            )
    from .families import editing_families

    buckets.check_routes(
        config.routes, need_target=need_target, can_edit=family.can_edit, editing_families=editing_families()
    )
