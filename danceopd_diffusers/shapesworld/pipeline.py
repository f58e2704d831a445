"""The ShapesWorld model: a small FluxKontextPipeline (a real diffusers editing family) built offline.

Text goes through a word-level T5 tokenizer over the world's own vocabulary (every word of every prompt and
instruction the world can produce) and a char-level CLIP (:mod:`.text_encoders`, shared with the tiny test
pipelines); both text encoders are small, seeded and frozen (training moves only the transformer). Flux gives text tokens no positions (``txt_ids`` are
zero), so word order reaches the transformer only through the T5: a randomly initialised one is a bag of words
("red circle left of blue square" = "blue circle left of red square"), which caps position and colour attribution
at chance. :func:`order_aware_t5` fixes the attention pattern instead (see there). The VAE is trained on world renders by
:mod:`.train_vae` (4x down-sampling, 4 latent channels: 64x64 images are 16x16 latents, 64 packed tokens).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .world import EDIT_CATEGORIES, T2I_CATEGORIES, make_edit_example, make_t2i_example

#: the architecture of the ShapesWorld transformer (about 5.9 M parameters, 12 MB in fp16)
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels, 2x2-packed
    num_layers=3,
    num_single_layers=3,
    attention_head_dim=32,
    num_attention_heads=6,
    joint_attention_dim=128,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def world_vocabulary(samples_per_category: int = 400, seed: int = 1234) -> list[str]:
    """Every word the world's prompts and instructions use (drawn exhaustively enough to cover all templates)."""
    rng = np.random.default_rng(seed)
    words: set[str] = set()
    for category in T2I_CATEGORIES:
        for _ in range(samples_per_category):
            words.update(make_t2i_example(category, rng)["prompt"].split())
    for category in EDIT_CATEGORIES:
        for _ in range(samples_per_category):
            words.update(make_edit_example(category, rng)["prompt"].split())
    return sorted(words)


def word_t5_tokenizer(words: list[str], max_length: int = 32):
    """A T5 tokenizer whose pieces are whole words: one token per word of the world."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


#: what each attention head of the ShapesWorld T5 reads: the word at a fixed offset, or every word up to and
#: including this one ("before") or from it on ("after")
T5_HEAD_READS = (-1, -2, -3, 1, 2, 3, "before", "after")


def order_aware_t5(vocab_size: int, d_model: int = 128, d_ff: int = 256, layers: int = 2):
    """A frozen T5 encoder whose attention is purely positional, so every token carries its neighbours in order.

    Query weights are zero, so the scores are the relative-position bias alone; the bias gives head ``h`` a
    +30 logit on the positions :data:`T5_HEAD_READS` names (the words before / after for the two "bag" heads,
    -30 elsewhere). Values, outputs and feed-forwards stay random: "circle" then encodes the colour word before
    it and the "left"/"right" around it, and stacked layers widen the window. Seeded by the caller.
    """
    from transformers import T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5Attention

    from .text_encoders import t5_config

    heads, buckets, max_distance = len(T5_HEAD_READS), 32, 64
    config = t5_config(vocab_size, d_model, d_ff, layers, heads, buckets)
    config.relative_attention_max_distance, config.dropout_rate = max_distance, 0.0
    model = T5EncoderModel(config)
    offsets = torch.arange(-max_distance + 1, max_distance)  # key position minus query position
    bucket_of = T5Attention._relative_position_bucket(offsets, True, buckets, max_distance)
    bias = torch.full((buckets, heads), -30.0)
    for head, reads in enumerate(T5_HEAD_READS):
        if reads == "before":
            bias[bucket_of[offsets <= 0], head] = 0.0
        elif reads == "after":
            bias[bucket_of[offsets >= 0], head] = 0.0
        else:
            bias[bucket_of[offsets == reads], head] = 30.0
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[0].SelfAttention.q.weight.zero_()
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.copy_(bias)
    return model


def build_shapesworld_pipeline(vae=None, seed: int = 0):
    """The untrained ShapesWorld pipeline (pass the trained ``vae``; a random one otherwise)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel

    from .text_encoders import clip_config, clip_tokenizer

    clip_tok = clip_tokenizer()
    t5_tok = word_t5_tokenizer(world_vocabulary())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config(len(clip_tok), hidden=64))
    text_encoder_2 = order_aware_t5(len(t5_tok))
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    if vae is None:
        vae = AutoencoderKL(**VAE_CONFIG, shift_factor=0.0, scaling_factor=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # 64 tokens: no resolution shift
    for model in (text_encoder, text_encoder_2, transformer, vae):
        model.eval()
    return FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def save_shapesworld_pipeline(path: str | os.PathLike, vae_path: str | os.PathLike | None = None) -> str:
    """Build the pipeline (with the trained VAE from ``vae_path``) and save it as the starting point of training."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_path) if vae_path else None
    pipe = build_shapesworld_pipeline(vae)
    Path(path).mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return str(path)
