"""Safety and failure handling: no folder code runs, no secret is written, no trained output is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_train

RUN = (
    "--num_rollout_steps 4 --rank 4 --train_batch_size 1 --gradient_accumulation_steps 1 "
    "--max_sequence_length 16 --learning_rate 1e-3 --seed 7 --cfg_scale 3.0"
).split()


def _prompts(tmp_path: Path) -> str:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\na red circle\ntwo blue squares\na green star\n")
    return str(path)


@pytest.fixture(scope="module")
def booby_trapped(tiny_path, tmp_path_factory):
    """A folder exported by this project whose pipeline_danceopd.py writes a marker file when imported."""
    from diffusers import StableDiffusion3Pipeline

    from danceopd_diffusers.export import save_pipeline_folder
    from danceopd_diffusers.families import SD3Family

    root = tmp_path_factory.mktemp("trap")
    folder, marker = root / "exported", root / "code-ran"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    save_pipeline_folder(pipe, SD3Family(), pipe.transformer, folder, 3.0)
    with open(folder / "pipeline_danceopd.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    return folder, marker


def test_exported_folder_code_never_runs(booby_trapped, tiny_path, tmp_path):
    from diffusers import DiffusionPipeline

    from danceopd_diffusers.shapesworld import evaluate as ev

    folder, marker = booby_trapped
    common = ["--dataset_name", _prompts(tmp_path), "--report_to", "none", "--max_train_steps", "1", *RUN]
    run_train(["--pretrained_model_name_or_path", str(folder), "--output_dir", str(tmp_path / "a"), *common])
    assert (tmp_path / "a" / "model_index.json").exists()
    run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--student_init",
            str(folder),
            "--full_finetune",
            "--skip_pipeline_export",
            "--output_dir",
            str(tmp_path / "b"),
            *common,
        ]
    )
    pipe, family = ev.load_pipeline(str(folder))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    result = ev.evaluate(pipe, family, num_steps=2, limit=2, progress=False)
    assert result["n_t2i"] == 2
    assert not marker.exists()
    # the trap is real: diffusers runs it when the user opts in
    DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_exported_hub_repo_is_fetched_without_its_code(booby_trapped, monkeypatch):
    """A Hub id goes through the same stock view: only the index and the component folders are downloaded."""
    import huggingface_hub
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    from danceopd_diffusers.stock_loading import load_stock_pipeline

    folder, marker = booby_trapped
    marker.unlink(missing_ok=True)  # the test above sets the trap off on purpose
    fetched = {}
    read_config = DiffusionPipeline.load_config

    def load_config(path, *args, **kwargs):
        return read_config(str(folder) if path == "someone/student" else path, *args, **kwargs)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        fetched.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(folder)

    monkeypatch.setattr(DiffusionPipeline, "load_config", load_config)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = load_stock_pipeline(StableDiffusion3Pipeline, "someone/student", revision="v1")
    assert type(pipe) is StableDiffusion3Pipeline and not marker.exists()
    assert fetched["repo_id"] == "someone/student" and fetched["revision"] == "v1"
    assert "model_index.json" in fetched["allow_patterns"] and "transformer/*" in fetched["allow_patterns"]
    assert not any(p.endswith(".py") or p == "*" for p in fetched["allow_patterns"])


def test_other_custom_code_is_refused(booby_trapped, tmp_path):
    import shutil

    from danceopd_diffusers.config import ConfigError
    from danceopd_diffusers.shapesworld import evaluate as ev

    folder = tmp_path / "other"
    shutil.copytree(booby_trapped[0], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = ["evil_pipeline", "StableDiffusion3Pipeline"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="evil_pipeline.*does not run"):
        ev.load_pipeline(str(folder))


# ------------------------------------------------------------------------------------------- secrets
def test_hub_token_is_written_nowhere(tiny_path, tmp_path, capfd):
    """The token given on the command line (no push: the tests are offline) is in no file and no log line."""
    token = "hf_FAKEtoken0123456789SECRET"
    out = tmp_path / "out"
    run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--dataset_name",
            _prompts(tmp_path),
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "1",
            "--validation_steps",
            "1",
            "--validation_prompt",
            "a red circle",
            "--report_to",
            "tensorboard",
            "--hub_token",
            token,
            *RUN,
        ]
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "hparams.yml" for p in files) and any("tfevents" in p.name for p in files)
    assert any(p.name == "optimizer.bin" for p in files) and (out / "README.md").is_file()
    leaked = [str(p.relative_to(out)) for p in files if token.encode() in p.read_bytes()]
    assert leaked == []
    captured = capfd.readouterr()
    assert token not in captured.out and token not in captured.err


# ------------------------------------------------------------------------------------------- trained outputs
def _base(tiny_path: str, tmp_path: Path, out: Path, *extra: str) -> list[str]:
    data = tmp_path / "prompts.csv"
    if not data.exists():
        _prompts(tmp_path)
    return [
        "--pretrained_model_name_or_path",
        tiny_path,
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        *RUN,
        *extra,
    ]


def _content(path: Path) -> bytes:
    """A file's bytes; a safetensors file's tensors only (its metadata's key order may vary between runs)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors.torch import load_file

    return b"".join(k.encode() + t.numpy().tobytes() for k, t in sorted(load_file(path).items()))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): _content(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and "logs" not in p.parts
    }


