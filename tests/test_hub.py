"""--push_to_hub, --hub_strategy and resume from a checkpoint on the Hub, against a fake Hub that keeps each repo
in a local folder (huggingface_hub's own pattern filtering decides what is uploaded, downloaded and deleted)."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_train, short_run
from safetensors.torch import load_file

from danceopd_diffusers import hub
from danceopd_diffusers.config import ConfigError

SHORT = [*short_run(train_batch_size=2), "--cfg_scale", "3.0"]


class FakeHub:
    """The remote side: ``root/<owner>/<name>/`` per repo, and every commit's message and files."""

    def __init__(self, root: Path, user: str = "me"):
        self.root, self.user = root, user
        self.commits: list[dict] = []
        self.gate = threading.Event()  # uploads wait for it (set: they run at once)
        self.gate.set()
        self.executor = ThreadPoolExecutor(max_workers=1)  # as HfApi: one worker, in order
        self.errors: dict[str, Exception] = {}  # method name -> the error it raises

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def api(self, token=None):
        return FakeHfApi(self, token)


class FakeHfApi:
    def __init__(self, hub_: FakeHub, token=None):
        self.hub, self.token = hub_, token

    def _check(self, method: str):
        if method in self.hub.errors:
            raise self.hub.errors[method]

    def whoami(self):
        self._check("whoami")
        return {"name": self.hub.user}

    def create_repo(self, repo_id, exist_ok=False, private=None):
        self._check("create_repo")
        self.hub.repo(repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return SimpleNamespace(repo_id=repo_id)

    def _files(self, repo_id):
        root = self.hub.repo(repo_id)
        if not root.is_dir():
            from huggingface_hub.errors import RepositoryNotFoundError

            raise RepositoryNotFoundError(f"404 {repo_id}", response=_response(404))
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def list_repo_files(self, repo_id):
        self._check("list_repo_files")
        return self._files(repo_id)

    def upload_folder(
        self, *, repo_id, folder_path, commit_message=None, delete_patterns=None, run_as_future=False, **kw
    ):
        from huggingface_hub.utils import filter_repo_objects

        assert not kw.get("path_in_repo") and not kw.get("allow_patterns")
        self._check("upload_folder")
        local = Path(folder_path)
        files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
        files = list(filter_repo_objects(files, ignore_patterns=kw.get("ignore_patterns")))

        def commit():
            self.hub.gate.wait(timeout=60)
            root = self.hub.repo(repo_id)
            deleted = []
            if delete_patterns:
                deleted = [
                    f
                    for f in filter_repo_objects(self._files(repo_id), allow_patterns=delete_patterns)
                    if f not in files
                ]
                for f in deleted:
                    (root / f).unlink()
            for f in files:
                (root / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local / f, root / f)
            self.hub.commits.append({"message": commit_message, "files": sorted(files), "deleted": deleted})
            return SimpleNamespace(commit_message=commit_message)

        return self.hub.executor.submit(commit) if run_as_future else commit()

    def snapshot_download(self, repo_id, allow_patterns=None, local_dir=None, **kw):
        from huggingface_hub.utils import filter_repo_objects

        self._check("snapshot_download")
        for f in filter_repo_objects(self._files(repo_id), allow_patterns=allow_patterns):
            (Path(local_dir) / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.hub.repo(repo_id) / f, Path(local_dir) / f)
        (Path(local_dir) / ".cache").mkdir(exist_ok=True)  # as huggingface_hub's local_dir metadata
        return str(local_dir)


def _response(status: int):
    import importlib

    from huggingface_hub.errors import Response

    http = importlib.import_module(Response.__module__)  # the HTTP client huggingface_hub uses
    return Response(status, request=http.Request("GET", "https://huggingface.co/api/x"))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    remote = FakeHub(tmp_path / "remote")
    monkeypatch.setattr(hub, "HfApi", remote.api)
    monkeypatch.setattr(
        constants, "HF_HUB_OFFLINE", False
    )  # the fake Hub is "online"; nothing leaves the machine
    yield remote
    remote.gate.set()
    remote.executor.shutdown(wait=True)


def _data(tmp_path: Path) -> str:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\na red circle\ntwo blue squares\na green star\nthree yellow dots\n")
    return str(path)


def _train(tiny_path, tmp_path, out: str, *extra: str):
    return run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--dataset_name",
            _data(tmp_path),
            "--output_dir",
            str(tmp_path / out),
            "--checkpointing_steps",
            "2",
            *SHORT,
            *extra,
        ]
    )


