"""What protects ``--output_dir``: one owner for the folder's whole life (:class:`OutputFolder`).

lock -> resume check -> checkpoints -> stage -> publish -> unlock:

- one writer at a time: an ``flock`` on ``.danceopd.lock`` (the kernel drops it when its process dies, so a
  crashed run's lock is taken over without any clean-up; the file names the holder for the error message);
- the folder is never, nor inside, the base model's, a field's, the warm start's or the data's folder (real
  paths, symlinks resolved), and those never lie inside it: nothing the run reads can be overwritten or pruned;
- a new run never silently replaces another kind of output, nor the checkpoints of a run with other settings
  (``--overwrite_output_dir`` allows it), and never mixes its checkpoints with an earlier run's (see
  ``checkpointing``: lineages);
- the folder deleted or replaced while the run trains stops the run at the next step, with one error line;
- the export is staged in a hidden sibling folder and published by renames, the old card and model index taken
  away first and the new ones put in last, under a journal: a kill at any moment leaves the old export or the
  new one (the next run in the folder finishes an interrupted publish), never a new card beside old weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import ConfigError
from .logging_utils import get_logger

logger = get_logger(__name__)

LOCK_FILE = ".danceopd.lock"
STAGING_DIR = ".export.tmp"
#: the publish journal: present only while an export is being moved in
JOURNAL = ".danceopd-publish.json"
#: files of an export (besides its component folders): all of an old export is replaced as one
EXPORT_FILES = (
    "pytorch_lora_weights.safetensors",
    "samples.png",
    "pipeline_danceopd.py",
    "shapesworld_eval.png",
    "shapesworld_eval.json",
)
#: published last, in this order (and taken away first): what says "this folder is a model" and describes it
EXPORT_LAST = ("model_index.json", "danceopd_config.json", "README.md")
#: folders of a diffusers pipeline export (with those the old model_index.json names)
EXPORT_FOLDERS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
    "image_encoder",
    "feature_extractor",
    "processor",
)
_COMPONENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
#: never part of an export, whatever an index in the folder says
_NOT_EXPORT = ("logs", "validation")


def _export_name(name: Any) -> bool:
    """Whether ``name`` may be an entry of an export (what a journal or an old index may make a publish move)."""
    if not isinstance(name, str) or name in _NOT_EXPORT:
        return False
    return name in EXPORT_FILES or name in EXPORT_LAST or bool(_COMPONENT_NAME.match(name))


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
        logger.info(f"taking over the lock of {output_dir} from process {previous['pid']}, which died")
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


class OutputDirGone(ConfigError):
    """``--output_dir`` was deleted or replaced while the run trained: nothing more can be saved there."""


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_apart(
    output_dir: str | os.PathLike,
    models: Iterable[tuple[str, str | None]],
    data: Iterable[tuple[str, str | None]] = (),
) -> None:
    """``output_dir`` is not, and is not inside, a folder the run reads, by real path (symlinks resolved):
    ``models`` (the base, fields, warm start: ``(what, path)``) and ``data`` folders. For a model given as a
    file, its folder is what must differ (an export there could overwrite it). A model inside ``output_dir``
    is refused too: the run replaces and prunes what is there. Hub ids (no local path) are skipped."""
    out = _real(output_dir)
    for what, path in models:
        if not path or not os.path.lexists(os.path.expanduser(path)):
            continue
        real = _real(path)
        folder = real if real.is_dir() else real.parent
        if (real.is_dir() and _inside(out, real)) or out == folder:
            where = "is" if out == folder else "is inside"
            raise ConfigError(
                f"--output_dir {output_dir} {where} the folder of {what} ({path} -> {folder}): writing there could "
                "overwrite the model the run reads, even with --overwrite_output_dir. Pass another --output_dir."
            )
        if _inside(real, out):
            raise ConfigError(
                f"{what} {path} lies inside --output_dir {output_dir}, whose checkpoints and export this run "
                "replaces and prunes. Copy it out of the folder first, or pass another --output_dir."
            )
    for what, path in data:
        if not path or not os.path.isdir(os.path.expanduser(path)):
            continue
        if _inside(out, _real(path)):
            raise ConfigError(
                f"--output_dir {output_dir} is inside the data folder of {what} ({path}): the run's images would "
                "become training data. Pass an --output_dir outside it."
            )


def run_inputs(
    args: Any, fields_config: Any
) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """What a training run reads from disk, as :func:`check_apart` takes it: ``(models, data)``."""
    models = [
        ("--pretrained_model_name_or_path", getattr(args, "pretrained_model_name_or_path", None)),
        ("--student_init", getattr(args, "student_init", None)),
    ]
    for spec in getattr(fields_config, "fields", {}).values():
        if spec.path:
            models.append((f"field {spec.name!r}", spec.path))
    data = [
        ("--train_data_dir", getattr(args, "train_data_dir", None)),
        ("--dataset_name", getattr(args, "dataset_name", None)),
    ]
    return models, data


class OutputFolder:
    """The one owner of ``--output_dir`` during a run (a context manager; see the module docstring).

    ``main_process`` is the process that writes the folder (lock, publish): by default global rank 0 as
    accelerate reads it from the launcher's environment, so the folder has its owner before the accelerator
    exists. Every process calls :meth:`save_checkpoint` (the save is collective). Leaving the ``with`` block releases the lock and removes
    this run's staging folder, whatever happened.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        main_process: bool | None = None,
        overwrite: bool = False,
        full_finetune: bool = False,
    ):
        from .checkpointing import Lineage

        if main_process is None:
            from accelerate.utils.environment import get_int_from_env

            ranks = ["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"]
            main_process = get_int_from_env(ranks, 0) == 0
        self.path = Path(path)
        self.main = main_process
        self.overwrite = overwrite
        self.full_finetune = full_finetune
        self.lineage = Lineage()
        self.identity: tuple[int, int] | None = None
        self._stage_root: Path | None = None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.close()
        return False

    def close(self) -> None:
        if self._stage_root is not None:
            shutil.rmtree(self._stage_root, ignore_errors=True)
            self._stage_root = None
        if self.main:
            unlock_output_dir(self.path)

    def open(self) -> OutputFolder:
        """Take the lock (main process), finish a publish a killed run left half done, drop stale staging."""
        if self.main:
            lock_output_dir(self.path)
            recovered = recover_publish(self.path)
            if recovered:
                logger.info(f"finished the export an interrupted run was publishing in {self.path}")
            for stale in _stage_parent(self.path).glob(_stage_prefix(self.path) + "*"):
                if stale.is_dir() and not _pid_alive(stale.name.rsplit("-", 1)[-1]):
                    shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(self.path / STAGING_DIR, ignore_errors=True)
            # a journal never completed: no move began
            (self.path / (JOURNAL + ".tmp")).unlink(missing_ok=True)
        self.identity = _identity(self.path)
        return self

    def resume(self, resume_from_checkpoint: str | None, run: dict[str, Any]) -> Path | None:
        """The checkpoint to resume from (checked before any weights load), or None for a new run. A new run
        may not replace another kind of output, nor the checkpoints of a run with other settings, without
        ``--overwrite_output_dir``; it replaces an earlier run's checkpoints once its own first one is saved."""
        from .checkpointing import Lineage, list_checkpoints, read_record, run_differences

        path = resolve_resume(self.path, resume_from_checkpoint, run)
        self.lineage = Lineage.resuming(path)
        if path is not None:
            return path
        check_output_kind(self.path, self.full_finetune, self.overwrite)
        earlier = list_checkpoints(self.path)
        if not earlier:
            return None
        newest = max(earlier, key=lambda p: (float(read_record(p).get("started") or 0), p.name))
        differences = run_differences(read_record(newest).get("run", {}), run)
        if differences and not self.overwrite:
            raise ConfigError(
                f"--output_dir {self.path} holds checkpoints of a run with other settings ({'; '.join(differences)[:300]}); "
                "this new run would replace them. Continue that run with its settings and --resume_from_checkpoint "
                "latest, pass --overwrite_output_dir to replace it, or pass another --output_dir."
            )
        if self.main:
            names = ", ".join(p.name for p in earlier)
            logger.info(
                f"{self.path} holds checkpoints of an earlier run ({names[:200]}); this new run replaces "
                "them once it saves its first checkpoint (stop now and pass --resume_from_checkpoint latest to "
                "continue that run instead)"
            )
        return None

    def restore(self, accelerator: Any, checkpoint: Path, model: Any) -> int:
        """The run's state from ``checkpoint`` (checked by :meth:`resume`), through accelerate's hooks; its step.
        Its files matched their recorded sizes, so a failure to load is damage in their content: one clear error."""
        from .checkpointing import checkpoint_step
        from .preflight import describe_load_error
        from .stopping import check_loaded_finite

        logger.info(f"Resuming from {checkpoint}")
        try:
            accelerator.load_state(str(checkpoint))
        except Exception as exc:
            raise ConfigError(f"Cannot resume from {checkpoint}: {describe_load_error(exc)}.") from exc
        check_loaded_finite(model, f"--resume_from_checkpoint {checkpoint}", trainable_only=True)
        return checkpoint_step(checkpoint)

    def check_alive(self, step: int) -> None:
        """The folder still exists and is the one the run locked (main process; a ``stat``, so every step)."""
        if not self.main or self.identity is None:
            return
        if _identity(self.path) != self.identity:
            raise OutputDirGone(
                f"--output_dir {self.path} was deleted or replaced while the run trained (noticed after step {step}); "
                "the run stopped without writing anything more there. Restore the folder and resume, or start "
                "again."
            )

    def save_checkpoint(
        self, accelerator: Any, step: int, total_limit: int | None, run: dict[str, Any]
    ) -> Path:
        """``checkpointing.save_checkpoint`` with this run's lineage (all processes call it)."""
        from .checkpointing import save_checkpoint

        self.check_alive(step)
        return save_checkpoint(accelerator, self.path, step, total_limit, run, self.lineage)

    def stage(self) -> Path:
        """An empty folder to write the export to, named as ``--output_dir`` (the card derives the repo name from
        it): in a hidden sibling folder on the same file system, else (no write access there) inside."""
        root = self.path.resolve()
        parent = _stage_parent(root)
        self._stage_root = parent / f"{_stage_prefix(root)}{os.getpid()}"
        same_device = _identity(parent) is not None and os.stat(parent).st_dev == os.stat(root).st_dev
        if not (same_device and os.access(parent, os.W_OK | os.X_OK)):
            self._stage_root = root / STAGING_DIR
        shutil.rmtree(self._stage_root, ignore_errors=True)
        stage = self._stage_root / root.name
        stage.mkdir(parents=True)
        return stage

    def publish(self, stage: str | os.PathLike, step: int | None = None) -> list[str]:
        """Move the complete export in ``stage`` into the folder (see :func:`publish`)."""
        if step is not None:
            self.check_alive(step)
        names = publish(stage, self.path)
        if self._stage_root is not None:
            shutil.rmtree(self._stage_root, ignore_errors=True)
            self._stage_root = None
        return names


