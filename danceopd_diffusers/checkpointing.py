"""Crash-safe ``accelerator.save_state`` checkpoints named ``checkpoint-<step>``.

A checkpoint is written under ``checkpoint-<step>.tmp``; the last file written is ``danceopd_checkpoint.json``
(every file's size and the run's settings), then the folder is renamed, and only then are old checkpoints
pruned. Resume takes only folders whose record is there and whose files match it, and refuses one saved by a
run with other settings, all before any weights load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .config import ConfigError

_NAME = re.compile(r"^checkpoint-(\d+)$")
RECORD = "danceopd_checkpoint.json"


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
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is corrupt: {file.stat().st_size} bytes, {size} when saved"
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as exc:
                return f"{name} is corrupt ({exc})"
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in _numbered(output_dir) if (p / RECORD).is_file()]


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
        for candidate in reversed(_numbered(output_dir)):
            if not (candidate / RECORD).is_file():  # a save that never finished: never resumed from
                print(f"[danceopd] skipping {candidate}: {checkpoint_problem(candidate)}", flush=True)
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


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None, keep: Path) -> list[Path]:
    """Keep the ``total_limit`` newest complete checkpoints (``keep`` among them); drop stale partial saves."""
    removed = [p for p in Path(output_dir).glob("checkpoint-*.tmp") if p.is_dir()]
    if total_limit:
        found = [p for p in list_checkpoints(output_dir) if p != keep]
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
) -> Path:
    """All processes call this. The main process records and renames the complete save, then prunes."""
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
        (tmp / RECORD).write_text(json.dumps({"step": step, "run": run or {}, "files": files}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final
