"""Fidelity of the student and its teachers to the method: LoRA targets, warm-start scale, fp32 master weights
of a full fine-tune, checkpoint + LoRA teachers, and the timestep the student is queried at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_lora_file, run_train
from test_errors import _expect, no_weight_loading  # noqa: F401  (the fixture is used by name)
from test_train import SHORT, _prompts


def _train(tiny_path: str, tmp_path: Path, *extra: str) -> Path:
    """One short CFG-absorption step on the tiny pipeline; returns the output folder."""
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
            "--max_train_steps",
            "1",
            "--report_to",
            "none",
            *SHORT,
            "--train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "1",
            *extra,
        ]
    )
    return out


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


def _set_metadata(file: Path, **entries) -> None:
    """Rewrite entries (lora_alpha, alpha_pattern...) of the config a diffusers-format LoRA file declares."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(file), "pt") as f:
        meta = dict(f.metadata())
    packed = json.loads(meta["lora_adapter_metadata"])
    packed.update({f"transformer.{k}": v for k, v in entries.items()})
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
@pytest.mark.parametrize(
    "declared",
    [{"lora_alpha": 2.0}, {"lora_alpha": 4, "alpha_pattern": {"transformer_blocks.0.attn.to_q": 1.0}}],
    ids=["alpha=r/2", "alpha_pattern"],
)
def test_student_init_keeps_the_lora_files_scale(tiny_path, tmp_path, declared):
    """A LoRA saved with alpha != r (or an alpha pattern) warm-starts a student equal to base + that LoRA at its
    own scale, not at alpha = --rank."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open

    init = make_lora_file(tiny_path, tmp_path / "init", rank=4)
    _set_metadata(init, **declared)
    out = _train(
        tiny_path, tmp_path, "--student_init", str(init), "--learning_rate", "0", "--skip_pipeline_export"
    )
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        saved = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(saved[f"transformer.{k}"] == v for k, v in declared.items())

    def with_lora(file: Path) -> torch.Tensor:
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
        pipe.load_lora_weights(str(file))
        return _velocity(pipe.transformer)

    expected = with_lora(init)  # the stock loader honours the file's scale
    student = with_lora(out / "pytorch_lora_weights.safetensors")
    assert torch.allclose(student, expected, atol=1e-5)
    _set_metadata(
        init, lora_alpha=4, alpha_pattern={}
    )  # what the old code trained: alpha = --rank everywhere
    assert not torch.allclose(student, with_lora(init), atol=1e-4)


@pytest.mark.usefixtures("no_weight_loading")
def test_student_init_refuses_an_alpha_that_contradicts_the_file(tiny_path, tmp_path):
    init = make_lora_file(tiny_path, tmp_path / "init", rank=4)
    _set_metadata(init, lora_alpha=2.0)
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


def test_student_init_config_of_files_with_and_without_metadata():
    from danceopd_diffusers.lora_io import LoraHeader
    from danceopd_diffusers.preflight import student_init_lora_config

    bare = LoraHeader("f", {"a.to_q": 4, "a.to_v": 8, "b.to_q": 4}, None, None, None, None)
    # no metadata: read as diffusers reads it (alpha = r, per-module ranks as a pattern), or at --lora_alpha
    assert student_init_lora_config(bare, 4, None) == {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["a.to_q", "a.to_v", "b.to_q"],
        "rank_pattern": {"a.to_v": 8},
    }
    assert student_init_lora_config(bare, 4, 2.0)["lora_alpha"] == 2.0
    declared = {"r": 4, "lora_alpha": 2, "alpha_pattern": {"a.to_q": 1}, "lora_dropout": 0.1}
    header = LoraHeader("f", {"a.to_q": 4}, 4, 2, None, declared)
    config = student_init_lora_config(header, 4, None)
    assert (
        config["lora_alpha"] == 2 and config["alpha_pattern"] == {"a.to_q": 1} and config["lora_dropout"] == 0
    )
    from danceopd_diffusers.config import ConfigError

    with pytest.raises(ConfigError, match="alpha_pattern"):  # an explicit alpha cannot express a pattern
        student_init_lora_config(header, 4, 2.0)


# ------------------------------------------------------------------------------------------- 4. full fine-tune
def test_full_finetune_under_bf16_trains_fp32_master_weights(tiny_path, tmp_path):
    """bf16 weights would swallow Adam's 1e-5 steps; the master copy is fp32, the export still bf16."""
    from diffusers import DiffusionPipeline

    out = _train(
        tiny_path,
        tmp_path,
        "--full_finetune",
        "--mixed_precision",
        "bf16",
        "--learning_rate",
        "1e-5",
        "--checkpointing_steps",
        "1",
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


# ------------------------------------------------------------------------------------------- 9. checkpoint + LoRA
def test_lora_on_a_checkpoint_field_is_that_checkpoint_with_the_lora_applied(tiny_pipe, tiny_path, tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from danceopd_diffusers.config import parse_fields_config
    from danceopd_diffusers.families import SD3Family
    from danceopd_diffusers.field_loading import build_fields
    from danceopd_diffusers.fields import FieldQuery
    from danceopd_diffusers.student import AdapterScope, add_student_lora

    family = SD3Family(max_sequence_length=16)
    checkpoint = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in checkpoint.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    checkpoint.save_pretrained(tmp_path / "ckpt")
    lora = make_lora_file(tiny_path, tmp_path / "lora", rank=4)
    _set_metadata(lora, lora_alpha=2.0)
    config = parse_fields_config(
        {
            "fields": {
                "base": {"type": "base"},
                "ckpt": {"type": "checkpoint", "path": str(tmp_path / "ckpt")},
                "ckpt_lora": {"type": "lora", "path": str(lora), "of": "ckpt"},
                "base_lora": {"type": "lora", "path": str(lora)},
            },
            "routes": [{"field": "ckpt_lora"}],
        }
    )
    student = tiny_pipe.transformer
    add_student_lora(student, 4, 4, family.default_lora_targets)
    fields = build_fields(config, family, tiny_path, student, AdapterScope(student), torch.float32, "cpu")

    by_hand = SD3Transformer2DModel.from_pretrained(tmp_path / "ckpt")  # W + (alpha / r) B A, alpha / r = 1/2
    state = load_file(lora)
    modules = dict(by_hand.named_modules())
    with torch.no_grad():
        for key, a in state.items():
            if ".lora_A." in key:
                name = key[len("transformer.") :].split(".lora_A.")[0]
                b = state[key.replace(".lora_A.", ".lora_B.")]
                modules[name].weight.add_(0.5 * b @ a)

    cond = family.encode_prompts(tiny_pipe, ["a red circle"], "cpu")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    query = FieldQuery(x, torch.full((1,), 0.6), cond)
    field = fields["ckpt_lora"]
    assert field.transformer is not fields["ckpt"].transformer and field.transformer is not student
    assert not any(p.requires_grad for p in field.transformer.parameters())
    with torch.no_grad():
        target = field.velocity(query)
        assert torch.allclose(target, family.velocity(by_hand, x, query.sigma, cond), atol=1e-5)
        for other in ("ckpt", "base_lora"):
            assert not torch.allclose(target, fields[other].velocity(query), atol=1e-3), other


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"l": {"type": "lora", "path": "x", "of": "nowhere"}}, "unknown field 'nowhere'"),
        ({"b": {"type": "base"}, "l": {"type": "lora", "path": "x", "of": "b"}}, "drop `of`"),
        (
            {
                "b": {"type": "base"},
                "c": {"type": "cfg", "of": "b", "scale": 2},
                "l": {"type": "lora", "path": "x", "of": "c"},
            },
            "'c', a cfg field, but `of` of a lora field must name a checkpoint field",
        ),
        (
            {"k": {"type": "checkpoint", "path": "x"}, "k2": {"type": "checkpoint", "path": "y", "of": "k"}},
            "(checkpoint) cannot have `of`",
        ),
    ],
)
def test_lora_on_a_checkpoint_config_errors(fields, fragment):
    from danceopd_diffusers.config import ConfigError, parse_fields_config

    with pytest.raises(ConfigError) as info:
        parse_fields_config({"fields": fields, "routes": [{"field": next(iter(fields))}]})
    assert fragment in str(info.value)


