"""Qwen-Image (text-to-image) and Qwen-Image-Edit: packed 2x2 tokens, timestep sigma, output v = noise - x0.

Conventions hidden here (diffusers 0.42 ``pipeline_qwenimage.py`` / ``pipeline_qwenimage_edit.py``):

- State: the pipeline's packed latents ``[B, (H/16)(W/16), 4 z]``; the transformer is called with
  ``timestep = sigma`` (the pipeline passes ``t / 1000``), ``img_shapes`` (the token grid of every image in the
  sequence, for RoPE) and the prompt's ``encoder_hidden_states_mask``. Its output already is v = noise - x0.
- The scheduler shifts sigmas with ``mu`` from the noisy image's token count (``calculate_shift``), on the
  ``linspace(1, 1/N, N)`` grid the pipeline passes.
- Prompts: the last hidden state of Qwen2.5-VL over a chat template, the template's system prompt dropped.
  Cached per prompt, embeddings are padded to a fixed length with a zero mask (so conditionings of different
  prompts stack); each call trims the batch back to its longest prompt, exactly the tensors the pipeline builds.
- Edit: the source's normalised VAE latents (argmax, as the pipeline) are packed and concatenated *after* the
  noisy tokens, ``img_shapes`` lists both grids, the prediction is sliced back to the noisy tokens. The source
  image also goes through the VL text encoder (``prompt_uses_source``): an edit conditioning holds
  ``source_prompt_embeds`` (the edit template with the image) and ``prompt_embeds`` (Qwen-Image's text-only
  encoding), so ``Conditioning.without_source()`` (image guidance's image-free branch) drops the image from
  both paths; ``edit_grid`` (not a source key) keeps the state's token grid for that branch.
- A Qwen-Image-Edit conditioning without a source is text-to-image: Qwen-Image's template and loop over the
  same components (``pipelines.pipeline_danceopd.qwen_image_t2i_view``), which the exported edit pipeline runs
  without ``image``; the rollout pipeline is ``pipelines/pipeline_qwenimage_edit_latents.py``.
- True CFG (``true_cfg_scale > 1`` with a negative prompt) is ``u + s (c - u)`` rescaled, per token, to the norm
  of the conditional prediction: a ``cfg`` field with ``norm_rescale: true`` (``CFGField(norm_rescale=True)``
  in ``fields.py``) is that operator exactly; without it the ``cfg`` field is plain CFG (no rescale).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .base import Conditioning, FamilyAdapter, register_family, scheduler_sigmas, token_count_mu

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- helpers
def _pad_to(
    embeds: torch.Tensor, mask: torch.Tensor | None, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, D] embeddings (+ mask) -> exactly ``length`` tokens; padding is zeros with mask 0."""
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    mask = mask.to(torch.long)
    if embeds.shape[1] > length:
        kept = mask[:, :length].sum(1)
        if bool((kept < mask.sum(1)).any()):
            logger.warning(
                "A prompt encodes to more than the %d text tokens kept; it is truncated. Raise "
                "--max_sequence_length to keep long prompts whole.",
                length,
            )
        return embeds[:, :length], mask[:, :length]
    pad = length - embeds.shape[1]
    embeds = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], pad, embeds.shape[2])], dim=1)
    return embeds, torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)


