"""The student: its LoRA, and switching expert adapters on the shared base without breaking its training.

peft flips ``requires_grad`` whenever adapters are switched (``set_adapter`` makes the active adapter
trainable, ``disable_adapters`` freezes everything). Expert evaluations on the student's own base therefore go
through :class:`AdapterScope`, which restores the student adapter and the exact trainable set on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

STUDENT_ADAPTER = "student"


def mode_switch(module: torch.nn.Module) -> Callable[[bool], object]:
    """``module.train(mode)`` as one flat loop over its modules, listed now.

    The recursive walk costs milliseconds on a transformer with LoRA layers, and the training loop switches modes
    around every rollout. Call this once the adapters are in place. If a module class overrides ``train``, the
    recursive call is kept so that the override runs.
    """
    modules = list(module.modules())
    if any(type(m).train is not torch.nn.Module.train for m in modules):
        return module.train

    # `training` lives in each module's __dict__: writing it there skips nn.Module.__setattr__
    flags = [vars(m) for m in modules]

    def switch(mode: bool) -> None:
        for flag in flags:
            flag["training"] = mode

    return switch


def add_student_lora(
    transformer: torch.nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    adapter_name: str = STUDENT_ADAPTER,
) -> None:
    """Gaussian A, zero B: the student at step 0 is exactly its initial model."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)
    )
    transformer.add_adapter(config, adapter_name=adapter_name)


def load_lora_into_adapter(
    transformer: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    metadata: dict | None,
    adapter_name: str,
) -> None:
    """Load a diffusers-format LoRA state dict (``transformer.`` keys) as a named adapter."""
    kwargs = {}
    if metadata:
        kwargs["metadata"] = {f"transformer.{k}": v for k, v in metadata.items()}
    transformer.load_lora_adapter(state_dict, prefix="transformer", adapter_name=adapter_name, **kwargs)


def lora_parameters(transformer: torch.nn.Module, adapter_name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if f".{adapter_name}." in n and "lora_" in n]


class AdapterScope:
    """Evaluate other adapters (or none) on a transformer whose ``student`` adapter is being trained.

    Switching inside :meth:`use` only flips which adapters each LoRA layer applies. peft's own ``set_adapter`` /
    ``disable_adapters`` also rewrite ``requires_grad`` of every LoRA weight, walking the whole module tree on
    each call, which cost more than the small ShapesWorld transformer's forward; the fields are evaluated under
    ``torch.no_grad()``, so the trainable set can stay as it is.
    """

    def __init__(self, transformer: torch.nn.Module, student: str = STUDENT_ADAPTER):
        self.transformer = transformer
        self.student = student
        self.refresh()

    def refresh(self) -> None:
        """Call after loading another adapter, so the LoRA layers and the trainable set are known exactly."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        named = list(self.transformer.named_parameters())
        self._student = [p for n, p in named if "lora_" in n and f".{self.student}." in n]
        self._others = [p for n, p in named if "lora_" in n and f".{self.student}." not in n]
        self._layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
        self.restore()

    def restore(self) -> None:
        """Student adapter active (loading another adapter activates that one), trainable set exact."""
        self.transformer.enable_adapters()
        self.transformer.set_adapter(self.student)
        for p in self._student:
            p.requires_grad_(True)
        for p in self._others:
            p.requires_grad_(False)

    def _activate(self, adapters: list[str] | None) -> None:
        for layer in self._layers:
            layer._disable_adapters = adapters is None
            if adapters is not None:
                layer._active_adapter = adapters

    @contextmanager
    def use(self, adapters: Sequence[str] | None) -> Iterator[None]:
        """``None`` means the pristine base (every adapter off)."""
        if adapters is not None:
            missing = set(adapters) - set(getattr(self.transformer, "peft_config", {}))
            if missing:
                raise ValueError(f"Adapter(s) {sorted(missing)} are not loaded on the transformer.")
        self._activate(None if adapters is None else list(adapters))
        try:
            yield
        finally:
            self._activate([self.student])