# ------------------------------------------------------------------------------------------- 10a. query time
@pytest.fixture(scope="module")
def flux_path(tmp_path_factory) -> str:
    from danceopd_diffusers.tiny import tiny_pipeline_path

    return tiny_pipeline_path("flux", tmp_path_factory.mktemp("flux-cache"))


def _rollout_with_its_velocities(path: str, index: int, mixed_precision: bool = False):
    """A 4-step bf16 on-policy rollout (the stock pipeline call) that queries ``index``: the queried state, and
    what the pipeline gave its transformer at that step (inputs and velocity). ``mixed_precision``: the
    transformer is prepared by accelerate (bf16 autocast, fp32 outputs), as the training script's student is."""
    from conftest import _reset_accelerate
    from diffusers import DiffusionPipeline

    from danceopd_diffusers.families import family_for_pipeline_class
    from danceopd_diffusers.fields import TransformerField
    from danceopd_diffusers.objectives import RoutedTargets, on_policy_states

    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    family = family_for_pipeline_class(type(pipe).__name__)(max_sequence_length=16)
    if mixed_precision:
        from accelerate import Accelerator

        _reset_accelerate()
        Accelerator(mixed_precision="bf16").prepare(pipe.transformer)
        _reset_accelerate()
    cond = family.encode_prompts(pipe, ["a red circle"], "cpu")
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(family.latent_shape(pipe, 1, 32, 32), generator=gen).to(torch.bfloat16)
    teacher = family.transformer_class().from_pretrained(
        path, subfolder="transformer", torch_dtype=torch.bfloat16
    )
    targets = RoutedTargets([TransformerField("t", family, teacher)], cond, None, 4)
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True
    )
    # the last state is queried too, so that the rollout runs the step of the state under test
    states = on_policy_states(pipe, family, targets, cond, noise, 4, torch.tensor([[index, 3]]), 32, 32)
    hook.remove()
    row = states.sigma.tolist().index(float(pipe.scheduler.sigmas[index]))
    return family, pipe, cond, states.x[row : row + 1], states.sigma[row : row + 1], calls[index]


