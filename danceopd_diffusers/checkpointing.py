"""Crash-safe ``accelerator.save_state`` checkpoints named ``checkpoint-<step>``.

A checkpoint is written under ``checkpoint-<step>.tmp``; the last file written is ``danceopd_checkpoint.json``
(every file's size, the run's settings and its lineage), then the folder is renamed, and only then are old
checkpoints pruned. Resume takes only folders whose record is there and whose files match it, and refuses one
saved by a run with other settings, all before any weights load.

Lineage: every start of the script is a run with its own id; a resumed run's lineage is its checkpoint's plus
its own id. A checkpoint belongs to a run when its lineage is a prefix of the run's and it is not newer than the
step the run resumed from. Once a run's first checkpoint is complete, the checkpoints that do not belong to it
(an earlier run's, or the abandoned future of a resume from an older checkpoint) are removed, and ``latest``
always takes the newest checkpoint of the most recently started run: old and new checkpoints never mix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, regular_file_problem
from .logging_utils import get_logger
from .lora_io import PICKLE_SUFFIXES

logger = get_logger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
RECORD = "danceopd_checkpoint.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


def _numbered(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete checkpoint (naming the file at fault), or None."""
    path = Path(path)
    if not path.is_dir():
        return "it does not exist"
    if not (path / RECORD).is_file():
        empty = not any(path.iterdir())
        return (
            "it is empty"
            if empty
            else f"it has no {RECORD} (its save did not finish, or an older danceopd-diffusers wrote it)"
        )
    try:
        record = json.loads((path / RECORD).read_text())
        files = dict(record["files"])
    except (ValueError, KeyError, TypeError):
        return f"{RECORD} is corrupt"
    for name, size in files.items():
        file = path / name
        problem = regular_file_problem(file)
        if problem is not None:
            return f"{name} is missing" if problem == "it does not exist" else f"{name}: {problem}"
        if file.stat().st_size != size:
            return f"{name} is corrupt: {file.stat().st_size} bytes, {size} when saved"
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as exc:
                return f"{name} is corrupt ({' '.join(str(exc).split())[:200]})"
            if name.endswith(LORA_FILE):  # small: every value checked (a diverged save is no resume point)
                from .lora_io import nonfinite_tensor

                key = nonfinite_tensor(str(file))
                if key is not None:
                    return f"{name} holds NaN or inf values (tensor {key}): it was saved from a diverged run"
        elif name.lower().endswith(PICKLE_SUFFIXES):
            problem = weights_only_problem(file)
            if problem is not None:
                return f"{name} {problem}"
    return None


def weights_only_problem(file: str | os.PathLike) -> str | None:
    """Why accelerate's own pickle files (``optimizer.bin``, ``scheduler.bin``, ``random_states_*.pkl``) cannot
    be loaded as plain tensors, or None. They are read as accelerate reads them on resume (``weights_only``,
    its numpy allowances) but memory-mapped, so even a full fine-tune's optimizer state costs no read: a
    pickle that names code is refused before any weights load, and no message suggests loading it anyway."""
    import pickle

    import torch

    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS
    except ImportError:  # another accelerate: torch's own allowances
        TORCH_SAFE_GLOBALS = []
    with open(file, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":  # accelerate writes torch.save zip archives only
            return "is not a torch.save archive (a plain pickle or another format); it is never loaded"
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return "is a pickle that names code to run (not plain tensors); it is never loaded"
    except Exception as exc:
        detail = " ".join(str(exc).split())
        if "weights_only" in detail:
            return "is a pickle that names code to run (not plain tensors); it is never loaded"
        return f"is corrupt ({type(exc).__name__}: {detail[:160]})"
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in _numbered(output_dir) if (p / RECORD).is_file()]


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's record ({} when unreadable: such a checkpoint is reported by checkpoint_problem)."""
    try:
        record = json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


@dataclass
class Lineage:
    """This run's place among the runs that wrote an output folder (see the module docstring)."""

    ids: list[str] = field(default_factory=lambda: [uuid.uuid4().hex])
    started: float = field(default_factory=time.time)
    resumed_step: int = 0

    @classmethod
    def resuming(cls, checkpoint: str | os.PathLike | None) -> Lineage:
        """A new run; resumed from ``checkpoint`` when given (its lineage continued)."""
        run = cls()
        if checkpoint is not None:
            saved = read_record(checkpoint).get("lineage") or []
            run.ids = [str(i) for i in saved if isinstance(i, str)] + run.ids
            run.resumed_step = checkpoint_step(checkpoint)
        return run

    def owns(self, checkpoint: str | os.PathLike) -> bool:
        """Whether ``checkpoint`` is part of this run's history (see the module docstring)."""
        ids = read_record(checkpoint).get("lineage") or []
        if ids and ids[-1] == self.ids[-1]:
            return True
        return list(ids) == self.ids[: len(ids)] and checkpoint_step(checkpoint) <= self.resumed_step

    def record(self) -> dict[str, Any]:
        return {"lineage": self.ids, "started": self.started}


