#!/usr/bin/env python
"""GPU benchmark of the paper recipe through the training script's own loop (random weights, no download).

    python benchmarks/bench_train_step.py --resolutions 1024 512 --steps 4 --warmup 1 --json bench.json

The first call builds, under ``--work_dir``, an SD3.5-Medium-shaped pipeline folder (2.24 B-parameter
transformer; tiny text encoders with the real widths, 77 + 256 = 333 x 4096 prompt tokens and 2048 pooled; a small
16-channel 8x VAE), saved with ``save_pretrained``, plus two random rank-64 LoRA experts in PEFT format
(``adapter_config.json`` + ``adapter_model.safetensors``), a fields config (``expert_a``, ``expert_b``, and
``base_cfg``: CFG 3.5 of the base) and a prompts file. Later calls (and ``benchmarks/run_official.py``) reuse it.
Each resolution then runs ``train_danceopd.main`` with the paper recipe: batch 1, gradient accumulation 4,
N = 16, K = 1 ``low`` (Beta(5, 2)), student LoRA r = alpha = 128, bf16 mixed precision, gradient checkpointing,
lr 2e-4, clip 1.0, max_sequence_length 256. ``--family flux-kontext`` does the same with a FLUX.1-Kontext-dev-shaped
pipeline, an edit data file and source images (editing routes). Flags this script does not know are passed on to
``train_danceopd.py``.

What is measured (``torch.cuda.synchronize`` at every edge):
- one optimizer step: between two calls of a global optimizer post-hook; the first ``--warmup`` steps are not
  counted. s/sample = measured time / measured samples (batch x accumulation per step).
- rollout = time in ``on_policy_states`` minus the targets inside it; targets = time in ``RoutedTargets.__call__``;
  student = the rest of the step (student forward + backward, optimizer, the loop's bookkeeping). The wrappers
  are patched onto the names of the ``train_danceopd`` module, so ``--code_dir`` times an older checkout's
  script the same way (before/after figures from one device call).
- peak memory: ``torch.cuda.max_memory_allocated``, reset at the first rollout (once the models are loaded; the
  weights stay counted).

The FLOP limit. F = one forward of the base transformer, counted with ``torch.utils.flop_counter.FlopCounterMode``
on the meta device (linear layers + attention + patch conv); L_r = the extra FLOPs of a rank-r LoRA on the
student's targets, counted the same way (2·r·(d_in + d_out) per token and adapted layer). Per sample:

    E[rollout steps]·R + teacher + student,    R = F + L_128,
    student = R + (F_linear + 2.5·F_attention + 2·L_128)   (frozen base: input gradients only; flash backward
                                                             = 5 matmuls against the forward's 2),
    teacher = mean over the routes of F + L_64 (a LoRA expert) or 2·F (CFG of the base),

with E[rollout steps] = E[max(q, 1)] exact for the query law (10.93 for N = 16, Beta(5, 2)). Checkpointing's
recomputation is not charged. limit s/sample = FLOPs / ``--matmul_tflops`` (default 780 TFLOP/s, the bf16 rate
measured on an H200; ``--measure_matmul`` measures an 8192³ bf16 matmul on the device instead).

Under ``accelerate launch`` with N processes (``benchmarks/bench_multi_gpu.py`` does this) each optimizer step
trains N times the samples, and each rank reports its own peak memory and writes ``--json`` with ``.rank<r>``
appended; the FLOP limit is taken at N times the matmul rate. The work dir must be built first, by one process.

Prints one JSON object per resolution (``--json`` also writes them as a list). ``--tiny`` runs a 2-layer model
on any device (CPU included): it checks the script, its numbers mean nothing. The micro-benchmark that produced
the older tables of ``benchmarks/RESULTS.md`` ran its own loop; it is in the history
(``git show 4691fb7:benchmarks/bench_train_step.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from profiling import device_profile_text, start_device_profile

REPO = Path(__file__).resolve().parents[1]
#: under `accelerate launch`: how many processes train together, and this one's rank
WORLD, RANK = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

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
FLUX_TINY = dict(
    FLUX_KONTEXT,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    axes_dims_rope=(4, 6, 6),
)

SD3_TINY = dict(
    SD35_MEDIUM,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,
    dual_attention_layers=(0,),
)

#: per family: the transformer configs (full, tiny), T5 tokens, the edit bucket (None: text-to-image)
FAMILIES = {
    "sd3": dict(config=SD35_MEDIUM, tiny=SD3_TINY, max_sequence_length=256, edit=False),
    "flux-kontext": dict(config=FLUX_KONTEXT, tiny=FLUX_TINY, max_sequence_length=512, edit=True),
}
PROMPTS = [
    "a photo of a red fox in the snow",
    "a lighthouse on a cliff at dusk, oil painting",
    "two cups of coffee on a wooden table",
    "a city street in the rain at night",
]
EDITS = ["make it winter", "turn the sky orange", "add a small boat", "make it a pencil sketch"]
EXPERTS = {"expert_a": 1, "expert_b": 2}  # name -> seed of its random LoRA
CFG_SCALE = 3.5
#: what one query of each benchmark route costs, in transformer forwards and expert LoRAs (for the FLOP limit)
ROUTE_COST = {"expert_a": (1, 1), "expert_b": (1, 1), "base_cfg": (2, 0), "base": (1, 0)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- model builders
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

    from danceopd_diffusers.shapesworld.text_encoders import clip_tokenizer
    from danceopd_diffusers.tiny.sd3 import t5_tokenizer

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

    from danceopd_diffusers.shapesworld.text_encoders import clip_tokenizer
    from danceopd_diffusers.tiny.flux import FLUX_DEV_SCHEDULER_CONFIG
    from danceopd_diffusers.tiny.sd3 import t5_tokenizer

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(max_length=512)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**config).to(dtype)
        clip = real_width_clip(CLIPTextModel, 768, len(clip_tok), dtype)
        t5 = real_width_t5(len(t5_tok), dtype)
        vae = bench_vae(0.1159, 0.3611, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
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


def family_adapter(name: str):
    """The library's family adapter of a benchmark family."""
    from danceopd_diffusers.families import SD3Family
    from danceopd_diffusers.families.flux import FluxKontextFamily

    tokens = FAMILIES[name]["max_sequence_length"]
    return (
        FluxKontextFamily(max_sequence_length=tokens)
        if name == "flux-kontext"
        else SD3Family(max_sequence_length=tokens)
    )


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


