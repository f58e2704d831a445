"""The resolution and text length to train at when ``--resolution`` / ``--max_sequence_length`` are not given:
the ones the base model was trained at, read from its files before any weights load.

Without this, a small model (ShapesWorld's 64 px base with its 32-token T5) would silently be trained at the
pipeline's hard-coded 512-1024 px and 256 tokens: slow, and out of distribution for the model.

Order of evidence: what an exported folder records (``danceopd_config.json``, written by ``train_danceopd.py``),
then the model's configs (the transformer's ``sample_size`` times the VAE's downsampling factor, else the VAE's
``sample_size``; the smallest ``model_max_length`` of its T5 / LLM tokenizers), then the script's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the text length used when nothing in the model says otherwise (the families' and diffusers' SD3 default)
DEFAULT_MAX_SEQUENCE_LENGTH = 256


@dataclass
class TrainedSize:
    resolution: int | None  # None: the pipeline's own default size, known once it is loaded
    resolution_reason: str
    max_sequence_length: int
    length_reason: str


def _read_json(path: str, filename: str, revision: str | None = None) -> dict[str, Any] | None:
    """A small JSON file of a local folder or Hub repo; None if it is absent or unreadable."""
    local = Path(path, filename)
    if Path(path).is_dir():
        try:
            return json.loads(local.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(
            Path(hf_hub_download(path, filename, revision=revision)).read_text(encoding="utf-8")
        )
    except Exception:  # absent from the repo, offline, ...: the next source of evidence decides
        return None


def trained_size(path: str, revision: str | None = None) -> TrainedSize:
    """What ``path`` (pipeline folder or Hub id) was trained at, and why we think so."""
    recorded = (_read_json(path, "danceopd_config.json", revision) or {}).get("args", {})
    index = _read_json(path, "model_index.json", revision) or {}

    resolution, resolution_reason = (
        None,
        "the pipeline's default size (no size recorded in the model's files)",
    )
    if isinstance(recorded.get("resolution"), int):
        resolution = recorded["resolution"]
        resolution_reason = f"recorded in {path}/danceopd_config.json"
    else:
        transformer = _read_json(path, "transformer/config.json", revision) or {}
        vae = _read_json(path, "vae/config.json", revision) or {}
        blocks = vae.get("block_out_channels")
        sample = transformer.get("sample_size")
        if isinstance(sample, int) and isinstance(blocks, list) and blocks:
            factor = 2 ** (len(blocks) - 1)
            resolution = sample * factor
            resolution_reason = f"the transformer's sample_size {sample} x the VAE's factor {factor}"
        elif isinstance(vae.get("sample_size"), int) and vae["sample_size"] >= 16:
            resolution = vae["sample_size"]
            resolution_reason = "the VAE's sample_size"
        if resolution is not None and resolution % 16:
            resolution, resolution_reason = (
                None,
                f"the pipeline's default size ({resolution_reason} is not /16)",
            )

    length, length_reason = DEFAULT_MAX_SEQUENCE_LENGTH, f"the default ({DEFAULT_MAX_SEQUENCE_LENGTH})"
    if isinstance(recorded.get("max_sequence_length"), int):
        length = recorded["max_sequence_length"]
        length_reason = f"recorded in {path}/danceopd_config.json"
    else:
        for folder in sorted(k for k in index if k.startswith("tokenizer")):
            config = _read_json(path, f"{folder}/tokenizer_config.json", revision) or {}
            if config.get("tokenizer_class", "").startswith("CLIP"):
                continue  # CLIP's 77 tokens are the pooled encoder's limit, not the prompt length
            limit = config.get("model_max_length")
            if isinstance(limit, int) and limit < length:
                length, length_reason = limit, f"the model_max_length of {folder}"
    return TrainedSize(resolution, resolution_reason, length, length_reason)


def fill_trained_defaults(args: Any, path: str, revision: str | None = None) -> list[str]:
    """Set ``args.resolution`` / ``args.max_sequence_length`` where the user gave none; returns what was chosen
    and why, one line each, for the log."""
    if args.resolution is not None and args.max_sequence_length is not None:
        return []
    size = trained_size(path, revision)
    lines = []
    if args.resolution is None and size.resolution is not None:
        args.resolution = size.resolution
        lines.append(
            f"--resolution {size.resolution} ({size.resolution_reason}; pass --resolution to change it)"
        )
    if args.max_sequence_length is None:
        args.max_sequence_length = size.max_sequence_length
        lines.append(
            f"--max_sequence_length {size.max_sequence_length} ({size.length_reason}; pass --max_sequence_length "
            "to change it)"
        )
    return lines


def describe_fallback_resolution(resolution: int) -> str:
    return f"--resolution {resolution} (the pipeline's default size: the model's files record none)"