def _started(path: Path) -> float:
    started = read_record(path).get("started", 0.0)
    return float(started) if isinstance(started, (int, float)) else 0.0


def checkpoint_step(path: str | os.PathLike) -> int:
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint-<step> folder.")
    return int(m.group(1))


def run_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings of ``current`` that differ from those a checkpoint was ``saved`` with, in words."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in run_differences(a, b)]
        else:
            out.append(f"{key}: {json.dumps(a)} in the checkpoint, {json.dumps(b)} in this run")
    return out


def resolve_resume(
    output_dir: str | os.PathLike, resume_from_checkpoint: str | None, run: dict[str, Any] | None = None
) -> Path | None:
    """``latest`` -> newest complete checkpoint (or None); a name or path -> that checkpoint, which must be
    complete. With ``run``, the checkpoint must have been saved by a run with the same settings."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        path = None
        # the newest checkpoint of the most recently started run (a new run's never mix with an older run's)
        candidates = sorted(_numbered(output_dir), key=lambda p: (_started(p), checkpoint_step(p)))
        for candidate in reversed(candidates):
            if not (candidate / RECORD).is_file():  # a save that never finished: never resumed from
                logger.info(f"skipping {candidate}: {checkpoint_problem(candidate)}")
                continue
            path = candidate
            break
        if path is None:
            return None
        problem = checkpoint_problem(path)
        if problem is not None:  # it was complete once: a damaged disk or a hand edit, not a crash
            older = [p.name for p in list_checkpoints(output_dir) if p != path]
            fallback = f"resume from {older[-1]} with --resume_from_checkpoint {older[-1]}" if older else ""
            raise ConfigError(
                f"{path} was saved completely but {problem}. Restore the file, "
                f"{fallback or 'or start a new run without --resume_from_checkpoint'}."
            )
    else:
        path = Path(resume_from_checkpoint)
        if not path.is_absolute() and not path.exists():
            path = Path(output_dir) / resume_from_checkpoint
        problem = (
            checkpoint_problem(path) if _NAME.match(path.name) else "it is not a checkpoint-<step> folder"
        )
        if problem is not None:
            available = [p.name for p in list_checkpoints(output_dir)]
            raise ConfigError(
                f"--resume_from_checkpoint {resume_from_checkpoint!r} cannot be used: {problem}. Complete "
                f"checkpoints in {output_dir}: {', '.join(available) or 'none'}; pass one of them or `latest`."
            )
    if run is not None:
        saved = json.loads((path / RECORD).read_text()).get("run", {})
        differences = run_differences(saved, run)
        if differences:
            raise ConfigError(
                f"{path} was saved by a run with other settings ({'; '.join(differences)}). Resume with the "
                "settings it was saved with, or start a new run in another --output_dir."
            )
    return path


def prune_checkpoints(
    output_dir: str | os.PathLike, total_limit: int | None, keep: Path, lineage: Lineage | None = None
) -> list[Path]:
    """Keep the ``total_limit`` newest complete checkpoints (``keep`` among them); drop stale partial saves and,
    with ``lineage``, every checkpoint that is not part of that run's history."""
    root = Path(output_dir)
    removed = [p for p in root.glob("checkpoint-*.tmp") if p.is_dir()]
    removed += [p for p in root.glob(".checkpoint-*.replaced") if p.is_dir()]
    found = [p for p in list_checkpoints(output_dir) if p != keep]
    if lineage is not None:
        removed += [p for p in found if not lineage.owns(p)]
        found = [p for p in found if lineage.owns(p)]
    if total_limit:
        removed += found[: max(len(found) - total_limit + 1, 0)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def save_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike,
    step: int,
    total_limit: int | None,
    run: dict[str, Any] | None = None,
    lineage: Lineage | None = None,
) -> Path:
    """All processes call this. The main process records and renames the complete save, then prunes. A
    checkpoint of the same name (an earlier run's) is renamed aside first and deleted after, so the name holds
    a complete checkpoint at every moment."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {
            p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        record = {"step": step, "run": run or {}, "files": files, **(lineage.record() if lineage else {})}
        (tmp / RECORD).write_text(json.dumps(record, indent=2))
        aside = Path(output_dir) / f".checkpoint-{step}.replaced"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        prune_checkpoints(output_dir, total_limit, keep=final, lineage=lineage)
    accelerator.wait_for_everyone()
    return final
