"""Checks that need the model's *configuration* but not its weights.

Reading ``model_index.json``, the scheduler config and the transformer config (a few KB, downloaded for Hub
ids) is enough to know the family, that the scheduler is flow matching, and every module name, so a LoRA
that targets modules the model lacks, or whose rank contradicts its weights, fails in seconds.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    ConfigError,
    FieldsConfig,
    hub_offline,
    looks_like_hub_id,
    offline_error,
    regular_file_problem,
)
from .families import FamilyAdapter
from .lora_io import (
    PICKLE_SUFFIXES,
    LoraHeader,
    check_finite_file,
    check_safetensors,
    inspect_lora,
    pickle_refusal,
    resolve_lora_file,
)
from .network import check_hub_reachable, hub_failure
from .stock_loading import family_of_index


@dataclass
class ModelInfo:
    path: str
    pipeline_class_name: str
    family_cls: type[FamilyAdapter]
    scheduler_class_name: str
    module_names: set[str]
    transformer_config: dict
    custom_pipeline: str | None = None  # the module an exported DanceOPD folder names for its pipeline class
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # transformer parameter -> shape

    @property
    def linear_features(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every 2-D weight, by module name: what a LoRA on that module must match."""
        return {
            name[: -len(".weight")]: (shape[1], shape[0])
            for name, shape in self.param_shapes.items()
            if name.endswith(".weight") and len(shape) == 2
        }


#: files that hold a component's weights (any format from_pretrained reads; sharded ones have an index)
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".gguf",
    ".msgpack",
    ".h5",
    ".index.json",
)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:400]


def _has_weights(folder: Path) -> bool:
    return any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir() if p.is_file())


def _is_pickle_weight(name: str) -> bool:
    name = name.lower()
    return name.endswith(PICKLE_SUFFIXES) or any(name.endswith(s + ".index.json") for s in PICKLE_SUFFIXES)


def check_pickle_only(folder: Path, what: str) -> None:
    """A model folder whose weights exist only in a pickle format (``*.bin``, ``*.pt``, ...) is refused
    before anything loads: unpickling can run code, and loaders fall back to pickles where no safetensors
    file is found. (Beside a .safetensors file a pickle is ignored: every load here asks for safetensors.)"""
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json") for p in files):
        return
    pickles = sorted(p for p in files if _is_pickle_weight(p.name))
    if pickles:
        raise ConfigError(f"{what}: {pickle_refusal(pickles[0])}")


#: how far and how many entries :func:`check_folder_entries` looks at (a model folder has a few dozen)
_WALK_DEPTH, _WALK_ENTRIES = 3, 20_000


def check_folder_entries(path: str | Path, what: str) -> None:
    """Every file in a local model folder (three levels down) is a regular file, from ``os.stat`` alone:
    loaders open every file they find, and a FIFO blocks forever, a device reads without end."""
    root = Path(path)
    if not root.is_dir():
        return
    pending, seen = [(root, 0)], 0
    while pending:
        folder, depth = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise ConfigError(f"{what} {path}: {folder} cannot be listed ({exc.strerror or exc}).") from exc
        for entry in entries:
            seen += 1
            if seen > _WALK_ENTRIES:
                return
            if entry.is_dir():  # follows links, as the loaders do
                if depth + 1 < _WALK_DEPTH and not entry.is_symlink():
                    pending.append((Path(entry.path), depth + 1))
                continue
            problem = regular_file_problem(entry.path)
            if problem is not None and (problem != "it does not exist" or entry.is_symlink()):
                raise ConfigError(
                    f"{what} {path}: {entry.path}: {problem}. Replace it by the file itself (or remove it)."
                )


def check_component_weights(path: str, index: dict, flag: str) -> None:
    """Every model component of a local pipeline folder has its config and a weights file (a half-copied
    download otherwise fails only once the weights load)."""
    root = Path(path)
    if not root.is_dir():
        return
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)) or None in entry:
            continue
        folder = root / name
        if not (folder / "config.json").is_file():
            continue  # tokenizers and schedulers hold no config.json; missing configs are reported elsewhere
        if not _has_weights(folder):
            raise ConfigError(
                f"{flag} {path}: component {name!r} has a config.json but no weights file in {folder} (expected "
                "e.g. diffusion_pytorch_model.safetensors or model.safetensors). The folder is incomplete; "
                "download or export it again."
            )
        check_pickle_only(folder, f"{flag} {path}, component {name!r}")
        for file in sorted(folder.glob("*.safetensors")):  # headers only: a truncated download fails here
            check_safetensors(str(file), f"{flag} {path}, component {name!r}")


