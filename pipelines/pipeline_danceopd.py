# Copyright 2026 The danceopd-diffusers authors. Apache-2.0.
"""Pipelines exported by danceopd-diffusers: the stock pipelines, with guidance off by default.

A DanceOPD student has absorbed its teachers' guidance (CFG or another guider) into its weights, so it is
sampled with one transformer call per denoising step. Extra CFG at inference multiplies with the absorbed
scale (``absorbed_guidance_scale`` in ``model_index.json``); raise ``guidance_scale`` above 1 only on purpose.

This file is self-contained (it imports only diffusers) because ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` imports it from the model folder. ``save_pretrained`` (and so ``push_to_hub``)
copies it along and keeps ``model_index.json`` pointing at it, so every saved copy stays loadable.
"""

from __future__ import annotations

import json
import os
import shutil

import diffusers
from diffusers import StableDiffusion3Pipeline

MODULE_STEM = os.path.splitext(os.path.basename(__file__))[0]


class _CustomPipelineSaveMixin:
    """Keep the folder loadable: copy this module next to model_index.json and point ``_class_name`` at it."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        push_to_hub = kwargs.pop("push_to_hub", False)
        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, MODULE_STEM + ".py"))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["_class_name"] = [MODULE_STEM, type(self).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = kwargs.get("repo_id") or os.path.basename(os.path.normpath(str(save_directory)))
            token = kwargs.get("token")
            repo_id = create_repo(repo_id, exist_ok=True, private=kwargs.get("private"), token=token).repo_id
            upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                token=token,
                commit_message=kwargs.get("commit_message") or "Upload pipeline",
            )


class DanceOPDStableDiffusion3Pipeline(_CustomPipelineSaveMixin, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline whose ``guidance_scale`` defaults to 1.0 (no CFG: one call per step)."""

    def __init__(
        self,
        transformer,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3,
        tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
        absorbed_guidance_scale: float | None = None,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(absorbed_guidance_scale=absorbed_guidance_scale)

    def __call__(self, prompt=None, *args, guidance_scale: float = 1.0, **kwargs):
        return super().__call__(prompt, *args, guidance_scale=guidance_scale, **kwargs)


def _optional(name: str):
    """Pipelines of newer diffusers releases: absent ones are simply not offered."""
    return getattr(diffusers, name, None)


FluxPipeline = _optional("FluxPipeline")
FluxKontextPipeline = _optional("FluxKontextPipeline")
ZImagePipeline = _optional("ZImagePipeline")
ZImageOmniPipeline = _optional("ZImageOmniPipeline")
QwenImagePipeline = _optional("QwenImagePipeline")
QwenImageEditPipeline = _optional("QwenImageEditPipeline")
Flux2Pipeline = _optional("Flux2Pipeline")
Flux2KleinPipeline = _optional("Flux2KleinPipeline")


if FluxPipeline is not None:

    class DanceOPDFluxPipeline(_CustomPipelineSaveMixin, FluxPipeline):
        """FluxPipeline; true CFG stays off (``true_cfg_scale=1``). ``guidance_scale`` is the embedded guidance
        input of guidance-distilled checkpoints, not CFG: keep the value the student was trained with."""

        def __init__(
            self,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            transformer,
            image_encoder=None,
            feature_extractor=None,
            absorbed_guidance_scale: float | None = None,
        ):
            super().__init__(
                scheduler=scheduler,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2,
                transformer=transformer,
                image_encoder=image_encoder,
                feature_extractor=feature_extractor,
            )
            self.register_to_config(absorbed_guidance_scale=absorbed_guidance_scale)

        def __call__(self, prompt=None, *args, true_cfg_scale: float = 1.0, **kwargs):
            return super().__call__(prompt, *args, true_cfg_scale=true_cfg_scale, **kwargs)


if FluxKontextPipeline is not None:

    class DanceOPDFluxKontextPipeline(_CustomPipelineSaveMixin, FluxKontextPipeline):
        """FluxKontextPipeline (edits with ``image=``, text-to-image without); true CFG off by default."""

        def __init__(
            self,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            transformer,
            image_encoder=None,
            feature_extractor=None,
            absorbed_guidance_scale: float | None = None,
        ):
            super().__init__(
                scheduler=scheduler,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2,
                transformer=transformer,
                image_encoder=image_encoder,
                feature_extractor=feature_extractor,
            )
            self.register_to_config(absorbed_guidance_scale=absorbed_guidance_scale)

        def __call__(self, image=None, prompt=None, *args, true_cfg_scale: float = 1.0, **kwargs):
            return super().__call__(image, prompt, *args, true_cfg_scale=true_cfg_scale, **kwargs)


if ZImagePipeline is not None:

    class DanceOPDZImagePipeline(_CustomPipelineSaveMixin, ZImagePipeline):
        """ZImagePipeline with ``guidance_scale=0`` by default (Z-Image guides only when it is > 0)."""

        def __init__(
            self,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            transformer,
            absorbed_guidance_scale: float | None = None,
        ):
            super().__init__(
                scheduler=scheduler,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                transformer=transformer,
            )
            self.register_to_config(absorbed_guidance_scale=absorbed_guidance_scale)

        def __call__(self, prompt=None, *args, guidance_scale: float = 0.0, **kwargs):
            return super().__call__(prompt, *args, guidance_scale=guidance_scale, **kwargs)


if ZImageOmniPipeline is not None:

    class DanceOPDZImageOmniPipeline(_CustomPipelineSaveMixin, ZImageOmniPipeline):
        """ZImageOmniPipeline (text-to-image and editing) with ``guidance_scale=0`` by default.

        ``siglip``/``siglip_processor`` are optional components (saved when present, loadable when absent);
        without them an edit conditions on the source's VAE latents only. Source images are encoded in the
        VAE's own dtype (the stock pipeline casts them to bfloat16, which fails with a float32 VAE).
        """

        _optional_components = ["siglip", "siglip_processor"]

        def prepare_image_latents(self, images, batch_size, device, dtype):
            image_latents = []
            for image in images:
                image = image.to(device=device, dtype=self.vae.dtype)
                latent = self.vae.encode(image).latent_dist.mode()[0]
                latent = (latent - self.vae.config.shift_factor) * self.vae.config.scaling_factor
                image_latents.append(latent.unsqueeze(1).to(dtype))
            return [image_latents.copy() for _ in range(batch_size)]

        def prepare_siglip_embeds(self, images, batch_size, device, dtype):
            if self.siglip is None or self.siglip_processor is None:
                return [[] for _ in range(batch_size)]
            return super().prepare_siglip_embeds(images, batch_size, device, dtype)

        def __init__(
            self,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            transformer,
            siglip=None,
            siglip_processor=None,
            absorbed_guidance_scale: float | None = None,
        ):
            super().__init__(
                scheduler=scheduler,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                transformer=transformer,
                siglip=siglip,
                siglip_processor=siglip_processor,
            )
            self.register_to_config(absorbed_guidance_scale=absorbed_guidance_scale)

        def __call__(self, *args, guidance_scale: float = 0.0, **kwargs):
            return super().__call__(*args, guidance_scale=guidance_scale, **kwargs)


if QwenImagePipeline is not None:

    class DanceOPDQwenImagePipeline(_CustomPipelineSaveMixin, QwenImagePipeline):
        """QwenImagePipeline with ``true_cfg_scale=1`` by default (one transformer call per step)."""

        def __init__(
            self,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            transformer,
            absorbed_guidance_scale: float | None = None,
        ):
            super().__init__(
                scheduler=scheduler,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                transformer=transformer,
            )
            self.register_to_config(absorbed_guidance_scale=absorbed_guidance_scale)

        def __call__(self, prompt=None, *args, true_cfg_scale: float = 1.0, **kwargs):
            return super().__call__(prompt, *args, true_cfg_scale=true_cfg_scale, **kwargs)


if QwenImageEditPipeline is not None:

    class DanceOPDQwenImageEditPipeline(_CustomPipelineSaveMixin, QwenImageEditPipeline):
        """QwenImageEditPipeline with ``true_cfg_scale=1`` by default; edits with ``image=``.

        Without ``image`` it generates from text alone, as a student trained on text-to-image routes does:
        QwenImagePipeline's template and loop over these same components (no copies).
        """

        def __init__(
            self,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            processor,
            transformer,
            absorbed_guidance_scale: float | None = None,
        ):
            super().__init__(
                scheduler=scheduler,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                processor=processor,
                transformer=transformer,
            )
            self.register_to_config(absorbed_guidance_scale=absorbed_guidance_scale)

        def __call__(self, image=None, prompt=None, *args, true_cfg_scale: float = 1.0, **kwargs):
            if image is None:
                text_to_image = QwenImagePipeline(
                    scheduler=self.scheduler,
                    vae=self.vae,
                    text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer,
                    transformer=self.transformer,
                )
                text_to_image.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
                return text_to_image(prompt, *args, true_cfg_scale=true_cfg_scale, **kwargs)
            return super().__call__(image, prompt, *args, true_cfg_scale=true_cfg_scale, **kwargs)


if Flux2Pipeline is not None:

    class DanceOPDFlux2Pipeline(_CustomPipelineSaveMixin, Flux2Pipeline):
        """Flux2Pipeline (FLUX.2 [dev]; edits with ``image=``). It has no CFG: ``guidance_scale`` is the embedded
        guidance input of the guidance-distilled model, not CFG: keep the value the student was trained with."""

        def __init__(
            self,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            transformer,
            absorbed_guidance_scale: float | None = None,
        ):
            super().__init__(
                scheduler=scheduler,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                transformer=transformer,
            )
            self.register_to_config(absorbed_guidance_scale=absorbed_guidance_scale)


if Flux2KleinPipeline is not None:

    class DanceOPDFlux2KleinPipeline(_CustomPipelineSaveMixin, Flux2KleinPipeline):
        """Flux2KleinPipeline (FLUX.2 [klein]; edits with ``image=``) with ``guidance_scale=1`` by default (Klein's
        CFG runs only when it is > 1): one transformer call per step."""

        def __init__(
            self,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            transformer,
            is_distilled: bool = False,
            absorbed_guidance_scale: float | None = None,
        ):
            super().__init__(
                scheduler=scheduler,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                transformer=transformer,
                is_distilled=is_distilled,
            )
            self.register_to_config(absorbed_guidance_scale=absorbed_guidance_scale)

        def __call__(self, image=None, prompt=None, *args, guidance_scale: float = 1.0, **kwargs):
            return super().__call__(image, prompt, *args, guidance_scale=guidance_scale, **kwargs)