@pytest.fixture(scope="module")
def finished(tiny_path, tmp_path_factory):
    """A complete 2-step LoRA run: checkpoint-1, checkpoint-2 and an exported pipeline."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "out"
    run_train(_base(tiny_path, tmp, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    return out


@pytest.fixture
def precious(finished, tmp_path):
    import shutil

    out = tmp_path / "precious"
    shutil.copytree(finished, out)
    return out


def test_another_kind_of_output_is_not_replaced(precious, tiny_path, tmp_path):
    from danceopd_diffusers.config import ConfigError

    before = _snapshot(precious)
    full = _base(tiny_path, tmp_path, precious, "--max_train_steps", "1", "--full_finetune")
    with pytest.raises(ConfigError, match="holds a LoRA; this run would replace it with a full fine-tune"):
        run_train([*full, "--skip_pipeline_export"])
    assert _snapshot(precious) == before
    run_train([*full, "--skip_pipeline_export", "--overwrite_output_dir"])
    assert (precious / "transformer").is_dir()


def test_crash_during_export_keeps_the_previous_export(precious, tiny_path, tmp_path, monkeypatch):
    from danceopd_diffusers import export

    before = _snapshot(precious)
    real = export.save_pipeline_folder

    def crash_after_writing(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_pipeline_folder", crash_after_writing)
    # another seed: its LoRA and pipeline differ from the ones in the folder
    with pytest.raises(OSError, match="disk full"):
        run_train(_base(tiny_path, tmp_path, precious, "--max_train_steps", "1", "--seed", "8"))
    after = _snapshot(precious)
    for name in ("pytorch_lora_weights.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        assert after[name] == before[name], name
    monkeypatch.setattr(export, "save_pipeline_folder", real)
    run_train(_base(tiny_path, tmp_path, precious, "--max_train_steps", "1", "--seed", "8"))
    after = _snapshot(precious)
    assert after["pytorch_lora_weights.safetensors"] != before["pytorch_lora_weights.safetensors"]
    assert not (precious / ".export.tmp").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_non_finite_target_stops_before_anything_is_saved(precious, tiny_path, tmp_path, monkeypatch, resume):
    import train_danceopd
    from danceopd_diffusers.stopping import NonFiniteError

    before = _snapshot(precious)
    real, calls = train_danceopd.on_policy_states, []

    def nan_on_second_step(*args, **kwargs):
        states = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            states.target.fill_(float("nan"))
        return states

    monkeypatch.setattr(train_danceopd, "on_policy_states", nan_on_second_step)
    extra = ["--resume_from_checkpoint", "latest"] if resume else []
    with pytest.raises(NonFiniteError, match="the target of route 'base_cfg' is not finite"):
        run_train(
            _base(
                tiny_path, tmp_path, precious, "--max_train_steps", "4", "--checkpointing_steps", "1", *extra
            )
        )
    after = _snapshot(precious)
    # the first step of this run was saved (checkpoint-1 again, or checkpoint-3 after resume); a new run's first
    # checkpoint replaces the earlier run's (never a mix of both); nothing else changed
    new_checkpoint = "checkpoint-3" if resume else "checkpoint-1"
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    replaced = set() if resume else {k for k in before if k.startswith("checkpoint-2/")}
    assert all(k.startswith(new_checkpoint + "/") for k in changed - replaced), sorted(changed)
    assert not replaced or not any(k in after for k in replaced)
    assert not (precious / ("checkpoint-4" if resume else "checkpoint-2")).with_suffix(".tmp").exists()


# ------------------------------------------------------------------------------------------- resume
def test_resume_is_checked_before_any_weights_load(precious, tiny_path, tmp_path, monkeypatch):
    from danceopd_diffusers import field_loading
    from danceopd_diffusers.checkpointing import resolve_resume
    from danceopd_diffusers.config import ConfigError

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the resume check")

    monkeypatch.setattr(field_loading, "load_pipeline", no_weights)

    def resume(name: str, *extra: str):
        return run_train(
            _base(
                tiny_path,
                tmp_path,
                precious,
                "--max_train_steps",
                "3",
                "--resume_from_checkpoint",
                name,
                *extra,
            )
        )

    with pytest.raises(
        ConfigError, match="'checkpoint-9' cannot be used: it does not exist.*checkpoint-1, checkpoint-2"
    ):
        resume("checkpoint-9")
    with pytest.raises(ConfigError, match="rank: 4 in the checkpoint, 8 in this run"):
        resume("latest", "--rank", "8")
    with pytest.raises(
        ConfigError, match=r'targets: \[.*"to_k".*\] in the checkpoint, \["attn.to_q"\] in this run'
    ):
        resume("latest", "--lora_layers", "attn.to_q")
    with pytest.raises(
        ConfigError, match=r"fields_config\.fields\.base_cfg\.scale: 3\.0 in the checkpoint, 5\.0 in this run"
    ):
        resume("latest", "--cfg_scale", "5.0")
    with pytest.raises(ConfigError, match="method: .danceopd. in the checkpoint, .offpolicy. in this run"):
        resume("checkpoint-1", "--method", "offpolicy")

    # an empty or partial newest checkpoint is never taken by `latest`, and refused by name
    (precious / "checkpoint-3").mkdir()
    (precious / "checkpoint-4").mkdir()
    (precious / "checkpoint-4" / "pytorch_lora_weights.safetensors").write_bytes(b"partial")
    assert resolve_resume(precious, "latest") == precious / "checkpoint-2"
    with pytest.raises(ConfigError, match="'checkpoint-3' cannot be used: it is empty"):
        resume("checkpoint-3")
    with pytest.raises(
        ConfigError, match="'checkpoint-4' cannot be used: it has no danceopd_checkpoint.json"
    ):
        resume("checkpoint-4")

    # a complete checkpoint whose file was damaged afterwards is reported by the file's name
    optimizer = precious / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(ConfigError, match="optimizer.bin is corrupt: 100 bytes.*checkpoint-1"):
        resume("latest")
    lora = precious / "checkpoint-1" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"x" * lora.stat().st_size)
    with pytest.raises(ConfigError, match="pytorch_lora_weights.safetensors is corrupt"):
        resume("checkpoint-1")


# ------------------------------------------------------------------------------------------- faults
REPO = Path(__file__).resolve().parents[1]

#: runs train_danceopd.main with the argv given, after SIGKILL-ing itself in the middle of checkpoint-2's save
#: (the student LoRA written, accelerate's optimizer / scheduler / RNG files not yet)
KILL_DURING_SECOND_SAVE = """
import os, signal, sys
import train_danceopd
from danceopd_diffusers import export

