"""Safety and failure handling: no folder code runs, no secret is written, no trained output is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_train

RUN = [
    "--num_rollout_steps",
    "4",
    "--rank",
    "4",
    "--train_batch_size",
    "1",
    "--gradient_accumulation_steps",
    "1",
    "--max_sequence_length",
    "16",
    "--learning_rate",
    "1e-3",
    "--seed",
    "7",
    "--cfg_scale",
    "3.0",
]


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
def test_hub_token_is_written_nowhere(tiny_path, tmp_path, monkeypatch, capfd):
    import huggingface_hub

    token = "hf_FAKEtoken0123456789SECRET"
    used = {}
    monkeypatch.setattr(
        huggingface_hub,
        "create_repo",
        lambda repo_id, **kw: used.setdefault("create", type("R", (), {"repo_id": "me/" + repo_id})),
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: used.setdefault("upload", kw))
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
            "--push_to_hub",
            "--hub_token",
            token,
            *RUN,
        ]
    )
    assert used["upload"]["token"] == token  # the token did its job
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "hparams.yml" for p in files) and any("tfevents" in p.name for p in files)
    assert any(p.name == "optimizer.bin" for p in files) and (out / "README.md").is_file()
    leaked = [str(p.relative_to(out)) for p in files if token.encode() in p.read_bytes()]
    assert leaked == []
    captured = capfd.readouterr()
    assert token not in captured.out and token not in captured.err
