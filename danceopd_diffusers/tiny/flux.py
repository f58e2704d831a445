"""Tiny Flux.1 and Flux.1 Kontext pipelines: CLIP + T5 with the char-level in-memory tokenizers (ShapesWorld's
CLIP one, the SD3 module's T5 one), a 1 + 1 block FluxTransformer2DModel with the embedded guidance input of the
guidance-distilled checkpoints, a small VAE with 4 latent channels (the real one has 16; the layout is the same)
and Flux's dynamically shifted scheduler.
"""

from __future__ import annotations

import torch

from ..shapesworld.text_encoders import clip_config, clip_tokenizer, t5_config
from .sd3 import t5_tokenizer

#: FLUX.1-dev's scheduler config: the shift grows with the image sequence length
FLUX_DEV_SCHEDULER_CONFIG = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def _tiny_flux_components(seed: int, guidance_embeds: bool) -> dict:
    """The seven components both Flux pipelines take, seeded and small enough for CPU tests."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    clip_tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config(len(clip_tok)))
    text_encoder_2 = T5EncoderModel(t5_config(len(t5_tok)))
    latent_channels = 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,  # 2x2-packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size (Flux uses CLIP's pooled output)
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.1159,  # FLUX.1's VAE values
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)
    for model in (text_encoder, text_encoder_2, transformer, vae):
        model.eval()  # as from_pretrained leaves them: T5's dropout would make prompts random
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline of under 1 MB; ``guidance_embeds=False`` gives the schnell-like variant (no guidance input)."""
    from diffusers import FluxPipeline

    return FluxPipeline(**_tiny_flux_components(seed, guidance_embeds))


def build_tiny_flux_kontext_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxKontextPipeline of under 1 MB (text-to-image without ``image=``, editing with it)."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**_tiny_flux_components(seed, guidance_embeds))
