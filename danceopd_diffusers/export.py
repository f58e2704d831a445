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
import re
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .pipelines import EXPORTED_PIPELINE_FILE, EXPORTED_PIPELINE_MODULE

UPLOAD_IGNORE_PATTERNS = ["checkpoint-*/**", "checkpoint-*", "*.tmp*/**", "logs/**", "validation/**", ".*"]
PACKAGE_DIR = Path(__file__).resolve().parent
#: a base folder shipped inside this package describes itself in this file (its name, license, card tags and the
#: command that prints where it is installed): export reads the folder, not the code that ships it
SHIPPED_BASE_FILE = "danceopd_base.json"
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
    trained_resolution: int | None = None,
) -> None:
    """The base pipeline's components with the student ``transformer``, as the custom CFG-free pipeline.

    ``call_kwargs`` (:func:`trained_call_kwargs`) become the pipeline's ``__call__`` defaults; they are its
    config, so every ``save_pretrained`` / ``push_to_hub`` of the loaded pipeline keeps them. So is
    ``trained_resolution``: a call without a size renders at it (the stock default is the base's, e.g. 1024²),
    and a size far from it draws a warning.
    """
    components = {k: v for k, v in pipe.components.items()}
    components["transformer"] = transformer
    cls = family.pipeline_class()
    stock = cls(**components, **pipeline_settings(pipe, cls))
    stock.save_pretrained(output_dir)
    shutil.copyfile(EXPORTED_PIPELINE_FILE, Path(output_dir) / EXPORTED_PIPELINE_FILE.name)
    index_path = Path(output_dir) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [EXPORTED_PIPELINE_MODULE, family.custom_pipeline_class_name]
    index["absorbed_guidance_scale"] = absorbed_guidance_scale
    index["trained_call_kwargs"] = call_kwargs
    index["trained_resolution"] = trained_resolution
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


def public_value(value: Any) -> Any:
    """``value`` with every path in it made public (:func:`public_path`): for configs that may be pushed."""
    if isinstance(value, str):
        return public_path(value)
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(v) for v in value]
    return value


def _scrub(text: str, paths: Sequence[str]) -> str:
    for path in sorted((p for p in paths if os.path.isabs(p)), key=len, reverse=True):
        text = text.replace(path, public_path(path))
    return text


def py_literal(value: Any) -> str:
    """``value`` as Python source that evaluates to it and cannot end the card's code block: strings by ``repr``
    with every backtick escaped (a ```` ``` ```` inside a prompt or a folder name would close the markdown fence),
    other values (numbers, booleans, None) by ``repr``. Prompts, repo ids and folder names are user input: they
    must stay data in the card's code, never become code."""
    if isinstance(value, str):
        return repr(value).replace("`", "\\x60")
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    raise TypeError(f"no safe literal for {type(value).__name__} in the model card's code")


def md_code(text: Any, table: bool = False) -> str:
    """``text`` as one markdown code span on one line, whatever backticks or line breaks it holds (a folder, field
    or bucket name is user input); in a table cell (``table``) its pipes are escaped, or they would start columns."""
    text = " ".join(str(text).split())
    if table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_text(text: Any) -> str:
    """``text`` as plain markdown on one line, inside a paragraph or a table cell: no line break, table pipe, code
    span, emphasis, link or HTML can start in it."""
    text = " ".join(str(text).split())
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", text)


def card_fields_table(fields: dict[str, Any], paths: Sequence[str] = ()) -> str:
    """The card's fields table: each field's name and :meth:`describe`, the training machine's ``paths`` in it
    replaced by their public names first, then every cell escaped."""
    return "\n".join(
        f"| {md_code(name, table=True)} | {md_text(_scrub(field.describe(), paths))} |"
        for name, field in fields.items()
    )


def card_routes_table(routes: Sequence[Any]) -> str:
    """The card's routes table: field, data bucket and weight of each route, each cell escaped."""
    return "\n".join(
        f"| {md_code(r.field, table=True)} | {md_code(r.task, table=True)} | {md_text(r.weight)} |"
        for r in routes
    )


#: a local folder that is a snapshot of the Hub cache: ``.../models--<owner>--<name>/snapshots/<commit>``
_HUB_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


