#!/usr/bin/env python
"""GPU benchmark of one DanceOPD training step on an SD3.5-Medium-shaped model (random weights, no download).

The paper recipe: N = 16 rollout steps, K = 1 query drawn from Beta(5, 2), a student LoRA of rank 128, two
LoRA experts (frozen adapters on the student's own base) and a CFG operator field, one route per step. The
step runs through the library exactly as ``train_danceopd.py`` does (pipeline rollout with the query
callback, routed field, student forward + backward, AdamW). Text encoders are tiny but produce the real
embedding shapes (333 x 4096 tokens, pooled 2048); prompt embeddings are cached, as in training.

    python benchmarks/bench_train_step.py --resolutions 512 1024 --batch_sizes 1 2 4 --steps 8

Prints a table: samples/s, peak GPU memory, and the time split rollout / teacher / student fwd+bwd.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from danceopd_diffusers.families import Conditioning, SD3Family
from danceopd_diffusers.fields import CFGField, TransformerField
from danceopd_diffusers.objectives import RoutedTargets, on_policy_states, velocity_mse
from danceopd_diffusers.rollout import sample_query_indices
from danceopd_diffusers.routing import Router, step_generator
from danceopd_diffusers.student import STUDENT_ADAPTER, AdapterScope, add_student_lora

SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)


# FLUX.1 Kontext [dev]: 19 double + 38 single blocks, 24 heads x 128, guidance-distilled
FLUX_KONTEXT = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SMOKE = dict(
    FLUX_KONTEXT,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    axes_dims_rope=(4, 6, 6),
)

SMOKE = dict(
    SD35_MEDIUM,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,
    dual_attention_layers=(0,),
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def real_width_clip(cls: type, hidden: int, vocab_size: int, dtype: torch.dtype):
    """A 1-layer CLIP text encoder with the real output width (768 / 1280)."""
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        hidden_size=hidden,
        projection_dim=hidden,
        intermediate_size=256,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return cls(config).to(dtype)


def real_width_t5(vocab_size: int, dtype: torch.dtype):
    """A 1-layer T5 encoder with the real output width (4096)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=4096,
        d_kv=64,
        d_ff=256,
        num_layers=1,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).to(dtype)


def bench_vae(shift_factor: float, scaling_factor: float, dtype: torch.dtype):
    """A small VAE with the real layout: 8x down-sampling, 16 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=[32, 32, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        norm_num_groups=8,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).to(dtype)


def build_pipeline(device: str, dtype: torch.dtype, config: dict = SD35_MEDIUM):
    """SD3.5-Medium-shaped transformer; tiny text encoders with the real output widths; an 8x, 16-channel VAE."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from danceopd_diffusers.tiny.sd3 import clip_tokenizer, t5_tokenizer

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(max_length=256)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).to(dtype)

        te1 = real_width_clip(CLIPTextModelWithProjection, 768, len(clip_tok), dtype)
        te2 = real_width_clip(CLIPTextModelWithProjection, 1280, len(clip_tok), dtype)
        t5 = real_width_t5(len(t5_tok), dtype)
        vae = bench_vae(0.0609, 1.5305, dtype)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=te1,
        tokenizer=clip_tok,
        text_encoder_2=te2,
        tokenizer_2=clip_tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (transformer, vae, te1, te2, t5):
        module.requires_grad_(False)
    return pipe


