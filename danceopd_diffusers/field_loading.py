"""Turn a checked :class:`FieldsConfig` into field objects, loading only the weights each kind needs.

With a LoRA student, the base field and every LoRA expert live on the student's own transformer (the base
with all adapters off; an expert as a frozen named adapter): no extra copy of the base weights. With a full
student the pristine base must be kept apart, so the base and LoRA experts (LoRA fused) are frozen copies.
Full-checkpoint experts are always separate frozen transformers; a LoRA on a checkpoint (``of``) is fused into its
own frozen copy of that checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import FieldsConfig, FieldSpec
from .families import FamilyAdapter
from .fields import CFGField, Field, GuiderField, ImageGuidanceField, MixField, TransformerField
from .lora_io import load_lora_for_diffusers, resolve_lora_file
from .preflight import transformer_subfolder
from .stock_loading import load_stock_pipeline
from .stopping import check_loaded_finite
from .student import AdapterScope, load_lora_into_adapter


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


def load_transformer(
    family: FamilyAdapter,
    path: str,
    subfolder: str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """A transformer from a diffusers folder / Hub id (``subfolder`` guessed) or a single ``.safetensors`` file."""
    cls = family.transformer_class()
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        base = kwargs.pop("config_source", None)
        if base is not None:
            return cls.from_single_file(str(p), config=base, subfolder="transformer", dtype=dtype)
        return cls.from_single_file(str(p), dtype=dtype)
    kwargs.pop("config_source", None)
    kwargs.setdefault("use_safetensors", True)  # never a pickle (.bin): unpickling can run code
    subfolder = transformer_subfolder(path, subfolder)
    return cls.from_pretrained(path, subfolder=subfolder, dtype=dtype, **kwargs)


def load_pipeline(family: FamilyAdapter, path: str, custom_pipeline: str | None = None, **kwargs: Any) -> Any:
    """The family's stock pipeline, also from a folder this project exported (a DanceOPD student or a
    ShapesWorld source), so that an exported model can be the base of further training.

    An exported folder's index names its own ``pipeline_danceopd.py``; that file is never imported: the stock
    class of the family loads the folder's components (``stock_loading``), since the rollout and the fields
    rely on its ``__call__`` (with CFG). ``custom_pipeline`` is accepted for callers that pass
    ``ModelInfo.custom_pipeline``; the index itself decides.
    """
    return load_stock_pipeline(family.pipeline_class(), path, **kwargs)


def build_fields(
    config: FieldsConfig,
    family: FamilyAdapter,
    pretrained_path: str,
    student_transformer: torch.nn.Module,
    scope: AdapterScope | None,
    dtype: torch.dtype,
    device: torch.device | str,
    revision: str | None = None,
) -> dict[str, Field]:
    """Build every declared field. ``scope`` is given iff the student is a LoRA on ``student_transformer``."""
    fields: dict[str, Field] = {}
    pristine: list[torch.nn.Module] = []  # the one frozen base copy a full student needs

    def base_copy() -> torch.nn.Module:
        if not pristine:
            model = load_transformer(family, pretrained_path, "transformer", dtype, revision=revision)
            pristine.append(_freeze(model).to(device))
        return pristine[0]

    def checkpoint_model(spec: FieldSpec) -> torch.nn.Module:
        model = load_transformer(family, spec.path, spec.subfolder, dtype, config_source=pretrained_path)
        check_loaded_finite(model, f"Field {spec.name!r}: checkpoint {spec.path}")
        return model

    def build(spec: FieldSpec) -> Field:
        if spec.name in fields:
            return fields[spec.name]
        if spec.type == "base":
            if scope is not None:
                field: Field = TransformerField(
                    spec.name, family, student_transformer, None, scope, "base model"
                )
            else:
                field = TransformerField(
                    spec.name, family, base_copy(), description="base model (frozen copy)"
                )
        elif spec.type == "lora":
            state, metadata = load_lora_for_diffusers(resolve_lora_file(spec.path, spec.weight_name))
            if spec.of is None and scope is not None:  # a named adapter on the student's shared base
                load_lora_into_adapter(student_transformer, state, metadata, adapter_name=spec.name)
                scope.refresh()
                field = TransformerField(
                    spec.name, family, student_transformer, [spec.name], scope, f"base + LoRA {spec.path}"
                )
            else:  # fused into a frozen copy of what it applies to: its checkpoint, or the pristine base
                if spec.of is not None:
                    under = config.fields[spec.of]
                    model = checkpoint_model(under)
                    described = f"checkpoint {under.path} + LoRA {spec.path} (fused copy)"
                else:
                    model = load_transformer(family, pretrained_path, "transformer", dtype, revision=revision)
                    described = f"base + LoRA {spec.path} (fused copy)"
                load_lora_into_adapter(model, state, metadata, adapter_name=spec.name)
                model.fuse_lora(adapter_names=[spec.name])
                model.unload_lora()
                field = TransformerField(spec.name, family, _freeze(model).to(device), description=described)
        elif spec.type == "checkpoint":
            field = TransformerField(
                spec.name,
                family,
                _freeze(checkpoint_model(spec)).to(device),
                description=f"checkpoint {spec.path}",
            )
        elif spec.type == "cfg":
            field = CFGField(spec.name, build(config.fields[spec.of]), spec.scale, spec.norm_rescale)
        elif spec.type == "image_guidance":
            field = ImageGuidanceField(
                spec.name, build(config.fields[spec.of]), spec.text_scale, spec.image_scale
            )
        elif spec.type == "guider":
            from diffusers import guiders

            guider = getattr(guiders, spec.guider)(**spec.guider_kwargs)
            field = GuiderField(spec.name, build(config.fields[spec.of]), guider)
        elif spec.type == "mix":
            field = MixField(spec.name, [build(config.fields[n]) for n in spec.of], spec.weights)
        else:  # parse_fields_config rejects unknown types first
            raise ValueError(f"unknown field type {spec.type!r}")
        if isinstance(field, TransformerField):
            field.embedded_guidance = spec.embedded_guidance
        fields[spec.name] = field
        return field

    for spec in config.fields.values():
        build(spec)
    return fields
