"""Tiny Qwen-Image and Qwen-Image-Edit: a 2-layer Qwen2.5-VL (with a 1-block vision tower), a byte-level
Qwen2 tokenizer built in memory, a small causal-3D VAE and a 2-layer MMDiT.

The tokenizer holds the 256 byte-level symbols plus BPE merges learned (in memory, deterministically) from the
two pipelines' system prompts, so each template word is one token as in the real Qwen2 vocabulary: the
pipelines drop exactly ``prompt_template_encode_start_idx`` tokens (34 / 64) and keep the prompt, as they do
with the real tokenizer. The builders check that count against the pipeline.

The edit pipeline's ``Qwen2VLProcessor`` normally carries a video processor, which needs torchvision; the tiny
edit pipeline uses :class:`~danceopd_diffusers.pipelines.qwen2vl_image_processor.Qwen2VLImageProcessor`, the same
processor without that slot, which the family's pipeline module imports (so the folder loads in any process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..pipelines.qwen2vl_image_processor import Qwen2VLImageProcessor

if TYPE_CHECKING:
    from diffusers import QwenImageEditPipeline, QwenImagePipeline
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The system prompts of QwenImagePipeline and QwenImageEditPipeline (diffusers 0.42): the BPE is learned from them.
_SYSTEM_PROMPTS = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:\nuser\n",
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image that "
    "meets the user's requirements while maintaining consistency with the original input where appropriate.\n",
)


def qwen2_tokenizer(model_max_length: int = 2048) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer built in memory: byte-level alphabet + merges for the template words + special tokens."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        show_progress=False,
    )
    bpe.train_from_iterator(list(_SYSTEM_PROMPTS), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Qwen2Tokenizer(
        vocab=dict(model["vocab"]),
        merges=merges,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=model_max_length,
    )


def tiny_qwen2_vl_processor(
    tokenizer: Qwen2Tokenizer | None = None, max_pixels: int = 56 * 56
) -> Qwen2VLImageProcessor:
    """An image+text processor whose image processor is built from parameters (no download).

    ``max_pixels`` keeps the vision tower's input small (a few patches) whatever the source size.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": max_pixels})
    return Qwen2VLImageProcessor(image_processor=image_processor, tokenizer=tokenizer or qwen2_tokenizer())


def tiny_qwen2_5_vl(
    tokenizer: Qwen2Tokenizer, hidden_size: int = 32, seed: int = 0
) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer Qwen2.5-VL text model with a 1-block vision tower; special-token ids from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[0],
            window_size=56,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _components(seed: int, hidden_size: int = 32) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = qwen2_tokenizer()
    text_encoder = tiny_qwen2_5_vl(tokenizer, hidden_size, seed)
    torch.manual_seed(seed + 1)
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    torch.manual_seed(seed + 2)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden_size,
        axes_dims_rope=(4, 6, 6),
    )
    # Qwen-Image's scheduler: exponential time shift, dynamic with the image sequence length.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    return dict(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def _check_template(pipe: QwenImagePipeline | QwenImageEditPipeline) -> None:
    prefix = pipe.prompt_template_encode.split("{}")[0].split("<|vision_start|>")[0]
    n = len(pipe.tokenizer(prefix).input_ids)
    if n != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(
            f"tiny Qwen tokenizer splits the {type(pipe).__name__} template prefix into {n} tokens, the pipeline "
            f"drops {pipe.prompt_template_encode_start_idx}: the prompt would be cut or the system prompt kept."
        )


def build_tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """A ~1 MB QwenImagePipeline (text-to-image) with the real component layout."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(**_components(seed))
    _check_template(pipe)
    return pipe


def build_tiny_qwen_image_edit_pipeline(seed: int = 0) -> QwenImageEditPipeline:
    """A ~1 MB QwenImageEditPipeline: the same tiny models plus the Qwen2-VL processor for the source image."""
    from diffusers import QwenImageEditPipeline

    components = _components(seed)
    processor = tiny_qwen2_vl_processor(components["tokenizer"])
    pipe = QwenImageEditPipeline(processor=processor, **components)
    _check_template(pipe)
    return pipe