def _meta_transformer(family_cls: type[FamilyAdapter], config: dict) -> Any:
    """The transformer a config describes, built on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return family_cls().transformer_class().from_config(config)


def _param_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _load_json_config(path: str, subfolder: str | None = None, revision: str | None = None) -> dict:
    from diffusers import ConfigMixin

    class _Reader(ConfigMixin):
        config_name = "config.json"

    return dict(_Reader.load_config(path, subfolder=subfolder, revision=revision))


def inspect_pipeline(
    path: str, revision: str | None = None, flag: str = "--pretrained_model_name_or_path"
) -> ModelInfo:
    """Family, scheduler and module names of a pipeline folder or Hub id, from its configs only (``flag``
    names the option it came from in error messages)."""
    from diffusers import DiffusionPipeline

    if not Path(path).exists() and not looks_like_hub_id(path):
        raise ConfigError(
            f"{flag} {path} does not exist (and is not a Hub id such as owner/name). Pass a diffusers pipeline "
            "folder or Hub id."
        )
    if not Path(path).exists():  # a Hub id: no network fails here in seconds, not after the Hub's retries
        check_hub_reachable(flag, path, revision=revision)
    if os.path.lexists(path) and not Path(path).is_dir():
        raise ConfigError(
            f"{flag} {path} is not a folder ({regular_file_problem(path) or 'it is a file'}). Pass a diffusers "
            "pipeline folder (with model_index.json) or Hub id."
        )
    check_folder_entries(path, flag)
    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except Exception as exc:
        if not Path(path).exists() and hub_offline():
            raise offline_error(flag, path) from exc
        if not Path(path).exists() and (cause := hub_failure(exc, "model_index.json")):
            raise ConfigError(f"{flag} {path!r}: {cause}.") from exc
        raise ConfigError(
            f"Cannot read model_index.json of {path!r} ({_first_line(exc)}). Pass a diffusers pipeline folder or Hub id "
            "with --pretrained_model_name_or_path."
        ) from exc
    if not isinstance(index, dict):
        raise ConfigError(
            f"{flag} {path}: model_index.json holds no JSON object; download or export it again."
        )
    indexed = family_of_index(index, path, where=f"{flag} {path}")
    class_name, family_cls, custom_pipeline = indexed.class_name, indexed.family_cls, indexed.exported_module
    scheduler_entry = index.get("scheduler")
    valid = isinstance(scheduler_entry, (list, tuple)) and len(scheduler_entry) == 2
    scheduler_name = scheduler_entry[1] if valid and isinstance(scheduler_entry[1], str) else None
    if valid and scheduler_name is None:
        scheduler_name = str(scheduler_entry[1])
    if "FlowMatch" not in (scheduler_name or ""):
        raise ConfigError(
            f"The scheduler of {path!r} is {scheduler_name or str(scheduler_entry)[:80]!r}, not a flow-matching scheduler. DanceOPD distils "
            "velocity fields of flow-matching pipelines (FlowMatchEulerDiscreteScheduler); use such a pipeline "
            "or replace its scheduler."
        )
    try:
        transformer_config = _load_json_config(path, subfolder="transformer", revision=revision)
    except Exception as exc:
        raise ConfigError(
            f"{flag} {path}: cannot read transformer/config.json ({_first_line(exc)}). The pipeline is incomplete; "
            "download or export it again."
        ) from exc
    check_component_weights(path, index, flag)
    model = _meta_transformer(family_cls, transformer_config)
    module_names = {name for name, _ in model.named_modules()}
    param_shapes = _param_shapes(model)
    weights = Path(path, "transformer")
    for file in sorted(weights.glob("*.safetensors")) if weights.is_dir() else []:
        _compare_shapes(
            _safetensors_shapes(str(file)),
            param_shapes,
            lambda key, got, want, file=file: (
                f"{flag} {path}: {file.name} in transformer/ holds {key} of shape {got}, but "
                f"transformer/config.json makes it {want}: the weights and the config are of different models. "
                "Download or export the folder again."
            ),
        )
    return ModelInfo(
        path,
        class_name,
        family_cls,
        scheduler_name,
        module_names,
        transformer_config,
        custom_pipeline,
        param_shapes,
    )


def _safetensors_shapes(file: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _compare_shapes(shapes: dict, expected: dict, message: Any) -> None:
    """The first tensor both name whose shapes differ is an error (``message(key, got, want)``)."""
    for key in sorted(
        set(shapes) & set(expected)
    ):  # a file in an original (non-diffusers) layout shares none
        if shapes[key] != expected[key]:
            raise ConfigError(message(key, list(shapes[key]), list(expected[key])))


def check_lora_targets(target_modules: Sequence[str], module_names: set[str], what: str) -> None:
    """Each peft target (a module-name suffix) must match a module of the model."""
    for target in target_modules:
        if not any(n == target or n.endswith("." + target) for n in module_names):
            examples = sorted(n for n in module_names if n.count(".") >= 3)[:6]
            raise ConfigError(
                f"{what}: target module {target!r} does not exist in the transformer. Use names such as "
                f"{examples} (or their suffixes, e.g. 'attn.to_q')."
            )


def check_lora_file(
    header: LoraHeader,
    module_names: set[str],
    what: str,
    expected_rank: int | None = None,
    linear_features: dict[str, tuple[int, int]] | None = None,
) -> None:
    """A LoRA file against the transformer: its modules exist, its weights fit them, its rank is consistent."""
    if not header.modules:
        raise ConfigError(f"{what}: {header.file} holds no transformer LoRA weights (no *.lora_A.* keys).")
    missing = sorted(m for m in header.modules if m not in module_names)
    if missing:
        raise ConfigError(
            f"{what}: {header.file} targets {len(missing)} module(s) the transformer does not have, e.g. "
            f"{missing[:3]}. It was trained for another model; use a LoRA of this base model."
        )
    for module, features in sorted(header.features.items()):
        expected = (linear_features or {}).get(module)
        if expected is not None and features != expected:
            raise ConfigError(
                f"{what}: {header.file} has weights for {module} of (in, out) = {features}, but that layer of the "
                f"transformer is {expected}. It was trained for another model size; use a LoRA of this base model."
            )
    ranks = sorted(set(header.modules.values()))
    if (
        header.declared_rank is not None
        and len(ranks) == 1
        and ranks[0] != header.declared_rank
        and not header.rank_pattern
    ):
        raise ConfigError(
            f"{what}: {header.file} declares rank r={header.declared_rank} but its weights have rank {ranks[0]}. "
            "The file is inconsistent; re-save it with the right metadata."
        )
    if expected_rank is not None and lora_base_rank(header) != expected_rank:
        raise ConfigError(
            f"{what}: the LoRA in {header.file} has rank {lora_base_rank(header)}, but --rank is "
            f"{expected_rank}. Pass --rank {lora_base_rank(header)} to continue training it."
        )
    check_finite_file(header.file, what)


def lora_base_rank(header: LoraHeader) -> int:
    """The file's ``r``: declared, else the most common rank of its weights (what diffusers infers)."""
    if header.declared_rank is not None:
        return int(header.declared_rank)
    return Counter(header.modules.values()).most_common(1)[0][0]


