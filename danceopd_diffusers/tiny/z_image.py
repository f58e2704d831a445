"""Tiny Z-Image (text-to-image) and Z-Image omni (text-to-image and editing) pipelines, built offline.

The text encoder is a 2-layer ``Qwen3Model`` with a byte-level Qwen2 tokenizer built in memory (the 256 byte
symbols, no merges, the chat special tokens and a minimal chat template that renders exactly what Z-Image's
``apply_chat_template(..., enable_thinking=True)`` renders). The omni pipeline optionally carries a tiny
``Siglip2VisionModel`` and its image processor, as the real omni checkpoints do.
"""

from __future__ import annotations

from typing import Any

import torch

#: special tokens of the Qwen chat format that Z-Image's prompt templates use
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
#: renders ``<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n``, the Qwen3 template's output
#: with thinking enabled and the string ZImageOmniPipeline writes by hand
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_byte_tokenizer(max_length: int = 512) -> Any:
    """A Qwen2 tokenizer over the 256 byte-level symbols (every text encodes, one token per byte)."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], chat_template=_CHAT_TEMPLATE, model_max_length=max_length
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS[1:]])
    return tokenizer


def _text_encoder(vocab_size: int, hidden_size: int) -> Any:
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,  # Z-Image reads hidden_states[-2]
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=1024,
        pad_token_id=vocab_size - 5,
        eos_token_id=vocab_size - 5,
        bos_token_id=None,
    )
    return Qwen3Model(config)


def _vae(sample_size: int) -> Any:
    from diffusers import AutoencoderKL

    # Flux/Z-Image VAE normalisation constants; 3 blocks -> vae_scale_factor 4, so a 64 px image (the
    # smallest source ZImageOmniPipeline accepts) is a 16x16 latent, 64 tokens after 2x2 patching
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 8, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _transformer(cap_feat_dim: int, siglip_feat_dim: int | None) -> Any:
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=cap_feat_dim,
        siglip_feat_dim=siglip_feat_dim,
        axes_dims=[4, 6, 6],  # sums to the head dim 16
        axes_lens=[2048, 128, 128],
    )
    # The pad tokens replace padded positions; some diffusers releases create them with torch.empty, so they
    # are always given fixed finite values here (a NaN there would poison every output).
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token", "siglip_pad_token"):
            param = getattr(model, name, None)
            if param is not None:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def build_tiny_z_image_pipeline(seed: int = 0, sample_size: int = 64, shift: float = 3.0) -> Any:
    """A ZImagePipeline with the real component layout; static shift 3 as Z-Image-Turbo's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tokenizer = qwen_byte_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _text_encoder(len(tokenizer), hidden_size=32)
    transformer = _transformer(cap_feat_dim=32, siglip_feat_dim=None)
    vae = _vae(sample_size)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return ZImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def tiny_siglip(hidden_size: int = 16) -> tuple[Any, Any]:
    """A 1-layer Siglip2VisionModel with 8-pixel patches and a processor capped at 16 patches."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    try:  # the torchvision-free processor (transformers >= 5); the default class needs torchvision
        from transformers import Siglip2ImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import Siglip2ImageProcessor as Processor

    config = Siglip2VisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_channels=3,
        patch_size=8,
        num_patches=16,
    )
    processor = Processor(patch_size=8, max_num_patches=16)
    return Siglip2VisionModel(config), processor


def build_tiny_z_image_omni_pipeline(seed: int = 0, sample_size: int = 64, with_siglip: bool = True) -> Any:
    """A ZImageOmniPipeline (T2I and editing); resolution-dependent shift (``mu``) in its scheduler.

    ``with_siglip=False`` leaves ``siglip``/``siglip_processor`` empty and the transformer without a SigLIP
    branch: the layout of an omni checkpoint that conditions on the source image's VAE latents only.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline

    tokenizer = qwen_byte_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _text_encoder(len(tokenizer), hidden_size=32)
    siglip, processor = tiny_siglip() if with_siglip else (None, None)
    transformer = _transformer(cap_feat_dim=32, siglip_feat_dim=16 if with_siglip else None)
    vae = _vae(sample_size)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        use_dynamic_shifting=True,
        base_image_seq_len=64,
        max_image_seq_len=1024,
        base_shift=0.5,
        max_shift=1.15,
    )
    return ZImageOmniPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        siglip=siglip,
        siglip_processor=processor,
    )
