"""Crash-safe ``accelerator.save_state`` checkpoints named ``checkpoint-<step>``.

A checkpoint is written under ``checkpoint-<step>.tmp`` and renamed when complete, and resume only ever
considers complete names, so a crash while saving cannot leave a checkpoint that resume would take.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

_COMPLETE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _COMPLETE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    m = _COMPLETE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint-<step> folder.")
    return int(m.group(1))


def resolve_resume(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """``latest`` -> newest complete checkpoint (or None); a name or path -> that checkpoint, which must exist."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir() or _COMPLETE.match(path.name) is None:
        available = [p.name for p in list_checkpoints(output_dir)]
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r}: no complete checkpoint there. "
            f"Available in {output_dir}: {available or 'none'}; pass one of them or `latest`."
        )
    return path


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Make room for one more checkpoint under ``total_limit``; returns what was removed."""
    if not total_limit:
        return []
    found = list_checkpoints(output_dir)
    excess = len(found) - total_limit + 1
    removed = found[: max(excess, 0)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_checkpoint(
    accelerator: Any, output_dir: str | os.PathLike, step: int, total_limit: int | None
) -> Path:
    """All processes call this; the main process prunes, cleans stale partial saves and renames."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