def student_init_lora_config(header: LoraHeader, rank: int, lora_alpha: float | None) -> dict:
    """The adapter config of a student that continues the LoRA ``header`` describes (``--student_init``).

    Its scale is the file's: alpha, ``rank_pattern``, ``alpha_pattern`` (and rsLoRA / DoRA flags) come from the
    file's declared config, so step 0 is exactly base + that LoRA. An explicit ``--lora_alpha`` that contradicts
    the file is refused. A file that declares no alpha is read as diffusers reads it (alpha = r) unless
    ``--lora_alpha`` says otherwise.
    """
    declared = header.config
    if declared is None or declared.get("lora_alpha") is None:
        return {
            "r": rank,
            "lora_alpha": lora_alpha if lora_alpha is not None else rank,
            "target_modules": sorted(header.modules),
            "rank_pattern": {m: r for m, r in header.modules.items() if r != rank},
        }
    file_alpha = declared["lora_alpha"]
    if lora_alpha is not None and (float(lora_alpha) != float(file_alpha) or header.alpha_pattern):
        pattern = f" and alpha_pattern {header.alpha_pattern}" if header.alpha_pattern else ""
        raise ConfigError(
            f"--student_init: the LoRA in {header.file} was trained with lora_alpha={file_alpha}{pattern}, but "
            f"--lora_alpha is {lora_alpha}. A different alpha would rescale the warm start. Drop --lora_alpha "
            "(the file's alpha is used)"
            + ("." if header.alpha_pattern else f" or pass --lora_alpha {file_alpha}.")
        )
    config = dict(declared)
    config["lora_dropout"] = 0.0  # the student trains without dropout, as a fresh student LoRA does
    return config


