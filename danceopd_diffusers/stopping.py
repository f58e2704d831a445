"""How a run stops early without losing or spoiling what it saved.

A NaN or infinite target or loss stops the run before the step reaches the weights. SIGTERM (schedulers such
as SLURM or Kubernetes preempt a job with it, then wait a grace period) and SIGINT (Ctrl-C) only set a flag,
which the training loop reads between optimizer steps: it saves a checkpoint of that consistent state, which
``--resume_from_checkpoint latest`` continues exactly, and exits non-zero. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


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
        print(
            f"[danceopd] {signal.Signals(signum).name} received: finishing this optimizer step, then saving a "
            "checkpoint (Ctrl-C again to stop at once)",
            flush=True,
        )

    def requested(self, accelerator: Any) -> int | None:
        """The signal to stop on, agreed by all processes (any one that got a signal stops them all)."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch

        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        agreed = int(accelerator.reduce(flag, reduction="max").item())
        return agreed or None
