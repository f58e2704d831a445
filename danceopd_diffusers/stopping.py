"""How a run stops early without losing or spoiling what it saved.

A NaN or infinite target or loss stops the run before the step reaches the weights, and says where it came
from (the student's own rollout, the routed field's target, the student's prediction). :class:`WeightGuard`
checks the trainable weights after every optimizer step (one fused max-norm, one host sync) and, before every
checkpoint and the export, also the student's prediction on the step's last batch: a diverged student (a
learning-rate typo such as 1e10 leaves finite but huge weights that draw only NaN) is never saved. It warns once
when the loss diverges. SIGTERM (schedulers such
as SLURM or Kubernetes preempt a job with it, then wait a grace period) and SIGINT (Ctrl-C) only set a flag,
which the training loop reads between optimizer steps: it saves a checkpoint of that consistent state, which
``--resume_from_checkpoint latest`` continues exactly, and exits non-zero. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from .logging_utils import get_logger

logger = get_logger(__name__)


class NonFiniteError(RuntimeError):
    """A loss or target that is NaN or infinite: stop before it reaches the weights or any saved file."""


def check_finite(what: str, value: Any, step: int, route: str) -> None:
    import torch

    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(
            f"step {step + 1}: the {what} of route {route!r} is not finite (NaN or inf). The run stopped before "
            "this step changed the weights; nothing was saved for it, earlier checkpoints and exports are "
            "untouched. Check the field's scale and the data, or lower --learning_rate."
        )


def describe_nonfinite(
    step: int, route: str, states_x: Any, target: Any, prediction: Any, learning_rate: float
) -> NonFiniteError | None:
    """The error for a non-finite loss, naming where it came from: the student's rollout (the student
    diverged), the routed field's target at finite states (the field), or the student's prediction."""
    import torch

    def finite(value: Any) -> bool:
        return bool(torch.isfinite(value).all())

    kept = (
        "The run stopped before this step changed the weights; nothing was saved for it, earlier checkpoints "
        "and exports are untouched."
    )
    if states_x is not None and not finite(states_x):
        return NonFiniteError(
            f"step {step + 1}: the student's own rollout (the states it is trained on) is not finite (NaN or "
            f"inf): the student diverged at an earlier step, most likely from too high a learning rate "
            f"(--learning_rate {learning_rate:g}). {kept} Lower --learning_rate (e.g. 10x) and resume from an "
            "earlier checkpoint or start again."
        )
    if target is not None and not finite(target):
        return NonFiniteError(
            f"step {step + 1}: the target of route {route!r} is not finite (NaN or inf) at finite student states. "
            f"{kept} Check that field's scale and weights (its files were checked when loaded), or the data."
        )
    if prediction is not None and not finite(prediction):
        return NonFiniteError(
            f"step {step + 1}: the student's prediction is not finite (NaN or inf) while its states and the target "
            f"of route {route!r} are: the student's weights overflow (--learning_rate {learning_rate:g} too high, "
            f"or fp16). {kept} Lower --learning_rate, or use --mixed_precision bf16."
        )
    return None


def nonfinite_parameter(named: Any) -> str | None:
    """The name of the first ``(name, tensor)`` holding NaN or inf, or None: one fused max-norm per device and
    dtype, one host sync; the names are searched only when something is wrong."""
    named = list(named)
    flag = _nonfinite_flag([t for _, t in named])
    if flag is None or not bool(flag):
        return None
    import torch

    for name, tensor in named:
        if not bool(torch.isfinite(_local(tensor)).all()):
            return name
    return "?"


def _local(tensor: Any) -> Any:
    """A sharded (DTensor) parameter's local shard; others as they are."""
    tensor = tensor.detach()
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _nonfinite_flag(tensors: list[Any]) -> Any:
    """A 0-d tensor, true iff any tensor holds NaN or inf; one fused max-norm (which cannot overflow, unlike a
    2-norm of large finite weights) per device and dtype. None for no tensors."""
    import torch

    groups: dict[tuple, list] = {}
    for tensor in tensors:
        local = _local(tensor)
        if local.numel() and local.is_floating_point():
            groups.setdefault((local.device, local.dtype), []).append(local)
    flags = []
    for group in groups.values():
        norms = torch._foreach_norm(group, float("inf"))
        flags.append((~torch.isfinite(torch.stack(norms).float())).any().cpu())
    return torch.stack(flags).any() if flags else None