def _stage_parent(path: str | os.PathLike) -> Path:
    return Path(path).resolve().parent


def _stage_prefix(path: str | os.PathLike) -> str:
    return f".{Path(path).resolve().name}.danceopd-export-"


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(text) != os.getpid()


def resolve_resume(output_dir: str | os.PathLike, resume: str | None, run: dict[str, Any]) -> Path | None:
    from .checkpointing import resolve_resume as resolve

    return resolve(output_dir, resume, run)


def old_export(output_dir: str | os.PathLike) -> list[str]:
    """The entries of the export now in ``output_dir``: its known files, and the component folders of a
    pipeline (those its model_index.json names, if they look like names a pipeline gives them)."""
    root = Path(output_dir)
    folders = set(EXPORT_FOLDERS)
    try:
        index = (
            json.loads((root / "model_index.json").read_text())
            if (root / "model_index.json").is_file()
            else {}
        )
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict):
        folders |= {k for k in index if _export_name(k) and not k.startswith("_")}
    names = [n for n in (*EXPORT_FILES, *EXPORT_LAST) if os.path.lexists(root / n)]
    names += sorted(n for n in folders if (root / n).is_dir() and not (root / n).is_symlink())
    return names


def _publish_order(names: Iterable[str]) -> list[str]:
    """Weights and components first; model_index.json, danceopd_config.json and the card last."""
    names = list(dict.fromkeys(names))
    return [n for n in names if n not in EXPORT_LAST] + [n for n in EXPORT_LAST if n in names]


