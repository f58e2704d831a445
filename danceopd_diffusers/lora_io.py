"""Reading LoRA files of either format (diffusers or peft) and inspecting them without loading weights."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import (
    ConfigError,
    hub_offline,
    looks_like_hub_id,
    offline_error,
    open_regular_file,
    regular_file_problem,
)

DIFFUSERS_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_LORA_WEIGHT_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
#: suffixes of weight files in pickle formats (torch.save, pickle): never loaded as weights here
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickle_kind(file: str | Path) -> str | None:
    """What pickle format ``file`` is in, by its suffix or its first bytes (a torch.save zip archive, a plain
    pickle), or None. Only the first 4 bytes are read, and only from a regular file."""
    name = Path(file).name.lower()
    head = b""
    if regular_file_problem(file) is None:
        with open_regular_file(file, "weights file") as handle:
            head = handle.read(4)
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip archive (torch.save)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    if name.endswith(PICKLE_SUFFIXES) or name.endswith(tuple(s + ".index.json" for s in PICKLE_SUFFIXES)):
        return f"a pickle-format file ({Path(name).suffix})"
    return None


def pickle_refusal(file: str | Path, kind: str | None = None) -> str:
    """The message for a weights file in a pickle format: names the file and the fix; never suggests loading
    it anyway (unpickling can run code)."""
    kind = kind or pickle_kind(file) or "a pickle-format file"
    return (
        f"{file} is {kind}, not a safetensors file; pickle formats are never loaded here because unpickling can "
        "run code. Convert it to safetensors (safetensors.torch.save_file, on a machine where you trust the "
        "file) or use the model's .safetensors weights, and pass those."
    )


def resolve_lora_file(path_or_id: str, weight_name: str | None = None, what: str = "LoRA") -> str:
    """A local path to the LoRA's safetensors file: a file, a folder, or a Hub repo id (downloaded); ``what``
    names it in errors (the flag or field)."""
    path = Path(path_or_id)
    if path.is_file():
        return str(path)
    if path.is_dir():
        names = [weight_name] if weight_name else [DIFFUSERS_LORA_WEIGHT_NAME, PEFT_LORA_WEIGHT_NAME]
        for name in names:
            if os.path.lexists(path / name):
                problem = regular_file_problem(path / name)
                if problem is not None:
                    raise ConfigError(f"{what} {path / name}: {problem}. Replace it by the file itself.")
                return str(path / name)
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if len(found) == 1 and not weight_name:
            return str(path / found[0])
        pickles = sorted(p.name for p in path.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        raise FileNotFoundError(
            f"No LoRA weights in {path}: expected {' or '.join(names)}"
            + (f"; found {found}, pass `weight_name` to choose one" if found else "")
            + (
                f"; {pickles[0]} is in a pickle format, which is never loaded here because unpickling can run "
                "code: use a .safetensors LoRA"
                if pickles and not found
                else ""
            )
            + "."
        )
    if os.path.lexists(path):  # a FIFO, device or socket: never opened
        raise ConfigError(
            f"{what} {path}: {regular_file_problem(path)}. Pass a .safetensors file or its folder."
        )
    if not looks_like_hub_id(path_or_id):
        raise FileNotFoundError(f"LoRA path {path_or_id!r} does not exist (and is not a Hub repo id).")
    from huggingface_hub import hf_hub_download

    from .network import check_hub_reachable, hub_failure

    filename = weight_name or DIFFUSERS_LORA_WEIGHT_NAME
    check_hub_reachable("LoRA", path_or_id, filename)
    try:
        return hf_hub_download(path_or_id, filename)
    except Exception as exc:
        if hub_offline():
            raise offline_error("LoRA", path_or_id) from exc
        cause = hub_failure(
            exc, filename, missing_file=False
        )  # no LoRA file: the caller may try a checkpoint
        if cause:
            raise ConfigError(f"LoRA {path_or_id!r}: {cause}.") from exc
        raise


def safetensors_problem(file: str) -> str | None:
    """Why ``file`` cannot be read as a safetensors file, or None. Says so when it is a pickle, which this
    project never loads (unpickling can run code)."""
    from safetensors import safe_open

    problem = regular_file_problem(file)
    if problem is not None:
        return f"{file}: {problem}; pass a .safetensors file"
    kind = pickle_kind(file)
    if kind is not None:
        return pickle_refusal(file, kind)
    try:
        with safe_open(file, framework="pt") as f:
            f.keys()
        return None
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        return (
            f"{file} is not a readable safetensors file ({detail}): it is truncated, corrupt or of another "
            "format. Re-download or re-save it."
        )


def check_safetensors(file: str, what: str) -> None:
    """A clear error, naming ``what`` uses the file, when it is not a readable safetensors file."""
    problem = safetensors_problem(file)
    if problem is not None:
        raise ConfigError(f"{what}: {problem}")


@dataclass
class LoraHeader:
    """What a LoRA file declares: module paths (without the ``transformer.`` prefix), ranks and alphas."""

    file: str
    modules: dict[str, int]  # module path -> rank found in the lora_A weight
    declared_rank: int | None
    declared_alpha: float | None
    target_modules: list[str] | None
    #: the adapter config the file declares (diffusers' ``lora_adapter_metadata`` or a peft adapter_config.json)
    config: dict | None = None
    features: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (in, out) of its weights

    @property
    def rank_pattern(self) -> dict:
        return dict((self.config or {}).get("rank_pattern") or {})

    @property
    def alpha_pattern(self) -> dict:
        return dict((self.config or {}).get("alpha_pattern") or {})


def _normalize_key(key: str) -> str | None:
    if key.startswith("transformer."):
        return key[len("transformer.") :]
    if key.startswith(_PEFT_PREFIX):
        return key[len(_PEFT_PREFIX) :]
    if key.startswith(("text_encoder", "unet.")):
        return None
    return key


def _peft_config_next_to(file: str) -> dict | None:
    cfg = Path(file).with_name("adapter_config.json")
    if not os.path.lexists(cfg):
        return None
    fix = "Fix or remove it (the LoRA's weights declare their own shapes)."
    try:
        with open_regular_file(cfg, "LoRA config", fix) as handle:
            config = json.loads(handle.read(1 << 20).decode("utf-8"))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"LoRA config {cfg} is not valid JSON ({exc}). {fix}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"LoRA config {cfg} must hold a JSON object. {fix}")
    return config


def _adapter_metadata(file: str) -> dict | None:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get("lora_adapter_metadata")
    beside = _peft_config_next_to(file)  # read (and checked) even when the file's own metadata wins
    if raw:  # diffusers' save_lora_weights prefixes every key with the component name
        try:
            packed = json.loads(raw)
            if not isinstance(packed, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise ConfigError(
                f"{file}: its `lora_adapter_metadata` is not a JSON object ({exc}). Re-save the LoRA with "
                "diffusers' save_lora_weights, or without that metadata."
            ) from exc
        unpacked = {k[len("transformer.") :]: v for k, v in packed.items() if k.startswith("transformer.")}
        return unpacked or packed
    return beside


def inspect_lora(file: str, what: str = "LoRA") -> LoraHeader:
    """Read only the safetensors header (cheap even for huge files)."""
    from safetensors import safe_open

    check_safetensors(file, what)
    modules: dict[str, int] = {}
    features: dict[str, tuple[int, int]] = {}
    with safe_open(file, framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    for key, shape in shapes.items():
        norm = _normalize_key(key)
        if norm is None or ".lora_A." not in norm:
            continue
        module = norm.split(".lora_A.")[0]
        modules[module] = shape[0]
        b_shape = shapes.get(key.replace(".lora_A.", ".lora_B."))
        if len(shape) == 2 and b_shape is not None and len(b_shape) == 2:
            features[module] = (shape[1], b_shape[0])
    declared = _adapter_metadata(file)
    meta = declared or {}
    targets = meta.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    rank, alpha = meta.get("r"), meta.get("lora_alpha")
    if (
        (rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1))
        or (alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))))
        or (targets is not None and not all(isinstance(t, str) for t in targets))
    ):
        raise ConfigError(
            f"{what}: {file} declares an adapter config with r={rank!r}, lora_alpha={alpha!r}, target_modules="
            f"{str(targets)[:80]}; r must be a positive integer, lora_alpha a number, target_modules names. Re-save "
            "the LoRA (diffusers' save_lora_weights writes them)."
        )
    return LoraHeader(
        file=file,
        modules=modules,
        declared_rank=meta.get("r"),
        declared_alpha=meta.get("lora_alpha"),
        target_modules=list(targets) if targets else None,
        features=features,
        config=declared,
    )


def nonfinite_tensor(file: str) -> str | None:
    """The first tensor of a safetensors file holding NaN or inf, or None; read one tensor at a time (a LoRA
    is small), so a damaged or diverged file is named before any model loads."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return key
    return None


