"""What the training script needs from accelerate's engines beyond ``prepare``: the checks, gathering a sharded
transformer for its no-grad calls, and full state dicts for saving.

Under FSDP2 every forward of a sharded module all-gathers its blocks, a collective that every rank must join in the
same order. The rollout and the fields' targets are no-grad calls whose number differs between ranks (the rollout
stops at each rank's own last queried state; per-sample routes and step-dependent guiders call fields per group),
so they run inside :func:`gathered`: each block is all-gathered once, every call of the scope (adapter switches
included) uses those weights without communication, and the blocks are resharded on exit. Only the student's
training forward and backward run sharded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .config import ConfigError


def _fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a module that FSDP2's ``fully_shard`` has sharded (in place: ``pipe.transformer`` itself)."""
    return bool(_fsdp_units(model))


def check_engine(accelerator: Any, full_finetune: bool, cuda_graphs: bool) -> None:
    """Engine settings this script cannot honour, refused before any weights load.

    accelerate turns an FSDP or DeepSpeed config into its engine only on accelerator devices; on CPU processes it
    would silently train as DDP, so that is refused too.
    """
    from accelerate.utils import DistributedType

    wanted = None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        wanted = DistributedType.FSDP
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        wanted = DistributedType.DEEPSPEED
    if wanted is not None and accelerator.distributed_type != wanted:
        raise ConfigError(
            f"the accelerate config asks for {wanted.value}, but accelerate runs these processes as "
            f"{accelerator.distributed_type.value}: accelerate uses FSDP and DeepSpeed only on GPUs (or other "
            "accelerators). On CPU use accelerate_configs/ddp.yaml or `accelerate launch --multi_gpu`."
        )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "the accelerate config uses FSDP1; this script supports FSDP2 only: set `fsdp_version: 2` in its "
            "fsdp_config (see accelerate_configs/fsdp2_lora.yaml)."
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise ConfigError(
                "DeepSpeed ZeRO-3 is not supported: it partitions the weights, and the rollout's no-grad calls "
                "differ in number between ranks. Use accelerate_configs/fsdp2_full.yaml (or fsdp2_lora.yaml) to "
                "shard the weights, or ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml)."
            )
    if cuda_graphs and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(
            f"--cuda_graphs cannot capture a transformer under {accelerator.distributed_type.value}; drop the flag "
            "or train with DDP (accelerate_configs/ddp.yaml)."
        )


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """All-gather a sharded ``model`` once for the no-grad calls inside; nothing for an unsharded one.

    Every rank must enter and leave the scope together (it all-gathers and frees); inside it, a rank may call the
    model any number of times, or not at all.
    """
    units = _fsdp_units(model)
    if not units:
        yield
        return
    # ``reshard_after_forward`` as each unit has it (accelerate keeps the root unit unsharded after forward)
    reshard = [
        g.post_forward_mesh_info is not None for u in units for g in u._get_fsdp_state()._fsdp_param_groups
    ]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        flags = iter(reshard)
        for unit in units:
            for _ in unit._get_fsdp_state()._fsdp_param_groups:
                unit.set_reshard_after_forward(next(flags), recurse=False)
            unit.reshard()


def end_training(accelerator: Any) -> None:
    """Every process reaches a barrier before any of them tears its process group down.

    Without it a rank that finished first destroys its gloo group while the main process is still exporting and
    holds the connection open; that rank can then abort on exit ("terminate called without an active exception",
    seen once in a CI run of the FSDP2 resume test) and the launcher reports the whole run as failed.
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()


def full_state_dict(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of a sharded ``model`` on the main process; every rank must call it.

    None for an unsharded model, whose own ``state_dict`` already is the full one.
    """
    if not is_sharded(model):
        return None
    state = accelerator.get_state_dict(model)
    return state if accelerator.is_main_process else None


def unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain module of a sharded ``model``'s class, config and adapters, holding ``state_dict``.

    What the export fuses and saves: the main process cannot fuse adapters into weights it holds a shard of.
    """
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):  # fully_shard swaps in a class FSDP<Cls>(FSDPModule, Cls)
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    peft_config = dict(getattr(model, "peft_config", {}))
    with torch.device("meta"):
        plain = cls.from_config(model.config)
        for name, config in peft_config.items():
            plain.add_adapter(config, adapter_name=name)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or missing:
        raise RuntimeError(
            f"the gathered state dict does not fit {cls.__name__}: {(missing + unexpected)[:3]}"
        )
    # buffers left out of state dicts (``persistent=False``) are never sharded: take the model's own
    stored = set(state_dict)
    for name, buffer in model.named_buffers():
        if name not in stored:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(
                leaf, buffer.detach().to("cpu").clone(), persistent=False
            )
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{cls.__name__} copy has tensors without values: {left[:3]}")
    return plain.requires_grad_(False)


def unwrap(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The student as trained: without accelerate's wrapper (DDP) and ``torch.compile``'s."""
    model = accelerator.unwrap_model(model)
    return model._orig_mod if hasattr(model, "_orig_mod") else model


def register_student_hooks(accelerator: Any, family: Any, full_finetune: bool) -> None:
    """accelerate's save/load hooks for the student: a checkpoint holds the student's own files (its LoRA in
    diffusers' format, or the full transformer as a diffusers folder), never a pickle of the model.

    Saving gathers a sharded student on every rank (each must join) and writes on the main process only."""
    from .export import save_student_lora
    from .lora_io import load_student_lora_state
    from .student import STUDENT_ADAPTER

    def save_model_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            model = unwrap(accelerator, model)
            state = full_state_dict(accelerator, model)
            if accelerator.is_main_process:
                if state is not None:
                    model = unsharded_copy(model, state)
                if full_finetune:
                    model.save_pretrained(os.path.join(output_dir, "transformer"))
                else:
                    save_student_lora(model, family, output_dir, STUDENT_ADAPTER)
                if weights:
                    weights.pop()

    def load_model_hook(models: list, input_dir: str) -> None:
        while models:
            model = unwrap(accelerator, models.pop())
            if full_finetune:
                loaded = family.transformer_class().from_pretrained(
                    input_dir,
                    subfolder="transformer",
                    use_safetensors=True,  # never a pickle
                )
                model.load_state_dict(loaded.state_dict())
                del loaded
            else:
                load_student_lora_state(model, input_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def describe_precision(accelerator: Any, flag: str | None) -> list[str]:
    """What the run computes in and which setting chose it (the flag, ``accelerate launch`` / its config, or
    nothing), and the paper's recipe when a GPU run trains in fp32."""
    source = "--mixed_precision"
    if not flag:
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
        source = "`accelerate launch` / accelerate config" if launched else "default: no accelerate setting"
    lines = [f"mixed precision: {accelerator.mixed_precision} (from {source})"]
    if accelerator.mixed_precision == "no" and torch.cuda.is_available():
        lines.append("training in fp32; the paper's recipe is bf16: pass --mixed_precision bf16")
    return lines
