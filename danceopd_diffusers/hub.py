"""The Hub side of a run: checks before training, uploads while it trains, resume from a checkpoint on the Hub.

``--hub_strategy`` follows transformers' ``Trainer``:

- ``end``: the final outputs (pipeline folder, LoRA, model card, samples) are pushed once, at the end.
- ``every_save``: at every checkpoint the student's weights of that step (``pytorch_lora_weights.safetensors``,
  or ``transformer/`` for a full fine-tune) are also pushed to the repo root, so the repo always holds the newest
  student; the end pushes the full outputs over them.
- ``checkpoint``: as ``every_save``, and the whole checkpoint (weights, optimizer, scheduler, RNG states) is
  pushed as ``checkpoint-<step>/``, replacing the previous one, so ``--resume_from_checkpoint <repo_id>:latest``
  continues the run on any machine.

Uploads run in the background (``HfApi.upload_folder(run_as_future=True)``: one worker, in order) from a
hard-linked snapshot of the files, so training never waits and a checkpoint pruned meanwhile still uploads
whole. As in transformers, a save whose predecessor is still uploading is not pushed (the end pushes the newest
checkpoint if it was skipped), and the run waits for the last upload before it exits.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi

from .config import ConfigError

logger = logging.getLogger("danceopd")

HUB_STRATEGIES = ("end", "every_save", "checkpoint")
#: ``<owner>/<name>:checkpoint-<step>`` or ``<owner>/<name>:latest``
_HUB_RESUME = re.compile(r"^(?P<repo>[^\s:/]+/[^\s:/]+):(?P<name>latest|checkpoint-\d+)$")
_REMOTE_CHECKPOINT = re.compile(r"^checkpoint-(\d+)/")
_STAGING_PREFIX = ".hub-upload-"
#: what of a checkpoint is "the model" (pushed to the repo root by every_save)
_MODEL_FILES = ("pytorch_lora_weights.safetensors", "transformer/")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def hub_error(exc: Exception, flag: str, repo_id: str | None) -> ConfigError:
    """One line that names what failed (offline, not logged in, token refused, no such repo, no network) and the
    fix, from a huggingface_hub or connection error."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    repo = f"{repo_id!r}" if repo_id else "the repo"
    if isinstance(exc, OfflineModeIsEnabled):
        return ConfigError(
            f"{flag}: the Hub cannot be reached in offline mode (HF_HUB_OFFLINE is set). Set HF_HUB_OFFLINE=0, or "
            "run without the Hub (drop --push_to_hub; resume from a local checkpoint)."
        )
    if isinstance(exc, LocalTokenNotFoundError):
        return ConfigError(f"{flag}: not logged in to the Hub. Run `hf auth login` or pass --hub_token.")
    if isinstance(exc, HFValidationError):
        return ConfigError(f"{flag}: {repo} is not a valid repo id ({_one_line(exc)}); use `owner/name`.")
    if isinstance(exc, RepositoryNotFoundError):
        return ConfigError(
            f"{flag}: repo {repo} does not exist on the Hub, or is private and your token cannot see it. Check the "
            "id (`owner/name`) and the token (`hf auth whoami`)."
        )
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status == 401:
            return ConfigError(
                f"{flag}: the Hub refused the token (401 Unauthorized). Log in again with `hf auth login` or pass "
                "a valid --hub_token."
            )
        if status == 403:
            return ConfigError(
                f"{flag}: your token may not write to {repo} (403 Forbidden). Use a repo under your own name or an "
                "organisation you belong to, and a token with write access."
            )
        if status == 404:
            return ConfigError(
                f"{flag}: repo {repo} was not found on the Hub (404). Check the id (`owner/name`)."
            )
        return ConfigError(f"{flag}: the Hub answered {status} for {repo} ({_one_line(exc)}).")
    return ConfigError(
        f"{flag}: cannot reach the Hub ({_one_line(exc)}). Check the network connection, or run without the Hub."
    )