def save_peft_adapter(transformer, name: str, folder: Path) -> None:
    """One adapter in PEFT's own format, which ``PeftModel.from_pretrained`` (the official toolkit) and our
    ``{type: lora}`` fields both read."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(transformer, adapter_name=name)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"base_model.model." + k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(folder / "adapter_model.safetensors"),
    )
    transformer.peft_config[name].save_pretrained(str(folder))


def build_work_dir(work_dir: Path, family_name: str, tiny: bool, expert_rank: int, device: str) -> dict:
    """Pipeline folder, expert LoRAs, fields config and data file under ``work_dir`` (built once, then reused).

    Returns the paths: ``model``, ``experts`` (name -> folder), ``fields``, ``data`` (our data file) and
    ``prompts_csv`` (the same rows as a CSV, for the official toolkit).
    """
    spec = FAMILIES[family_name]
    family = family_adapter(family_name)
    paths = {
        "model": work_dir / "pipeline",
        "experts": {name: work_dir / "experts" / name for name in EXPERTS},
        "fields": work_dir / "fields.yaml",
        "data": work_dir / ("edits.jsonl" if spec["edit"] else "prompts.csv"),
        "prompts_csv": work_dir / "prompts_official.csv",
    }
    done = work_dir / "built.json"
    wanted = {"family": family_name, "tiny": tiny, "expert_rank": expert_rank}
    if done.exists() and json.loads(done.read_text()) == wanted:
        return paths
    if done.exists():
        raise SystemExit(
            f"{work_dir} holds another benchmark setup ({done.read_text()}); pass another --work_dir or delete it."
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    build = build_kontext_pipeline if spec["edit"] else build_pipeline
    pipe = build(device, torch.bfloat16, spec["tiny"] if tiny else spec["config"])
    pipe.save_pretrained(str(paths["model"]))
    for name, seed in EXPERTS.items():
        add_random_expert(pipe.transformer, name, expert_rank, seed, family.default_lora_targets)
        save_peft_adapter(pipe.transformer, name, paths["experts"][name])
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    task = "edit" if spec["edit"] else "t2i"
    fields = "fields:\n  base: {type: base}\n"
    fields += "".join(f"  {n}: {{type: lora, path: {p}}}\n" for n, p in paths["experts"].items())
    fields += f"  base_cfg: {{type: cfg, of: base, scale: {CFG_SCALE}}}\nroutes:\n"
    fields += "".join(f"  - {{field: {n}, task: {task}}}\n" for n in [*EXPERTS, "base_cfg"])
    paths["fields"].write_text(fields)
    if spec["edit"]:
        from PIL import Image

        gen = torch.Generator().manual_seed(3)
        source_size = 64 if tiny else 1024  # each edit is fitted to the training resolution
        rows = []
        for i, prompt in enumerate(EDITS):
            pixels = torch.randint(0, 256, (source_size, source_size, 3), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(work_dir / f"source_{i}.png")
            rows.append({"prompt": prompt, "task": task, "source_image": f"source_{i}.png"})
        paths["data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
        csv_rows = [f'"{r["prompt"]}",{task},{work_dir / r["source_image"]}' for r in rows]
        paths["prompts_csv"].write_text("prompt,task,source_image\n" + "\n".join(csv_rows) + "\n")
    else:
        paths["data"].write_text("prompt,task\n" + "".join(f'"{p}",{task}\n' for p in PROMPTS))
        paths["prompts_csv"].write_text("prompt\n" + "".join(f'"{p}"\n' for p in PROMPTS))
    done.write_text(json.dumps(wanted))
    return paths


# ------------------------------------------------------------------------------------------- the FLOP limit
def _count(fn) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): float(n) for op, n in counter.get_flop_counts()["Global"].items()}


def count_flops(
    family_name: str,
    resolution: int,
    rank: int,
    tiny: bool = False,
    text_tokens: int | None = None,
    device: str = "meta",
) -> dict[str, float]:
    """FLOPs of one transformer forward at batch 1, counted by ``FlopCounterMode`` (on the meta device: no weights).

    Returns ``F`` split into ``F_linear`` (addmm / mm), ``F_attention`` (SDPA kernels, or bmm when attention
    decomposes, as on meta) and ``F_other``; ``lora`` = the extra FLOPs of a rank-``rank`` LoRA on the family's
    default targets (linear in the rank). ``text_tokens``: prompt tokens (default: the real encoders', 77 + 256
    for SD3, 512 for Flux).
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig

    from danceopd_diffusers.families import Conditioning

    spec = FAMILIES[family_name]
    family = family_adapter(family_name)
    config = spec["tiny"] if tiny else spec["config"]
    cls = FluxTransformer2DModel if spec["edit"] else SD3Transformer2DModel
    with torch.device(device):
        transformer = cls(**config).to(torch.bfloat16)
    pipe = SimpleNamespace(vae_scale_factor=8, transformer=transformer)
    shape = family.latent_shape(pipe, 1, resolution, resolution)
    tokens = text_tokens or (spec["max_sequence_length"] + (0 if spec["edit"] else 77))
    empty = dict(device=device, dtype=torch.bfloat16)
    cond = {
        "encoder_hidden_states": torch.empty(1, tokens, config["joint_attention_dim"], **empty),
        "pooled_projections": torch.empty(1, config["pooled_projection_dim"], **empty),
    }
    if spec["edit"]:  # a source image at the same size: as many image tokens again
        from danceopd_diffusers.families.flux import SOURCE_LATENTS

        cond[SOURCE_LATENTS] = torch.empty(1, 16, resolution // 8, resolution // 8, **empty)
    x, sigma = torch.empty(shape, **empty), torch.full((1,), 0.5, device=device)

    def forward():
        family.velocity(transformer, x, sigma, Conditioning(cond))

    base = _count(forward)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(family.default_lora_targets))
    )
    with_lora = _count(forward)
    linear = sum(n for op, n in base.items() if op in ("aten.addmm", "aten.mm"))
    attention = sum(n for op, n in base.items() if "attention" in op or op == "aten.bmm")
    total = sum(base.values())
    return {
        "F": total,
        "F_linear": linear,
        "F_attention": attention,
        "F_other": total - linear - attention,
        "lora": sum(with_lora.values()) - total,
        "lora_rank": rank,
    }


