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


PIPELINE_FOR_FAMILY = {"sd3": DanceOPDStableDiffusion3Pipeline}