def check_fields_against_model(config: FieldsConfig, info: ModelInfo) -> dict[str, LoraHeader]:
    """LoRA experts: files found and consistent with the model. Returns their headers by field name."""
    headers: dict[str, LoraHeader] = {}
    for spec in config.fields.values():
        if spec.embedded_guidance is not None and not info.family_cls.has_embedded_guidance:
            raise ConfigError(
                f"Field {spec.name!r} sets `embedded_guidance`, an input of guidance-distilled Flux models; the "
                f"{info.family_cls.name} family has none. Remove it (use a cfg field for classifier-free guidance)."
            )
        what = f"Field {spec.name!r}"
        if spec.type == "checkpoint":
            check_transformer_checkpoint(spec.path, spec.subfolder, info, what)
        if spec.type != "lora":
            continue
        try:
            file = resolve_lora_file(spec.path, spec.weight_name)
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from exc
        except Exception as exc:
            raise ConfigError(f"{what}: cannot find its LoRA ({_first_line(exc)}).") from exc
        header = inspect_lora(file, f"{what} (LoRA)")
        check_lora_file(header, info.module_names, what, linear_features=info.linear_features)
        headers[spec.name] = header
    return headers


def transformer_subfolder(path: str, subfolder: str | None = None) -> str | None:
    """Where a transformer checkpoint's ``config.json`` is: ``subfolder``, else ``transformer/`` of a pipeline
    folder or Hub repo, else the folder itself."""
    p = Path(path)
    if (
        subfolder is None
        and p.is_dir()
        and not (p / "config.json").is_file()
        and (p / "transformer").is_dir()
    ):
        return "transformer"
    if subfolder is None and not p.exists():
        return "transformer"  # a pipeline repo on the Hub
    return subfolder


def check_transformer_checkpoint(path: str, subfolder: str | None, info: ModelInfo, what: str) -> None:
    """A full transformer checkpoint (a diffusers folder, Hub id or single .safetensors file) exists, is in a
    format this project reads and has the base transformer's shapes, all from its config or file header."""
    local = Path(path)
    if not local.exists():
        if not looks_like_hub_id(path):
            raise ConfigError(
                f"{what}: checkpoint {path} does not exist (and is not a Hub id). Pass a diffusers transformer "
                "folder, a pipeline folder, a Hub id or a .safetensors file."
            )
        check_hub_reachable(f"{what}: checkpoint", path, "config.json")
    if local.exists() and not local.is_dir() and regular_file_problem(local) is not None:
        raise ConfigError(
            f"{what}: checkpoint {path}: {regular_file_problem(local)}. Pass a diffusers transformer folder, a "
            "pipeline folder or a .safetensors file."
        )
    check_folder_entries(path, f"{what}: checkpoint")
    if local.is_file():
        check_safetensors(str(local), what)
        shapes = _safetensors_shapes(str(local))
    else:
        subfolder = transformer_subfolder(path, subfolder)
        try:
            config = _load_json_config(path, subfolder=subfolder)
        except Exception as exc:
            if not local.exists() and hub_offline():
                raise offline_error(f"{what}: checkpoint", path) from exc
            if not local.exists() and (cause := hub_failure(exc, "config.json")):
                raise ConfigError(f"{what}: checkpoint {path!r}: {cause}.") from exc
            raise ConfigError(
                f"{what}: cannot read the config.json of checkpoint {path}"
                + (f" (subfolder {subfolder!r})" if subfolder else "")
                + f": {_first_line(exc)}. Pass a diffusers transformer folder, a pipeline folder or a .safetensors file."
            ) from exc
        folder = local / (subfolder or "")
        if folder.is_dir() and not _has_weights(folder):
            raise ConfigError(f"{what}: checkpoint {folder} has a config.json but no weights file.")
        if folder.is_dir():
            check_pickle_only(folder, f"{what}: checkpoint")
        try:
            shapes = _param_shapes(_meta_transformer(info.family_cls, config))
        except Exception as exc:
            raise ConfigError(
                f"{what}: checkpoint {path} is not a {info.family_cls.name} transformer ({_first_line(exc)})."
            ) from exc
    _compare_shapes(
        shapes,
        info.param_shapes,
        lambda key, got, want: (
            f"{what}: checkpoint {path} is a transformer of another shape: {key} is {got} there "
            f"but {want} in --pretrained_model_name_or_path. Use a checkpoint of this base model."
        ),
    )