def expected_rollout_steps(num_steps: int, strategy: str, k: int, batch: int, draws: int = 20000) -> float:
    """E[rollout steps] = E[max(q, 1)] over the batch's queried indices q: exact for K = 1, sampled otherwise."""
    from danceopd_diffusers.rollout import query_index_probabilities, sample_query_indices

    if k == 1:
        cdf = query_index_probabilities(num_steps, strategy).cumsum(0).clamp(max=1.0) ** batch
        p_max = torch.diff(cdf, prepend=torch.zeros(1, dtype=cdf.dtype))
        steps = torch.arange(num_steps, dtype=cdf.dtype).clamp(min=1)
        return float((p_max * steps).sum())
    gen = torch.Generator().manual_seed(0)
    idx = sample_query_indices(num_steps, draws * batch, k, strategy, gen).amax(1).view(draws, batch)
    return float(idx.amax(1).clamp(min=1).double().mean())


def per_sample_tflop(
    flops: dict[str, float], expert_lora: float, rollout_steps: float, routes: list[str]
) -> dict[str, float]:
    """The formula of the module docstring; ``routes``: the route names to average the teacher over."""
    r = flops["F"] + flops["lora"]
    student = r + flops["F_linear"] + 2.5 * flops["F_attention"] + 2 * flops["lora"]
    teacher = statistics.mean(ROUTE_COST[n][0] * flops["F"] + ROUTE_COST[n][1] * expert_lora for n in routes)
    parts = {"rollout": rollout_steps * r, "teacher": teacher, "student": student}
    return {k: v / 1e12 for k, v in {**parts, "total": sum(parts.values())}.items()}


