"""Fields: velocities over the student's state space that a student can be distilled from.

A field answers ``velocity(query)`` in the library convention (v = noise - x0, sigma in [0, 1]); callers hold
``torch.no_grad()``. Transformer fields call a model through the family adapter; operator fields (CFG, any
``diffusers.guiders`` guider) combine the velocities of another field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch

from .families import EMBEDDED_GUIDANCE, Conditioning, FamilyAdapter
from .student import AdapterScope


@dataclass
class FieldQuery:
    x: torch.Tensor
    sigma: torch.Tensor  # [B]
    cond: Conditioning
    uncond: Conditioning | None = None  # the empty-prompt conditioning (same source image for edits)
    step_index: int = 0
    num_steps: int = 1


class Field:
    name: str
    #: whether the velocity depends on ``FieldQuery.step_index`` beyond the state and sigma (then rows of
    #: different steps are never batched into one query)
    step_dependent: bool = False

    def velocity(self, query: FieldQuery) -> torch.Tensor:
        raise NotImplementedError

    @property
    def transformer(self) -> torch.nn.Module | None:
        return None

    def describe(self) -> str:
        return type(self).__name__


class OperatorField(Field):
    """A field made from another (``inner``): it runs on the inner field's transformer and is as step-dependent
    as the inner field is (subclasses that read the step themselves say so)."""

    inner: Field

    @property
    def transformer(self) -> torch.nn.Module | None:
        return self.inner.transformer

    @property
    def step_dependent(self) -> bool:
        return self.inner.step_dependent


class TransformerField(Field):
    """The base model, a LoRA expert or a full checkpoint.

    ``adapters`` selects what is active when the transformer is the student's own (``scope`` given): ``None``
    is the pristine base with every adapter off, a list names frozen expert adapters. Without ``scope`` the
    transformer is a separate frozen model and is called as it is.
    """

    def __init__(
        self,
        name: str,
        family: FamilyAdapter,
        transformer: torch.nn.Module,
        adapters: list[str] | None = None,
        scope: AdapterScope | None = None,
        description: str = "",
        embedded_guidance: float | None = None,
    ):
        self.name = name
        self.family = family
        self._transformer = transformer
        self.adapters = adapters
        self.scope = scope
        self.description = description
        self.embedded_guidance = (
            embedded_guidance  # guidance-distilled models: this field's own guidance input
        )

    @property
    def transformer(self) -> torch.nn.Module:
        return self._transformer

    def velocity(self, query: FieldQuery) -> torch.Tensor:
        if self.embedded_guidance is not None:
            value = torch.full((query.x.shape[0],), self.embedded_guidance, device=query.x.device)
            query = replace(query, cond=query.cond.merge(Conditioning({EMBEDDED_GUIDANCE: value})))
        if self.scope is None:  # a separate frozen model: give it inputs in its own dtype
            dtype = self._transformer.dtype
            v = self.family.velocity(
                self._transformer, query.x.to(dtype), query.sigma, query.cond.to(dtype=dtype)
            )
            return v.to(query.x.dtype)
        with self.scope.use(self.adapters):
            return self.family.velocity(self._transformer, query.x, query.sigma, query.cond)

    def describe(self) -> str:
        text = self.description or "transformer"
        return text + (
            f" at embedded guidance {self.embedded_guidance}" if self.embedded_guidance is not None else ""
        )


class CFGField(OperatorField):
    """``u + scale * (c - u)`` with u the empty-prompt velocity: the field of classifier-free guidance.

    ``norm_rescale`` rescales the result, per token (packed layouts) or per pixel (channel-first layouts), to the
    norm of ``c``: Qwen-Image's ``true_cfg_scale`` combination. The norm ratio is sign-free, so it is the same
    in our v = noise - x0 as in the pipeline's own prediction.
    """

    def __init__(self, name: str, inner: Field, scale: float, norm_rescale: bool = False):
        self.name = name
        self.inner = inner
        self.scale = float(scale)
        self.norm_rescale = norm_rescale

    def velocity(self, query: FieldQuery) -> torch.Tensor:
        if query.uncond is None:
            raise ValueError(f"Field {self.name!r} (CFG) needs the unconditional conditioning of the query.")
        both = replace(
            query,
            x=torch.cat([query.x, query.x]),
            sigma=torch.cat([query.sigma, query.sigma]),
            cond=Conditioning.cat([query.uncond, query.cond]),
        )
        v_uncond, v_cond = self.inner.velocity(both).chunk(2)
        combined = v_uncond + self.scale * (v_cond - v_uncond)
        if self.norm_rescale:
            dim = -1 if combined.dim() == 3 else 1  # packed [B, tokens, C] or channel-first [B, C, ...]
            combined = combined * (v_cond.norm(dim=dim, keepdim=True) / combined.norm(dim=dim, keepdim=True))
        return combined

    def describe(self) -> str:
        rescale = ", norm-rescaled" if self.norm_rescale else ""
        return f"CFG(scale={self.scale}{rescale}) of {self.inner.name}"


class ImageGuidanceField(OperatorField):
    """InstructPix2Pix-style three-branch guidance for edit experts.

    ``v(0,0) + s_img (v(I,0) - v(0,0)) + s_txt (v(I,T) - v(I,0))`` where I is the source image and T the
    instruction: the unconditional branch keeps the source and drops the text, the image-free branch drops both.
    """

    def __init__(self, name: str, inner: Field, text_scale: float, image_scale: float):
        self.name = name
        self.inner = inner
        self.text_scale = float(text_scale)
        self.image_scale = float(image_scale)

    def velocity(self, query: FieldQuery) -> torch.Tensor:
        if query.uncond is None or not query.cond.has_source:
            raise ValueError(f"Field {self.name!r} (image guidance) needs edit samples with a source image.")
        v_full = self.inner.velocity(query)
        v_image = self.inner.velocity(replace(query, cond=query.uncond))
        v_none = self.inner.velocity(replace(query, cond=query.uncond.without_source()))
        return v_none + self.image_scale * (v_image - v_none) + self.text_scale * (v_full - v_image)

    def describe(self) -> str:
        return f"image guidance(text={self.text_scale}, image={self.image_scale}) of {self.inner.name}"


class GuiderField(OperatorField):
    """Any ``diffusers.guiders`` guider (CFG, CFG-Zero*, APG, ...) used as an operator field.

    The guider sees the two branches as it does in a modular pipeline: ``prepare_inputs`` splits the
    conditioning into one batch per branch, each branch's prediction is the inner field's velocity, and the
    guider combines them. Model hooks (layer-skip guiders) go on the inner field's transformer.

    A field is a function of the queried state: every query runs on a fresh copy of ``guider`` set to the
    query's step, so a path-dependent guider (APG's momentum) carries nothing from one query (or sample) to the
    next; with momentum it is APG without its running average. ``guider`` itself is never stepped.
    """

    step_dependent = True  # start/stop windows, zero-init steps; it also reads one timestep for the batch

    def __init__(self, name: str, inner: Field, guider: Any):
        self.name = name
        self.inner = inner
        self.guider = guider

    def velocity(self, query: FieldQuery) -> torch.Tensor:
        if query.uncond is None:
            raise ValueError(
                f"Field {self.name!r} (guider) needs the unconditional conditioning of the query."
            )
        keys = list(query.cond.tensors)
        timestep = query.sigma.reshape(-1)[0] * 1000
        guider = copy.deepcopy(self.guider)  # fresh state for this query
        guider.set_state(step=query.step_index, num_inference_steps=query.num_steps, timestep=timestep)
        batches = guider.prepare_inputs({k: (query.cond.tensors[k], query.uncond.tensors[k]) for k in keys})
        denoiser = self.inner.transformer
        for batch in batches:
            if denoiser is not None:
                guider.prepare_models(denoiser)
            cond = Conditioning({k: getattr(batch, k) for k in keys})
            batch.noise_pred = self.inner.velocity(replace(query, cond=cond))
            if denoiser is not None:
                guider.cleanup_models(denoiser)
        return guider(batches).pred

    def describe(self) -> str:
        config = dict(self.guider.config)
        args = ", ".join(f"{k}={v}" for k, v in config.items() if not k.startswith("_"))
        return f"{type(self.guider).__name__}({args}) of {self.inner.name}"


class MixField(Field):
    """The weighted mean of several fields' velocities at the same state: soft routing.

    The paper's soft-mixing ablation gives every sample this blend of the setting's fields instead of routing it to
    one (hard routing); weights are normalised to sum to 1. Each inner field answers the same query.
    """

    def __init__(self, name: str, inners: list[Field], weights: list[float] | None = None):
        if not inners:
            raise ValueError(f"Field {name!r} (mix) needs at least one field.")
        weights = [1.0] * len(inners) if weights is None else [float(w) for w in weights]
        if len(weights) != len(inners) or not all(w > 0 for w in weights):
            raise ValueError(f"Field {name!r} (mix): give one positive weight per field.")
        self.name = name
        self.inners = list(inners)
        total = sum(weights)
        self.weights = [w / total for w in weights]

    @property
    def transformer(self) -> torch.nn.Module | None:
        models = {id(f.transformer): f.transformer for f in self.inners}
        return next(iter(models.values())) if len(models) == 1 else None

    @property
    def step_dependent(self) -> bool:
        return any(f.step_dependent for f in self.inners)

    def velocity(self, query: FieldQuery) -> torch.Tensor:
        total = None
        for weight, inner in zip(self.weights, self.inners):
            v = inner.velocity(query)
            total = weight * v.float() if total is None else total + weight * v.float()
        return total.to(query.x.dtype)

    def describe(self) -> str:
        parts = " + ".join(f"{w:.3g} {f.name}" for w, f in zip(self.weights, self.inners))
        return f"mix({parts})"
