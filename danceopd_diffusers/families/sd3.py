"""Stable Diffusion 3 / 3.5: [B, C, H, W] latents, timestep 1000·sigma, output already v = noise - x0."""

from __future__ import annotations

from typing import Any

import torch

from .base import Conditioning, FamilyAdapter, register_family


@register_family
class SD3Family(FamilyAdapter):
    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline", "DanceOPDStableDiffusion3Pipeline")
    transformer_class_name = "SD3Transformer2DModel"
    custom_pipeline_class_name = "DanceOPDStableDiffusion3Pipeline"
    can_edit = False
    ragged_inputs = ("prompt_embeds", "pooled_prompt_embeds")
    # Suffixes, so that they also match the second self-attention (`attn2`) of SD3.5's dual-attention blocks,
    # as the official toolkit's list does; diffusers' SD3 example names `attn.` only and misses those.
    default_lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )

    def __init__(self, max_sequence_length: int = 256):
        self.max_sequence_length = max_sequence_length

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, source_images: list | None = None
    ) -> Conditioning:
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning({"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled})

    def pipeline_condition_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        return {
            "prompt_embeds": cond.tensors["encoder_hidden_states"],
            "pooled_prompt_embeds": cond.tensors["pooled_projections"],
        }

    def unguided_call_kwargs(self) -> dict[str, Any]:
        return {"guidance_scale": 1.0}  # SD3 guides only when guidance_scale > 1

    def velocity(
        self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        num_train_timesteps = 1000  # SD3 was trained with timestep = 1000 * sigma
        dtype = x.dtype
        # the pipeline passes the scheduler's float32 timestep (1000 * sigma) whatever the latents' dtype: the
        # same value here, so the student and the fields are queried at exactly the rollout's time
        sigma = sigma.reshape(-1).to(device=x.device, dtype=torch.float32)
        timestep = (sigma * num_train_timesteps).expand(x.shape[0])
        return transformer(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"].to(dtype),
            pooled_projections=cond.tensors["pooled_projections"].to(dtype),
            return_dict=False,
        )[0]

    def latent_shape(self, pipe: Any, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        channels = pipe.transformer.config.in_channels
        return (batch_size, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)

    def sigmas(
        self, pipe: Any, num_steps: int, latent_shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        scheduler = pipe.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            seq_len = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, num_steps, device, **kwargs)
        return scheduler.sigmas.detach().clone().float().cpu()
