# Copyright 2026 The danceopd-diffusers authors. Apache-2.0.
"""Pipelines exported by danceopd-diffusers: the stock pipelines, with guidance off by default.

A DanceOPD student has absorbed its teachers' guidance (CFG or another guider) into its weights, so it is
sampled with one transformer call per denoising step. Extra CFG at inference multiplies with the absorbed
scale (``absorbed_guidance_scale`` in ``model_index.json``); raise the guidance only on purpose.

``DanceOPD<Stock>`` is ``<Stock>`` (a diffusers pipeline) whose ``__call__`` defaults are the stock pipeline's
guidance-off arguments (its ``_unguided_defaults``, collected in :data:`UNGUIDED_DEFAULTS`), then what the export
recorded in ``model_index.json`` as ``trained_call_kwargs``: the step count, text length and guidance the student
was trained for. Arguments given to a call always win. A call without ``height``/``width`` renders at
``trained_resolution`` (an edit at that area and its source's aspect ratio), not at the stock default (1024² for
Kontext, Flux, Qwen-Image), and a size whose area is more than twice or less than half the trained one logs a
warning. These values are pipeline config, so ``save_pretrained`` / ``push_to_hub`` keep them.

This file is self-contained (it imports only diffusers) because ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` imports it from the model folder. ``save_pretrained`` (and so ``push_to_hub``)
copies it along and keeps ``model_index.json`` pointing at it, so every saved copy stays loadable.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil

import diffusers
from diffusers import DiffusionPipeline
from diffusers.utils import logging

logger = logging.get_logger(__name__)

#: the module name ``model_index.json`` gives for these classes: this file's own name, whatever folder it sits in
#: (danceopd_diffusers.pipelines.EXPORTED_PIPELINE_MODULE is the same name, for code that cannot import this file)
EXPORTED_PIPELINE_MODULE = os.path.splitext(os.path.basename(__file__))[0]
#: exported class name = this prefix + the stock diffusers pipeline class name
CLASS_PREFIX = "DanceOPD"
#: the config entries every exported class adds to its stock pipeline's ``__init__``
CONFIG_ENTRIES = ("absorbed_guidance_scale", "trained_call_kwargs", "trained_resolution")


class _UnavailablePipeline(DiffusionPipeline):
    """The base of an exported class whose stock pipeline this diffusers release lacks: the module still imports
    (a folder of another family loads), and only loading this class says what is missing."""

    def __init__(self, *args, **kwargs):
        raise ImportError(
            f"{type(self).__name__} needs the diffusers pipeline {type(self).__name__[len(CLASS_PREFIX) :]}, which "
            f"diffusers {diffusers.__version__} does not have: upgrade diffusers."
        )


def _stock(name: str) -> type:
    """The stock diffusers pipeline class ``name``, or :class:`_UnavailablePipeline` on an older diffusers."""
    return getattr(diffusers, name, None) or _UnavailablePipeline


class _DanceOPDPipeline:
    """What every exported class adds to its stock pipeline: call defaults and a save that stays loadable.

    diffusers reads a pipeline's components off its ``__init__`` signature, and the stock signature differs
    between diffusers releases (the one a user loads the folder with may not be ours): every subclass gets an
    ``__init__`` whose signature is its stock pipeline's (optional components default to None) plus
    :data:`CONFIG_ENTRIES`, made from the stock class at class creation (:meth:`__init_subclass__`).
    """

    _unguided_defaults: dict[str, float] = {}
    #: a requested area this many times larger or smaller than the trained one draws a warning
    size_warning_ratio: float = 2.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        stock = cls.__bases__[-1]  # the stock pipeline is every exported class's last base
        if issubclass(
            stock, _DanceOPDPipeline
        ):  # a user's subclass of an exported class inherits its __init__
            return
        stock_signature = inspect.signature(stock.__init__)

        def __init__(
            self,
            *args,
            absorbed_guidance_scale=None,
            trained_call_kwargs=None,
            trained_resolution=None,
            **components,
        ):
            positional = list(stock_signature.parameters)[1 : len(args) + 1]
            for name in cls._optional_components:  # the loader leaves out optional components saved as None
                if name in stock_signature.parameters and name not in positional:
                    components.setdefault(name, None)
            stock.__init__(self, *args, **components)
            self.register_to_config(
                absorbed_guidance_scale=absorbed_guidance_scale,
                trained_call_kwargs=trained_call_kwargs,
                trained_resolution=trained_resolution,
            )

        params = [
            p.replace(default=None) if p.name in cls._optional_components and p.default is p.empty else p
            for p in stock_signature.parameters.values()
        ]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in CONFIG_ENTRIES]
        __init__.__signature__ = stock_signature.replace(parameters=params)
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = __init__

    def __call__(self, *args, **kwargs):
        defaults = {**self._unguided_defaults, **(self.config.get("trained_call_kwargs") or {})}
        bound = inspect.signature(super().__call__).bind_partial(*args).arguments
        given = set(kwargs) | set(bound)
        kwargs.update({k: v for k, v in defaults.items() if k not in given})
        kwargs.update(self._trained_size({**bound, **kwargs}))
        return super().__call__(*args, **kwargs)

    def _trained_size(self, call: dict) -> dict:
        """``height``/``width`` (and Kontext's ``max_area``) for a call: the trained size where the call gives
        none, the given size otherwise; a warning when the area is far from the trained one."""
        resolution = self.config.get("trained_resolution")
        if not resolution:
            return {}
        height, width = call.get("height"), call.get("width")
        if height is None and width is None:
            height, width = _trained_edit_size(call.get("image"), resolution)
        height, width = height or resolution, width or resolution
        size = {"height": height, "width": width}
        if "max_area" in inspect.signature(super().__call__).parameters and call.get("max_area") is None:
            size["max_area"] = height * width  # Kontext rescales every request to max_area (default 1024²)
        area = call["max_area"] if call.get("max_area") is not None else height * width
        ratio = area / (resolution * resolution)
        if ratio > self.size_warning_ratio or ratio < 1 / self.size_warning_ratio:
            logger.warning(
                f"{type(self).__name__}: this student was trained at {resolution}x{resolution} pixels; a call at "
                f"{height}x{width} is {ratio:.3g}x that area, far outside what it learned (and slower). Pass "
                f"height={resolution}, width={resolution}, or leave the size out."
            )
        return size

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        push_to_hub = kwargs.pop("push_to_hub", False)
        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, EXPORTED_PIPELINE_MODULE + ".py"))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [EXPORTED_PIPELINE_MODULE, type(self).__name__]
        with open(index_path, "w", encoding="utf-8") as f:
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


def _image_size(image) -> tuple[int, int] | None:
    """(width, height) of a call's ``image`` (a PIL image, an array or tensor, or a list of them), else None."""
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    if image is None:
        return None
    if hasattr(image, "size") and not callable(image.size):  # PIL
        return tuple(image.size)
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    if len(shape) == 4 or (len(shape) == 3 and shape[0] in (1, 3, 4)):  # torch: [B,] C, H, W
        return int(shape[-1]), int(shape[-2])
    return int(shape[1]), int(shape[0])  # numpy: H, W[, C]


def _trained_edit_size(image, resolution: int, multiple: int = 16) -> tuple[int, int]:
    """(height, width) a call renders at by default: the trained square, or for an edit its source's aspect ratio
    at the trained area, sides rounded down to 16 px (what training did: ``danceopd_diffusers.families.edit_size``)."""
    size = _image_size(image)
    if size is None:
        return resolution, resolution
    width, height = size
    scale = (resolution * resolution / (width * height)) ** 0.5
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return h, w


class _OmniSources:
    """Z-Image Omni: ``siglip``/``siglip_processor`` optional (without them an edit conditions on the source's
    VAE latents only); sources encoded in the VAE's own dtype (the stock casts them to bfloat16)."""

    _optional_components = ["siglip", "siglip_processor"]

    # Adapted from diffusers.pipelines.z_image.pipeline_z_image_omni.ZImageOmniPipeline.prepare_image_latents
    #   -         image = image.to(device=device, dtype=dtype)
    #   -         image_latent = (self.vae.encode(image.bfloat16()).latent_dist.mode()[0] - self.vae.config.shift_factor) * self.vae.config.scaling_factor
    #   +         image = image.to(device=device, dtype=self.vae.dtype)
    #   +         image_latent = (self.vae.encode(image).latent_dist.mode()[0] - self.vae.config.shift_factor) * self.vae.config.scaling_factor
    def prepare_image_latents(
        self,
        images: list[torch.Tensor],  # noqa: F821 (an annotation, never evaluated: this file imports no torch)
        batch_size,
        device,
        dtype,
    ):
        image_latents = []
        for image in images:
            image = image.to(device=device, dtype=self.vae.dtype)
            image_latent = (
                self.vae.encode(image).latent_dist.mode()[0] - self.vae.config.shift_factor
            ) * self.vae.config.scaling_factor
            image_latent = image_latent.unsqueeze(1).to(dtype)
            image_latents.append(image_latent)  # (16, 128, 128)

        # image_latents = [image_latents] * batch_size
        image_latents = [image_latents.copy() for _ in range(batch_size)]

        return image_latents

    def prepare_siglip_embeds(self, images, batch_size, device, dtype):
        if self.siglip is None or self.siglip_processor is None:
            return [[] for _ in range(batch_size)]
        return super().prepare_siglip_embeds(images, batch_size, device, dtype)


def qwen_image_t2i_view(pipe: diffusers.QwenImagePipeline | diffusers.QwenImageEditPipeline):
    """``pipe`` if it is a QwenImagePipeline, else a QwenImagePipeline over its components (no copies).

    Qwen-Image-Edit's transformer, VAE, text encoder and tokenizer are Qwen-Image's: this runs them with
    Qwen-Image's text-to-image template and loop, as a student trained on text-to-image routes was.
    """
    if isinstance(pipe, diffusers.QwenImagePipeline):
        return pipe
    components = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
    text_to_image = diffusers.QwenImagePipeline(**{k: getattr(pipe, k) for k in components})
    text_to_image.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return text_to_image


class _QwenEditTextToImage:
    """Qwen-Image-Edit without ``image``: text-to-image through :func:`qwen_image_t2i_view`."""

    def __call__(self, image=None, prompt=None, *args, **kwargs):
        if image is not None:
            return super().__call__(image, prompt, *args, **kwargs)
        return qwen_image_t2i_view(self)(prompt, *args, **kwargs)


# -- the exported classes: one per stock pipeline a family trains -------------------------------------------------
# SD3 guides only when guidance_scale > 1; Flux, Kontext and Qwen-Image only with true_cfg_scale > 1 (Flux's
# guidance_scale is the embedded input of guidance-distilled checkpoints, recorded per export); Z-Image as
# pos + g (pos - neg), only when g > 0; Flux.2 [klein] only when guidance_scale > 1, while Flux.2 [dev] has no
# CFG at all (its guidance_scale is the embedded input, recorded per export).


class DanceOPDStableDiffusion3Pipeline(_DanceOPDPipeline, _stock("StableDiffusion3Pipeline")):
    """StableDiffusion3Pipeline with guidance off (``guidance_scale=1.0``) and the trained call by default."""

    _unguided_defaults = {"guidance_scale": 1.0}


class DanceOPDFluxPipeline(_DanceOPDPipeline, _stock("FluxPipeline")):
    """FluxPipeline with true CFG off (``true_cfg_scale=1.0``) and the trained call by default."""

    _unguided_defaults = {"true_cfg_scale": 1.0}


class DanceOPDFluxKontextPipeline(_DanceOPDPipeline, _stock("FluxKontextPipeline")):
    """FluxKontextPipeline with true CFG off (``true_cfg_scale=1.0``) and the trained call by default."""

    _unguided_defaults = {"true_cfg_scale": 1.0}


class DanceOPDZImagePipeline(_DanceOPDPipeline, _stock("ZImagePipeline")):
    """ZImagePipeline with guidance off (``guidance_scale=0.0``) and the trained call by default."""

    _unguided_defaults = {"guidance_scale": 0.0}


class DanceOPDZImageOmniPipeline(_DanceOPDPipeline, _OmniSources, _stock("ZImageOmniPipeline")):
    """ZImageOmniPipeline with guidance off (``guidance_scale=0.0``) and the trained call by default."""

    _unguided_defaults = {"guidance_scale": 0.0}


class DanceOPDQwenImagePipeline(_DanceOPDPipeline, _stock("QwenImagePipeline")):
    """QwenImagePipeline with true CFG off (``true_cfg_scale=1.0``) and the trained call by default."""

    _unguided_defaults = {"true_cfg_scale": 1.0}


class DanceOPDQwenImageEditPipeline(_DanceOPDPipeline, _QwenEditTextToImage, _stock("QwenImageEditPipeline")):
    """QwenImageEditPipeline with true CFG off (``true_cfg_scale=1.0``) and the trained call by default."""

    _unguided_defaults = {"true_cfg_scale": 1.0}


class DanceOPDFlux2Pipeline(_DanceOPDPipeline, _stock("Flux2Pipeline")):
    """Flux2Pipeline (no CFG; its embedded guidance is recorded per export) with the trained call by default."""

    _unguided_defaults = {}


class DanceOPDFlux2KleinPipeline(_DanceOPDPipeline, _stock("Flux2KleinPipeline")):
    """Flux2KleinPipeline with CFG off (``guidance_scale=1.0``) and the trained call by default."""

    _unguided_defaults = {"guidance_scale": 1.0}


#: stock pipeline class -> the ``__call__`` arguments that turn its guidance off (one model call per step), read
#: off the classes above (tests tie every family's ``unguided_call_kwargs()`` to them)
UNGUIDED_DEFAULTS: dict[str, dict[str, float]] = {
    cls.__name__[len(CLASS_PREFIX) :]: cls._unguided_defaults for cls in _DanceOPDPipeline.__subclasses__()
}