def _require_online(flag: str) -> None:
    """Offline mode first: without it, a missing token would be reported instead of the real cause."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise hub_error(OfflineModeIsEnabled("offline mode is enabled"), flag, None)


def prepare_push(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Check the token and create (or find) the repo; returns its full ``owner/name``. Raises ConfigError in one
    line when offline, not logged in, refused or with a bad id, before anything is trained or written."""
    _require_online("--push_to_hub")
    from .network import check_hub_reachable

    check_hub_reachable("--push_to_hub", repo_id, fix="connect to the network, or drop --push_to_hub")
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except Exception as exc:
        raise hub_error(exc, "--push_to_hub", repo_id) from exc
    full_id = repo_id if "/" in repo_id else f"{user['name']}/{repo_id}"
    try:
        return api.create_repo(full_id, exist_ok=True, private=private).repo_id
    except Exception as exc:
        raise hub_error(exc, "--push_to_hub", full_id) from exc


@dataclass(frozen=True)
class HubCheckpoint:
    repo_id: str
    name: str  # checkpoint-<step>


def parse_hub_resume(value: str | None) -> tuple[str, str] | None:
    """``(repo_id, 'latest' | 'checkpoint-<step>')`` for a Hub resume spec, None for a local name or path."""
    match = _HUB_RESUME.match(value or "")
    return (match.group("repo"), match.group("name")) if match else None


def resolve_hub_checkpoint(
    spec: str, output_dir: str | os.PathLike, token: str | None = None
) -> HubCheckpoint:
    """The checkpoint a Hub resume spec names, checked against the repo's files (no download yet)."""
    repo_id, name = parse_hub_resume(spec) or (None, None)
    if repo_id is None:
        raise ConfigError(
            f"--resume_from_checkpoint {spec!r} is not `<owner>/<name>:checkpoint-<step>` or `<owner>/<name>:latest`."
        )
    _require_online(f"--resume_from_checkpoint {spec}")
    from .network import check_hub_reachable

    check_hub_reachable(
        "--resume_from_checkpoint", repo_id, fix="connect to the network, or resume from a local checkpoint"
    )
    try:
        files = HfApi(token=token).list_repo_files(repo_id)
    except Exception as exc:
        raise hub_error(exc, f"--resume_from_checkpoint {spec}", repo_id) from exc
    steps = sorted({int(m.group(1)) for f in files if (m := _REMOTE_CHECKPOINT.match(f))})
    available = [f"checkpoint-{s}" for s in steps]
    if name == "latest":
        if not steps:
            raise ConfigError(
                f"--resume_from_checkpoint {spec}: {repo_id} holds no checkpoint-<step>/ folder. A run pushes its "
                "checkpoints with --push_to_hub --hub_strategy checkpoint."
            )
        name = available[-1]
    elif name not in available:
        raise ConfigError(
            f"--resume_from_checkpoint {spec}: {repo_id} has no {name}/; it holds {available or 'no checkpoint'}. "
            f"Pass `{repo_id}:latest` or one of those."
        )
    if Path(output_dir, name).exists():
        raise ConfigError(
            f"--resume_from_checkpoint {spec}: {Path(output_dir, name)} already exists here. Resume from it with "
            f"--resume_from_checkpoint {name}, or pick another --output_dir."
        )
    return HubCheckpoint(repo_id, name)