def _shipped_base(path: str) -> dict[str, Any] | None:
    """The description of a base shipped inside this package (its ``danceopd_base.json``), else None. Only a folder
    inside the package is asked: a user's folder cannot name itself as something the package ships."""
    if not os.path.isdir(path) or not Path(path).resolve().is_relative_to(PACKAGE_DIR):
        return None
    marker = Path(path, SHIPPED_BASE_FILE)
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def base_model_reference(path: str) -> dict[str, Any]:
    """How the card names the base, says where it comes from, and loads it: its Hub id, the shipped ShapesWorld
    base, or a local folder (by its name only, with what the reader must point ``base`` at).

    ``name`` identifies the base in checkpoints' run settings; ``where`` is the card's sentence on where the base
    comes from (markdown); ``default`` is the value the card's ``base = ...`` line starts with.
    """
    shipped = _shipped_base(path)
    if shipped is not None:
        folder = public_path(path)
        return {
            "name": shipped["name"],
            "hub_id": None,
            "license": shipped["license"],  # shipped with (and under the license of) danceopd-diffusers
            "tags": list(shipped.get("tags", [])),
            "default": folder,
            "where": (
                f"The base is the {shipped['name']}. It is not on the Hub: it ships with danceopd-diffusers, as the "
                f"folder {md_code(folder)} of its source repository and of its installed package "
                f"(`{shipped['locate']}` prints where it is). Set `base` below to that folder; the code itself needs "
                "only diffusers."
            ),
        }
    snapshot = _HUB_CACHE_SNAPSHOT.search(Path(path).resolve().as_posix()) if os.path.isdir(path) else None
    if snapshot:  # a Hub model passed by its cache folder: the card names the Hub id
        path = f"{snapshot['owner']}/{snapshot['name']}"
    elif os.path.exists(path):
        name = public_path(os.path.abspath(path))
        return {
            "name": name,
            "hub_id": None,
            "license": None,
            "default": name,
            "where": (
                f"The base was a local folder, {md_code(name)}, on the training machine; it is not a Hub model this "
                "card can name. Set `base` below to your copy of that folder (a diffusers pipeline folder)."
            ),
        }
    return {
        "name": path,
        "hub_id": path,
        "license": None,
        "default": path,
        "where": f"The base is the Hub model [{md_code(path)}](https://huggingface.co/{path}).",
    }


