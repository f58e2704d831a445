"""The benchmark's models: SD3.5-Medium- and FLUX.1-Kontext-dev-shaped pipelines with random weights (no
download), the random LoRA experts, prompts and edit data, built once into a work dir that the benchmarks
(``bench_train_step.py``, ``bench_multi_gpu.py``, ``run_official.py``) share. ``--tiny`` sizes keep the real
widths' structure at two layers, for CPU checks.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

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