def publish(stage: str | os.PathLike, output_dir: str | os.PathLike) -> list[str]:
    """Move every entry of a complete staged export into ``output_dir`` by rename; returns their names.

    The old export (:func:`old_export`) is replaced as a whole: a journal naming the stage, the new entries and
    the old ones is written first, then the old card, config and index are moved aside, the card first (the
    folder stops saying it is a model), then each old entry is moved aside and each new one moved in, weights
    first and the card last, then the journal and the old entries are deleted: wherever a card is, the complete
    export it describes is beside it. A kill at any moment leaves the old export, the new
    one, or a journal with which the next run in the folder finishes the move (:func:`recover_publish`).
    """
    stage, root = Path(stage), Path(output_dir)
    if not stage.is_dir():
        raise ValueError(f"{stage} is not a staged export folder")
    trash = stage.parent / ".replaced"
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    names = _publish_order(sorted(p.name for p in stage.iterdir()))
    unknown = [n for n in names if not _export_name(n)]
    if unknown:
        raise ValueError(f"{stage} holds {unknown}, which are not entries of an export")
    journal = {"stage": str(stage.resolve()), "new": names, "old": old_export(root)}
    tmp = root / (JOURNAL + ".tmp")
    tmp.write_text(json.dumps(journal))
    os.replace(tmp, root / JOURNAL)
    _finish_publish(root, journal)
    return names