def download_hub_checkpoint(
    checkpoint: HubCheckpoint, output_dir: str | os.PathLike, token: str | None = None
) -> Path:
    """Download ``checkpoint-<step>/`` into ``output_dir`` (staged, then renamed: never a partial checkpoint)."""
    final = Path(output_dir, checkpoint.name)
    staging = Path(output_dir, f".{checkpoint.name}.download")
    HfApi(token=token).snapshot_download(
        checkpoint.repo_id, allow_patterns=[f"{checkpoint.name}/*"], local_dir=str(staging)
    )
    os.replace(staging / checkpoint.name, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def _files_under(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


class HubPusher:
    """Pushes a run's outputs to ``repo_id`` according to ``strategy`` (see the module docstring)."""

    def __init__(
        self, repo_id: str, output_dir: str | os.PathLike, strategy: str = "end", token: str | None = None
    ):
        if strategy not in HUB_STRATEGIES:
            raise ConfigError(f"--hub_strategy {strategy!r}: use one of {', '.join(HUB_STRATEGIES)}.")
        self.repo_id, self.output_dir, self.strategy = repo_id, Path(output_dir), strategy
        self.api = HfApi(token=token)
        self.uploads: list[tuple[str, Future, Path]] = []
        self.pushed_checkpoint: str | None = None
        for stale in self.output_dir.glob(_STAGING_PREFIX + "*"):  # left by a crashed run
            shutil.rmtree(stale, ignore_errors=True)

    def _snapshot(self, files: dict[str, Path]) -> Path:
        """Hard links (copies where links fail) of ``files`` at their repo paths, in a hidden folder."""
        stage = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.output_dir))
        for rel, src in files.items():
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        return stage

    def _submit(self, files: dict[str, Path], message: str, replace_checkpoints: bool) -> Future:
        stage = self._snapshot(files)
        future = self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=str(stage),
            commit_message=message,
            delete_patterns=["checkpoint-*/**"] if replace_checkpoints else None,
            run_as_future=True,
        )
        future.add_done_callback(lambda _: shutil.rmtree(stage, ignore_errors=True))
        self.uploads.append((message, future, stage))
        return future

    def busy(self) -> bool:
        return any(not f.done() for _, f, _ in self.uploads)

    def on_save(self, checkpoint: str | os.PathLike, step: int) -> bool:
        """Called after each checkpoint save; returns whether an upload was started."""
        if self.strategy == "end":
            return False
        if self.busy():
            logger.info(f"Hub upload still running: step {step} is not pushed (the end pushes the newest)")
            return False
        checkpoint = Path(checkpoint)
        files = {k: v for k, v in _files_under(checkpoint).items() if k.startswith(_MODEL_FILES)}
        if self.strategy == "checkpoint":
            files.update(_files_under(checkpoint, prefix=checkpoint.name + "/"))
            self.pushed_checkpoint = checkpoint.name
        self._submit(files, f"Training in progress, step {step}", self.strategy == "checkpoint")
        return True

    def push_final(self, files: list[str], last_checkpoint: str | os.PathLike | None = None) -> Future:
        """The end of the run: ``files`` (paths relative to ``output_dir``), and with ``checkpoint`` the newest
        checkpoint if it was not pushed yet."""
        upload = {rel: self.output_dir / rel for rel in files}
        replace = False
        if self.strategy == "checkpoint" and last_checkpoint is not None:
            last = Path(last_checkpoint)
            if last.name != self.pushed_checkpoint:
                upload.update(_files_under(last, prefix=last.name + "/"))
                self.pushed_checkpoint, replace = last.name, True
        return self._submit(upload, "End of DanceOPD training", replace)

    def wait(self) -> None:
        """Block until every upload has finished; a failed final upload raises, earlier failures are logged."""
        for message, future, stage in self.uploads:
            exc = future.exception()
            shutil.rmtree(stage, ignore_errors=True)
            if exc is not None and future is not self.uploads[-1][1]:
                logger.warning(f"Hub upload {message!r} to {self.repo_id} failed: {_one_line(exc)}")
        if self.uploads and (exc := self.uploads[-1][1].exception()) is not None:
            raise RuntimeError(
                f"The upload {self.uploads[-1][0]!r} to {self.repo_id} failed ({_one_line(exc)}); the outputs are "
                f"in {self.output_dir}: upload them with `hf upload {self.repo_id} {self.output_dir}`."
            ) from exc
