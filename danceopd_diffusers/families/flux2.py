"""Flux.2 [dev] (``Flux2Pipeline``) and Flux.2 [klein] (``Flux2KleinPipeline``): text-to-image and reference-image
editing, timestep = sigma, output v = noise - x0.

What the edge hides (diffusers 0.42 ``pipelines/flux2``):

- Latents: the VAE's latents are 2x2-*patchified* into channels (``[B, 4C, h, w]``), normalised by the VAE's
  batch-norm statistics (``vae.bn``), then flattened into tokens ``[B, h·w, 4C]``. The state layout is these tokens,
  the pipelines' ``latents`` inside the loop. Position ids have four coordinates ``(t, h, w, l)``; a packed state
  does not carry its grid, so the adapter recovers it as the Flux.1 adapter does, from the sample's conditioning only:
  its ``token_grid`` entry (:meth:`size_conditioning`, merged by the training loop into every sample's), else
  the source latents of an edit, else a square.
- The pipelines' ``latents=`` argument takes the *unpacked* ``[B, 4C, h, w]`` tensor while their callbacks expose
  packed tokens; the pipeline classes used for training (:meth:`pipeline_class`) also accept packed tokens, so the
  rollout's initial state and its recorded states share one layout.
- Editing: each reference image is encoded (VAE mode, patchified, normalised), packed and concatenated *after* the
  noisy tokens, with ids whose time coordinate is 10 (the first reference); the prediction is sliced back. The stock
  pipelines encode one list of PIL references shared by the whole batch inside ``__call__``; the training classes
  take per-sample pre-encoded ``source_latents`` instead. One reference per sample (DanceOPD's edit data).
- Guidance: [dev] is guidance-distilled (an embedded guidance input, the pipeline's ``guidance_scale``, default 4) and
  has no true CFG in diffusers; [klein] has no guidance input and true CFG ``neg + g·(pos − neg)`` with the empty
  prompt as ``neg`` when ``guidance_scale > 1``, unless the checkpoint is step-distilled (``is_distilled``, CFG off).
  Our :class:`~danceopd_diffusers.fields.CFGField` with scale ``g`` is exactly Klein's CFG; for an edit its
  unconditional branch keeps the reference, as Klein's does.
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
    token_grid_of,
    unwrap_model,
)

#: key of the reference-image latents in a Conditioning: patchified and normalised ``[B, 4C, h, w]``
SOURCE_LATENTS = SOURCE_PREFIX + "latents"
#: time coordinate of the first reference image's position ids (``Flux2Pipeline._prepare_image_ids``)
REFERENCE_TIME = 10

#: attention projections of the double-stream blocks (named as in Flux.1's) and the fused QKV/MLP input of the
#: single-stream blocks (diffusers' train_dreambooth_lora_flux2*.py target to_q/k/v/out.0, Klein's to_qkv_mlp_proj too)
FLUX2_LORA_TARGETS = JOINT_ATTENTION_LORA_TARGETS + ("attn.to_qkv_mlp_proj",)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h·w, C]`` (``Flux2Pipeline._pack_latents``)."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._pack_latents(latents)


def _bn_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent batch-norm, ``[1, 4C, 1, 1]``, as the pipelines compute them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        like.device, like.dtype
    )
    return mean, std


class _Flux2Base(PackedTokenFamily):
    """What Flux.2 [dev] and [klein] share: latents, ids, time, references. Subclasses: prompts and guidance."""

    transformer_class_name = "Flux2Transformer2DModel"
    can_edit = True
    default_lora_targets = FLUX2_LORA_TARGETS

    def __init__(self, max_sequence_length: int = 512):
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"Flux.2's prompt length must be in [1, 512], got {max_sequence_length}.")
        self.max_sequence_length = max_sequence_length

    # -- conditioning -------------------------------------------------------------------------------------
    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, source_images: list | None = None
    ) -> Conditioning:
        """The pipeline's own encoding: stacked intermediate hidden states, padded to ``max_sequence_length``."""
        prompt_embeds, _text_ids = pipe.encode_prompt(
            prompt=list(prompts), device=device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning({"prompt_embeds": prompt_embeds})

    def pipeline_condition_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"prompt_embeds": cond.tensors["prompt_embeds"]}
        if SOURCE_LATENTS in cond.tensors:
            kwargs["source_latents"] = cond.tensors[SOURCE_LATENTS]
        return kwargs

    # -- the velocity in the library convention --------------------------------------------------------
    def token_grid(self, num_tokens: int, cond: Conditioning) -> tuple[int, int]:
        """The (rows, cols) of the tokens of a state with ``num_tokens`` tokens (see the module docstring)."""
        source = cond.tensors.get(SOURCE_LATENTS)
        source_grid = None if source is None else (source.shape[-2], source.shape[-1])
        return token_grid_of(num_tokens, cond, source_grid, "Flux.2")

    def _guidance(
        self, transformer: torch.nn.Module, cond: Conditioning, batch: int, device
    ) -> torch.Tensor | None:
        return None

    def velocity(
        self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        dtype, device = x.dtype, x.device
        batch, num_tokens, _ = x.shape
        # the pipelines' arithmetic: t = 1000·sigma in the latents' dtype, passed as t / 1000
        sigma = sigma.reshape(-1).to(device=device, dtype=torch.float32)
        timestep = ((sigma * 1000).to(dtype) / 1000).expand(batch)
        grid_h, grid_w = self.token_grid(num_tokens, cond)
        img_ids = Flux2Pipeline._prepare_latent_ids(x.new_empty(1, 0, grid_h, grid_w))[0].to(device)
        hidden = x
        source = cond.tensors.get(SOURCE_LATENTS)
        if source is not None:
            source = source.to(device=device, dtype=dtype)
            hidden = torch.cat([x, pack(source)], dim=1)
            img_ids = torch.cat([img_ids, Flux2Pipeline._prepare_image_ids([source[:1]])[0].to(device)])
        prompt_embeds = cond.tensors["prompt_embeds"].to(device=device, dtype=dtype)
        txt_ids = Flux2Pipeline._prepare_text_ids(prompt_embeds[:1])[0].to(device)
        out = transformer(
            hidden_states=hidden,
            encoder_hidden_states=prompt_embeds,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=self._guidance(transformer, cond, batch, device),
            return_dict=False,
        )[0]
        return out[:, :num_tokens]

    # -- latents -------------------------------------------------------------------------------------------
    def sigmas(
        self, pipe: Any, num_steps: int, latent_shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        """linspace(1, 1/N, N) shifted with Flux.2's empirical ``mu`` (token count and step count), as __call__."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        mu = compute_empirical_mu(image_seq_len=latent_shape[1], num_steps=num_steps)
        return scheduler_sigmas(
            pipe.scheduler, num_steps, device, linspace_grid(pipe.scheduler, num_steps), mu
        )

    def encode_images(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels -> a posterior sample, patchified and normalised as the pipelines' references, as tokens."""
        vae = pipe.vae
        latents = pipe._patchify_latents(
            vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        )
        mean, std = _bn_stats(vae, latents)
        return pack((latents - mean) / std)

    def vae_latents(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """States (tokens) -> the VAE's own latents ``[B, C, H/f, W/f]``, as the pipelines before decoding."""
        from ..pipelines.pipeline_flux2_source import unpack

        multiple = pipe.vae_scale_factor * 2
        latents = unpack(latents, int(height) // multiple, int(width) // multiple)
        mean, std = _bn_stats(pipe.vae, latents)
        return pipe._unpatchify_latents(latents * std + mean)

    def decode_latents(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> list:
        """States, or the VAE latents Klein returns for ``output_type="latent"`` (4-D), -> PIL images."""
        if latents.ndim == 3:
            latents = self.vae_latents(pipe, latents, height, width)
        vae = pipe.vae
        images = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil")

    # -- editing --------------------------------------------------------------------------------------------
    def encode_sources(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> Conditioning:
        """The pipelines' own reference encoding (``_encode_vae_image``: VAE mode, patchify, batch-norm)."""
        vae = pipe.vae
        return Conditioning(
            {SOURCE_LATENTS: pipe._encode_vae_image(images.to(vae.device, vae.dtype), generator)}
        )


@register_family
class Flux2Family(_Flux2Base):
    """FLUX.2 [dev] (``Flux2Pipeline``, Mistral3 text encoder), guidance-distilled: text-to-image and edits.

    ``embedded_guidance`` is the model's guidance input (the pipeline's ``guidance_scale``, default 4.0 as in
    diffusers), given identically to the student's rollout and to every field; it is not CFG. A ``cfg`` field is
    true CFG ``u + s·(c − u)`` on top, which the stock [dev] pipeline does not offer.
    """

    name = "flux2"
    pipeline_class_names = ("Flux2Pipeline", "DanceOPDFlux2Pipeline")
    custom_pipeline_class_name = "DanceOPDFlux2Pipeline"
    has_embedded_guidance = True

    @classmethod
    def pipeline_class(cls) -> type:
        from ..pipelines.pipeline_flux2_source import Flux2PipelineWithSources

        return Flux2PipelineWithSources

    def __init__(self, max_sequence_length: int = 512, embedded_guidance: float = 4.0):
        super().__init__(max_sequence_length)
        self.embedded_guidance = float(embedded_guidance)

    def unguided_call_kwargs(self) -> dict[str, Any]:
        return {"guidance_scale": self.embedded_guidance}

    def _guidance(
        self, transformer: torch.nn.Module, cond: Conditioning, batch: int, device
    ) -> torch.Tensor | None:
        if not unwrap_model(transformer).config.guidance_embeds:
            return None
        per_field = cond.tensors.get(EMBEDDED_GUIDANCE)  # a field queried at its own embedded guidance
        if per_field is not None:
            return per_field.reshape(-1).to(device=device, dtype=torch.float32).expand(batch)
        return torch.full([batch], self.embedded_guidance, device=device, dtype=torch.float32)


@register_family
class Flux2KleinFamily(_Flux2Base):
    """FLUX.2 [klein] (``Flux2KleinPipeline``, Qwen3 text encoder): text-to-image and reference-image edits.

    CFG (``guidance_scale > 1`` on a non-distilled checkpoint) is the library's ``cfg`` field with the same scale.
    Step-distilled checkpoints (``is_distilled``) are meant to run without CFG; the student's rollout always does.
    """

    name = "flux2-klein"
    pipeline_class_names = ("Flux2KleinPipeline", "DanceOPDFlux2KleinPipeline")
    custom_pipeline_class_name = "DanceOPDFlux2KleinPipeline"

    @classmethod
    def pipeline_class(cls) -> type:
        from ..pipelines.pipeline_flux2_source import Flux2KleinPipelineWithSources

        return Flux2KleinPipelineWithSources

    def unguided_call_kwargs(self) -> dict[str, Any]:
        return {"guidance_scale": 1.0}  # Klein's CFG runs only when guidance_scale > 1