def measure_matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e12


def recipe_flops(args: argparse.Namespace, resolution: int) -> dict:
    """The counts the limit needs (with this checkout's library): forward FLOPs, the expert LoRA's, E[steps]."""
    flops = count_flops(args.family, resolution, args.rank, args.tiny)
    return {
        **flops,
        "expert_lora": flops["lora"] * args.expert_rank / args.rank,
        "rollout_steps": expected_rollout_steps(16, "low", 1, args.train_batch_size),
    }


def limit_fields(recipe: dict, matmul_tflops: float, measured_routes: list[str]) -> dict:
    """The JSON fields of the FLOP limit, shared with ``run_official.py``: the limit of the full route mix, and of
    the routes the measured steps drew."""
    all_routes = [*EXPERTS, "base_cfg"]
    full = per_sample_tflop(recipe, recipe["expert_lora"], recipe["rollout_steps"], all_routes)
    measured = per_sample_tflop(
        recipe, recipe["expert_lora"], recipe["rollout_steps"], measured_routes or all_routes
    )
    return {
        "flops_tflop": {
            "F": recipe["F"] / 1e12,
            "F_linear": recipe["F_linear"] / 1e12,
            "F_attention": recipe["F_attention"] / 1e12,
            "lora_student": recipe["lora"] / 1e12,
            "lora_expert": recipe["expert_lora"] / 1e12,
            "per_sample": full,
            "per_sample_measured_routes": measured,
        },
        "expected_rollout_steps": recipe["rollout_steps"],
        "matmul_tflops": matmul_tflops,
        "limit_s_per_sample": full["total"] / matmul_tflops,
        "limit_s_per_sample_measured_routes": measured["total"] / matmul_tflops,
    }