def _trim(
    embeds: torch.Tensor, mask: torch.Tensor, drop_full_mask: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut the cached padding back to the batch's longest prompt; ``None`` mask when nothing is padded.

    These are the tensors the pipeline itself builds (``_get_qwen_prompt_embeds`` pads to the batch maximum,
    ``encode_prompt`` drops an all-ones mask), so the model sees identical inputs. The pipeline is given its
    mask even when full (``drop_full_mask=False``): it drops it itself, and warns when it is missing.
    """
    valid = mask.to(torch.bool)
    positions = torch.arange(mask.shape[1], device=mask.device)
    length = int(torch.where(valid, positions + 1, 0).max()) if valid.any() else mask.shape[1]
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, (None if drop_full_mask and bool(mask.all()) else mask)


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] (or [B, C, h, w]) -> [B, (h/2)(w/2), 4C], as ``QwenImagePipeline._pack_latents``."""
    b, c = latents.shape[:2]
    h, w = latents.shape[-2:]
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, 1, h, w], as ``QwenImagePipeline._unpack_latents``."""
    b, _, channels = latents.shape
    x = latents.reshape(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, 1, h, w)


def _vae_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    return mean, std


def _square_grid(seq_len: int) -> tuple[int, int]:
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(
            f"Cannot tell the token grid of {seq_len} packed Qwen-Image tokens: text-to-image states are "
            "expected square (the training script samples them at --resolution x --resolution); edits take "
            "the grid of their source image."
        )
    return side, side


# ---------------------------------------------------------------------------------------------------- adapters
@register_family
class QwenImageFamily(FamilyAdapter):
    name = "qwen-image"
    pipeline_class_names = ("QwenImagePipeline", "DanceOPDQwenImagePipeline")
    transformer_class_name = "QwenImageTransformer2DModel"
    custom_pipeline_class_name = "DanceOPDQwenImagePipeline"
    can_edit = False
    # what diffusers' train_dreambooth_lora_qwen_image.py targets
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")

    def __init__(self, max_sequence_length: int = 256):
        self.max_sequence_length = max_sequence_length

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    # -- conditioning ---------------------------------------------------------------------------------------
    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, source_images: list | None = None
    ) -> Conditioning:
        from ..pipelines.pipeline_danceopd import qwen_image_t2i_view

        # Qwen-Image's text-to-image encoding (its template, dropped system prompt, max_sequence_length)
        embeds, mask = qwen_image_t2i_view(pipe).encode_prompt(
            prompt=list(prompts), device=device, max_sequence_length=self.max_sequence_length
        )
        embeds, mask = _pad_to(embeds, mask, self.max_sequence_length)
        return Conditioning({"prompt_embeds": embeds, "prompt_embeds_mask": mask})

    def pipeline_condition_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        embeds, mask = _trim(cond.tensors["prompt_embeds"], cond.tensors["prompt_embeds_mask"], False)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def unguided_call_kwargs(self) -> dict[str, Any]:
        # Qwen's pipelines guide only with true_cfg_scale > 1 *and* a negative prompt; none is given.
        return {"true_cfg_scale": 1.0}

    # -- velocity -------------------------------------------------------------------------------------------
    def _text(self, cond: Conditioning, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = "source_prompt_embeds" if "source_prompt_embeds" in cond.tensors else "prompt_embeds"
        embeds, mask = _trim(cond.tensors[key], cond.tensors[key + "_mask"])
        return embeds.to(dtype), mask

    def velocity(
        self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        dtype = x.dtype
        embeds, mask = self._text(cond, dtype)
        grid = None
        if "edit_grid" in cond.tensors:  # an edit (or its image-free branch): the state is at the edit size
            edit_grid = tuple(int(v) for v in cond.tensors["edit_grid"][0])
            grid = edit_grid if edit_grid[0] * edit_grid[1] == x.shape[1] else None
        shapes = [(1, *(grid or _square_grid(x.shape[1])))]
        hidden = x
        source = cond.tensors.get("source_latents")
        if source is not None:
            hidden = torch.cat([x, _pack(source).to(x.device, dtype)], dim=1)
            shapes.append((1, source.shape[-2] // 2, source.shape[-1] // 2))
        # the pipeline passes scheduler timestep (1000 sigma) / 1000
        timestep = (sigma.reshape(-1).to(x.device) * 1000).to(dtype).expand(x.shape[0]) / 1000
        out = transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[shapes] * x.shape[0],
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]]

    # -- latents --------------------------------------------------------------------------------------------
    def latent_shape(self, pipe: Any, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        cell = pipe.vae_scale_factor * 2  # VAE factor x 2x2 packing
        return (batch_size, (height // cell) * (width // cell), pipe.transformer.config.in_channels)

    def sigmas(
        self, pipe: Any, num_steps: int, latent_shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        import numpy as np

        mu = token_count_mu(pipe.scheduler, latent_shape[1])
        grid = np.linspace(1.0, 1 / num_steps, num_steps)
        return scheduler_sigmas(pipe.scheduler, num_steps, device, grid, mu)

    def _vae_latents(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None, mode: bool
    ) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised latents [B, z, 1, h, w] (the pipeline's ``_encode_vae_image``)."""
        vae = pipe.vae
        dist = vae.encode(images.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist
        latents = dist.mode() if mode else dist.sample(generator)
        mean, std = _vae_stats(vae, latents)
        return (latents - mean) / std

    def encode_images(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return _pack(self._vae_latents(pipe, images, generator, mode=False))

    def decode_latents(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> list:
        vae = pipe.vae
        cell = pipe.vae_scale_factor
        unpacked = _unpack(latents, 2 * (height // (cell * 2)), 2 * (width // (cell * 2))).to(vae.dtype)
        mean, std = _vae_stats(vae, unpacked)
        images = vae.decode(unpacked * std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(images, output_type="pil")


@register_family
class QwenImageEditFamily(QwenImageFamily):
    """Qwen-Image-Edit: edits, and text-to-image through Qwen-Image's own path on the same components.

    A conditioning without a source is a text-to-image one: Qwen-Image's prompt template and no source tokens,
    which is what ``QwenImagePipeline`` does with this transformer (and what the exported pipeline runs when
    called without ``image``). This is what lets one Qwen-Image-Edit student absorb a text-to-image teacher
    (e.g. a Qwen-Image checkpoint field) and an edit teacher at once.
    """

    name = "qwen-image-edit"
    pipeline_class_names = ("QwenImageEditPipeline", "DanceOPDQwenImageEditPipeline")
    custom_pipeline_class_name = "DanceOPDQwenImageEditPipeline"
    can_edit = True
    prompt_uses_source = True

    @classmethod
    def pipeline_class(cls) -> type:
        from ..pipelines.pipeline_qwenimage_edit_latents import QwenImageEditLatentsPipeline

        return QwenImageEditLatentsPipeline

    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, source_images: list | None = None
    ) -> Conditioning:
        """Text-to-image encoding (``prompt_embeds``); with sources also prompt + image (``source_prompt_embeds``).

        Both are kept for an edit so that ``without_source()`` (image guidance's image-free branch) drops the
        image from the text path as well as the source tokens.
        """
        cond = super().encode_prompts(pipe, prompts, device)
        if source_images is not None:
            cond.tensors.update(self._encode_with_images(pipe, list(prompts), list(source_images), device))
        return cond

    def _encode_with_images(
        self, pipe: Any, prompts: list[str], images: list, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The edit pipeline's own encoding of (prompt, image), padded to image + template tokens + max length."""
        embeds, mask = pipe.encode_prompt(prompt=prompts, image=images, device=device)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        # Everything but the prompt's own tokens (vision tokens, template) depends only on the image size,
        # shared by the samples of a batch (and by a sample's cond and uncond): pad to that + max length.
        prompt_lengths = [len(pipe.tokenizer(p).input_ids) for p in prompts]
        overhead = {int(n) - p for n, p in zip(mask.sum(1).tolist(), prompt_lengths)}
        if len(overhead) != 1:
            raise ValueError("The source images of one batch of edits must share their size.")
        embeds, mask = _pad_to(embeds, mask, overhead.pop() + self.max_sequence_length)
        return {"source_prompt_embeds": embeds, "source_prompt_embeds_mask": mask}

    def pipeline_condition_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        if "source_latents" not in cond.tensors:  # text-to-image: image=None runs Qwen-Image's path
            return super().pipeline_condition_kwargs(cond)
        embeds, mask = _trim(
            cond.tensors["source_prompt_embeds"], cond.tensors["source_prompt_embeds_mask"], False
        )
        return {"image": cond.tensors["source_latents"], "prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def encode_sources(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> Conditioning:
        # The pipeline encodes the source with the VAE's mode ("argmax"), not a sample. ``edit_grid`` (the token
        # grid of the edit size) is no source key: the image-free branch keeps it to know its state's shape.
        latents = self._vae_latents(pipe, images, generator, mode=True)
        grid = torch.tensor([[latents.shape[-2] // 2, latents.shape[-1] // 2]] * latents.shape[0])
        return Conditioning({"source_latents": latents, "edit_grid": grid.to(latents.device)})


__all__ = ["QwenImageEditFamily", "QwenImageFamily"]