def check_something_to_distill(config: FieldsConfig, warm_start: bool) -> None:
    """Routes that all go to the plain base would teach a student that starts as the base nothing."""
    plain = {
        r.field
        for r in config.routes
        if config.fields[r.field].type == "base" and config.fields[r.field].embedded_guidance is None
    }
    if config.routes and len(plain) == len({r.field for r in config.routes}) and not warm_start:
        raise ConfigError(
            f"Every route goes to the plain base field ({sorted(plain)}), and the student starts as the base, so "
            "it would learn nothing. Route to a cfg, guider, lora or checkpoint field, or pass --student_init to "
            "pull a warm start back to the base."
        )


def check_output_dir(path: str) -> None:
    """``--output_dir`` can be created and written, checked before anything loads."""
    if not path:
        raise ConfigError("--output_dir is empty; pass the folder to write the student to.")
    out = Path(path)
    if os.path.islink(out) and not out.exists():
        raise ConfigError(f"--output_dir {path} is a broken symbolic link. Pass a folder, or fix the link.")
    if out.exists() and not out.is_dir():
        problem = regular_file_problem(out)  # None: a regular file
        what = "is a file, not a folder" if problem is None else f"is not a folder ({problem})"
        raise ConfigError(f"--output_dir {path} {what}. Pass a new folder or the folder of an earlier run.")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"--output_dir {path} cannot be created: {existing} is a file. Pass another folder."
        )
    try:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {existing}")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--output_dir {path} is not writable ({_first_line(exc)}). Pass a folder you can write to."
        ) from exc


@contextlib.contextmanager
def load_errors(what: str, path: str) -> Iterator[None]:
    """At a weight-loading site: a file that only loading can find broken becomes one clear error line
    naming the flag or field and the file (not out-of-memory, and not bugs of other kinds)."""
    import pickle

    import torch
    from safetensors import SafetensorError

    try:
        yield
    except (ConfigError, torch.OutOfMemoryError):
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{what}: loading {path} failed ({describe_load_error(exc)}). {_LOAD_FIX}") from exc


_LOAD_FIX = "The files there do not fit this model or are damaged; check or replace them."


def describe_load_error(exc: BaseException) -> str:
    """A loader's exception in one line. A refused pickle is said to be one, without torch's advice to load it
    with ``weights_only=False`` (which would run whatever code it names)."""
    import pickle

    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
        return (
            "a pickle in it could not be read as plain tensors: it is damaged, or it names code to run, and it "
            "was not loaded. Pickles are never loaded beyond plain tensors here; use .safetensors files"
        )
    return f"{type(exc).__name__}: {_first_line(exc)}"


def describe_model_info(info: ModelInfo) -> dict[str, Any]:
    return {
        "pipeline": info.pipeline_class_name,
        "scheduler": info.scheduler_class_name,
        "family": info.family_cls.name,
    }
