"""Z-Image (``ZImagePipeline``, text-to-image) and Z-Image omni (``ZImageOmniPipeline``, text-to-image and edits).

What the edge hides:

- ``ZImageTransformer2DModel`` takes a *list* of per-sample ``[C, 1, H, W]`` latents and a list of
  variable-length caption embeddings; its time is ``1 - sigma`` (1 = clean) and it predicts ``x0 - noise``,
  the negated velocity. States keep the pipeline's ``[B, C, H, W]`` latents layout.
- Caption embeddings have one length per prompt (the pipeline drops padded tokens). A :class:`Conditioning`
  needs batch-first tensors, so they are stored right-padded to ``max_sequence_length`` with their lengths.
- The omni pipeline always runs the transformer in omni mode: per sample a list of images (the clean sources,
  then the noisy target) with ``image_noise_mask = [0, ..., 0, 1]`` and one caption segment per image plus a
  closing one. A text-to-image sample is ``[target]`` with one segment; an edit ``[source, target]`` with the
  three segments of the edit template. Both templates are encoded for every prompt, so the same cached prompt
  serves text-to-image and edit samples and dropping the source (image guidance) gives exactly what the
  pipeline does without an image.
- The omni pipeline encodes one list of source images for the whole batch, inside ``__call__``. The rollout
  needs per-sample, pre-encoded sources, so :meth:`ZImageOmniFamily.pipeline_class` is a subclass
  (``pipelines/pipeline_z_image_omni_source.py``) whose
  ``__call__`` also takes ``source_latents`` / ``source_siglip`` and returns them from the two
  ``prepare_*`` hooks; the stock denoising loop is untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Conditioning, FamilyAdapter, register_family, scheduler_sigmas, token_count_mu, unwrap_model

#: Z-Image's FeedForward is w2(silu(w1 x) * w3 x); DanceOPD's Z-Image recipe adapts it with the attention
_Z_IMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def _model_time(sigma: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Z-Image's time: ``(1000 - 1000 sigma) / 1000``, computed in fp32 exactly as the pipelines do."""
    t = sigma.reshape(-1).to(device=device, dtype=torch.float32) * 1000
    return ((1000 - t) / 1000).expand(batch)


