"""What a training run hands the user: the LoRA file, a loadable CFG-free pipeline folder, a model card.

Layout of ``output_dir`` (one folder, like diffusers' examples): ``pytorch_lora_weights.safetensors`` (stock
``load_lora_weights(output_dir)`` reads it), the pipeline folder itself (``model_index.json``, components, the
student transformer with its LoRA fused, ``pipeline_danceopd.py``), ``README.md`` and ``samples.png``.
Checkpoints and logs live there too and are never uploaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CUSTOM_PIPELINE_FILE = REPO_ROOT / "pipelines" / "pipeline_danceopd.py"
MODEL_CARD_TEMPLATE = REPO_ROOT / "model_card_template.md"
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*/**", "checkpoint-*", "*.tmp*/**", "logs/**", "validation/**", ".*"]


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} not found at {path}. Install danceopd-diffusers from its source tree (`pip install -e .`)."
        )
    return path


def save_student_lora(
    transformer: torch.nn.Module, family: Any, output_dir: str | os.PathLike, adapter: str
) -> str:
    """``pytorch_lora_weights.safetensors`` in diffusers' format, with the adapter metadata (rank, alpha)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=adapter)
    state = {k.replace(f".{adapter}.", "."): v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = transformer.peft_config[adapter].to_dict()
    family.pipeline_class().save_lora_weights(
        output_dir, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
    )
    return os.path.join(output_dir, "pytorch_lora_weights.safetensors")


def pipeline_settings(pipe: Any, cls: type) -> dict[str, Any]:
    """The init arguments ``pipe`` registered besides its components that ``cls`` takes (Flux2-Klein's
    ``is_distilled``): ``pipe.components`` alone would reset them to their defaults."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in pipe.config.items() if k in accepted and k not in pipe.components}


def save_pipeline_folder(
    pipe: Any,
    family: Any,
    transformer: torch.nn.Module,
    output_dir: str | os.PathLike,
    absorbed_guidance_scale: float | None = None,
) -> None:
    """The base pipeline's components with the student ``transformer``, as the custom CFG-free pipeline."""
    components = {k: v for k, v in pipe.components.items()}
    components["transformer"] = transformer
    cls = family.pipeline_class()
    stock = cls(**components, **pipeline_settings(pipe, cls))
    stock.save_pretrained(output_dir)
    shutil.copyfile(
        _require(CUSTOM_PIPELINE_FILE, "The custom pipeline"), Path(output_dir) / CUSTOM_PIPELINE_FILE.name
    )
    index_path = Path(output_dir) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [CUSTOM_PIPELINE_FILE.stem, family.custom_pipeline_class_name]
    index["absorbed_guidance_scale"] = absorbed_guidance_scale
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))


def fused_student(
    transformer: torch.nn.Module, adapter: str, drop_adapters: Sequence[str]
) -> torch.nn.Module:
    """Fuse the student LoRA into its base (in place) and remove every adapter."""
    if drop_adapters:
        transformer.delete_adapters(list(drop_adapters))
    transformer.set_adapter(adapter)
    transformer.fuse_lora(adapter_names=[adapter])
    transformer.unload_lora()
    return transformer


def render_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    repo_id: str | None,
    fields_table: str,
    routes_table: str,
    method: str,
    hyperparameters: dict[str, Any],
    absorbed_guidance_scale: float | None,
    has_lora: bool,
    has_pipeline: bool,
    samples_image: str | None,
    template_path: str | os.PathLike | None = None,
) -> str:
    """Render ``model_card_template.md`` into ``output_dir/README.md`` with Hub metadata; returns the text."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        license="other",
        library_name="diffusers",
        base_model=base_model if "/" in base_model and not os.path.exists(base_model) else None,
        pipeline_tag="text-to-image",
        tags=[
            "diffusers",
            "danceopd",
            "distillation",
            "flow-matching",
            "lora" if has_lora else "full-finetune",
        ],
    )
    hp = "\n".join(f"| `{k}` | `{v}` |" for k, v in hyperparameters.items())
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or _require(MODEL_CARD_TEMPLATE, "model_card_template.md")),
        repo_id=repo_id or Path(output_dir).name,
        base_model_name=base_model,
        fields_table=fields_table,
        routes_table=routes_table,
        method=method,
        hyperparameters_table=hp,
        absorbed_guidance_scale=absorbed_guidance_scale,
        has_lora=has_lora,
        has_pipeline=has_pipeline,
        samples_image=samples_image,
    )
    card.save(os.path.join(output_dir, "README.md"))
    return str(card)


def files_to_upload(output_dir: str | os.PathLike) -> list[str]:
    """Exactly the files ``push_output_dir`` would upload (relative paths, sorted)."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(output_dir)
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE_PATTERNS))


def create_hub_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    from huggingface_hub import create_repo

    return create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id


def push_output_dir(output_dir: str | os.PathLike, repo_id: str, token: str | None = None) -> Any:
    from huggingface_hub import upload_folder

    return upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="End of DanceOPD training",
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        token=token,
    )