def check_loaded_finite(model: Any, what: str, trainable_only: bool = False) -> None:
    """Loaded weights hold no NaN or inf: a :class:`ConfigError` naming ``what`` (the flag or field and its path)
    and the tensor, so a damaged or diverged file is reported as that file, not later as a non-finite target.
    ``model`` is a module or a pipeline (every module component is checked); ``trainable_only`` checks only
    parameters that train (a resumed student)."""
    import torch

    from .config import ConfigError

    components = getattr(model, "components", None)
    if isinstance(components, dict):
        modules = {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}
    else:
        modules = {"": model}
    for component, module in modules.items():
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
        bad = nonfinite_parameter(named)
        if bad is not None:
            where = f"component {component!r}, " if component else ""
            raise ConfigError(
                f"{what}: {where}weight {bad} holds NaN or inf values; the file was saved from a diverged run or is "
                "damaged. Use another copy of it (or an earlier checkpoint)."
            )


class WeightGuard:
    """Never checkpoint or export a broken student.

    ``check_step`` after every optimizer step: the trainable weights are finite (one fused check, one host sync;
    several processes agree on it), and the loss is watched for divergence (one warning). ``check_before_save``
    before every checkpoint and the export: the weights again, and the student's prediction on the step's last
    batch (``probe``), which overflows when an update left finite but huge weights.
    """

    #: a loss this many times its first steps' is diverging
    DIVERGED_FACTOR = 100.0

    def __init__(self, params: list[Any], learning_rate: float, accelerator: Any = None):
        self.params = params
        self.learning_rate = learning_rate
        self.accelerator = accelerator
        self.first_losses: list[float] = []
        self.warned = False

    def _agreed(self, flag: Any) -> bool:
        import torch

        value = torch.tensor([1 if flag is not None and bool(flag) else 0])
        accelerator = self.accelerator
        if accelerator is not None and accelerator.num_processes > 1:
            value = accelerator.reduce(value.to(accelerator.device), reduction="max").cpu()
        return bool(value.item())

    def _fail(self, step: int, what: str) -> NonFiniteError:
        return NonFiniteError(
            f"after step {step}, {what} (NaN or inf): the student diverged, most likely from too high a learning "
            f"rate (--learning_rate {self.learning_rate:g}). Nothing was saved from it; earlier checkpoints and "
            "exports are untouched. Lower --learning_rate (e.g. 10x) and resume from an earlier checkpoint or "
            "start again."
        )

    def check_step(self, step: int, loss: float | None = None) -> None:
        """After optimizer step ``step`` (1-based): the weights it produced are finite; warn on divergence."""
        if loss is not None:
            self._watch(step, loss)
        if self._agreed(_nonfinite_flag(self.params)):
            raise self._fail(step, "the student's trainable weights are not finite")

    def check_before_save(self, step: int, probe: Any = None) -> None:
        """Before a checkpoint or the export: the weights, and the student's prediction ``probe()`` on the last
        batch it trained on (skipped when None: no step ran in this process)."""
        import torch

        if self._agreed(_nonfinite_flag(self.params)):
            raise self._fail(step, "the student's trainable weights are not finite")
        if probe is not None:
            with torch.no_grad():
                prediction = probe()
            if prediction is not None and self._agreed(~torch.isfinite(prediction.detach()).all().cpu()):
                raise self._fail(step, "the student's prediction on its last training batch is not finite")

    def _watch(self, step: int, loss: float) -> None:
        """One warning when the loss exceeds ``DIVERGED_FACTOR`` x the mean of the first steps' losses."""
        import math

        if not math.isfinite(loss) or self.warned:
            return
        if len(self.first_losses) < 3:
            self.first_losses.append(loss)
            return
        first = sum(self.first_losses) / len(self.first_losses)
        if first > 0 and loss > self.DIVERGED_FACTOR * first:
            self.warned = True
            logger.warning(
                f"the loss is diverging: {loss:.4g} at step {step}, {loss / first:.0f}x its first steps' "
                f"{first:.4g}. The learning rate (--learning_rate {self.learning_rate:g}) is likely too high: "
                "lower it (e.g. 10x), and resume from a checkpoint saved before the rise."
            )


class Interrupted(Exception):
    """The run stopped on a signal after saving its state; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """Install with ``start()`` before the loop, ``stop()`` after it; ``requested`` says whether to stop."""

    signals = (signal.SIGTERM, signal.SIGINT)
    _active: list[StopOnSignal] = []  # started and not stopped (a run in this process ended by an exception)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def start(self) -> StopOnSignal:
        self.stop_all()
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            StopOnSignal._active.append(self)
        return self

    def stop(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self in StopOnSignal._active:
            StopOnSignal._active.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        """Give the process its own handlers back (newest first, so the originals are restored last)."""
        for active in reversed(list(cls._active)):
            active.stop()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.info(
            f"{signal.Signals(signum).name} received: finishing this optimizer step, then saving a "
            "checkpoint (Ctrl-C again to stop at once)"
        )

    def requested(self, accelerator: Any) -> int | None:
        """The signal to stop on, agreed by all processes (any one that got a signal stops them all)."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch

        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        agreed = int(accelerator.reduce(flag, reduction="max").item())
        return agreed or None