@pytest.mark.parametrize("family_name", ["sd3", "flux"])
@pytest.mark.parametrize("mixed_precision", [False, True], ids=["bf16", "bf16-autocast"])
def test_student_is_queried_where_the_rollout_was(tiny_path, flux_path, family_name, mixed_precision):
    """At a queried state, the student's velocity (as the training step computes it) is the one the stock
    pipeline computed at that step: same state, same timestep. SD3's loop passes a float32 1000·sigma (the query
    passed bf16(1000·sigma), up to 0.0018 off in sigma on the 16-step grid); under accelerate's mixed precision
    the rollout's latents must stay bf16 as at inference (Flux casts its timestep to the latents' dtype)."""
    index = 2  # sigma 0.75 on SD3's shift-3, 4-step grid: 750 is not a bf16 number
    path = tiny_path if family_name == "sd3" else flux_path
    family, pipe, cond, x, sigma, (inputs, velocity) = _rollout_with_its_velocities(
        path, index, mixed_precision
    )
    assert inputs["hidden_states"].dtype == torch.bfloat16  # as at inference
    assert torch.equal(x, inputs["hidden_states"])  # the queried state is the one the pipeline stepped from
    with torch.no_grad():
        student = family.velocity(pipe.transformer, x, sigma, cond)
    assert torch.equal(student, velocity)


# ------------------------------------------------------------------------------------------- 10b. precision
def test_mixed_precision_taken_from_accelerate_is_logged_and_recorded(
    tiny_path, tmp_path, monkeypatch, capsys
):
    # what `accelerate launch --mixed_precision bf16` (or its config) sets
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = _train(tiny_path, tmp_path, "--skip_pipeline_export")
    assert "mixed precision: bf16 (from `accelerate launch`" in capsys.readouterr().out
    assert json.loads((out / "danceopd_config.json").read_text())["args"]["mixed_precision"] == "bf16"
    assert "| `mixed_precision` | `bf16` |" in (out / "README.md").read_text()
