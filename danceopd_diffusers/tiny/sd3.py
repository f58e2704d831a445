"""Tiny SD3: two CLIPs + T5 with character-level tokenizers built in memory, a 2-layer transformer, a small VAE.

Every diffusers test downloads its tokenizers; we cannot. The char-level tokenizers here (and in the other
families' modules, which reuse them) are built from a fixed vocabulary, the models from small configs with a
fixed seed.
"""

from __future__ import annotations

import string

import torch

_CHARS = list(string.ascii_lowercase + string.digits + ",.'-!?:;()")


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    # model_max_length is required: SD3's encode_prompt reads it.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 64):
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in _CHARS] + [("\u2581" + c, -1.5) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_config(
    vocab_size: int, hidden: int = 32, layers: int = 2, intermediate: int | None = None, heads: int = 4
):
    """A small CLIP text config for the char-level tokenizer (ids 0/1 = start/end; ``projection_dim`` = hidden)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        projection_dim=hidden,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        hidden_act="gelu",
    )


def t5_config(
    vocab_size: int, d_model: int = 64, d_ff: int = 128, layers: int = 2, heads: int = 4, buckets: int = 8
):
    """A small T5 encoder config for the in-memory tokenizers (pad 0, eos 1)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


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
