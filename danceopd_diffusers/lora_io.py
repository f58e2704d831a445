"""Reading LoRA files of either format (diffusers or peft) and inspecting them without loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, hub_offline, looks_like_hub_id, offline_error

DIFFUSERS_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_LORA_WEIGHT_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def resolve_lora_file(path_or_id: str, weight_name: str | None = None) -> str:
    """A local path to the LoRA's safetensors file: a file, a folder, or a Hub repo id (downloaded)."""
    path = Path(path_or_id)
    if path.is_file():
        return str(path)
    if path.is_dir():
        names = [weight_name] if weight_name else [DIFFUSERS_LORA_WEIGHT_NAME, PEFT_LORA_WEIGHT_NAME]
        for name in names:
            if (path / name).is_file():
                return str(path / name)
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if len(found) == 1 and not weight_name:
            return str(path / found[0])
        raise FileNotFoundError(
            f"No LoRA weights in {path}: expected {' or '.join(names)}"
            + (f"; found {found}, pass `weight_name` to choose one" if found else "")
            + "."
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

    try:
        with safe_open(file, framework="pt") as f:
            f.keys()
        return None
    except Exception as exc:
        with open(file, "rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            kind = "a PyTorch zip archive (torch.save)" if head.startswith(b"PK") else "a Python pickle"
            return (
                f"{file} is {kind}, not a safetensors file; pickles are never loaded here because unpickling can "
                "run code. Convert it with safetensors.torch.save_file and pass the .safetensors file."
            )
        return (
            f"{file} is not a readable safetensors file ({exc}): it is truncated, corrupt or of another format. "
            "Re-download or re-save it."
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
    return json.loads(cfg.read_text()) if cfg.is_file() else None


def _adapter_metadata(file: str) -> dict | None:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get("lora_adapter_metadata")
    if raw:  # diffusers' save_lora_weights prefixes every key with the component name
        packed = json.loads(raw)
        unpacked = {k[len("transformer.") :]: v for k, v in packed.items() if k.startswith("transformer.")}
        return unpacked or packed
    return _peft_config_next_to(file)


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
    return LoraHeader(
        file=file,
        modules=modules,
        declared_rank=meta.get("r"),
        declared_alpha=meta.get("lora_alpha"),
        target_modules=list(targets) if targets else None,
        features=features,
        config=declared,
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
