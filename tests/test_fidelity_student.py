"""Fidelity of the student and its teachers to the method: LoRA targets, warm-start scale, fp32 master weights
of a full fine-tune, checkpoint + LoRA teachers, and the timestep the student is queried at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_lora_file, run_train
from test_errors import _expect, no_weight_loading  # noqa: F401  (the fixture is used by name)

SHORT = [
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
    "--seed",
    "7",
    "--report_to",
    "none",
    "--checkpointing_steps",
    "100",
]


def _prompts(tmp_path: Path) -> str:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,task\na red circle,t2i\ntwo blue squares,t2i\n")
    return str(path)


def _velocity(transformer, seed: int = 0) -> torch.Tensor:
    """The transformer's output at a fixed random input (the tiny SD3 shapes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    text = torch.randn(1, 8, 64, generator=gen)
    pooled = torch.randn(1, 64, generator=gen)
    with torch.no_grad():
        return transformer(
            hidden_states=x.to(transformer.dtype),
            timestep=torch.tensor([600.0]),
            encoder_hidden_states=text.to(transformer.dtype),
            pooled_projections=pooled.to(transformer.dtype),
            return_dict=False,
        )[0].float()


def _set_lora_alpha(file: Path, alpha: float) -> None:
    """Rewrite the alpha a diffusers-format LoRA file declares (its weights unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(file), "pt") as f:
        meta = dict(f.metadata())
    packed = json.loads(meta["lora_adapter_metadata"])
    packed["transformer.lora_alpha"] = alpha
    meta["lora_adapter_metadata"] = json.dumps(packed)
    save_file(load_file(file), file, metadata=meta)


# ------------------------------------------------------------------------------------------- 1. SD3 targets
def test_sd3_default_targets_cover_every_attention_projection_of_dual_attention_blocks():
    """SD3.5-Medium's blocks 0-12 have a second self-attention (attn2); the student LoRA must adapt it too."""
    from diffusers.models.attention_processor import Attention

    from danceopd_diffusers.families import SD3Family
    from danceopd_diffusers.student import add_student_lora
    from danceopd_diffusers.tiny.sd3 import build_tiny_sd3_pipeline

    transformer = build_tiny_sd3_pipeline(dual_attention_layers=(0,)).transformer
    attention_linears = {
        f"{name}.{child}"
        for name, module in transformer.named_modules()
        if isinstance(module, Attention)
        for child, sub in module.named_modules()
        if isinstance(sub, torch.nn.Linear)
    }
    assert any(".attn2." in n for n in attention_linears)
    add_student_lora(transformer, 4, 4, SD3Family.default_lora_targets)
    adapted = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and "student" in m.lora_A}
    assert adapted == attention_linears, sorted(attention_linears - adapted)


# ------------------------------------------------------------------------------------------- 2. warm start
def test_student_init_keeps_the_lora_files_alpha(tiny_path, tmp_path):
    """A LoRA saved with alpha = r / 2 warm-starts a student equal to base + that LoRA at its own scale."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors import safe_open

    init = make_lora_file(tiny_path, tmp_path / "init", rank=4)
    _set_lora_alpha(init, 2.0)
    out = tmp_path / "o"
    run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--cfg_scale",
            "3",
            "--dataset_name",
            _prompts(tmp_path),
            "--output_dir",
            str(out),
            "--student_init",
            str(init),
            "--learning_rate",
            "0",
            "--max_train_steps",
            "1",
            "--skip_pipeline_export",
            *SHORT,
        ]
    )
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        saved = json.loads(f.metadata()["lora_adapter_metadata"])
    assert saved["transformer.lora_alpha"] == 2.0

    def with_lora(file: Path) -> torch.Tensor:
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
        pipe.load_lora_weights(str(file))
        return _velocity(pipe.transformer)

    expected = with_lora(init)  # the stock loader honours the file's alpha
    base = _velocity(SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer"))
    # alpha = r / 2: the LoRA's delta is half of what alpha = r would give
    doubled = base + 2 * (expected - base)
    student = with_lora(out / "pytorch_lora_weights.safetensors")
    assert torch.allclose(student, expected, atol=1e-5)
    assert not torch.allclose(student, doubled, atol=1e-3)  # what the old code (alpha = --rank) trained


@pytest.mark.usefixtures("no_weight_loading")
def test_student_init_refuses_an_alpha_that_contradicts_the_file(tiny_path, tmp_path):
    init = make_lora_file(tiny_path, tmp_path / "init", rank=4)
    _set_lora_alpha(init, 2.0)
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--cfg_scale",
            "3",
            "--student_init",
            str(init),
            "--rank",
            "4",
            "--lora_alpha",
            "4",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "lora_alpha=2.0",
        "--lora_alpha is 4.0",
        "Drop --lora_alpha",
    )


# ------------------------------------------------------------------------------------------- 4. full fine-tune
def test_full_finetune_under_bf16_trains_fp32_master_weights(tiny_path, tmp_path):
    """bf16 weights would swallow Adam's 1e-5 steps; the master copy is fp32, the export still bf16."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "o"
    run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--cfg_scale",
            "3",
            "--dataset_name",
            _prompts(tmp_path),
            "--output_dir",
            str(out),
            "--full_finetune",
            "--mixed_precision",
            "bf16",
            "--learning_rate",
            "1e-5",
            "--max_train_steps",
            "1",
            *SHORT[:-2],
            "--checkpointing_steps",
            "1",
        ]
    )
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict[str, torch.Tensor]:  # as saved: from_pretrained would upcast to fp32
        return load_file(next(folder.glob("*.safetensors")))

    original = weights(Path(tiny_path) / "transformer")
    trained = weights(out / "checkpoint-1" / "transformer")
    assert {v.dtype for v in trained.values()} == {torch.float32}  # the master weights, as checkpointed
    moved = sum(int((trained[k] != original[k].to(trained[k].dtype)).sum()) for k in original)
    total = sum(v.numel() for v in original.values())
    assert moved / total > 0.5, moved / total  # bf16 weights: few move
    assert {v.dtype for v in weights(out / "transformer").values()} == {torch.bfloat16}  # exported in bf16
    DiffusionPipeline.from_pretrained(out, trust_remote_code=True)  # and loadable
    card = (out / "README.md").read_text()
    assert "base model (frozen copy)" in card  # the base teacher is a pristine copy, not the trained student
