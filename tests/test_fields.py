"""Fields reproduce what they claim to be: the stock pipeline's CFG, guiders, LoRA experts, the base."""

from __future__ import annotations

import pytest
import torch
from conftest import make_lora_file

from danceopd_diffusers.config import parse_fields_config
from danceopd_diffusers.families import Conditioning, SD3Family
from danceopd_diffusers.field_loading import build_fields
from danceopd_diffusers.fields import FieldQuery
from danceopd_diffusers.rollout import field_rollout
from danceopd_diffusers.student import STUDENT_ADAPTER, AdapterScope, add_student_lora

FAMILY = SD3Family(max_sequence_length=32)


def _inputs(pipe, prompts=("a red circle", "two blue squares")):
    cond = FAMILY.encode_prompts(pipe, list(prompts), "cpu")
    empty = FAMILY.encode_prompts(pipe, [""], "cpu")
    uncond = Conditioning({k: v.expand(len(prompts), *v.shape[1:]) for k, v in empty.tensors.items()})
    x = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return cond, uncond, x


def _perturb_student(transformer, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if f".{STUDENT_ADAPTER}." in name and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_cfg_field_reproduces_stock_pipeline_cfg(tiny_pipe, tiny_path):
    cond, uncond, x = _inputs(tiny_pipe)
    config = parse_fields_config(
        {
            "fields": {"base": {"type": "base"}, "cfg": {"type": "cfg", "of": "base", "scale": 4.0}},
            "routes": [{"field": "cfg"}],
        }
    )
    fields = build_fields(config, FAMILY, tiny_path, tiny_pipe.transformer, None, torch.float32, "cpu")
    with torch.no_grad():
        stock = tiny_pipe(
            prompt_embeds=cond.tensors["encoder_hidden_states"],
            pooled_prompt_embeds=cond.tensors["pooled_projections"],
            negative_prompt_embeds=uncond.tensors["encoder_hidden_states"],
            negative_pooled_prompt_embeds=uncond.tensors["pooled_projections"],
            guidance_scale=4.0,
            latents=x,
            num_inference_steps=6,
            output_type="latent",
        ).images
        sigmas = FAMILY.sigmas(tiny_pipe, 6, x.shape, "cpu")
        ours = field_rollout(
            lambda xx, s, i: fields["cfg"].velocity(FieldQuery(xx, s, cond, uncond)), x, sigmas
        )[-1]
    assert torch.allclose(stock, ours, atol=1e-5), (stock - ours).abs().max()


def test_guider_fields(tiny_pipe, tiny_path):
    cond, uncond, x = _inputs(tiny_pipe)
    config = parse_fields_config(
        {
            "fields": {
                "base": {"type": "base"},
                "cfg": {"type": "cfg", "of": "base", "scale": 3.0},
                "g_cfg": {
                    "type": "guider",
                    "of": "base",
                    "guider": "ClassifierFreeGuidance",
                    "guider_kwargs": {"guidance_scale": 3.0},
                },
                "g_apg": {
                    "type": "guider",
                    "of": "base",
                    "guider": "AdaptiveProjectedGuidance",
                    "guider_kwargs": {"guidance_scale": 3.0, "eta": 0.0},
                },
                "g_zero": {
                    "type": "guider",
                    "of": "base",
                    "guider": "ClassifierFreeZeroStarGuidance",
                    "guider_kwargs": {"guidance_scale": 3.0},
                },
            },
            "routes": [{"field": "cfg"}],
        }
    )
    fields = build_fields(config, FAMILY, tiny_path, tiny_pipe.transformer, None, torch.float32, "cpu")
    q = FieldQuery(x, torch.full((2,), 0.7), cond, uncond, step_index=5, num_steps=16)
    with torch.no_grad():
        v = {name: fields[name].velocity(q) for name in ("base", "cfg", "g_cfg", "g_apg", "g_zero")}
    assert torch.allclose(v["cfg"], v["g_cfg"], atol=1e-5)
    for name in ("g_apg", "g_zero"):
        assert torch.isfinite(v[name]).all()
        assert not torch.allclose(v[name], v["cfg"], atol=1e-4), name
        assert not torch.allclose(v[name], v["base"], atol=1e-4), name


def test_lora_expert_on_shared_base_matches_a_fused_copy_and_keeps_student_trainable(
    tiny_pipe, tiny_path, tmp_path
):
    lora = make_lora_file(tiny_path, tmp_path / "expert")
    cond, uncond, x = _inputs(tiny_pipe)
    transformer = tiny_pipe.transformer
    add_student_lora(transformer, 4, 4, FAMILY.default_lora_targets)
    _perturb_student(transformer)
    scope = AdapterScope(transformer)
    config = parse_fields_config(
        {
            "fields": {"base": {"type": "base"}, "expert": {"type": "lora", "path": str(lora)}},
            "routes": [{"field": "expert"}],
        }
    )
    n_params = sum(p.numel() for p in transformer.parameters())
    shared = build_fields(config, FAMILY, tiny_path, transformer, scope, torch.float32, "cpu")
    # the expert is a named adapter on the same model: only LoRA parameters were added
    assert shared["expert"].transformer is transformer
    assert sum(p.numel() for p in transformer.parameters()) - n_params < 0.2 * n_params
    separate = build_fields(config, FAMILY, tiny_path, transformer, None, torch.float32, "cpu")
    q = FieldQuery(x, torch.full((2,), 0.5), cond, uncond)
    with torch.no_grad():
        student_before = FAMILY.velocity(transformer, x, q.sigma, cond)
        for name in ("base", "expert"):
            assert torch.allclose(shared[name].velocity(q), separate[name].velocity(q), atol=1e-5), name
        assert not torch.allclose(shared["expert"].velocity(q), shared["base"].velocity(q), atol=1e-4)
        student_after = FAMILY.velocity(transformer, x, q.sigma, cond)
    assert torch.equal(student_before, student_after)
    assert not torch.allclose(student_after, separate["base"].velocity(q), atol=1e-4)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(f".{STUDENT_ADAPTER}." in n for n in trainable)
    assert transformer.active_adapters() == [STUDENT_ADAPTER]
    # gradients reach the student adapter after an expert evaluation
    FAMILY.velocity(transformer, x, q.sigma, cond).square().mean().backward()
    assert all(
        p.grad is not None for n, p in transformer.named_parameters() if f".{STUDENT_ADAPTER}.lora_A" in n
    )


def test_checkpoint_field_from_folder_and_single_file(tiny_pipe, tiny_path, tmp_path):
    from safetensors.torch import save_file

    cond, uncond, x = _inputs(tiny_pipe)
    ckpt = tiny_pipe.transformer
    with torch.no_grad():
        ckpt.transformer_blocks[0].attn.to_q.weight.mul_(1.5)
    ckpt.save_pretrained(tmp_path / "ckpt")
    save_file(ckpt.state_dict(), tmp_path / "ckpt.safetensors")
    q = FieldQuery(x, torch.full((2,), 0.5), cond, uncond)
    for path in (tmp_path / "ckpt", tmp_path / "ckpt.safetensors"):
        config = parse_fields_config(
            {"fields": {"c": {"type": "checkpoint", "path": str(path)}}, "routes": [{"field": "c"}]}
        )
        field = build_fields(config, FAMILY, tiny_path, None, None, torch.float32, "cpu")["c"]
        assert field.transformer is not ckpt
        assert not any(p.requires_grad for p in field.transformer.parameters())
        with torch.no_grad():
            assert torch.allclose(field.velocity(q), FAMILY.velocity(ckpt, x, q.sigma, cond), atol=1e-5)


@pytest.mark.parametrize("strategy,expected", [("low", 5 / 7), ("mid", 0.5), ("high", 2 / 7)])
def test_query_index_distribution(strategy, expected):
    from danceopd_diffusers.rollout import sample_query_indices

    idx = sample_query_indices(16, 20000, 1, strategy, torch.Generator().manual_seed(0)).float()
    assert idx.min() >= 0 and idx.max() <= 15
    # E[min(int(u*N), N-1)] ~= N*E[u] - 1/2
    assert abs((idx.mean().item() + 0.5) / 16 - expected) < 0.02


def test_norm_rescaled_cfg_from_a_config(tiny_pipe, tiny_path):
    cond, uncond, x = _inputs(tiny_pipe)
    config = parse_fields_config(
        {
            "fields": {
                "base": {"type": "base"},
                "cfg": {"type": "cfg", "of": "base", "scale": 4.0, "norm_rescale": True},
            },
            "routes": [{"field": "cfg"}],
        }
    )
    fields = build_fields(config, FAMILY, tiny_path, tiny_pipe.transformer, None, torch.float32, "cpu")
    q = FieldQuery(x, torch.full((2,), 0.6), cond, uncond)
    with torch.no_grad():
        v = fields["cfg"].velocity(q)
        c = fields["base"].velocity(q)
    # per-pixel channel norms equal the conditional's, and the direction is plain CFG's
    assert torch.allclose(v.norm(dim=1), c.norm(dim=1), atol=1e-4)
    assert "norm-rescaled" in fields["cfg"].describe()
    assert config.to_dict()["fields"]["cfg"]["norm_rescale"] is True


def test_lora_expert_in_peft_format_equals_diffusers_format(tiny_pipe, tiny_path, tmp_path):
    """A peft-saved adapter (adapter_model.safetensors + adapter_config.json) is the same field."""
    import json

    from conftest import make_lora_file
    from safetensors.torch import load_file, save_file

    lora = make_lora_file(tiny_path, tmp_path / "diffusers_fmt")
    peft_dir = tmp_path / "peft_fmt"
    peft_dir.mkdir()
    state = {"base_model.model." + k[len("transformer.") :]: v for k, v in load_file(lora).items()}
    save_file(state, peft_dir / "adapter_model.safetensors")
    (peft_dir / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 4, "target_modules": ["attn.to_q", "attn.to_v"], "peft_type": "LORA"})
    )
    cond, uncond, x = _inputs(tiny_pipe)
    q = FieldQuery(x, torch.full((2,), 0.5), cond, uncond)
    out = {}
    for name, path in (("diffusers", lora.parent), ("peft", peft_dir)):
        config = parse_fields_config({"fields": {"e": {"type": "lora", "path": str(path)}}, "routes": [{"field": "e"}]})
        field = build_fields(config, FAMILY, tiny_path, None, None, torch.float32, "cpu")["e"]
        with torch.no_grad():
            out[name] = field.velocity(q)
    assert torch.allclose(out["diffusers"], out["peft"], atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(out["peft"], FAMILY.velocity(tiny_pipe.transformer, x, q.sigma, cond), atol=1e-4)