def check_finite_file(file: str, what: str) -> None:
    """A :class:`ConfigError` naming ``what`` and the file when a tensor in it is NaN or inf."""
    key = nonfinite_tensor(file)
    if key is not None:
        raise ConfigError(
            f"{what}: {file} holds NaN or inf values (tensor {key}); it was saved from a diverged run or is "
            "damaged. Use an earlier or another copy of it."
        )


def load_lora_for_diffusers(file: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict with diffusers' ``transformer.`` prefix and the adapter metadata, from either format."""
    from safetensors.torch import load_file

    raw = load_file(file)
    state = {}
    for key, value in raw.items():
        norm = _normalize_key(key)
        if norm is None:
            continue
        state["transformer." + norm.replace(".default.weight", ".weight")] = value
    return state, _adapter_metadata(file)


def load_student_lora_state(model: torch.nn.Module, input_dir: str) -> None:
    """A checkpoint's student LoRA into the student adapter (accelerate's load hook), kept in fp32 for training."""
    from peft import set_peft_model_state_dict

    from .student import STUDENT_ADAPTER

    state, _ = load_lora_for_diffusers(os.path.join(input_dir, "pytorch_lora_weights.safetensors"))
    state = {k[len("transformer.") :]: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=STUDENT_ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"Checkpoint {input_dir} does not match the student: {result.unexpected_keys[:3]}")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
