"""What a training run hands the user: the LoRA file, a loadable CFG-free pipeline folder, a model card.

Layout of ``output_dir`` (one folder, like diffusers' examples): ``pytorch_lora_weights.safetensors`` (stock
``load_lora_weights(output_dir)`` reads it), the pipeline folder itself (``model_index.json``, components, the
student transformer with its LoRA fused, ``pipeline_danceopd.py``), ``README.md`` and ``samples.png``.
Checkpoints and logs live there too and are never uploaded.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

#: the module exported folders carry and name in model_index.json (``danceopd_diffusers/pipeline_danceopd.py``)
CUSTOM_PIPELINE_MODULE = "pipeline_danceopd"
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*/**", "checkpoint-*", "*.tmp*/**", "logs/**", "validation/**", ".*"]
PACKAGE_DIR = Path(__file__).resolve().parent
#: what the card calls the embedded default's base (``danceopd_diffusers/shapesworld/sources/base``)
SHAPESWORLD_BASE = "ShapesWorld base"
DEFAULT_PROMPT = "a photo of a red fox in the snow"
#: stock edit pipelines that need ``image=``: the stock class that runs text-to-image on their components (what
#: the exported class does without ``image``), for the card's LoRA-on-the-base snippet
TEXT_TO_IMAGE_PIPELINES = {"QwenImageEditPipeline": "QwenImagePipeline"}


def package_file(name: str) -> Path:
    """A file shipped inside this package (wheel or source tree), found through importlib.resources."""
    path = resources.files(__package__) / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is missing from the danceopd_diffusers package; reinstall it.")
    return Path(str(path))


def exported_pipelines() -> dict[str, str]:
    """Exported class name (``model_index.json``'s) -> the stock diffusers pipeline class it subclasses.

    ``pipeline_danceopd.py`` builds each ``DanceOPD<Stock>`` from ``<Stock>``; the families name both.
    """
    from .families import FAMILIES

    return {f.custom_pipeline_class_name: f.pipeline_class_names[0] for f in FAMILIES.values()}


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
    call_kwargs: dict[str, Any] | None = None,
) -> None:
    """The base pipeline's components with the student ``transformer``, as the custom CFG-free pipeline.

    ``call_kwargs`` (:func:`trained_call_kwargs`) become the pipeline's ``__call__`` defaults; they are its
    config, so every ``save_pretrained`` / ``push_to_hub`` of the loaded pipeline keeps them.
    """
    components = {k: v for k, v in pipe.components.items()}
    components["transformer"] = transformer
    cls = family.pipeline_class()
    stock = cls(**components, **pipeline_settings(pipe, cls))
    stock.save_pretrained(output_dir)
    module_file = CUSTOM_PIPELINE_MODULE + ".py"
    shutil.copyfile(package_file(module_file), Path(output_dir) / module_file)
    index_path = Path(output_dir) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [CUSTOM_PIPELINE_MODULE, family.custom_pipeline_class_name]
    index["absorbed_guidance_scale"] = absorbed_guidance_scale
    index["trained_call_kwargs"] = call_kwargs
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))


def _stock_call_parameters(family: Any) -> dict[str, inspect.Parameter]:
    import diffusers

    stock = getattr(diffusers, exported_pipelines()[family.custom_pipeline_class_name])
    return dict(inspect.signature(stock.__call__).parameters)


def trained_call_kwargs(
    family: Any, *, method: str, num_steps: int, max_sequence_length: int
) -> dict[str, Any]:
    """The ``__call__`` arguments (besides prompt and size) that sample the student as it was trained.

    A distilled student: the family's guidance-off arguments (Flux's embedded guidance at the trained value),
    the rollout's step count and the text length. An ``sft`` student absorbed no guidance and was not trained
    on a rollout: the stock pipeline's own guidance and step count, with the trained text length.
    """
    params = _stock_call_parameters(family)
    guidance = family.unguided_call_kwargs()
    if method == "sft":
        embedded = {"guidance_scale"} if family.has_embedded_guidance else set()
        guidance = {k: v if k in embedded else params[k].default for k, v in guidance.items() if k in params}
        num_steps = params["num_inference_steps"].default
    kwargs = {"num_inference_steps": num_steps, "max_sequence_length": max_sequence_length, **guidance}
    # private switches (Kontext's _auto_resize) concern edit sources, not the documented call
    return {k: v for k, v in kwargs.items() if k in params and not k.startswith("_")}


def card_call_kwargs(
    family: Any, call_kwargs: dict[str, Any], resolution: int, prompt: str = DEFAULT_PROMPT
) -> dict[str, Any]:
    """The full call the model card gives: keyword prompt, the trained size, then ``call_kwargs``."""
    size: dict[str, Any] = {"height": resolution, "width": resolution}
    if "max_area" in _stock_call_parameters(family):  # Kontext rescales to max_area (1024^2) otherwise
        size["max_area"] = resolution * resolution
    return {"prompt": prompt, **size, **call_kwargs}


def public_path(path: str) -> str:
    """A path as it may appear in a card or config: Hub ids and relative paths as given, files of this
    package relative to it, other absolute paths of the training machine by their name only."""
    if not os.path.isabs(path):
        return path
    resolved = Path(path).resolve()
    if resolved.is_relative_to(PACKAGE_DIR):
        return (Path(PACKAGE_DIR.name) / resolved.relative_to(PACKAGE_DIR)).as_posix()
    return resolved.name


def _public(value: Any) -> Any:
    if isinstance(value, str):
        return public_path(value)
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    return value


def _scrub(text: str, paths: Sequence[str]) -> str:
    for path in sorted((p for p in paths if os.path.isabs(p)), key=len, reverse=True):
        text = text.replace(path, public_path(path))
    return text


def base_model_reference(path: str) -> dict[str, Any]:
    """How the card names and loads the base: its Hub id, the shipped ShapesWorld base, or a local folder."""
    from .demo import base_path

    if os.path.exists(path) and Path(path).resolve() == Path(base_path()).resolve():
        return {
            "name": SHAPESWORLD_BASE,
            "hub_id": None,
            "license": "apache-2.0",  # shipped with (and under the license of) danceopd-diffusers
            "load": "from danceopd_diffusers.demo import base_path  # the ShapesWorld base ships in the package\n"
            "base = base_path()",
        }
    if os.path.exists(path):
        name = public_path(os.path.abspath(path))
        return {
            "name": name,
            "hub_id": None,
            "license": None,
            "load": f"base = {name!r}  # the base was a local folder: point this at your copy of it",
        }
    return {"name": path, "hub_id": path, "license": None, "load": f"base = {path!r}"}


def _base_license(base: dict[str, Any]) -> dict[str, Any]:
    """The base model's license fields (a derivative carries them); ``other`` when they cannot be read."""
    if base["license"]:
        return {"license": base["license"]}
    if base["hub_id"] and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            from huggingface_hub import ModelCard

            data = ModelCard.load(base["hub_id"]).data.to_dict()
            if data.get("license"):
                return {k: data[k] for k in ("license", "license_name", "license_link") if data.get(k)}
        except Exception:  # gated, private or unreachable: say so below instead
            pass
    fields: dict[str, Any] = {"license": "other", "license_name": "same-as-base-model"}
    if base["hub_id"]:
        fields["license_link"] = f"https://huggingface.co/{base['hub_id']}"
    return fields