def build_kontext_pipeline(device: str, dtype: torch.dtype, config: dict = FLUX_KONTEXT):
    """FLUX.1-Kontext-shaped transformer; tiny CLIP-L/T5 with the real widths (768 pooled, 4096); 16-ch 8x VAE."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel

    from danceopd_diffusers.tiny.sd3 import clip_tokenizer, t5_tokenizer

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(max_length=512)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**config).to(dtype)
        clip = real_width_clip(CLIPTextModel, 768, len(clip_tok), dtype)
        t5 = real_width_t5(len(t5_tok), dtype)
        vae = bench_vae(0.1159, 0.3611, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (transformer, vae, clip, t5):
        module.requires_grad_(False)
        module.eval()
    return pipe


def add_random_expert(transformer, name: str, rank: int, seed: int, targets) -> None:
    from peft import LoraConfig

    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), adapter_name=name
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if f".{name}." in n and "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=gen) * 1e-3).to(p))


class Timed:
    """Wraps the routed targets so time spent in the teacher is measured apart from the rollout."""

    def __init__(self, targets):
        self.targets, self.seconds = targets, 0.0

    def __call__(self, *args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = self.targets(*args, **kwargs)
        sync()
        self.seconds += time.perf_counter() - t0
        return out


def run(
    pipe,
    family,
    router,
    route_fields,
    resolution: int,
    batch: int,
    steps: int,
    warmup: int,
    params,
    optimizer,
    prompt_embeds: Conditioning,
    uncond: Conditioning,
    edit: bool = False,
):
    transformer = pipe.transformer
    cond = Conditioning({k: v[:1].expand(batch, *v.shape[1:]) for k, v in prompt_embeds.tensors.items()})
    unc = Conditioning({k: v[:1].expand(batch, *v.shape[1:]) for k, v in uncond.tensors.items()})
    if edit:  # one source image per sample, encoded once (as SourceCache does), given to both branches
        pixels = (
            torch.rand((1, 3, resolution, resolution), generator=torch.Generator().manual_seed(1)) * 2 - 1
        )
        with torch.no_grad():
            source = family.encode_sources(pipe, pixels.to(transformer.device, transformer.dtype))
        source = Conditioning({k: v.expand(batch, *v.shape[1:]) for k, v in source.tensors.items()})
        cond, unc = cond.merge(source), unc.merge(source)
    shape = family.latent_shape(pipe, batch, resolution, resolution)
    rows = []
    device = transformer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        gen = step_generator(0, "bench", step)
        route = router.draw(gen)[0]
        targets = Timed(RoutedTargets([route_fields[route]] * batch, cond, unc, 16))
        noise = torch.randn(shape, generator=gen).to(device, transformer.dtype)
        indices = sample_query_indices(16, batch, 1, "low", gen)
        sync()
        t0 = time.perf_counter()
        transformer.eval()
        states = on_policy_states(pipe, family, targets, cond, noise, 16, indices, resolution, resolution)
        transformer.train()
        sync()
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = family.velocity(
                transformer, states.x, states.sigma.to(device), cond.select(states.samples)
            )
        loss = velocity_mse(pred, states.target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if step >= warmup:
            rows.append(
                {
                    "rollout": t1 - t0 - targets.seconds,
                    "teacher": targets.seconds,
                    "student": t2 - t1,
                    "total": t2 - t0,
                    "rollout_steps": states.steps_run,
                }
            )
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    mean["samples_per_s"] = batch / mean["total"]
    mean["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--expert_rank", type=int, default=64)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--family",
        choices=["sd3", "flux-kontext"],
        default="sd3",
        help="sd3: SD3.5-Medium shape, T2I; flux-kontext: FLUX.1-Kontext-dev shape, editing routes",
    )
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument(
        "--cudnn_attention",
        action="store_true",
        help="keep PyTorch's cuDNN SDPA backend (its backward failed on FLUX shapes with torch 2.11)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="A 2-layer model on whatever device: checks the script."
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and device != "cuda":
        raise SystemExit("This benchmark needs a CUDA GPU (use --smoke to check the script on CPU).")
    torch.backends.cuda.matmul.allow_tf32 = True
    if not args.cudnn_attention:
        # torch 2.11 + cuDNN: the cuDNN attention backward fails ("mha_graph.execute ... is_good()") on the
        # Kontext-shaped model; flash / memory-efficient attention are used instead
        torch.backends.cuda.enable_cudnn_sdp(False)

    edit = args.family == "flux-kontext"
    if edit:
        from danceopd_diffusers.families.flux import FluxKontextFamily

        family = FluxKontextFamily(max_sequence_length=512)
        pipe = build_kontext_pipeline(device, torch.bfloat16, FLUX_SMOKE if args.smoke else FLUX_KONTEXT)
    else:
        family = SD3Family(max_sequence_length=256)
        pipe = build_pipeline(device, torch.bfloat16, SMOKE if args.smoke else SD35_MEDIUM)
    transformer = pipe.transformer
    add_random_expert(transformer, "expert_a", args.expert_rank, 1, family.default_lora_targets)
    add_random_expert(transformer, "expert_b", args.expert_rank, 2, family.default_lora_targets)
    add_student_lora(transformer, args.rank, args.rank, family.default_lora_targets)
    scope = AdapterScope(transformer)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    base = TransformerField("base", family, transformer, None, scope)
    fields = [
        TransformerField("expert_a", family, transformer, ["expert_a"], scope),
        TransformerField("expert_b", family, transformer, ["expert_b"], scope),
        CFGField("base_cfg", base, 3.5),
    ]
    from danceopd_diffusers.config import RouteSpec

    router = Router([RouteSpec(f.name) for f in fields])
    with torch.no_grad():
        cond = family.encode_prompts(pipe, ["a photo of a red fox in the snow"], device)
        uncond = family.encode_prompts(pipe, [""], device)
    n_student = sum(p.numel() for p in params)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    print(
        f"device: {name}  transformer params: "
        f"{sum(p.numel() for n, p in transformer.named_parameters() if 'lora_' not in n) / 1e9:.2f} B  "
        f"student LoRA r{args.rank}: {n_student / 1e6:.1f} M  prompt embeds {tuple(cond.tensors['encoder_hidden_states'].shape)}"
        f"  family: {family.name}{' (edit routes: source image tokens + noisy tokens)' if edit else ''}"
        f"  gradient checkpointing: {args.gradient_checkpointing}",
        flush=True,
    )
    print(
        "| resolution | batch | samples/s | step s | rollout s | teacher s | student fwd+bwd s | mean rollout steps "
        "| peak GiB |\n|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    results = []
    for res in args.resolutions:
        for batch in args.batch_sizes:
            try:
                m = run(
                    pipe,
                    family,
                    router,
                    fields,
                    res,
                    batch,
                    args.steps,
                    args.warmup,
                    params,
                    optimizer,
                    cond,
                    uncond,
                    edit,
                )
            except torch.OutOfMemoryError:
                print(f"| {res} | {batch} | OOM | | | | | | |", flush=True)
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            results.append({"resolution": res, "batch": batch, **m})
            print(
                f"| {res} | {batch} | {m['samples_per_s']:.2f} | {m['total']:.3f} | {m['rollout']:.3f} | "
                f"{m['teacher']:.3f} | {m['student']:.3f} | {m['rollout_steps']:.1f} | {m['peak_gib']:.1f} |",
                flush=True,
            )
            assert scope.transformer.active_adapters() == [STUDENT_ADAPTER]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