def summarize(
    step_times: list[float],
    samples_per_step: int,
    rollout_s: float,
    targets_s: float,
    rollout_steps: list[int],
    peak_bytes: float | None,
) -> dict:
    """The timing fields shared with ``run_official.py``: s/sample and its split over the measured steps."""
    n = len(step_times) * samples_per_step
    total = sum(step_times)
    return {
        "measured_steps": len(step_times),
        "measured_samples": n,
        "s_per_sample": total / n,
        "samples_per_s": n / total,
        "s_per_optimizer_step": statistics.mean(step_times),
        "step_times_s": step_times,
        "rollout_s_per_sample": rollout_s / n,
        "targets_s_per_sample": targets_s / n,
        "student_s_per_sample": (total - rollout_s - targets_s) / n,
        "mean_rollout_steps": statistics.mean(rollout_steps) if rollout_steps else None,
        "peak_memory_gib": None if peak_bytes is None else peak_bytes / 2**30,
    }


def finish(result: dict, recipe: dict, matmul_tflops: float, routes: list[str]) -> dict:
    """Adds the FLOP limit and the % of it reached; prints the JSON line."""
    result.update(limit_fields(recipe, matmul_tflops, routes))
    result["percent_of_limit"] = 100 * result["limit_s_per_sample"] / result["s_per_sample"]
    print(json.dumps(result), flush=True)
    return result


# ------------------------------------------------------------------------------------------- the training run
def measured_window(
    stamps: list[float],
    calls: list[tuple[int, str, float, float | None]],
    warmup: int,
    targets_inside_rollout: bool = True,
) -> tuple[list[float], float, float, list[float]]:
    """Step times after ``warmup`` optimizer steps, and the rollout (without the targets inside it) and targets
    seconds and the rollout lengths of the calls made in them; ``calls``: (step, "rollout" | "targets", seconds,
    rollout steps), ``step`` being the number of optimizer steps done when the call ran. Our rollout queries the
    targets inside ``on_policy_states``; the official toolkit's ``_rollout`` does not."""
    times = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:])]
    steps = range(warmup, warmup + len(times))
    mine = [c for c in calls if c[0] in steps]
    targets = sum(c[2] for c in mine if c[1] == "targets")
    rollout = sum(c[2] for c in mine if c[1] == "rollout") - targets * targets_inside_rollout
    return times, rollout, targets, [c[3] for c in mine if c[1] == "rollout" and c[3] is not None]


class Probe:
    """Timing wrappers on the training script's names; the optimizer post-hook marks the optimizer steps."""

    def __init__(self, script, profile_from: int | None = None):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.script = script
        self.profile_from = profile_from  # optimizer steps done when the device profile starts
        self.device_profile = None
        self.stamps: list[float] = []
        # (step, kind, seconds, rollout steps per sample)
        self.calls: list[tuple[int, str, float, float | None]] = []
        self.memory_reset = False
        original_states, original_targets = script.on_policy_states, script.RoutedTargets
        probe = self

        def on_policy_states(*args, **kwargs):
            if not probe.memory_reset and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()  # the models are loaded; their weights stay counted
            probe.memory_reset = True
            sync()
            t0 = time.perf_counter()
            states = original_states(*args, **kwargs)
            sync()
            latents = args[4] if len(args) > 4 else kwargs["initial_latents"]
            # transformer steps per sample: a joint (--batch_rollouts) rollout drops each sample after its query
            per_sample = getattr(states, "sample_steps", 0) / len(latents) or getattr(
                states, "steps_run", None
            )
            probe.calls.append((len(probe.stamps), "rollout", time.perf_counter() - t0, per_sample))
            return states

        class TimedRoutedTargets(original_targets):
            def __call__(self, *args, **kwargs):
                sync()
                t0 = time.perf_counter()
                out = super().__call__(*args, **kwargs)
                sync()
                probe.calls.append((len(probe.stamps), "targets", time.perf_counter() - t0, None))
                return out

        script.on_policy_states, script.RoutedTargets = on_policy_states, TimedRoutedTargets
        self._restore = (original_states, original_targets)
        self._hook = register_optimizer_step_post_hook(self._stamp)

    def _stamp(self, *_):
        sync()
        self.stamps.append(time.perf_counter())
        if (
            self.profile_from is not None
            and len(self.stamps) == self.profile_from
            and self.device_profile is None
        ):
            self.device_profile = start_device_profile()  # from the first measured step to the run's end

    def reset(self) -> None:
        self.stamps.clear()
        self.calls.clear()
        self.memory_reset = False
        self.device_profile = None

    def profile_text(self) -> str | None:
        """Stops the device profile (if one runs) and returns its tables."""
        if self.device_profile is None:
            return None
        sync()
        self.device_profile.__exit__(None, None, None)
        steps = len(self.stamps) - self.profile_from
        wall = self.stamps[-1] - self.stamps[self.profile_from - 1]
        text = device_profile_text(self.device_profile, wall, steps)
        self.device_profile = None
        return text

    def measured(self, warmup: int) -> tuple[list[float], float, float, list[float]]:
        return measured_window(self.stamps, self.calls, warmup)

    def remove(self) -> None:
        self.script.on_policy_states, self.script.RoutedTargets = self._restore
        self._hook.remove()