def test_checkpoint_strategy_pushes_a_loadable_pipeline_and_a_run_resumes_from_it(
    tiny_path, tmp_path, fake_hub
):
    from diffusers import DiffusionPipeline

    _train(
        tiny_path,
        tmp_path,
        "first",
        "--max_train_steps",
        "4",
        "--push_to_hub",
        "--hub_strategy",
        "checkpoint",
    )
    repo = fake_hub.repo("me/first")
    messages = [c["message"] for c in fake_hub.commits]
    assert messages == [
        "Training in progress, step 2",
        "Training in progress, step 4",
        "End of DanceOPD training",
    ]
    # every save pushed the student's weights and the checkpoint, which replaced the previous one
    assert {"pytorch_lora_weights.safetensors", "checkpoint-2/optimizer.bin"} <= set(
        fake_hub.commits[0]["files"]
    )
    assert "checkpoint-2/optimizer.bin" in fake_hub.commits[1]["deleted"]
    remote = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert not any(f.startswith(("checkpoint-2/", "logs/", "validation/", ".")) for f in remote)
    assert "checkpoint-4/pytorch_lora_weights.safetensors" in remote and "README.md" in remote
    assert not list((tmp_path / "first").glob(".hub-upload-*"))  # the staged snapshots are cleaned up
    # the uploaded folder is the exported pipeline
    pipe = DiffusionPipeline.from_pretrained(str(repo), trust_remote_code=True)
    assert type(pipe).__name__ == "DanceOPDStableDiffusion3Pipeline"

    # a fresh output folder resumes from the Hub's newest checkpoint and reaches the uninterrupted run's weights
    _train(
        tiny_path, tmp_path, "cut", "--max_train_steps", "2", "--push_to_hub", "--hub_strategy", "checkpoint"
    )
    assert sorted(p.name for p in (fake_hub.repo("me/cut")).glob("checkpoint-*")) == ["checkpoint-2"]
    _train(
        tiny_path, tmp_path, "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "me/cut:latest"
    )
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()  # downloaded there, then resumed from
    assert not list((tmp_path / "resumed").glob(".checkpoint-*.download"))
    full = load_file(tmp_path / "first" / "pytorch_lora_weights.safetensors")
    resumed = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    two = load_file(tmp_path / "cut" / "pytorch_lora_weights.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.allclose(full[k], resumed[k], atol=1e-6) for k in full)
    assert any(not torch.allclose(full[k], two[k]) for k in full)  # steps 3-4 changed the weights


def test_end_and_every_save_strategies(tiny_path, tmp_path, fake_hub):
    _train(tiny_path, tmp_path, "end", "--max_train_steps", "2", "--push_to_hub", "--skip_pipeline_export")
    assert [c["message"] for c in fake_hub.commits] == ["End of DanceOPD training"]
    fake_hub.commits.clear()
    _train(
        tiny_path,
        tmp_path,
        "every",
        "--max_train_steps",
        "2",
        "--push_to_hub",
        "--hub_strategy",
        "every_save",
        "--skip_pipeline_export",
    )
    first = fake_hub.commits[0]
    assert first["message"] == "Training in progress, step 2"
    assert first["files"] == ["pytorch_lora_weights.safetensors"] and not first["deleted"]


def test_uploads_run_in_the_background_and_a_busy_save_is_skipped(tmp_path, fake_hub):
    out = tmp_path / "out"
    for step in (1, 2, 3):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors").write_text(f"w{step}")
        (out / f"checkpoint-{step}" / "optimizer.bin").write_text(f"o{step}")
    (out / "README.md").write_text("card")
    fake_hub.api().create_repo("me/out")
    pusher = hub.HubPusher("me/out", out, "checkpoint")
    fake_hub.gate.clear()  # the Hub is slow: the first upload does not finish until released
    assert pusher.on_save(out / "checkpoint-1", 1)  # returns at once: training does not wait
    assert not fake_hub.commits
    assert not pusher.on_save(out / "checkpoint-2", 2)  # the previous upload still runs: skipped
    shutil.rmtree(out / "checkpoint-1")  # pruned locally while uploading: the snapshot still uploads whole
    pusher.push_final(["README.md"], out / "checkpoint-3")
    fake_hub.gate.set()
    pusher.wait()
    remote = fake_hub.repo("me/out")
    assert [c["message"] for c in fake_hub.commits] == [
        "Training in progress, step 1",
        "End of DanceOPD training",
    ]
    assert fake_hub.commits[0]["files"] == [
        "checkpoint-1/optimizer.bin",
        "checkpoint-1/pytorch_lora_weights.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    # the end pushed the newest checkpoint, which the skipped save had not, and replaced checkpoint-1
    assert sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()) == [
        "README.md",
        "checkpoint-3/optimizer.bin",
        "checkpoint-3/pytorch_lora_weights.safetensors",
        "pytorch_lora_weights.safetensors",
    ]


def _hub_error(kind: str) -> Exception:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    return {
        "offline": OfflineModeIsEnabled("offline mode is enabled"),
        "no token": LocalTokenNotFoundError("Token is required"),
        "401": HfHubHTTPError("401 Client Error", response=_response(401)),
        "403": HfHubHTTPError("403 Client Error", response=_response(403)),
        "network": ConnectionError("[Errno -2] Name or service not known"),
    }[kind]


@pytest.mark.parametrize(
    "kind,fragment",
    [
        ("offline", "offline mode (HF_HUB_OFFLINE is set)"),
        ("no token", "not logged in to the Hub. Run `hf auth login`"),
        ("401", "refused the token (401"),
        ("403", "may not write to 'me/o' (403"),
        ("network", "cannot reach the Hub (ConnectionError: [Errno -2]"),
    ],
)
def test_hub_failures_stop_before_training_in_one_line(tiny_path, tmp_path, fake_hub, kind, fragment):
    fake_hub.errors["create_repo" if kind == "403" else "whoami"] = _hub_error(kind)
    with pytest.raises(ConfigError) as info:
        _train(tiny_path, tmp_path, "o", "--max_train_steps", "2", "--push_to_hub")
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    assert not (tmp_path / "o").exists()  # no empty output folder left behind


def test_resume_from_a_missing_hub_checkpoint(tiny_path, tmp_path, fake_hub):
    with pytest.raises(ConfigError, match="repo 'me/nothing' does not exist on the Hub"):
        _train(tiny_path, tmp_path, "o", "--resume_from_checkpoint", "me/nothing:latest")
    fake_hub.api().create_repo("me/empty")
    with pytest.raises(ConfigError, match="me/empty holds no checkpoint-<step>/ folder"):
        _train(tiny_path, tmp_path, "o", "--resume_from_checkpoint", "me/empty:latest")
    (fake_hub.repo("me/empty") / "checkpoint-2").mkdir()
    (fake_hub.repo("me/empty") / "checkpoint-2" / "optimizer.bin").write_text("x")
    with pytest.raises(ConfigError, match=r"has no checkpoint-9/; it holds \['checkpoint-2'\]"):
        _train(tiny_path, tmp_path, "o", "--resume_from_checkpoint", "me/empty:checkpoint-9")
    assert not (tmp_path / "o").exists()


def test_push_while_offline_with_the_real_client(tiny_path, tmp_path):
    """No fake: huggingface_hub itself, with HF_HUB_OFFLINE=1 (the tests' setting)."""
    with pytest.raises(ConfigError, match="offline mode") as info:
        _train(tiny_path, tmp_path, "o", "--max_train_steps", "2", "--push_to_hub")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_hub_strategy_needs_push_to_hub():
    import train_danceopd

    with pytest.raises(ConfigError, match="--hub_strategy checkpoint pushes to the Hub: add --push_to_hub"):
        train_danceopd.parse_args(["--pretrained_model_name_or_path", "x/y", "--hub_strategy", "checkpoint"])
