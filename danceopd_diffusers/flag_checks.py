"""The training script's flags: bounds and conflicts, checked before anything is read or loaded.

Whole categories, not known cases: every float flag must be finite, every numeric flag has its range, and every
pair of flags that cannot go together is named with the fix. The script calls :func:`check_flags` at the end of
``parse_args``, so a bad command line never reaches the model.
"""

from __future__ import annotations

import argparse
import math

import torch
from accelerate.utils import is_tensorboard_available

from .config import ConfigError
from .logging_utils import get_logger

logger = get_logger(__name__)

#: lowest (and highest) value of each numeric flag; None bounds are open. Checked in check_flags.
NUMERIC_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "max_train_steps": (1, None, ""),
    "train_batch_size": (1, None, ""),
    "gradient_accumulation_steps": (1, None, ""),
    "checkpointing_steps": (1, None, "; pass a large number to save rarely"),
    "checkpoints_total_limit": (1, None, "; omit it to keep every checkpoint"),
    "validation_steps": (1, None, "; omit --validation_prompt to skip validation"),
    "num_rollout_steps": (2, None, ""),
    "query_k": (1, None, ""),
    "max_sequence_length": (1, None, ""),
    "rank": (1, None, ""),
    "lr_warmup_steps": (0, None, ""),
    "lr_num_cycles": (1, None, ""),
    "demo_eval_limit": (1, None, ""),
    "seed": (0, 2**32 - 1, ""),
    "resolution": (16, None, "; omit it for the model's default"),
    "max_grad_norm": (0, None, "; 0 turns clipping off"),
    "adam_weight_decay": (0, None, ""),
}
#: float flags that must be strictly positive
POSITIVE_FLAGS = {
    "learning_rate": "; 0 would train nothing",
    "lora_alpha": "",
    "adam_epsilon": "",
    "lr_power": "",
    "cfg_scale": "",
    "embedded_guidance": "",
}


def check_numbers(args: argparse.Namespace) -> None:
    """Zero, negative, NaN and out-of-range numbers, refused before anything loads."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{name} is {v}; pass a finite number.")
    for name, (low, high, hint) in NUMERIC_RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"--{name} is {value}; it must be {bounds}{hint}.")
    for name, hint in POSITIVE_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name} is {value}; it must be greater than 0{hint}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ConfigError(f"--{name} is {getattr(args, name)}; it must be in [0, 1).")
    for seed in args.validation_seeds or []:
        if not 0 <= seed < 2**32:
            raise ConfigError(f"--validation_seeds {seed}: seeds must be between 0 and {2**32 - 1}.")
    if not 0 < args.query_reference_shift <= 100:
        raise ConfigError(
            f"--query_reference_shift is {args.query_reference_shift}; it must be in (0, 100] (3.0 is the paper's)."
        )
    if args.query_space != "step" and args.method not in ("danceopd", "offpolicy"):
        raise ConfigError(
            f"--query_space {args.query_space} chooses which states are queried; --method {args.method} queries "
            + ("every state of the rollout" if args.method == "dense" else "no rollout")
            + ". Drop --query_space."
        )
    if args.learning_rate >= 1:  # AdamW moves every weight by about the learning rate per step
        logger.warning(
            f"--learning_rate {args.learning_rate:g} is far above AdamW's working range (1e-6 to 1e-2); "
            "the student will diverge. A typo? Pass e.g. --learning_rate 2e-4."
        )
    if args.query_k > args.num_rollout_steps:
        raise ConfigError(
            f"--query_k {args.query_k} is more than --num_rollout_steps {args.num_rollout_steps}: a rollout has only "
            f"that many states. Pass --query_k {args.num_rollout_steps} to query every state."
        )


def check_flags(args: argparse.Namespace) -> None:
    """Conflicting or impossible flags, before anything loads."""
    if args.cuda_graphs and not torch.cuda.is_available():
        raise ConfigError("--cuda_graphs needs a CUDA device, and none is available here: drop the flag.")
    from_flags = [
        f for f in ("cfg_scale", "expert_lora", "expert_checkpoint") if getattr(args, f) is not None
    ]
    if args.demo_eval_limit is not None and not args.demo:
        raise ConfigError(
            "--demo_eval_limit applies only to the embedded default (no --pretrained_model_name_or_path); to score "
            "a model, run `python -m danceopd_diffusers.shapesworld.evaluate --pipeline OUTPUT_DIR --limit N`."
        )
    if args.fields_config and from_flags:
        raise ConfigError(
            f"--fields_config and --{from_flags[0]} both given. Declare every field in the config file, or drop "
            "--fields_config to use the flags alone."
        )
    if args.method == "sft" and from_flags:
        raise ConfigError(
            f"--method sft trains on dataset targets and uses no field; drop --{from_flags[0]}."
        )
    if args.full_finetune and args.lora_layers:
        raise ConfigError("--lora_layers has no effect with --full_finetune; drop one of them.")
    demo_set = getattr(args, "demo_overrides", {})
    ignored = [f for f in ("rank", "lora_alpha") if getattr(args, f) is not None and f not in demo_set]
    if args.full_finetune and ignored:  # kept a warning: scripts that switch --full_finetune on keep working
        logger.warning(f"--{ignored[0]} has no effect with --full_finetune (no LoRA is trained); drop it.")
    check_numbers(args)
    if args.routing == "soft" and args.method == "sft":
        raise ConfigError("--routing soft mixes fields' targets; --method sft uses no field. Drop --routing.")
    if args.per_sample_routing and args.method == "sft":
        raise ConfigError(
            "--per_sample_routing has no meaning for --method sft (buckets are drawn per step)."
        )
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ConfigError(
            "--report_to wandb with --hub_token would expose the token; log in with `hf auth login` instead."
        )
    if args.hub_strategy != "end" and not args.push_to_hub:
        raise ConfigError(f"--hub_strategy {args.hub_strategy} pushes to the Hub: add --push_to_hub.")
    if args.resolution is not None and args.resolution % 16:
        raise ConfigError(f"--resolution {args.resolution} must be a multiple of 16.")
    if not 0.0 <= args.caption_dropout_prob < 1.0:
        raise ConfigError("--caption_dropout_prob must be in [0, 1).")
    from diffusers.optimization import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if args.lr_scheduler not in schedulers:
        raise ConfigError(
            f"--lr_scheduler {args.lr_scheduler!r} is not a scheduler of diffusers; use one of {schedulers}."
        )
    check_trackers(args.report_to)
    if args.report_to == "tensorboard" and not is_tensorboard_available():  # the default: not an error
        logger.info("tensorboard is not installed: logging to the console only (pip install tensorboard)")
        args.report_to = "none"


def check_trackers(report_to: str) -> None:
    """A tracker named in --report_to must be one accelerate knows and be installed (the default tensorboard
    falls back to console logging instead)."""
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in report_to.split(","):
        if name in ("none", "", "all", "tensorboard"):
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"--report_to {name!r} is not a tracker accelerate knows; use one of {sorted(LOGGER_TYPE_TO_CLASS)} or none."
            )
        if not getattr(accelerate.utils, f"is_{name}_available")():
            raise ConfigError(
                f"--report_to {name} but {name} is not installed: pip install {name}, or pass --report_to none."
            )