def _pad(embeds: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length ``[L_i, D]`` embeddings -> ``[B, length, D]`` (zeros after L_i) and ``[B]`` lengths."""
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    return out, torch.tensor([e.shape[0] for e in embeds], dtype=torch.long)


def _unpad(
    embeds: torch.Tensor, lengths: torch.Tensor, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Back to the per-sample lists the transformer and the pipelines take."""
    return [e[: int(n)].to(dtype) if dtype else e[: int(n)] for e, n in zip(embeds, lengths.tolist())]


def _stack_equal(embeds: list[torch.Tensor], what: str) -> torch.Tensor:
    """Prompt-independent template segments have one length; stack them as they are."""
    if len({e.shape[0] for e in embeds}) != 1:
        raise ValueError(f"The {what} of the edit template has different lengths across prompts.")
    return torch.stack(embeds)


def _keep_siglip_in_graph(model: torch.nn.Module, out: list[torch.Tensor], used: bool) -> list[torch.Tensor]:
    """Give the SigLIP branch's trainable weights a zero gradient when a forward did not use it.

    Multi-GPU training wraps the student in DDP with ``find_unused_parameters=False``, which needs a gradient for
    every trainable weight at every step; a text-to-image sample (or an edit without SigLIP features) never
    runs ``siglip_refiner``, whose attention projections carry student LoRA weights. Adding 0 * their sum keeps
    the outputs exactly as they were.
    """
    if used or not torch.is_grad_enabled() or getattr(model, "siglip_refiner", None) is None:
        return out
    params = [p for p in model.siglip_refiner.parameters() if p.requires_grad]
    params += [p for p in model.siglip_embedder.parameters() if p.requires_grad]
    if model.siglip_pad_token.requires_grad:
        params.append(model.siglip_pad_token)
    if not params:
        return out
    zero = torch.stack([p.sum().float() for p in params]).sum() * 0.0
    return [o + zero.to(o.dtype) for o in out]


@register_family
class ZImageFamily(FamilyAdapter):
    """``ZImagePipeline`` (Z-Image, Z-Image-Turbo): text-to-image only.

    Editing goes through ``ZImageOmniPipeline`` checkpoints (:class:`ZImageOmniFamily`): the plain pipeline runs
    the transformer in its basic mode, which has no place for source images.
    """

    name = "z-image"
    pipeline_class_names = ("ZImagePipeline", "DanceOPDZImagePipeline")
    transformer_class_name = "ZImageTransformer2DModel"
    custom_pipeline_class_name = "DanceOPDZImagePipeline"
    can_edit = False
    default_lora_targets = _Z_IMAGE_LORA_TARGETS
    ragged_inputs = ("prompt_embeds",)  # a list of unpadded per-sample prompts

    def __init__(self, max_sequence_length: int = 256):
        self.max_sequence_length = max_sequence_length

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import ZImagePipeline

        return ZImagePipeline

    # -- conditioning -------------------------------------------------------------------------------------
    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, source_images: list | None = None
    ) -> Conditioning:
        """The pipeline's own prompt encoding (chat template, Qwen3 hidden_states[-2], padding dropped)."""
        embeds, _ = pipe.encode_prompt(
            prompt=list(prompts),  # encode_prompt rewrites the list it is given
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        padded, lengths = _pad(embeds, self.max_sequence_length)
        return Conditioning({"prompt_embeds": padded, "prompt_lens": lengths.to(padded.device)})

    def pipeline_condition_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        return {"prompt_embeds": _unpad(cond.tensors["prompt_embeds"], cond.tensors["prompt_lens"])}

    def unguided_call_kwargs(self) -> dict[str, Any]:
        return {"guidance_scale": 0.0}  # Z-Image guides as pos + g (pos - neg) and only when g > 0

    # -- velocity -------------------------------------------------------------------------------------------
    def velocity(
        self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        dtype = unwrap_model(transformer).dtype
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))
        caps = _unpad(cond.tensors["prompt_embeds"], cond.tensors["prompt_lens"], dtype)
        out = transformer(latents, _model_time(sigma, x.shape[0], x.device), caps, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    # -- latents --------------------------------------------------------------------------------------------
    def default_resolution(self, pipe: Any) -> int:
        """The VAE's configured sample size (1024 for Z-Image's Flux VAE); the pipelines default to 1024."""
        size = pipe.vae.config.get("sample_size", None)
        return size if isinstance(size, int) and size >= 64 else 1024

    def latent_shape(self, pipe: Any, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        multiple = pipe.vae_scale_factor * 2  # the VAE factor times the 2x2 patch
        return (
            batch_size,
            pipe.transformer.config.in_channels,
            2 * (height // multiple),
            2 * (width // multiple),
        )

    def sigmas(
        self, pipe: Any, num_steps: int, latent_shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        """linspace(1, 1/N, N) through the scheduler with mu from the image sequence length, as __call__."""
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        mu = token_count_mu(pipe.scheduler, (latent_shape[-2] // 2) * (latent_shape[-1] // 2))
        return scheduler_sigmas(pipe.scheduler, num_steps, device, get_default_z_image_sigmas(num_steps), mu)


@register_family
class ZImageOmniFamily(ZImageFamily):
    """``ZImageOmniPipeline``: text-to-image and instruction edits in one model.

    Edit samples put the clean source latents before the noisy target (noise mask ``[0, 1]``), with the source's
    SigLIP2 features when the pipeline has a ``siglip`` encoder and the transformer a SigLIP branch.
    """

    name = "z-image-omni"
    pipeline_class_names = ("ZImageOmniPipeline", "DanceOPDZImageOmniPipeline")
    custom_pipeline_class_name = "DanceOPDZImageOmniPipeline"
    can_edit = True
    ragged_inputs = None  # the omni loop also holds per-sample source latents and features

    @classmethod
    def pipeline_class(cls) -> type:
        from ..pipelines.pipeline_z_image_omni_source import ZImageOmniSourcePipeline

        return ZImageOmniSourcePipeline

    # -- conditioning -------------------------------------------------------------------------------------
    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, source_images: list | None = None
    ) -> Conditioning:
        """Both templates the pipeline writes: text-to-image (no image) and edit (one source image).

        The edit template is three separately encoded segments: ``<|im_start|>user\\n<|vision_start|>`` before
        the source, ``<|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>`` before the
        target, ``<|vision_end|><|im_end|>`` after it. The first and last do not depend on the prompt.
        """
        length = self.max_sequence_length
        t2i, _ = pipe.encode_prompt(
            prompt=list(prompts),
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=length,
            num_condition_images=0,
        )
        edit, _ = pipe.encode_prompt(
            prompt=list(prompts),
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=length,
            num_condition_images=1,
        )
        prompt_embeds, prompt_lens = _pad([segments[0] for segments in t2i], length)
        edit_embeds, edit_lens = _pad([segments[1] for segments in edit], length)
        return Conditioning(
            {
                "prompt_embeds": prompt_embeds,
                "prompt_lens": prompt_lens.to(prompt_embeds.device),
                "edit_prompt_embeds": edit_embeds,
                "edit_prompt_lens": edit_lens.to(edit_embeds.device),
                "edit_prefix_embeds": _stack_equal([s[0] for s in edit], "opening segment"),
                "edit_suffix_embeds": _stack_equal([s[2] for s in edit], "closing segment"),
            }
        )

    def _captions(self, cond: Conditioning, dtype: torch.dtype | None = None) -> list[list[torch.Tensor]]:
        """Per-sample caption segments, as the omni pipeline passes them (edit template iff a source)."""
        t = cond.tensors
        if "source_latents" not in t:
            return [[e] for e in _unpad(t["prompt_embeds"], t["prompt_lens"], dtype)]
        middle = _unpad(t["edit_prompt_embeds"], t["edit_prompt_lens"], dtype)
        prefix, suffix = t["edit_prefix_embeds"], t["edit_suffix_embeds"]
        if dtype is not None:
            prefix, suffix = prefix.to(dtype), suffix.to(dtype)
        return [[prefix[i], middle[i], suffix[i]] for i in range(len(middle))]

    def pipeline_condition_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"prompt_embeds": self._captions(cond)}
        if "source_latents" in cond.tensors:
            kwargs["source_latents"] = cond.tensors["source_latents"]
            kwargs["source_siglip"] = cond.tensors.get("source_siglip")
        return kwargs

    # -- velocity -------------------------------------------------------------------------------------------
    def velocity(
        self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        dtype = unwrap_model(transformer).dtype
        batch = x.shape[0]
        targets = list(x.to(dtype).unsqueeze(2).unbind(0))
        source = cond.tensors.get("source_latents")
        if source is None:
            images = [[target] for target in targets]
            noise_mask = [[1] for _ in range(batch)]
            siglip_feats: list = [None] * batch
        else:
            sources = source.to(device=x.device, dtype=dtype).unsqueeze(2)
            images = [[sources[i], targets[i]] for i in range(batch)]
            noise_mask = [[0, 1] for _ in range(batch)]
            siglip = cond.tensors.get("source_siglip")
            siglip_feats = (
                [None] * batch
                if siglip is None
                else [[siglip[i].to(device=x.device, dtype=dtype), None] for i in range(batch)]
            )
        out = transformer(
            x=images,
            t=_model_time(sigma, batch, x.device),
            cap_feats=self._captions(cond, dtype),
            siglip_feats=siglip_feats,
            image_noise_mask=noise_mask,
            return_dict=False,
        )[0]
        out = _keep_siglip_in_graph(unwrap_model(transformer), out, used=siglip_feats[0] is not None)
        return -torch.stack([o.float() for o in out]).squeeze(2)

    # -- editing --------------------------------------------------------------------------------------------
    def encode_sources(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> Conditioning:
        """VAE latents (the distribution's mode, as the pipeline takes) and, with SigLIP, its patch features.

        SigLIP2 reads the source as the pipeline gives it (a PIL image at the edit size, its own resizing).
        """
        vae = pipe.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        latents = ((dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor).float()
        tensors = {"source_latents": latents}
        if self._uses_siglip(pipe):
            tensors["source_siglip"] = self._siglip_features(pipe, images)
        return Conditioning(tensors)

    @staticmethod
    def _uses_siglip(pipe: Any) -> bool:
        return (
            getattr(pipe, "siglip", None) is not None
            and getattr(pipe, "siglip_processor", None) is not None
            and pipe.transformer.config.get("siglip_feat_dim", None) is not None
        )

    @staticmethod
    def _siglip_features(pipe: Any, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        features = []
        for array in pixels.permute(0, 2, 3, 1).numpy():
            inputs = pipe.siglip_processor(images=[Image.fromarray(array)], return_tensors="pt").to(
                pipe.siglip.device
            )
            h, w = (int(v) for v in inputs.spatial_shapes[0])
            hidden = pipe.siglip(**inputs).last_hidden_state
            features.append(hidden[0, : h * w].reshape(h, w, -1).float())
        if len({f.shape for f in features}) != 1:
            raise ValueError("Source images of one batch must share their size (the edit size).")
        return torch.stack(features)