def _python_call(kwargs: dict[str, Any]) -> str:
    return "\n".join(
        f"    {k}={json.dumps(v) if isinstance(v, str) else repr(v)}," for k, v in kwargs.items()
    )


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
    family: Any,
    fields_table: str,
    routes_table: str,
    method: str,
    hyperparameters: dict[str, Any],
    call_kwargs: dict[str, Any],
    absorbed_guidance_scale: float | None,
    has_lora: bool,
    has_pipeline: bool,
    samples_image: str | None,
    fields_config: Any = None,
    prompt: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> str:
    """Render ``model_card_template.md`` into ``output_dir/README.md`` with Hub metadata; returns the text.

    The usage code is runnable as written: keyword arguments, the trained size, steps, text length and the
    family's own guidance-off values (``call_kwargs``). Local paths of the training machine never appear.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_reference(base_model)
    paths = [base_model] + [
        s.path for s in (fields_config.fields.values() if fields_config else []) if s.path
    ]
    tasks = {r.task for r in fields_config.routes} if fields_config else {"t2i"}
    edits = bool(tasks - {"t2i"})
    card_data = ModelCardData(
        **_base_license(base),
        base_model=base["hub_id"],
        pipeline_tag="text-to-image" if "t2i" in tasks or not edits else "image-to-image",
    )
    tags = ["diffusers", "diffusers-training", "danceopd", family.name, "flow-matching"]
    tags += ["lora" if has_lora else "full-finetune"]
    tags += ["text-to-image"] + (["image-to-image"] if edits else [])
    tags += ["distillation"] if method != "sft" else []
    tags += ["shapesworld"] if base["name"] == SHAPESWORLD_BASE else []
    resolution = hyperparameters["resolution"]
    call = card_call_kwargs(family, call_kwargs, resolution, prompt or DEFAULT_PROMPT)
    guidance = {k: v for k, v in call_kwargs.items() if k in family.unguided_call_kwargs()}
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or package_file("model_card_template.md")),
        repo_id=repo_id or Path(output_dir).name,
        base_model_name=base["name"],
        base_load=base["load"],
        lora_pipeline_class=TEXT_TO_IMAGE_PIPELINES.get(
            exported_pipelines()[family.custom_pipeline_class_name], "DiffusionPipeline"
        ),
        family=family.name,
        fields_table=_scrub(fields_table, paths),
        routes_table=routes_table,
        method=method,
        distilled=method != "sft",
        hyperparameters_table="\n".join(f"| `{k}` | `{_public(v)}` |" for k, v in hyperparameters.items()),
        call=_python_call(call),
        guidance=", ".join(f"`{k}={v!r}`" for k, v in guidance.items()),
        num_steps=call_kwargs.get("num_inference_steps"),
        resolution=resolution,
        max_sequence_length=call_kwargs.get("max_sequence_length"),
        can_edit=family.can_edit and edits,
        embedded_guidance=family.has_embedded_guidance,
        edit_kwargs=", ".join(
            f"`{k}={v!r}`" for k, v in family.unguided_call_kwargs().items() if k[0] == "_"
        ),
        absorbed_guidance_scale=absorbed_guidance_scale,
        has_lora=has_lora,
        has_pipeline=has_pipeline,
        samples_image=samples_image,
    )
    populate_model_card(card, tags=tags)
    card.save(os.path.join(output_dir, "README.md"))
    return str(card)


def write_run_config(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    fields_config: Any,
    hyperparameters: dict[str, Any],
    call_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """``danceopd_config.json``: the base, the fields, the run's settings and the trained call; no local paths."""
    base = base_model_reference(base_model)
    config = {
        "base_model": base["hub_id"] or base["name"],
        "fields_config": _public(fields_config.to_dict()),
        "args": _public(hyperparameters),
        "trained_call_kwargs": call_kwargs,
    }
    Path(output_dir, "danceopd_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return config


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