def _finish_publish(root: Path, journal: dict) -> None:
    """Carry out (or carry on) the moves a journal describes; every step can be repeated."""
    stage = Path(journal["stage"])
    trash = stage.parent / ".replaced"
    trash.mkdir(parents=True, exist_ok=True)
    new = [n for n in journal["new"] if _export_name(n)]
    old = [n for n in journal["old"] if _export_name(n)]
    # the old export away, its card and index first: an entry whose new one is still staged (so what is in
    # the folder is the old one), or that the new export does not have
    for name in [n for n in reversed(EXPORT_LAST) if n in old] + [n for n in old if n not in EXPORT_LAST]:
        replaced = name in new and os.path.lexists(stage / name)
        if os.path.lexists(root / name) and (replaced or name not in new):
            if os.path.lexists(trash / name):
                _remove(trash / name)
            os.replace(root / name, trash / name)
    for name in _publish_order(new):
        if os.path.lexists(stage / name):
            if os.path.lexists(root / name):
                if os.path.lexists(trash / name):
                    _remove(trash / name)
                os.replace(root / name, trash / name)
            os.replace(stage / name, root / name)
    (root / JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(trash, ignore_errors=True)
    if stage.parent.name == STAGING_DIR or stage.parent.name.startswith("."):
        shutil.rmtree(stage.parent, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_publish(output_dir: str | os.PathLike) -> bool:
    """Finish a publish a killed run left half done (its journal is in ``output_dir``); whether there was one.
    The staged export is complete before the journal is written, so finishing it leaves the new export."""
    root = Path(output_dir)
    path = root / JOURNAL
    if not path.is_file():
        return False
    try:
        journal = json.loads(path.read_text())
        stage = Path(journal["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)  # a journal cut short: its write came before any move
        return False
    real = root.resolve()
    inside = stage.parent.name == STAGING_DIR and stage.parent.parent == real
    beside = (
        stage.parent.name.startswith(f".{real.name}.danceopd-export-") and stage.parent.parent == real.parent
    )
    if stage.name != real.name or not (inside or beside):
        path.unlink(missing_ok=True)  # not one of ours: never move what it names
        return False
    _finish_publish(root, journal)
    return True
