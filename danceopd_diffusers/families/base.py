"""What a pipeline family must provide so the core never sees its conventions.

Inside the library there is one convention (the one of diffusers' FlowMatchEulerDiscreteScheduler):
``x_sigma = (1 - sigma) * x0 + sigma * noise``, velocity ``v = noise - x0``, sigma runs 1 -> 0, Euler step
``x_next = x + (sigma_next - sigma) * v``. States keep the layout the family's pipeline uses for its
``latents`` (so states recorded from a pipeline callback can be fed back unchanged). An adapter converts time,
sign, packing and conditioning at the edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch


@dataclass
class Conditioning:
    """Per-sample model inputs other than the state (prompt embeddings, source-image latents...).

    Every tensor has the batch as its first dimension so that conditionings can be sliced and concatenated.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: torch.Tensor | list[int]) -> Conditioning:
        index = torch.as_tensor(index, dtype=torch.long)
        return Conditioning({k: v[index.to(v.device)] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Moved (floating tensors also cast); host-side sizes (:data:`HOST_KEYS`) stay on the CPU, where reading
        them costs no device sync."""

        def move(k: str, t: torch.Tensor) -> torch.Tensor:
            if k in HOST_KEYS:
                return t
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning({k: move(k, v) for k, v in self.tensors.items()})

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items]) for k in keys})

    def merge(self, other: Conditioning) -> Conditioning:
        """Prompt conditioning + source-image conditioning of the same samples."""
        return Conditioning({**self.tensors, **other.tensors})

    @property
    def has_source(self) -> bool:
        return any(k.startswith(SOURCE_PREFIX) for k in self.tensors)

    def without_source(self) -> Conditioning:
        """The same prompts with the source image dropped (the image-free branch of image guidance)."""
        return Conditioning({k: v for k, v in self.tensors.items() if not k.startswith(SOURCE_PREFIX)})


#: keys of a Conditioning that carry the source image of an edit (families name theirs with this prefix)
SOURCE_PREFIX = "source_"
#: a Conditioning entry ([B] or [B, 1]) that overrides the embedded guidance input of guidance-distilled models
EMBEDDED_GUIDANCE = "embedded_guidance"
#: a Conditioning entry ([B, 2], rows and columns) with the token grid of a packed state. Packed tokens do not carry
#: their 2-D layout, and two grids of one area (32x64 and 64x32) have the same token count: the grid travels with
#: the sample (no source-prefix, so the image-free branch of image guidance keeps it) instead of being remembered
#: by the adapter, whose answer would then depend on the order of its calls.
TOKEN_GRID = "token_grid"
#: integer size entries read on the host (``int(...)``): :meth:`Conditioning.to` leaves them on the CPU
HOST_KEYS = frozenset({TOKEN_GRID, "edit_grid"})


#: the projections of a joint (text + image) attention block, as diffusers names them in Flux.1 and Flux.2's
#: double-stream blocks: the LoRA targets both families share
JOINT_ATTENTION_LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DistributedDataParallel / torch.compile wrappers (for its dtype and config)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def edit_size(width: int, height: int, resolution: int, multiple: int = 16) -> tuple[int, int]:
    """The size an edit is trained and sampled at: the source's aspect ratio, area ~ resolution^2.

    Both sides are rounded down to ``multiple`` (what the VAE and patching need). Returns (height, width).
    """
    scale = (resolution * resolution / (width * height)) ** 0.5
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return h, w


class FamilyAdapter:
    """Base class of the per-family edge. Subclasses set the class attributes and the methods below.

    What a family *is* (its name, pipeline classes, transformer class, whether it edits, its LoRA targets) are
    class facts: class attributes and classmethods, readable without an instance. An instance holds only the
    options of a run (text length, embedded guidance) and nothing that one call leaves for the next.
    """

    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    transformer_class_name: str = ""
    #: the class in pipelines/pipeline_danceopd.py that exported folders of this family use
    custom_pipeline_class_name: str = ""
    can_edit: bool = False
    #: attention projections; what diffusers' own LoRA training scripts target for this family.
    default_lora_targets: tuple[str, ...] = ()
    #: True when the text encoder also reads the source image of an edit (then prompts are encoded per sample)
    prompt_uses_source: bool = False
    #: True when the transformer takes an embedded guidance input (guidance-distilled checkpoints)
    has_embedded_guidance: bool = False
    #: the pipeline's per-sample loop tensors besides ``latents``, all in its ``_callback_tensor_inputs`` (with
    #: guidance off), so a rollout callback can drop finished samples; None where the loop holds others
    #: (Flux's pooled embeddings and guidance, Kontext's source latents, Qwen's prompt mask)
    ragged_inputs: tuple[str, ...] | None = None

    # -- classes (imported lazily so that `import danceopd_diffusers` stays cheap) --------------------------
    @classmethod
    def for_run(
        cls, max_sequence_length: int | None, embedded_guidance: float | None = None
    ) -> FamilyAdapter:
        """The adapter with the options a run sets, those this family has; an embedded guidance is refused where
        the family has none, with the fix."""
        import inspect

        from ..config import ConfigError

        accepted = inspect.signature(cls.__init__).parameters
        options: dict[str, Any] = {"max_sequence_length": max_sequence_length}
        if embedded_guidance is not None:
            if "embedded_guidance" not in accepted:
                raise ConfigError(
                    f"--embedded_guidance is an input of guidance-distilled Flux checkpoints; the {cls.name} family "
                    "has none. Drop the flag (use a cfg field for classifier-free guidance)."
                )
            options["embedded_guidance"] = embedded_guidance
        return cls(**{k: v for k, v in options.items() if k in accepted})

    @classmethod
    def pipeline_class(cls) -> type:
        """The diffusers pipeline class that loads this family's folders and runs the student's rollout."""
        raise NotImplementedError

    @classmethod
    def transformer_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.transformer_class_name)

    # -- conditioning -------------------------------------------------------------------------------------
    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, source_images: list | None = None
    ) -> Conditioning:
        """Prompt conditioning; ``source_images`` (PIL, at the edit size) only when ``prompt_uses_source``."""
        raise NotImplementedError

    def pipeline_condition_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        """Keyword arguments of the pipeline ``__call__`` that carry ``cond`` (precomputed embeddings)."""
        raise NotImplementedError

    # -- the velocity in the library convention --------------------------------------------------------
    def unguided_call_kwargs(self) -> dict[str, Any]:
        """Pipeline ``__call__`` arguments that turn every kind of guidance off (one model call per step)."""
        raise NotImplementedError

    def velocity(
        self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        raise NotImplementedError

    # -- latents -------------------------------------------------------------------------------------------
    def latent_shape(self, pipe: Any, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def default_resolution(self, pipe: Any) -> int:
        """The pipeline's own default size (its ``default_sample_size`` latents, in pixels)."""
        return pipe.default_sample_size * pipe.vae_scale_factor

    def size_call_kwargs(self, height: int, width: int) -> dict[str, Any]:
        """Pipeline ``__call__`` arguments that make it run at exactly ``height`` x ``width`` (besides those two).

        Derived from the call's own size, never from earlier calls: a rollout of one size and a rollout of another
        may be prepared in any order (gradient accumulation prepares all micro-steps before rolling any out).
        """
        return {}

    def size_conditioning(self, pipe: Any, batch_size: int, height: int, width: int) -> Conditioning:
        """Conditioning that tells :meth:`velocity` the layout of states of this size (empty where the state's
        shape already says it, as for channel-first latents)."""
        return Conditioning()

    def sigmas(
        self, pipe: Any, num_steps: int, latent_shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        """The pipeline's own sigma grid (N + 1 values, ending at 0) for this resolution and step count."""
        raise NotImplementedError

    def encode_images(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels in [-1, 1], [B, 3, H, W] -> clean latents x0 in the state layout.

        The default is an ``AutoencoderKL`` with ``shift_factor``/``scaling_factor`` and channel-first latents
        (SD3, Z-Image); families with another layout or VAE override it.
        """
        vae = pipe.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def decode_latents(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> list:
        """Clean latents in the state layout -> PIL images (the inverse of the default ``encode_images``)."""
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil")

    # -- editing (families with ``can_edit``) ---------------------------------------------------------------
    def encode_sources(
        self, pipe: Any, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> Conditioning:
        """Source images ([B, 3, H, W] in [-1, 1], already at the edit size) -> ``source_*`` conditioning.

        Called once per sample; the result is given identically to the student's rollout, its forward and the
        routed field (and kept by CFG's unconditional branch, which drops only the text).
        """
        raise NotImplementedError(f"The {self.name} family cannot edit.")


#: every registered family, by name, in registration order (the order families are listed to users)
FAMILIES: dict[str, type[FamilyAdapter]] = {}

_Family = TypeVar("_Family", bound=type[FamilyAdapter])


def register_family(cls: _Family) -> _Family:
    """Class decorator: offer ``cls`` under ``cls.name``. A family module registers its own adapters, so adding a
    family is its module (imported by ``families/__init__``), its pipeline classes and its tests."""
    if not cls.name or not cls.pipeline_class_names:
        raise TypeError(f"{cls.__name__} needs a name and its pipeline class names to be registered.")
    taken = FAMILIES.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"Two families are named {cls.name!r}: {taken.__name__} and {cls.__name__}.")
    FAMILIES[cls.name] = cls
    return cls


def family_for_pipeline_class(class_name: str) -> type[FamilyAdapter]:
    """The family of a pipeline class name (stock or exported), or say which pipelines are supported.

    Reading a ``model_index.json`` goes through ``stock_loading.family_of_index``, which calls this.
    """
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            return family
    supported = ", ".join(name for f in FAMILIES.values() for name in f.pipeline_class_names)
    raise ValueError(
        f"Pipeline class {class_name!r} is not supported by danceopd-diffusers. Supported pipelines: {supported}."
    )


def editing_families() -> list[str]:
    """Names of the registered families that can edit (for messages about edit routes)."""
    return [name for name, family in FAMILIES.items() if family.can_edit]


def token_grid_conditioning(batch_size: int, grid_h: int, grid_w: int) -> Conditioning:
    """A :data:`TOKEN_GRID` entry for ``batch_size`` samples whose states are ``grid_h`` x ``grid_w`` tokens."""
    return Conditioning({TOKEN_GRID: torch.tensor([[grid_h, grid_w]] * batch_size, dtype=torch.long)})


def token_grid_of(
    num_tokens: int, cond: Conditioning, source_grid: tuple[int, int] | None, what: str
) -> tuple[int, int]:
    """The (rows, cols) of a packed state with ``num_tokens`` tokens, from the sample's own conditioning only:
    its :data:`TOKEN_GRID` entry, else its source image's grid when that has as many tokens, else a square."""
    grid = cond.tensors.get(TOKEN_GRID)
    if grid is not None:
        rows, cols = (int(v) for v in grid[0])
        if rows * cols == num_tokens:
            return rows, cols
    if source_grid is not None and source_grid[0] * source_grid[1] == num_tokens:
        return source_grid
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    raise ValueError(
        f"Cannot tell the latent grid of a {what} state with {num_tokens} tokens: pass its size in the "
        "conditioning, cond.merge(family.size_conditioning(pipe, batch, height, width))."
    )


def token_count_mu(scheduler: Any, image_seq_len: int) -> float:
    """The dynamic shift's ``mu`` of the Flux / Qwen-Image / Z-Image pipelines: linear in the image token count
    between the two points of the scheduler's config."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def scheduler_sigmas(
    scheduler: Any, num_steps: int, device: torch.device, sigmas: Any = None, mu: float | None = None
) -> torch.Tensor:
    """The N + 1 sigmas the pipeline's ``__call__`` sets on ``scheduler`` from this grid and ``mu``."""
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.detach().clone().float().cpu()


def linspace_grid(scheduler: Any, num_steps: int) -> Any:
    """linspace(1, 1/N, N), or None when the scheduler makes its own (``use_flow_sigmas``), as the Flux pipelines."""
    import numpy as np

    return (
        None
        if getattr(scheduler.config, "use_flow_sigmas", False)
        else np.linspace(1.0, 1 / num_steps, num_steps)
    )


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
):
    """One Euler step with FlowMatchEulerDiscreteScheduler.step's exact arithmetic.

    dt is a float32 difference of float32 sigmas, ``dt * v`` runs in v's dtype, the sum in float32, and the
    result is cast to v's dtype: matching this bit for bit keeps field rollouts equal to the pipeline's in bf16.
    """
    sigmas = torch.tensor([float(sigma), float(sigma_next)], dtype=torch.float32, device=v.device)
    dt = sigmas[1] - sigmas[0]
    return (x.to(torch.float32) + dt * v).to(v.dtype)


class PackedTokenFamily(FamilyAdapter):
    """A family whose states are rows of tokens, one per 2x2 patch of latents (Flux, Flux.2): the token grid of a
    state cannot be read off its token count, so each sample's conditioning carries it (:data:`TOKEN_GRID`)."""

    @staticmethod
    def _latent_grid(pipe: Any, height: int, width: int) -> tuple[int, int]:
        """The token grid of ``height`` x ``width`` pixels: the VAE factor times the 2x2 patch, as the pipelines'
        ``prepare_latents`` (the latent grid must be even for the packing)."""
        multiple = pipe.vae_scale_factor * 2
        return int(height) // multiple, int(width) // multiple

    def size_conditioning(self, pipe: Any, batch_size: int, height: int, width: int) -> Conditioning:
        return token_grid_conditioning(batch_size, *self._latent_grid(pipe, height, width))

    def latent_shape(self, pipe: Any, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        """Packed ``(B, tokens, 4C)``."""
        grid_h, grid_w = self._latent_grid(pipe, height, width)
        return (batch_size, grid_h * grid_w, pipe.transformer.config.in_channels)
