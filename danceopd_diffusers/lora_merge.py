"""Weight merging of expert LoRAs: the paper's "weight merging" baseline, through peft's ``add_weighted_adapter``.

    python -m danceopd_diffusers.lora_merge --pretrained_model_name_or_path BASE \
        --lora local.safetensors --lora global.safetensors --weights 0.5 0.5 \
        --combination ties_svd --density 0.5 --output_dir merged/

writes ``merged/pytorch_lora_weights.safetensors`` (diffusers' format, with its rank and alpha in the metadata,
so the stock ``load_lora_weights``, ``evaluate --lora`` and ``train_danceopd.py --student_init`` read it) and
``merged/merge_config.json`` (what was merged, how).

``cat`` is the exact weighted sum of the experts' weight deltas (its rank is the sum of theirs); the ``*_svd``
variants (TIES, DARE, magnitude pruning) act on each module's full delta and factor it back at ``--svd_rank``;
``linear``, ``ties``, ``dare_*`` without ``_svd`` act on A and B separately, which peft itself calls a rough
approximation.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .lora_io import inspect_lora, load_lora_for_diffusers, resolve_lora_file

COMBINATIONS = (
    "cat",
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
)
#: combinations that prune to a density (peft refuses them without one)
NEEDS_DENSITY = {c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude"))}
_PEFT_KEY_PREFIX = "base_model.model."


def _lora_config(file: str):
    """The LoRA's own config (rank, alpha, patterns) from its metadata, else rank = alpha = the found rank."""
    from peft import LoraConfig

    header = inspect_lora(file)
    if not header.modules:
        raise ValueError(f"{file} holds no LoRA weights for a transformer.")
    _, metadata = load_lora_for_diffusers(file)
    known = LoraConfig.__dataclass_fields__
    kwargs = {
        k: v for k, v in (metadata or {}).items() if k in known and k not in ("target_modules", "peft_type")
    }
    rank = max(header.modules.values())
    kwargs.setdefault("r", header.declared_rank or rank)
    kwargs.setdefault("lora_alpha", header.declared_alpha or kwargs["r"])
    kwargs.pop("task_type", None)
    return LoraConfig(**{**kwargs, "target_modules": sorted(header.modules)})


def merge_lora_files(
    transformer: torch.nn.Module,
    files: Sequence[str],
    weights: Sequence[float],
    combination: str = "cat",
    density: float | None = None,
    svd_rank: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Merge LoRA files over ``transformer`` (no adapters on it yet; it is wrapped by peft in place).

    Returns the merged adapter's state dict (module paths without prefix, as ``save_lora_weights`` takes them)
    and its peft config as a dict.
    """
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    if len(files) != len(weights):
        raise ValueError(f"{len(files)} LoRA files but {len(weights)} weights: give one weight per LoRA.")
    if combination not in COMBINATIONS:
        raise ValueError(f"Unknown combination {combination!r}; use one of {list(COMBINATIONS)}.")
    if combination in NEEDS_DENSITY and density is None:
        raise ValueError(f"The {combination!r} combination prunes: give a density in (0, 1].")
    names = [f"expert_{i}" for i in range(len(files))]
    model = None
    for name, file in zip(names, files):
        config = _lora_config(file)
        if model is None:
            model = get_peft_model(transformer, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        state, _ = load_lora_for_diffusers(file)
        state = {_PEFT_KEY_PREFIX + k[len("transformer.") :]: v for k, v in state.items()}
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{file} does not fit this transformer: {unexpected[:3]}")
    merge_kwargs: dict[str, Any] = {"combination_type": combination}
    if density is not None:
        merge_kwargs["density"] = density
    if svd_rank is not None:
        merge_kwargs["svd_rank"] = svd_rank
    model.base_model.add_weighted_adapter(names, list(weights), "merged", **merge_kwargs)
    state = get_peft_model_state_dict(model, adapter_name="merged")
    state = {k[len(_PEFT_KEY_PREFIX) :]: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return state, model.peft_config["merged"].to_dict()


def merge_and_save(
    pretrained_model_name_or_path: str,
    loras: Sequence[str],
    weights: Sequence[float],
    output_dir: str | os.PathLike,
    combination: str = "cat",
    density: float | None = None,
    svd_rank: int | None = None,
    revision: str | None = None,
) -> Path:
    """Load the base transformer, merge, and write the merged LoRA in diffusers' format."""
    from .preflight import inspect_pipeline

    family = inspect_pipeline(pretrained_model_name_or_path, revision=revision).family_cls()
    files = [resolve_lora_file(lora) for lora in loras]
    transformer = family.transformer_class().from_pretrained(
        pretrained_model_name_or_path, subfolder="transformer", revision=revision
    )
    state, config = merge_lora_files(transformer, files, weights, combination, density, svd_rank)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    family.pipeline_class().save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=config
    )
    record = {
        "base": pretrained_model_name_or_path,
        "loras": list(loras),
        "weights": list(weights),
        "combination": combination,
        "density": density,
        "svd_rank": svd_rank,
        "rank": config["r"],
        "lora_alpha": config["lora_alpha"],
    }
    (out / "merge_config.json").write_text(json.dumps(record, indent=2) + "\n")
    return out / "pytorch_lora_weights.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--pretrained_model_name_or_path", required=True, help="the base the LoRAs were trained on"
    )
    parser.add_argument(
        "--lora", action="append", required=True, help="a LoRA file, folder or Hub id (repeat)"
    )
    parser.add_argument(
        "--weights", type=float, nargs="+", default=None, help="one per LoRA (default: equal)"
    )
    parser.add_argument("--combination", default="cat", choices=COMBINATIONS)
    parser.add_argument("--density", type=float, default=None, help="kept fraction for TIES / DARE / pruning")
    parser.add_argument("--svd_rank", type=int, default=None, help="rank of *_svd merges (default: largest)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    weights = args.weights or [1.0 / len(args.lora)] * len(args.lora)
    if args.density is not None and not 0 < args.density <= 1:
        parser.error(f"--density {args.density} must be in (0, 1].")
    try:
        path = merge_and_save(
            args.pretrained_model_name_or_path,
            args.lora,
            weights,
            args.output_dir,
            args.combination,
            args.density,
            args.svd_rank,
            args.revision,
        )
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print(f"merged LoRA written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
