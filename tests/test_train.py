"""End-to-end runs of train_danceopd.py on the tiny pipeline (CPU, offline) and what they hand the user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_lora_file, run_train
from PIL import Image
from safetensors.torch import load_file

SHORT = [
    "--num_rollout_steps",
    "4",
    "--rank",
    "4",
    "--train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "2",
    "--max_sequence_length",
    "16",
    "--learning_rate",
    "1e-3",
    "--seed",
    "7",
]


@pytest.fixture(scope="module")
def trained(tiny_path, tmp_path_factory):
    """One short CFG-absorption run with a LoRA expert field, validation and checkpoints."""
    tmp = tmp_path_factory.mktemp("run")
    lora = make_lora_file(tiny_path, tmp / "expert")
    config = tmp / "fields.yaml"
    config.write_text(
        "fields:\n  base: {type: base}\n  expert: {type: lora, path: " + str(lora.parent) + "}\n"
        "  base_cfg: {type: cfg, of: base, scale: 3.5}\n"
        "routes:\n  - {field: base_cfg, task: t2i}\n  - {field: expert, task: t2i}\n"
    )
    data = tmp / "prompts.csv"
    data.write_text("prompt,task\na red circle,t2i\ntwo blue squares,t2i\na green star,t2i\n")
    out = tmp / "out"
    run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            str(config),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(out),
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "2",
            "--validation_steps",
            "2",
            "--validation_prompt",
            "a red circle",
            *SHORT,
        ]
    )
    return out


def test_outputs_exist(trained):
    for name in (
        "pytorch_lora_weights.safetensors",
        "model_index.json",
        "pipeline_danceopd.py",
        "README.md",
        "samples.png",
        "transformer/config.json",
        "checkpoint-2",
        "checkpoint-4",
        "validation/step-000002.png",
    ):
        assert (trained / name).exists(), name
    routes = [
        json.loads(line)["route"]
        for line in (trained / "logs" / "routes_rank0.jsonl").read_text().splitlines()
    ]
    assert len(routes) == 4 and set(routes) <= {"base_cfg", "expert"}
    events = list((trained / "logs").rglob("events.out.tfevents*"))
    assert events, "tensorboard received nothing"


def test_exported_pipeline_is_cfg_free_and_round_trips(trained, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(trained, trust_remote_code=True)
    assert type(pipe).__name__ == "DanceOPDStableDiffusion3Pipeline"
    assert pipe.config.absorbed_guidance_scale == 3.5
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", num_inference_steps=5, output_type="latent", max_sequence_length=16)
    assert len(calls) == 5  # one transformer call per denoising step: no CFG by default
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(again).__name__ == "DanceOPDStableDiffusion3Pipeline"
    assert json.loads((tmp_path / "copy" / "model_index.json").read_text())["_class_name"] == [
        "pipeline_danceopd",
        "DanceOPDStableDiffusion3Pipeline",
    ]


def test_lora_loads_in_stock_pipeline_and_matches_exported_student(trained, tiny_path):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    lora = load_file(trained / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    plain = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    stock.load_lora_weights(trained)
    exported = DiffusionPipeline.from_pretrained(trained, trust_remote_code=True)
    kwargs = dict(num_inference_steps=4, output_type="latent", max_sequence_length=16, guidance_scale=1.0)
    out = {}
    for name, p in (("stock", stock), ("exported", exported), ("plain", plain)):
        p.set_progress_bar_config(disable=True)
        out[name] = p("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.allclose(out["stock"], out["exported"], atol=1e-4), (
        (out["stock"] - out["exported"]).abs().max()
    )
    assert not torch.allclose(out["stock"], out["plain"], atol=1e-4)


def test_model_card(trained):
    card = (trained / "README.md").read_text()
    for fragment in (
        "library_name: diffusers",
        "base_cfg",
        "CFG(scale=3.5) of base",
        "`expert`",
        "| `t2i` |",
        "danceopd",
        "trust_remote_code=True",
        "load_lora_weights",
        "multiplies",
        "3.5",
        "![samples](samples.png)",
        "`num_rollout_steps` | `4`",
        "`query_strategy` | `low`",
    ):
        assert fragment in card, fragment


def test_push_uploads_exactly_the_outputs(trained, monkeypatch):
    import huggingface_hub

    from danceopd_diffusers import export

    calls = {}
    monkeypatch.setattr(
        huggingface_hub,
        "create_repo",
        lambda repo_id, **kw: calls.setdefault("create", type("R", (), {"repo_id": "me/" + repo_id})),
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    repo = export.create_hub_repo("student")
    export.push_output_dir(trained, repo, token="t")
    upload = calls["upload"]
    assert upload["repo_id"] == "me/student" and upload["folder_path"] == str(trained)
    files = export.files_to_upload(trained)
    assert (
        "pytorch_lora_weights.safetensors" in files and "model_index.json" in files and "README.md" in files
    )
    assert "pipeline_danceopd.py" in files and "samples.png" in files
    assert any(f.startswith("transformer/") for f in files)
    assert not any(f.startswith(("checkpoint-", "logs/", "validation/")) for f in files)
    from huggingface_hub.utils import filter_repo_objects

    every = [p.relative_to(trained).as_posix() for p in trained.rglob("*") if p.is_file()]
    assert sorted(filter_repo_objects(every, ignore_patterns=upload["ignore_patterns"])) == files


def _prompts(tmp_path: Path) -> str:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\na red circle\ntwo blue squares\na green star\nthree yellow dots\n")
    return str(path)


def _lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "pytorch_lora_weights.safetensors")


def test_resume_reaches_the_same_weights(tiny_path, tmp_path):
    base = [
        "--pretrained_model_name_or_path",
        tiny_path,
        "--cfg_scale",
        "3.0",
        "--checkpointing_steps",
        "2",
        "--dataset_name",
        _prompts(tmp_path),
        "--report_to",
        "none",
        "--skip_pipeline_export",
        *SHORT,
    ]
    run_train([*base, "--output_dir", str(tmp_path / "full"), "--max_train_steps", "4"])
    run_train([*base, "--output_dir", str(tmp_path / "cut"), "--max_train_steps", "2"])
    # a crash while saving checkpoint-4 left a partial folder: resume must not take it
    (tmp_path / "cut" / "checkpoint-4.tmp").mkdir()
    run_train(
        [
            *base,
            "--output_dir",
            str(tmp_path / "cut"),
            "--max_train_steps",
            "4",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    full, cut = _lora_weights(tmp_path / "full"), _lora_weights(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for key in full:  # bit-exact: the resumed run repeats the uninterrupted one's arithmetic
        assert torch.equal(full[key], cut[key]), key
    two = _lora_weights(tmp_path / "cut" / "checkpoint-2")
    assert any(not torch.allclose(two[k], full[k]) for k in full)  # steps 3-4 did change the weights
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_checkpoints_total_limit_and_named_resume(tiny_path, tmp_path):
    from danceopd_diffusers.checkpointing import resolve_resume
    from danceopd_diffusers.config import ConfigError

    out = tmp_path / "o"
    run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--cfg_scale",
            "3.0",
            "--checkpointing_steps",
            "1",
            "--dataset_name",
            _prompts(tmp_path),
            "--checkpoints_total_limit",
            "2",
            "--report_to",
            "none",
            "--skip_pipeline_export",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "3",
            *SHORT,
        ]
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert resolve_resume(out, "checkpoint-2") == out / "checkpoint-2"
    with pytest.raises(
        ConfigError, match="does not exist. Complete checkpoints in .*: checkpoint-2, checkpoint-3;"
    ):
        resolve_resume(out, "checkpoint-1")


def _image_data(tmp_path: Path) -> str:
    (tmp_path / "imgs").mkdir()
    rows = []
    for i, (prompt, colour) in enumerate(
        [("a red square", "red"), ("a blue square", "blue"), ("a green one", "green")]
    ):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"prompt": prompt, "task": "t2i", "target_image": f"imgs/{i}.png"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "data.jsonl")


@pytest.mark.parametrize("method", ["sft", "dense", "offpolicy"])
def test_other_methods_train(tiny_path, tmp_path, method):
    extra = (
        ["--dataset_name", _image_data(tmp_path), "--caption_dropout_prob", "0.2"]
        if method == "sft"
        else ["--cfg_scale", "3", "--dataset_name", _prompts(tmp_path)]
    )
    out = tmp_path / "o"
    run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--method",
            method,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "100",
            "--report_to",
            "none",
            *extra,
            *SHORT,
        ]
    )
    lora = _lora_weights(out)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    card = (out / "README.md").read_text()
    assert f"`method` | `{method}`" in card


def test_full_finetune_and_per_sample_routing(tiny_path, tmp_path):
    out = tmp_path / "o"
    config = tmp_path / "f.json"
    config.write_text(
        json.dumps(
            {
                "fields": {
                    "base": {"type": "base"},
                    "c2": {"type": "cfg", "of": "base", "scale": 2},
                    "c5": {"type": "cfg", "of": "base", "scale": 5},
                },
                "routes": [{"field": "c2"}, {"field": "c5"}],
            }
        )
    )
    run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            str(config),
            "--full_finetune",
            "--dataset_name",
            _prompts(tmp_path),
            "--per_sample_routing",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--report_to",
            "none",
            "--checkpointing_steps",
            "1",
            *SHORT,
        ]
    )
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "checkpoint-1" / "transformer" / "config.json").exists()
    logged = [json.loads(line) for line in (out / "logs" / "routes_rank0.jsonl").read_text().splitlines()]
    assert all(len(entry["sample_routes"]) == 2 for entry in logged)
    from diffusers import DiffusionPipeline, SD3Transformer2DModel

    trained_t = DiffusionPipeline.from_pretrained(out, trust_remote_code=True).transformer
    original = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer")
    diff = max((a - b).abs().max().item() for a, b in zip(trained_t.parameters(), original.parameters()))
    assert diff > 0


def test_prompts_encoded_once_per_unique_prompt(tiny_pipe):
    from danceopd_diffusers.caches import PromptCache
    from danceopd_diffusers.families import SD3Family

    cache = PromptCache(tiny_pipe, SD3Family(max_sequence_length=16), "cpu")
    a = cache(["x", "y", "x"])
    b = cache(["y", "x", ""])
    assert cache.encoded == 3
    assert torch.equal(a.tensors["encoder_hidden_states"][0], b.tensors["encoder_hidden_states"][1])


def test_target_cache_encodes_each_row_once_and_opens_nothing_when_cached(tiny_pipe):
    from PIL import Image

    from danceopd_diffusers.caches import TargetCache
    from danceopd_diffusers.data import images_to_tensor
    from danceopd_diffusers.families import SD3Family

    family = SD3Family(max_sequence_length=16)
    cache = TargetCache(tiny_pipe, family, "cpu")
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    a = cache([3, 5, 3], [images[0], images[1], images[0]], 32, 32)
    assert cache.encoded == 2 and a.shape[0] == 3 and torch.equal(a[0], a[2])

    def never():
        raise AssertionError("a cached batch opened its images")

    b = cache([5, 3], never, 32, 32)
    assert torch.equal(b[0], a[1]) and cache.encoded == 2
    with torch.no_grad():  # one fixed posterior sample per row, the same the script would draw uncached
        expected = family.encode_images(
            tiny_pipe, images_to_tensor(images[:1], 32, 32), torch.Generator().manual_seed(0)
        )
    assert torch.allclose(a[0], expected[0], atol=1e-3)  # batched conv: float noise only


def test_student_init_bf16_and_gradient_checkpointing(trained, tiny_path, tmp_path):
    """Warm start from a LoRA (continues its weights) or a checkpoint; bf16 autocast and checkpointing run."""
    common = [
        "--pretrained_model_name_or_path",
        tiny_path,
        "--cfg_scale",
        "3",
        "--dataset_name",
        _prompts(tmp_path),
        "--max_train_steps",
        "1",
        "--report_to",
        "none",
        "--skip_pipeline_export",
        "--checkpointing_steps",
        "9",
        *SHORT,
    ]
    out = tmp_path / "from_lora"
    # --learning_rate 0 is refused (it would train nothing); 1e-30 moves no float32 weight
    run_train([*common, "--output_dir", str(out), "--student_init", str(trained), "--learning_rate", "1e-30"])
    start, end = _lora_weights(trained), _lora_weights(out)
    assert all(torch.allclose(start[k], end[k]) for k in start)  # exactly the LoRA it started from
    out = tmp_path / "from_ckpt"
    run_train(
        [
            *common,
            "--output_dir",
            str(out),
            "--student_init",
            str(trained / "transformer"),
            "--mixed_precision",
            "bf16",
            "--gradient_checkpointing",
        ]
    )
    assert (out / "pytorch_lora_weights.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "base model (frozen copy)" in card  # a checkpoint warm start keeps the pristine base apart
