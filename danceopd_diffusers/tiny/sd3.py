"""Tiny SD3: two CLIPs + T5 with character-level tokenizers built in memory, a 2-layer transformer, a small VAE.

Every diffusers test downloads its tokenizers; we cannot. The char-level tokenizers (the T5 one here, the CLIP
one and the small text-encoder configs from :mod:`danceopd_diffusers.shapesworld.text_encoders`, which owns them
because the shipped ShapesWorld base was built with them; the other families' modules reuse both) are built from
a fixed vocabulary, the models from small configs with a fixed seed.
"""

from __future__ import annotations

import torch

from ..shapesworld.text_encoders import CHARACTERS, clip_config, clip_tokenizer, t5_config


def t5_tokenizer(max_length: int = 64):
    """A T5Tokenizer over the same characters, alone and word-initial, built without a download."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in CHARACTERS] + [("\u2581" + c, -1.5) for c in CHARACTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_tiny_sd3_pipeline(
    seed: int = 0, sample_size: int = 16, shift: float = 3.0, dual_attention_layers: tuple[int, ...] = ()
):
    """A ~1 MB StableDiffusion3Pipeline with the real component layout (2 CLIPs + T5).

    ``dual_attention_layers`` gives those blocks SD3.5-Medium's second self-attention (``attn2``).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip_config(len(clip_tok)))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(len(clip_tok)))
    text_encoder_3 = T5EncoderModel(t5_config(len(t5_tok)))
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=tuple(dual_attention_layers),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
    )