def script_flags(args: argparse.Namespace, paths: dict, resolution: int, output_dir: str) -> list[str]:
    spec = FAMILIES[args.family]
    flags = [
        "--pretrained_model_name_or_path", str(paths["model"]),
        "--fields_config", str(paths["fields"]),
        "--dataset_name", str(paths["data"]),
        "--resolution", str(resolution),
        "--train_batch_size", str(args.train_batch_size),
        "--gradient_accumulation_steps", str(args.gradient_accumulation_steps),
        "--num_rollout_steps", "16", "--query_k", "1", "--query_strategy", "low",
        "--rank", str(args.rank), "--lora_alpha", str(args.rank),
        "--mixed_precision", args.mixed_precision,
        "--learning_rate", "2e-4", "--max_grad_norm", "1.0",
        "--max_sequence_length", str(spec["max_sequence_length"]),
        "--max_train_steps", str(args.warmup + args.steps),
        "--output_dir", output_dir, "--report_to", "none", "--seed", str(args.seed),
        "--checkpointing_steps", "1000000", "--validation_steps", "1000000", "--skip_pipeline_export",
    ]  # fmt: skip
    if args.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    if args.cuda_graphs:
        flags.append("--cuda_graphs")
    if spec["edit"]:  # torch 2.11's cuDNN attention backward fails on the Kontext shapes
        flags.append("--disable_cudnn_attention")
    return flags + args.script_args


