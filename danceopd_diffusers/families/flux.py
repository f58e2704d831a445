"""Flux.1 and Flux.1 Kontext: 2x2-packed latent tokens with position ids, timestep = sigma, output v = noise - x0.

The state layout is the pipelines' packed ``latents``: ``[B, (h/2)·(w/2), 4·C]`` for a latent grid h x w. The
transformer also needs each token's position (``img_ids``), which a packed tensor does not carry, so the adapter
recovers the grid from the sample's own conditioning, in order: its ``token_grid`` entry
(:meth:`~danceopd_diffusers.families.base.FamilyAdapter.size_conditioning`, which the training loop merges into
every sample's conditioning, so the image-free branch of image guidance keeps it), the source latents of an edit (same size as the target in every DanceOPD edit),
or a square grid. The adapter remembers nothing between calls: one object serves the student and every field, and
gradient accumulation prepares states of several sizes before any is used.

Guidance-distilled checkpoints (``transformer.config.guidance_embeds``: FLUX.1-dev, FLUX.1-Kontext-dev) take the
distilled guidance strength as an input. It is an option of the adapter (``embedded_guidance``), passed identically
to the pipeline (``guidance_scale``) during the student's rollout and to every :meth:`velocity` call, so the student
and all fields are the same function of it. It is not CFG: true CFG (``true_cfg_scale > 1`` with a negative prompt,
``neg + s·(pos − neg)``) is the library's :class:`~danceopd_diffusers.fields.CFGField` with scale ``s``.

Kontext editing: the source image's clean latents are packed and concatenated after the noisy tokens along the
sequence, with position ids whose first coordinate is 1; the prediction is sliced back to the noisy tokens. Without a
source, Kontext is a plain text-to-image model, so one student learns both.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import (
    EMBEDDED_GUIDANCE,
    JOINT_ATTENTION_LORA_TARGETS,
    SOURCE_PREFIX,
    Conditioning,
    PackedTokenFamily,
    linspace_grid,
    register_family,
    scheduler_sigmas,
    token_count_mu,
    token_grid_of,
    unwrap_model,
)

#: key of the Kontext source-image latents in a Conditioning: unpacked ``[B, C, h, w]``, exactly what
#: ``FluxKontextPipeline(image=...)`` takes as pre-encoded latents (a tensor with the VAE's latent channels)
SOURCE_LATENTS = SOURCE_PREFIX + "latents"

#: what diffusers' train_dreambooth_lora_flux.py targets by default
FLUX_LORA_TARGETS = JOINT_ATTENTION_LORA_TARGETS + (
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``, the packing of ``FluxPipeline._pack_latents``."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def latent_ids(grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype, index: int = 0):
    """Position ids ``[grid_h·grid_w, 3]`` of a token grid; ``index`` is the first coordinate (1 = Kontext source)."""
    from diffusers import FluxPipeline

    ids = FluxPipeline._prepare_latent_image_ids(1, grid_h, grid_w, device, dtype)
    if index:
        ids[..., 0] = index
    return ids


@register_family
class FluxFamily(PackedTokenFamily):
    """FLUX.1 [dev] / [schnell] text-to-image (``FluxPipeline``).

    ``embedded_guidance`` is the distilled-guidance input of guidance-distilled checkpoints (the pipeline's
    ``guidance_scale``, default 3.5 as in diffusers); ignored by checkpoints without ``guidance_embeds``. Keep it
    at the value the exported pipeline will be called with: the exported pipeline's default is 3.5 as well.
    ``max_sequence_length`` is the T5 prompt length (Flux allows up to 512).
    """

    name = "flux"
    pipeline_class_names = ("FluxPipeline", "DanceOPDFluxPipeline")
    transformer_class_name = "FluxTransformer2DModel"
    custom_pipeline_class_name = "DanceOPDFluxPipeline"
    can_edit = False
    has_embedded_guidance = True
    default_lora_targets = FLUX_LORA_TARGETS

    def __init__(self, max_sequence_length: int = 512, embedded_guidance: float = 3.5):
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"Flux's T5 prompt length must be in [1, 512], got {max_sequence_length}.")
        self.max_sequence_length = max_sequence_length
        self.embedded_guidance = float(embedded_guidance)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    # -- conditioning -------------------------------------------------------------------------------------
    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, source_images: list | None = None
    ) -> Conditioning:
        prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning({"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled})

    def pipeline_condition_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        return {
            "prompt_embeds": cond.tensors["encoder_hidden_states"],
            "pooled_prompt_embeds": cond.tensors["pooled_projections"],
        }

    def unguided_call_kwargs(self) -> dict[str, Any]:
        # true CFG off (it needs true_cfg_scale > 1 and a negative prompt); the embedded guidance is an input of
        # the model, the same one velocity() gives it
        return {"true_cfg_scale": 1.0, "guidance_scale": self.embedded_guidance}

    # -- the velocity in the library convention --------------------------------------------------------
    def token_grid(self, num_tokens: int, cond: Conditioning) -> tuple[int, int]:
        """The (rows, cols) of packed tokens of a state with ``num_tokens`` tokens (see the module docstring)."""
        source = cond.tensors.get(SOURCE_LATENTS)
        source_grid = None if source is None else (source.shape[-2] // 2, source.shape[-1] // 2)
        return token_grid_of(num_tokens, cond, source_grid, "packed Flux")

    def velocity(
        self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        dtype, device = x.dtype, x.device
        batch, num_tokens, _ = x.shape
        # exactly the pipeline's arithmetic: timestep t = 1000·sigma cast to the latents' dtype, then t / 1000
        sigma = sigma.reshape(-1).to(device=device, dtype=torch.float32)
        timestep = ((sigma * 1000).to(dtype) / 1000).expand(batch)
        guidance = None
        if unwrap_model(transformer).config.guidance_embeds:
            # a field may query its model at its own embedded guidance (a per-sample conditioning entry)
            per_field = cond.tensors.get(EMBEDDED_GUIDANCE)
            if per_field is not None:
                guidance = per_field.reshape(-1).to(device=device, dtype=torch.float32).expand(batch)
            else:
                guidance = torch.full([batch], self.embedded_guidance, device=device, dtype=torch.float32)
        hidden = x
        img_ids = latent_ids(*self.token_grid(num_tokens, cond), device, dtype)
        source = cond.tensors.get(SOURCE_LATENTS)
        if source is not None:
            source = source.to(device=device, dtype=dtype)
            hidden = torch.cat([x, pack_latents(source)], dim=1)
            src_ids = latent_ids(source.shape[-2] // 2, source.shape[-1] // 2, device, dtype, index=1)
            img_ids = torch.cat([img_ids, src_ids], dim=0)
        prompt_embeds = cond.tensors["encoder_hidden_states"].to(device=device, dtype=dtype)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        out = transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.tensors["pooled_projections"].to(device=device, dtype=dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return out[:, :num_tokens]

    # -- latents -------------------------------------------------------------------------------------------
    def sigmas(
        self, pipe: Any, num_steps: int, latent_shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        # mu from the image sequence length: noisy tokens only, as in the pipelines
        mu = token_count_mu(pipe.scheduler, latent_shape[1])
        return scheduler_sigmas(
            pipe.scheduler, num_steps, device, linspace_grid(pipe.scheduler, num_steps), mu
        )

    def encode_images(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        vae = pipe.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        return pack_latents(latents)

    def decode_latents(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> list:
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil")


@register_family
class FluxKontextFamily(FluxFamily):
    """FLUX.1 Kontext (``FluxKontextPipeline``): editing with a source image, and text-to-image without one.

    Edits are conditioned on the source's clean latents (``source_latents``, encoded once per sample with the
    pipeline's own ``_encode_vae_image``: the VAE mode, shifted and scaled), given to the pipeline as ``image=``
    (a latent tensor is used as is: never resized or re-encoded). The pipeline's rescaling of the output to
    ``max_area`` (1024² by default) is neutralised with ``max_area = height·width`` of the call
    (:meth:`size_call_kwargs`) and ``_auto_resize=False``, so the student's rollout runs at exactly the size the core asked for.
    """

    name = "flux-kontext"
    pipeline_class_names = ("FluxKontextPipeline", "DanceOPDFluxKontextPipeline")
    custom_pipeline_class_name = "DanceOPDFluxKontextPipeline"
    can_edit = True
    #: what diffusers' train_dreambooth_lora_flux_kontext.py targets by default (Flux's + the single blocks' MLP)
    default_lora_targets = FLUX_LORA_TARGETS + ("proj_mlp",)

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import FluxKontextPipeline

        return FluxKontextPipeline

    def pipeline_condition_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        kwargs = super().pipeline_condition_kwargs(cond)
        source = cond.tensors.get(SOURCE_LATENTS)
        if source is not None:
            kwargs["image"] = source
        return kwargs

    def size_call_kwargs(self, height: int, width: int) -> dict[str, Any]:
        # the pipeline rescales its output to max_area (1024² by default) unless told the call's own area
        return {"max_area": int(height) * int(width)}

    def unguided_call_kwargs(self) -> dict[str, Any]:
        return {**super().unguided_call_kwargs(), "_auto_resize": False}

    def encode_sources(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> Conditioning:
        vae = pipe.vae
        latents = pipe._encode_vae_image(images.to(vae.device, vae.dtype), generator)
        return Conditioning({SOURCE_LATENTS: latents})
