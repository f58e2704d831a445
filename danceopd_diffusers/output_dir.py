"""What protects ``--output_dir``: one writer at a time, no silent replacement of another kind of output, and
exports that appear only when complete.

The lock is an ``flock`` on ``.danceopd.lock``: the kernel drops it when its process dies, so a crashed run's
lock is taken over without any clean-up, and the file names the holder for the error message.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".danceopd.lock"
STAGING_DIR = ".export.tmp"
_held: dict[str, int] = {}  # real lock path -> descriptor, for the runs of this process


def lock_output_dir(output_dir: str | os.PathLike) -> Path:
    """Take the folder's lock (creating the folder), or fail at once naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unlocked
        return Path(output_dir) / LOCK_FILE
    path = Path(output_dir) / LOCK_FILE
    try:
        os.makedirs(output_dir, exist_ok=True)
        key = os.path.realpath(path)
        if key in _held:  # an earlier run in this process stopped with an exception
            os.close(_held.pop(key))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"--output_dir {output_dir!s} cannot be used ({exc}). Pass a writable folder."
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ConfigError(
            f"--output_dir {output_dir!s} is in use by another training run (process {holder.get('pid', '?')} "
            f"on {holder.get('host', '?')}, started {holder.get('started', '?')}). Wait for it to end or stop "
            "it, or pass another --output_dir."
        ) from None
    previous = _read_holder(fd)
    if previous.get("pid") not in (None, os.getpid()):
        print(f"[danceopd] taking over the lock of {output_dir} from process {previous['pid']}, which died")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _held[key] = fd
    return path


def unlock_output_dir(output_dir: str | os.PathLike) -> None:
    fd = _held.pop(os.path.realpath(Path(output_dir) / LOCK_FILE), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # a holder left in the file means a run that died holding the lock
        os.close(fd)  # closing drops the flock; the file stays, so no other run can race on its creation


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def output_kind(full_finetune: bool) -> str:
    return "a full fine-tune" if full_finetune else "a LoRA"


def existing_output_kind(output_dir: str | os.PathLike) -> str | None:
    """What a previous run left in ``output_dir``: a DanceOPD LoRA or full fine-tune, another model, or None."""
    root = Path(output_dir)
    config = root / "danceopd_config.json"
    if config.is_file():
        try:
            return output_kind(bool(json.loads(config.read_text())["args"]["full_finetune"]))
        except (ValueError, KeyError, TypeError):
            pass
    checkpoints = sorted(root.glob("checkpoint-*/"))
    if (root / "pytorch_lora_weights.safetensors").is_file() or any(
        (c / "pytorch_lora_weights.safetensors").is_file() for c in checkpoints
    ):
        return output_kind(False)
    if any((c / "transformer").is_dir() for c in checkpoints):
        return output_kind(True)
    if (root / "model_index.json").is_file():
        return "another model (a pipeline folder not written by train_danceopd.py)"
    return None


def check_output_kind(output_dir: str | os.PathLike, full_finetune: bool, overwrite: bool) -> None:
    """Refuse to replace a different kind of output unless ``--overwrite_output_dir``."""
    found = existing_output_kind(output_dir)
    wanted = output_kind(full_finetune)
    if found is None or found == wanted or overwrite:
        return
    raise ConfigError(
        f"--output_dir {output_dir!s} holds {found}; this run would replace it with {wanted}. Pass another "
        "--output_dir, or --overwrite_output_dir to replace it."
    )


def staging_dir(output_dir: str | os.PathLike) -> Path:
    """An empty folder inside ``output_dir`` to write an export to; its name is ``output_dir``'s own, so what
    is derived from the folder name (the model card's repo name) is the same as for ``output_dir``."""
    root = Path(output_dir).resolve()
    stage = root / STAGING_DIR / root.name
    shutil.rmtree(stage.parent, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


def publish(stage: str | os.PathLike, output_dir: str | os.PathLike) -> list[str]:
    """Move every entry of a complete staged export into ``output_dir`` by rename; returns their names.

    A replaced folder is renamed aside before the new one takes its name and deleted after, so each entry is
    at every moment either the old complete one or the new complete one.
    """
    stage, root = Path(stage), Path(output_dir)
    if stage.parent.name != STAGING_DIR:
        raise ValueError(f"{stage} is not a folder made by staging_dir")
    trash = stage.parent / ".replaced"
    trash.mkdir()
    names = sorted(p.name for p in stage.iterdir())
    for name in names:
        target = root / name
        if target.is_dir() or (target.exists() and (stage / name).is_dir()):
            os.replace(target, trash / name)
        os.replace(stage / name, target)
    shutil.rmtree(stage.parent, ignore_errors=True)
    return names
