"""Tiny Flux.2 [dev] and Flux.2 [klein] pipelines, built offline.

Both share a 1 + 1 block ``Flux2Transformer2DModel`` (the [dev] one with the embedded guidance input), a small
``AutoencoderKLFlux2`` (3 blocks: 4x downsampling, 4 latent channels -> 16 after the 2x2 patchify) whose latent
batch-norm statistics are set to fixed non-trivial values (the real ones normalise the latents; identity statistics
would hide a missing normalisation), and Flux.2's dynamically shifted scheduler.

Text encoders: [klein] a 28-layer, 16-wide ``Qwen3ForCausalLM`` (the pipeline stacks hidden states 9, 18, 27) with
the byte-level Qwen2 tokenizer of the Z-Image module and a chat template that renders what Qwen3's renders with
``enable_thinking=False``; [dev] a 31-layer ``Mistral3ForConditionalGeneration`` (hidden states 10, 20, 30) with a
1-layer Pixtral vision tower. The real [dev] tokenizer is a ``PixtralProcessor``, which needs torchvision; the tiny
pipeline uses the byte-level tokenizer itself, whose chat template renders the system and user messages the
pipeline writes (the pipeline only calls ``apply_chat_template`` on it).
"""

from __future__ import annotations

from typing import Any

import torch

from .z_image import qwen_byte_tokenizer

#: Qwen3's chat template output for one user message, generation prompt on, thinking disabled
_QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
#: Mistral-style rendering of the [SYSTEM_PROMPT]/[INST] conversation Flux2Pipeline builds (content lists)
_MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% set tag = 'SYSTEM_PROMPT' if message['role'] == 'system' else 'INST' %}"
    "[{{ tag }}]{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}[/{{ tag }}]{% endfor %}"
)
TEXT_HIDDEN = 16
LATENT_CHANNELS = 4


def _tokenizer(chat_template: str, extra_tokens: tuple[str, ...] = ()) -> Any:
    from tokenizers import AddedToken

    tokenizer = qwen_byte_tokenizer(max_length=1024)
    tokenizer.chat_template = chat_template
    if extra_tokens:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra_tokens])
    return tokenizer


def _text_config(vocab_size: int, pad_id: int, layers: int) -> dict:
    """A decoder of width 16 (the transformer's text input is three stacked layers: 48 wide)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=pad_id,
        eos_token_id=pad_id,
        bos_token_id=None,
    )


def _qwen3(vocab_size: int, pad_id: int, layers: int = 28) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**_text_config(vocab_size, pad_id, layers), tie_word_embeddings=True)
    return Qwen3ForCausalLM(config)


def _mistral3(vocab_size: int, pad_id: int, layers: int = 31) -> Any:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(
            model_type="mistral", sliding_window=None, **_text_config(vocab_size, pad_id, layers)
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            patch_size=8,
            image_size=64,
        ),
        image_token_index=pad_id,
        spatial_merge_size=1,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(config)


def _transformer(guidance_embeds: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2-patchified latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN,  # three stacked text-encoder layers
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # (t, h, w, l); sums to the head dim
        guidance_embeds=guidance_embeds,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 8, 16],
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    channels = vae.bn.running_mean.numel()
    gen = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(channels, generator=gen) * 0.3)
        vae.bn.running_var.copy_(torch.rand(channels, generator=gen) * 2 + 0.5)
    return vae


def _scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.2's scheduler config; the pipelines pass their own mu (compute_empirical_mu)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def build_tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False) -> Any:
    """A Flux2KleinPipeline of ~1 MB: text-to-image, and reference-image editing with ``image=``."""
    from diffusers import Flux2KleinPipeline

    tokenizer = _tokenizer(_QWEN3_TEMPLATE, ("<think>", "</think>"))
    torch.manual_seed(seed)
    text_encoder = _qwen3(len(tokenizer), tokenizer.pad_token_id)
    transformer = _transformer(guidance_embeds=False)
    vae = _vae()
    for model in (text_encoder, transformer, vae):
        model.eval()
    return Flux2KleinPipeline(
        scheduler=_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )


def build_tiny_flux2_pipeline(seed: int = 0) -> Any:
    """A Flux2Pipeline ([dev] layout: Mistral3 text encoder, guidance-distilled transformer) of ~1 MB."""
    from diffusers import Flux2Pipeline

    tokenizer = _tokenizer(_MISTRAL_TEMPLATE, ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"))
    torch.manual_seed(seed)
    text_encoder = _mistral3(len(tokenizer), tokenizer.pad_token_id)
    transformer = _transformer(guidance_embeds=True)
    vae = _vae()
    for model in (text_encoder, transformer, vae):
        model.eval()
    return Flux2Pipeline(
        scheduler=_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