def measured_routes(output_dir: str, warmup: int) -> list[str]:
    """The routed field of each measured step, from the script's routes log."""
    log = Path(output_dir, "logs", "routes_rank0.jsonl")
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r["route"] for r in rows if r["step"] >= warmup]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd3")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not counted")
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--expert_rank", type=int, default=64)
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True, help="(paper recipe)"
    )
    parser.add_argument("--cuda_graphs", action="store_true", help="pass --cuda_graphs to the script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work_dir",
        default=str(Path(tempfile.gettempdir()) / "danceopd-bench"),
        help="where the pipeline folder, experts, fields config and data are built once and reused",
    )
    parser.add_argument("--code_dir", default=str(REPO), help="the checkout whose train_danceopd.py runs")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument(
        "--profile",
        default=None,
        help="write torch.profiler's tables of the measured steps to PROFILE.<resolution> (GPU busy time, top ops)",
    )
    parser.add_argument("--matmul_tflops", type=float, default=780.0, help="the rate the limit is taken at")
    parser.add_argument(
        "--measure_matmul", action="store_true", help="measure the bf16 8192³ matmul rate instead"
    )
    parser.add_argument("--json", default=None, help="also write the results to this file (a JSON list)")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="the training runs' folder (default: a temporary one under --work_dir)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer model on any device (CPU too): checks the script"
    )
    args, args.script_args = parser.parse_known_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the first step's start is not marked)")
    if not Path(args.code_dir, "train_danceopd.py").is_file():
        parser.error(
            f"--code_dir {args.code_dir} holds no train_danceopd.py: pass a checkout of this project"
        )
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.tiny and device != "cuda":
        raise SystemExit("This benchmark needs a CUDA GPU (use --tiny to check the script on CPU).")
    if args.measure_matmul:
        args.matmul_tflops = measure_matmul_tflops()
    work_dir = Path(args.work_dir).expanduser().resolve()
    if WORLD > 1 and not (work_dir / "built.json").exists():
        raise SystemExit(
            f"{work_dir} is not built: build it with one process first (benchmarks/bench_multi_gpu.py does), so "
            "that the ranks do not all write it."
        )
    paths = build_work_dir(work_dir, args.family, args.tiny, args.expert_rank, device)
    recipes = {res: recipe_flops(args, res) for res in args.resolutions}
    code_dir = Path(args.code_dir).resolve()
    if code_dir != REPO:  # the other checkout's script runs with its own library
        for name in [
            m for m in sys.modules if m == "danceopd_diffusers" or m.startswith("danceopd_diffusers.")
        ]:
            del sys.modules[name]
    sys.path.insert(0, str(code_dir))
    import train_danceopd

    if Path(train_danceopd.__file__).resolve().parent != code_dir:
        raise SystemExit(
            f"train_danceopd was already imported from {train_danceopd.__file__}, not --code_dir."
        )

    def train_once(resolution: int, out: str) -> tuple[dict, list[str]]:
        train_danceopd.main(train_danceopd.parse_args(script_flags(args, paths, resolution, out)))
        run = {
            "toolkit": "danceopd-diffusers",
            "label": args.label + (" + --cuda_graphs" if args.cuda_graphs else ""),
            "code_dir": args.code_dir,
            "family": args.family,
            "gradient_checkpointing": args.gradient_checkpointing,
            "cuda_graphs": args.cuda_graphs,
        }
        return run, measured_routes(out, args.warmup)

    probe = Probe(train_danceopd, profile_from=args.warmup if args.profile else None)
    return run_resolutions(args, work_dir, recipes, probe, train_once)


def run_resolutions(args: argparse.Namespace, work_dir: Path, recipes: dict, probe, train_once) -> list[dict]:
    """Per resolution: ``train_once(resolution, output_dir)`` trains (the probe's wrappers timing it) and returns
    the run's description and the routes of its measured steps; then the JSON line. Shared with run_official.py."""
    results = []
    try:
        for resolution in args.resolutions:
            probe.reset()
            if getattr(args, "output_dir", None):  # shared by the ranks of a multi-process run
                out = str(Path(args.output_dir) / f"res{resolution}")
                run, routes = train_once(resolution, out)
            else:
                with tempfile.TemporaryDirectory(dir=work_dir) as out:
                    run, routes = train_once(resolution, out)
            gc.collect()
            cuda = torch.cuda.is_available()
            times, rollout, targets, lengths = probe.measured(args.warmup)
            profile = probe.profile_text() if hasattr(probe, "profile_text") else None
            if profile is not None:
                Path(f"{args.profile}.{resolution}").write_text(profile)
            result = {
                **run,
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "resolution": resolution,
                "train_batch_size": args.train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "measured_routes": routes,
                "processes": WORLD,
                "rank": RANK,
                **summarize(
                    times,
                    args.train_batch_size * args.gradient_accumulation_steps * WORLD,
                    rollout,
                    targets,
                    lengths,
                    torch.cuda.max_memory_allocated() if cuda else None,
                ),
            }
            results.append(finish(result, recipes[resolution], args.matmul_tflops * WORLD, routes))
            if cuda:
                torch.cuda.empty_cache()
    finally:
        probe.remove()
    if args.json:
        Path(args.json + (f".rank{RANK}" if WORLD > 1 else "")).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