real, calls = export.save_student_lora, []

def save_then_die(*args, **kwargs):
    path = real(*args, **kwargs)
    calls.append(path)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

export.save_student_lora = save_then_die
train_danceopd.main(train_danceopd.parse_args(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    import os

    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def _route_steps(out: Path) -> list[int]:
    lines = (out / "logs" / "routes_rank0.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_kill_during_save_with_total_limit_1_keeps_a_complete_checkpoint(tiny_path, tmp_path):
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from danceopd_diffusers.checkpointing import checkpoint_problem

    out = tmp_path / "out"
    args = _base(tiny_path, tmp_path, out, "--checkpointing_steps", "1", "--checkpoints_total_limit", "1")
    args += ["--skip_pipeline_export"]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SAVE, *args, "--max_train_steps", "3"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (out / "checkpoint-2.tmp").is_dir() and not (out / "checkpoint-2").exists()
    assert checkpoint_problem(out / "checkpoint-1") is None  # pruned only after checkpoint-2 is complete
    run_train([*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert _route_steps(out) == [0, 1, 1, 2]  # resumed after step 1, not restarted
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    run_train(
        [
            *_base(tiny_path, tmp_path, tmp_path / "straight", "--skip_pipeline_export"),
            "--max_train_steps",
            "3",
        ]
    )
    resumed = load_file(out / "pytorch_lora_weights.safetensors")
    straight = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_sigterm_saves_and_exits_and_a_second_run_is_refused(tiny_path, tmp_path):
    import re
    import signal
    import subprocess
    import sys
    import time

    from danceopd_diffusers.checkpointing import checkpoint_problem
    from danceopd_diffusers.config import ConfigError

    out = tmp_path / "out"
    args = _base(tiny_path, tmp_path, out, "--checkpointing_steps", "1000", "--skip_pipeline_export")
    first = subprocess.Popen(
        [sys.executable, str(REPO / "train_danceopd.py"), *args, "--max_train_steps", "100000"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        routes = out / "logs" / "routes_rank0.jsonl"
        deadline = time.time() + 240
        while not (routes.exists() and len(routes.read_text().splitlines()) >= 2):
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)
        # one writer per folder: a second run fails at once, naming the first one's process id
        with pytest.raises(ConfigError, match=f"in use by another training run \\(process {first.pid} on"):
            run_train([*args, "--max_train_steps", "2"])
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped = re.search(
        r"stopped by SIGTERM after step (\d+); its state is saved in (\S+)\. Continue with", stderr
    )
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))
    assert (
        Path(stopped.group(2)) == out / f"checkpoint-{step}"
        and checkpoint_problem(out / f"checkpoint-{step}") is None
    )
    assert _route_steps(out) == list(range(step))
    # the dead run's lock is taken over; `latest` continues from the checkpoint written on SIGTERM
    run_train([*args, "--max_train_steps", str(step + 1), "--resume_from_checkpoint", "latest"])
    assert _route_steps(out) == list(range(step + 1))
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_sigint_finishes_the_step_and_saves(tiny_path, tmp_path, monkeypatch):
    import os
    import signal

    import train_danceopd
    from danceopd_diffusers.checkpointing import checkpoint_problem
    from danceopd_diffusers.stopping import Interrupted

    real, calls = train_danceopd.on_policy_states, []

    def interrupt_during_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_danceopd, "on_policy_states", interrupt_during_second_step)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job
    with pytest.raises(Interrupted, match="stopped by SIGINT after step 2") as stopped:
        run_train(_base(tiny_path, tmp_path, out, "--max_train_steps", "5", "--checkpointing_steps", "1000"))
    assert stopped.value.exit_code == 130
    assert checkpoint_problem(out / "checkpoint-2") is None and _route_steps(out) == [0, 1]
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # no export of an unfinished run
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is back