def base_load_line(base: dict[str, Any]) -> str:
    """The card's ``base = ...`` line: the Hub id as is, a local base as the value to replace."""
    line = f"base = {py_literal(base['default'])}"
    return line if base["hub_id"] else line + "  # set this to the base's folder (see above)"


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
    for key in kwargs:
        if not key.isidentifier():
            raise ValueError(f"{key!r} is not a keyword argument the card can write")
    return "\n".join(f"    {k}={py_literal(v)}," for k, v in kwargs.items())


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
    method: str,
    hyperparameters: dict[str, Any],
    call_kwargs: dict[str, Any],
    absorbed_guidance_scale: float | None,
    has_lora: bool,
    has_pipeline: bool,
    samples_image: str | None,
    fields_table: str | None = None,
    routes_table: str | None = None,
    fields: dict[str, Any] | None = None,
    fields_config: Any = None,
    prompt: str | None = None,
    dataset_images: Sequence[tuple[str, int]] = (),
    template_path: str | os.PathLike | None = None,
) -> str:
    """Render ``model_card_template.md`` into ``output_dir/README.md`` with Hub metadata; returns the text.

    The usage code is runnable as written with diffusers alone: keyword arguments, the trained size, steps, text
    length and the family's own guidance-off values (``call_kwargs``); the base by its Hub id, or, for a local
    base, the folder the reader points ``base`` at, with where to get it. Every user-given string (repo id,
    folder, field and bucket names, the prompt) enters the code as an escaped literal and the prose as escaped
    text. Local paths of the training machine never appear. ``fields`` (name -> field) builds the fields table
    (``fields_table`` is a prebuilt one); ``dataset_images`` names the training rows whose source images the
    sample grid shows, as ``(bucket, row)``.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_reference(base_model)
    paths = [base_model] + [
        s.path for s in (fields_config.fields.values() if fields_config else []) if s.path
    ]
    if fields is not None:
        fields_table = card_fields_table(fields, paths)
    if routes_table is None and fields_config is not None:
        routes_table = card_routes_table(fields_config.routes)
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
    tags += base.get("tags", [])
    resolution = hyperparameters["resolution"]
    call = card_call_kwargs(family, call_kwargs, resolution, prompt or DEFAULT_PROMPT)
    guidance = {k: v for k, v in call_kwargs.items() if k in family.unguided_call_kwargs()}
    repo = repo_id or Path(output_dir).name
    student_init = hyperparameters.get("student_init")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or package_file("model_card_template.md")),
        title=md_text(repo),
        repo_literal=py_literal(repo),
        repo_note=(
            f"{md_code(repo)} is this repository on the Hub."
            if repo_id
            else f"{md_code(repo)} is the folder the training run wrote: run the code beside it, or replace that "
            "string with the folder's path, or with the Hub id you upload it to."
        ),
        base_model_name=md_text(base["name"]),
        base_where=base["where"],
        base_load=base_load_line(base),
        student_init=md_code(public_path(str(student_init))) if student_init else None,
        lora_pipeline_class=TEXT_TO_IMAGE_PIPELINES.get(
            exported_pipelines()[family.custom_pipeline_class_name], "DiffusionPipeline"
        ),
        family=family.name,
        fields_table=_scrub(fields_table or "", paths),
        routes_table=routes_table or "",
        method=method,
        distilled=method != "sft",
        hyperparameters_table="\n".join(
            f"| `{k}` | {md_code(public_value(v), table=True)} |" for k, v in hyperparameters.items()
        ),
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
        dataset_images=", ".join(f"row {int(row)} of bucket {md_code(task)}" for task, row in dataset_images),
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
        "fields_config": public_value(fields_config.to_dict()),
        "args": public_value(hyperparameters),
        "trained_call_kwargs": call_kwargs,
    }
    Path(output_dir, "danceopd_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return config


#: JSON files of an export whose string values are settings (configs, indexes), not data such as vocabularies
_CONFIG_JSON = re.compile(r"(^|/)(model_index|config|[^/]*_config|special_tokens_map)\.json$")
#: config keys that name the folder a component was loaded from (diffusers', transformers')
_NAME_OR_PATH_KEYS = ("_name_or_path", "name_or_path")


def scrub_machine_paths(folder: str | os.PathLike, base_model: str) -> list[str]:
    """Replace every absolute path of the training machine in the configs of an export (``folder``): the
    components' ``_name_or_path`` become the base's public name (its Hub id, or its folder's name), any other
    absolute path its last component. diffusers and transformers record the folder each component was loaded
    from (``transformer/config.json``, ``vae/config.json``, ...), and ``--push_to_hub`` would publish it.

    Returns the files it rewrote (paths relative to ``folder``)."""
    root = Path(folder)
    base = base_model_reference(base_model)
    public_base = base["hub_id"] or base["default"]

    def clean(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
            return public_base if key in _NAME_OR_PATH_KEYS else public_path(os.path.expanduser(value))
        return value

    changed = []
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root).as_posix()
        if not _CONFIG_JSON.search(rel):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        cleaned = clean(data)
        if cleaned != data:
            path.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            changed.append(rel)
    return changed


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


#: the flags a run's card and ``danceopd_config.json`` record (with the resolution it trained at)
RECORDED_FLAGS = (
    "method",
    "num_rollout_steps",
    "query_strategy",
    "query_k",
    "per_sample_routing",
    "rank",
    "lora_alpha",
    "full_finetune",
    "learning_rate",
    "lr_scheduler",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "max_grad_norm",
    "mixed_precision",
    "seed",
    "max_sequence_length",
    "student_init",
)


def run_hyperparameters(args: Any, resolution: int, queried_sigma: dict | None = None) -> dict[str, Any]:
    """What the card and ``danceopd_config.json`` record of a run's flags: :data:`RECORDED_FLAGS`, the
    resolution, the σ the queries reached, and the options of the method and routing only where they apply."""
    out = {k: getattr(args, k) for k in RECORDED_FLAGS}
    out["resolution"] = resolution
    if args.query_space != "step":
        out["query_space"] = args.query_space
        out["query_reference_shift"] = args.query_reference_shift
    if queried_sigma is not None:  # the noise levels the queries reached on the run's grid
        out["queried_sigma"] = queried_sigma
    if args.routing != "hard":
        out["routing"] = args.routing
    method_option = {"dense": "dense_weighting", "sft": "weighting_scheme"}.get(args.method)
    if method_option:
        out[method_option] = getattr(args, method_option)
    if out["lora_alpha"] is None and not args.full_finetune:
        out["lora_alpha"] = args.rank
    return out


def tracker_config(args: Any, queried_sigma: dict | None = None) -> dict[str, Any]:
    """What trackers record of a run: its scalar flags and the σ its queries reached. Never the token: tracker
    configs are written to disk (``hparams.yml``) and shared."""
    config = {
        k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"
    }
    config.update({f"queried_sigma_{k}": v for k, v in (queried_sigma or {}).items()})
    return config


def checkpoint_settings(args: Any, fields_config: Any, targets: Sequence[str]) -> dict[str, Any]:
    """The settings every checkpoint records; resuming under other settings is refused. No machine paths:
    checkpoints may be pushed. (The σ query law is recorded only when chosen, so checkpoints of earlier versions,
    which queried by step, still resume.)"""
    settings = {
        "base_model": base_model_reference(args.pretrained_model_name_or_path)["name"],
        "revision": args.revision,
        "method": args.method,
        "full_finetune": args.full_finetune,
        "rank": None if args.full_finetune else args.rank,
        "lora_alpha": None if args.full_finetune else args.lora_alpha or args.rank,
        "targets": None if args.full_finetune else sorted(targets),
        "fields_config": public_value(fields_config.to_dict()),
    }
    if args.query_space != "step":
        settings["query_law"] = [args.query_space, args.query_reference_shift]
    return settings


def export_student(
    export_dir: str | os.PathLike,
    pipe: Any,
    family: Any,
    model: torch.nn.Module,
    *,
    base_model: str,
    fields_config: Any,
    fields: dict[str, Any],
    hyperparameters: dict[str, Any],
    full_finetune: bool,
    skip_pipeline_export: bool,
    dtype: torch.dtype,
    repo_id: str | None = None,
    prompt: str | None = None,
    samples_image: str | None = None,
    dataset_images: Sequence[tuple[str, int]] = (),
) -> None:
    """Everything a run hands over, written into ``export_dir`` (the output folder's staging sibling): the student
    LoRA, the CFG-free pipeline folder with the student fused in (or, with ``skip_pipeline_export``, a full
    fine-tune's transformer alone), the model card, ``danceopd_config.json``; then no machine path in any config.

    ``model`` is the trained transformer (a LoRA student still carries its adapters; a full fine-tune's fp32 master
    weights are exported in ``dtype``). The guidance the routed fields applied is recorded as absorbed."""
    from .student import STUDENT_ADAPTER

    method = hyperparameters["method"]
    if not full_finetune:
        save_student_lora(model, family, export_dir, STUDENT_ADAPTER)
        experts = [n for n in model.peft_config if n != STUDENT_ADAPTER]
        export_model = fused_student(model, STUDENT_ADAPTER, experts) if not skip_pipeline_export else None
    else:
        export_model = model.to(dtype)
    absorbed = fields_config.absorbed_guidance_scale()
    call = trained_call_kwargs(
        family,
        method=method,
        num_steps=hyperparameters["num_rollout_steps"],
        max_sequence_length=hyperparameters["max_sequence_length"],
    )
    resolution = hyperparameters["resolution"]
    if not skip_pipeline_export:
        save_pipeline_folder(
            pipe, family, export_model, export_dir, absorbed, call, trained_resolution=resolution
        )
    elif full_finetune:
        model.save_pretrained(os.path.join(export_dir, "transformer"))
    render_model_card(
        export_dir,
        base_model=base_model,
        repo_id=repo_id,
        family=family,
        fields_config=fields_config,
        call_kwargs=call,
        prompt=prompt,
        fields=fields,
        dataset_images=dataset_images,
        method=method,
        hyperparameters=hyperparameters,
        absorbed_guidance_scale=absorbed,
        has_lora=not full_finetune,
        has_pipeline=not skip_pipeline_export,
        samples_image=samples_image,
    )
    write_run_config(
        export_dir,
        base_model=base_model,
        fields_config=fields_config,
        hyperparameters=hyperparameters,
        call_kwargs=call,
    )
    scrub_machine_paths(export_dir, base_model)  # the components' _name_or_path
