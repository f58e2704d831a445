#!/usr/bin/env python
# Copyright 2026 The danceopd-diffusers authors. Apache-2.0.
"""DanceOPD: on-policy generative field distillation for diffusers flow-matching pipelines.

    accelerate launch train_danceopd.py                       # embedded default: ShapesWorld fusion, offline, CPU
    accelerate launch train_danceopd.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \
        --fields_config fields.yaml --dataset_name prompts.jsonl --output_dir my-student

Each optimizer step draws one route (a field and its data bucket), rolls the student out through the real
pipeline call, queries the routed field at one low-noise state of that trajectory (a pipeline callback) and
regresses the student's velocity onto it.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import copy
import functools
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from danceopd_diffusers.checkpointing import checkpoint_step
from danceopd_diffusers.cli import ArgumentParser
from danceopd_diffusers.config import (
    EDIT_ONLY_TYPES,
    ConfigError,
    FieldsConfig,
    FieldSpec,
    RouteSpec,
    config_from_flags,
    parse_fields_config,
)
from danceopd_diffusers.data import (
    DataColumns,
    TaskBuckets,
    fit_image,
    images_to_tensor,
    load_training_dataset,
)
from danceopd_diffusers.families import Conditioning, edit_size, editing_families
from danceopd_diffusers.hub import HUB_STRATEGIES
from danceopd_diffusers.lora_io import inspect_lora, load_lora_for_diffusers
from danceopd_diffusers.objectives import (
    DENSE_WEIGHTINGS,
    METHODS,
    RoutedTargets,
    TrainingStates,
    off_policy_states,
    on_policy_states,
    sample_sft_sigmas,
    sft_states,
    velocity_mse,
)
from danceopd_diffusers.output_dir import OutputFolder, check_apart, run_inputs
from danceopd_diffusers.preflight import (
    check_fields_against_model,
    check_lora_file,
    check_lora_targets,
    check_output_dir,
    check_something_to_distill,
    check_transformer_checkpoint,
    describe_load_error,
    inspect_pipeline,
    load_errors,
    lora_base_rank,
    student_init_lora_config,
)
from danceopd_diffusers.rollout import (
    LOW_QUERY_SIGMA,
    PAPER_REFERENCE_SHIFT,
    QUERY_SPACES,
    QUERY_STRATEGIES,
    QueryLaw,
)
from danceopd_diffusers.routing import ROUTINGS, Router, soft_routes, step_generator
from danceopd_diffusers.shapesworld import demo
from danceopd_diffusers.stopping import (
    Interrupted,
    NonFiniteError,
    StopOnSignal,
    WeightGuard,
    check_loaded_finite,
    describe_nonfinite,
)
from danceopd_diffusers.student import STUDENT_ADAPTER

logger = logging.getLogger("danceopd")
DEFAULT_RANK = 128


EPILOG = """examples:
  # the embedded default: DanceOPD on ShapesWorld from the shipped sources (offline, about 4 minutes on 2 cores)
  accelerate launch train_danceopd.py

  # absorb CFG 3.5 of a base model into a CFG-free student
  accelerate launch train_danceopd.py --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
      --cfg_scale 3.5 --dataset_name prompts.jsonl --resolution 1024 --mixed_precision bf16

  # several experts and operators, routed by the data's task column (see README: the fields config)
  accelerate launch train_danceopd.py --pretrained_model_name_or_path ./base --fields_config fields.yaml \\
      --dataset_name data/train.jsonl --output_dir my-student

  # push to the Hub while training, then resume the run anywhere from the Hub's newest checkpoint
  accelerate launch train_danceopd.py ... --push_to_hub --hub_model_id you/my-student --hub_strategy checkpoint
  accelerate launch train_danceopd.py ... --resume_from_checkpoint you/my-student:latest

Without --resolution / --max_sequence_length, the base's own training size and text length are used (an exported
folder's danceopd_config.json, else the model's configs); the run prints what it chose and why.
"""


def _demo_epilog() -> str:
    """The defaults the embedded default changes, as flags (printed by --help, so they cannot drift)."""
    shown = []
    for key, value in demo.DEMO_DEFAULTS.items():
        if key == "validation_prompt":
            continue
        if value is True:
            shown.append(f"--{key}")
        else:
            shown.append(f"--{key} {Path(value).name if key == 'fields_config' else value}")
    import textwrap

    text = (
        "With no --pretrained_model_name_or_path (the embedded default), options left at their default take these "
        "values instead: " + " ".join(shown)
    )
    return "\n" + textwrap.fill(text, width=110, break_on_hyphens=False) + "\n"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (not the empty ones: None, off switches; the help says what
    happens then); the epilog's examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(  # a bad flag: one error line and a "did you mean", not the usage block
        description=__doc__.split("\n\n")[0], epilog=EPILOG + _demo_epilog(), formatter_class=HelpFormatter
    )
    # model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Flow-matching pipeline (folder or Hub id). Omit it to run the embedded offline demo.",
    )
    parser.add_argument(
        "--revision", type=str, default=None, help="Git revision (branch, tag or commit) of a Hub model."
    )
    parser.add_argument("--variant", type=str, default=None, help="Weight file variant to load, e.g. fp16.")
    # fields and routes
    parser.add_argument(
        "--fields_config", type=str, default=None, help="YAML/JSON file with `fields` and `routes`."
    )
    parser.add_argument(
        "--cfg_scale",
        type=float,
        default=None,
        help="Without --fields_config: absorb CFG with this scale (of the base, or of the expert).",
    )
    parser.add_argument(
        "--expert_lora", type=str, default=None, help="Without --fields_config: one LoRA expert."
    )
    parser.add_argument(
        "--expert_checkpoint",
        type=str,
        default=None,
        help="Without --fields_config: one full-checkpoint expert (folder or .safetensors).",
    )
    # method
    parser.add_argument(
        "--method",
        type=str,
        default="danceopd",
        choices=METHODS,
        help="danceopd: on-policy (the paper); dense: every state of the rollout (DiffusionOPD); offpolicy: the routed field's own rollout; sft: flow-matching fine-tuning on the dataset's target images.",
    )
    parser.add_argument(
        "--num_rollout_steps", type=int, default=16, help="N: the pipeline's inference steps."
    )
    parser.add_argument(
        "--query_strategy",
        type=str,
        default="low",
        choices=QUERY_STRATEGIES,
        help="low = Beta(5,2) (paper), mid = Beta(5,5), high = Beta(2,5), uniform.",
    )
    parser.add_argument(
        "--query_space",
        type=str,
        default="step",
        choices=QUERY_SPACES,
        help="step (the paper's sampler): --query_strategy is drawn over this run's N states, so the noise level it "
        "reaches depends on the pipeline's sigma grid (shift, resolution); sigma: the same law read on a reference "
        "grid of shift --query_reference_shift, queried at that sigma on this run's grid, so it means the same noise "
        "levels on every pipeline. The start-up log prints the queried sigma either way.",
    )
    parser.add_argument(
        "--query_reference_shift",
        type=float,
        default=PAPER_REFERENCE_SHIFT,
        help="--query_space sigma only: the static shift of the reference grid; 3.0 is the paper's Z-Image grid "
        "(mean queried sigma 0.55 for low).",
    )
    parser.add_argument(
        "--query_k",
        type=int,
        default=1,
        help="K: distinct states queried per rollout; K >= --num_rollout_steps queries every state once.",
    )
    parser.add_argument(
        "--dense_weighting",
        type=str,
        default="uniform",
        choices=DENSE_WEIGHTINGS,
        help="dense only: uniform = 0.5/N^2 per state (the official DiffusionOPD code), "
        "step = (sigma_i - sigma_i+1)^2/2 of the shifted grid.",
    )
    parser.add_argument(
        "--routing",
        type=str,
        default="hard",
        choices=ROUTINGS,
        help="hard: each sample's target is its route's field (the paper); soft: the weighted mean of every routed "
        "field, weighted by route weight (the soft-mixing ablation; each route keeps its data bucket).",
    )
    parser.add_argument(
        "--per_sample_routing",
        action="store_true",
        help="Draw a route per sample instead of one per optimizer step.",
    )
    parser.add_argument(
        "--batch_rollouts",
        action="store_true",
        help="Roll out the samples of all --gradient_accumulation_steps micro-steps of an optimizer step in one "
        "pipeline call, and train the student on all their states in one forward and backward (danceopd, dense): "
        "fewer, larger calls where a small batch leaves the GPU idle. The gradients are the sequential "
        "micro-steps' (to round-off); micro-steps whose edits differ in size run one by one.",
    )
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default="logit_normal",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
        help="sft only: how sigma is drawn; sigma_sqrt and cosmap also weight the loss, as diffusers' SD3 example.",
    )
    parser.add_argument(
        "--caption_dropout_prob",
        type=float,
        default=0.0,
        help="sft only: share of prompts replaced by '' so the model keeps an unconditional field.",
    )
    # data
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset id, or a local csv/json/jsonl/parquet file.",
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Config name of a Hub dataset.")
    parser.add_argument(
        "--train_data_dir", type=str, default=None, help="Local image folder or folder with train.jsonl."
    )
    parser.add_argument(
        "--caption_column",
        type=str,
        default="prompt",
        help="Column holding the prompt (the instruction, for edits).",
    )
    parser.add_argument(
        "--task_column",
        type=str,
        default="task",
        help="Column naming each row's bucket, which routes draw from (absent: every row is t2i).",
    )
    parser.add_argument(
        "--source_image_column",
        type=str,
        default="source_image",
        help="Column holding an edit's source image (image or path).",
    )
    parser.add_argument(
        "--image_column",
        type=str,
        default="target_image",
        help="Column holding the target image (read by --method sft only).",
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where Hub datasets are cached.")
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every routed row's VAE latents (sft targets, edit sources) and prompts before training, 64 per "
        "encoder call, and keep them on the device, so images are read and encoded once. Needs memory for the whole "
        "dataset's latents (prompt embeddings stop at 4 GiB; the rest are encoded on first use).",
    )
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="Text tokens per prompt. Default: what the base was trained with (an exported folder's "
        "danceopd_config.json, else its T5/LLM tokenizer's model_max_length if below 256), else 256.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Square training/rollout resolution (edits keep their source's aspect ratio at this area). Default: "
        "what the base was trained at (danceopd_config.json, else its transformer/VAE sample_size), else the "
        "pipeline's default.",
    )
    parser.add_argument(
        "--embedded_guidance",
        type=float,
        default=None,
        help="Guidance-distilled checkpoints (Flux.1-dev, Kontext): the embedded guidance input given to the "
        "student's rollout and every field (default: the family's, 3.5). Not CFG.",
    )
    # student
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help=f"LoRA rank (default {DEFAULT_RANK}; with --student_init: the file's).",
    )
    parser.add_argument(
        "--lora_alpha", type=float, default=None, help="Defaults to --rank (with --student_init: the file's)."
    )
    parser.add_argument(
        "--lora_layers",
        type=str,
        default=None,
        help="Comma-separated module names for the student LoRA (default: attention projections).",
    )
    parser.add_argument(
        "--full_finetune", action="store_true", help="Train every transformer weight, not a LoRA."
    )
    parser.add_argument(
        "--student_init",
        type=str,
        default=None,
        help="Start from a LoRA (file/folder/Hub id; continued at its own alpha, --rank must match it) or a full "
        "transformer checkpoint.",
    )
    # optimisation
    parser.add_argument(
        "--train_batch_size",
        type=int,
        default=1,
        help="Samples per process per micro-step (rollouts are batched).",
    )
    parser.add_argument("--max_train_steps", type=int, default=3000, help="Optimizer steps.")
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=4,
        help="Micro-steps per optimizer step (all share the step's route).",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Trade compute for memory in the student's backward.",
    )
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="AdamW learning rate.")
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps x batch size x processes.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="diffusers scheduler: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial.",
    )
    parser.add_argument(
        "--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the learning-rate scheduler."
    )
    parser.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    parser.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    parser.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    parser.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Clip the gradient norm to this (0: no clipping)."
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Default: accelerate's setting (`accelerate launch --mixed_precision`, `accelerate config`), else "
        "'no'. The paper trains in bf16: pass bf16 on GPUs. The value used is logged and recorded in the card.",
    )
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    parser.add_argument(
        "--disable_cudnn_attention",
        action="store_true",
        help="Use flash / memory-efficient attention instead of cuDNN's (its backward fails on FLUX shapes with "
        "torch 2.11: `mha_graph.execute(...).is_good()`).",
    )
    parser.add_argument(
        "--cuda_graphs",
        action="store_true",
        help="Replay the transformer's no-grad calls (rollout steps, field targets) as CUDA graphs, one per "
        "distinct call: removes the host overhead that bounds small batches. Needs CUDA; costs one graph memory "
        "pool per distinct call.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed of every random draw (routes, rows, noise, queried states); random if omitted. A resumed run with the same seed continues exactly.",
    )
    # outputs, checkpoints, logging
    parser.add_argument(
        "--output_dir",
        type=str,
        default="danceopd-output",
        help="Where the LoRA, the pipeline folder, the model card, samples, checkpoints and logs go.",
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Allow replacing another kind of output in --output_dir (a LoRA by a full fine-tune or back).",
    )
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, under --output_dir.")
    parser.add_argument(
        "--report_to", type=str, default="tensorboard", help="Tracker: tensorboard, wandb or none."
    )
    parser.add_argument(
        "--tracker_project_name", type=str, default="danceopd", help="Project name given to the tracker."
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint-<step>/ every this many steps.",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints (oldest removed first); default: all.",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="`latest` or a checkpoint name in --output_dir, or a checkpoint on the Hub: "
        "`<repo_id>:checkpoint-<step>` or `<repo_id>:latest` (downloaded into --output_dir first).",
    )
    parser.add_argument(
        "--validation_prompt",
        type=str,
        nargs="+",
        default=None,
        help="Prompts of the validation grid: the student without CFG beside each routed field.",
    )
    parser.add_argument(
        "--validation_seeds",
        type=int,
        nargs="+",
        default=[0],
        help="Seeds of the validation grid (one row per prompt and seed).",
    )
    parser.add_argument(
        "--validation_steps", type=int, default=500, help="Write a validation grid every this many steps."
    )
    parser.add_argument(
        "--skip_pipeline_export",
        action="store_true",
        help="Write only the LoRA / transformer and model card, not the full pipeline folder.",
    )
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Push the outputs to the Hub (checked before training: token, repo, network).",
    )
    parser.add_argument(
        "--hub_strategy",
        type=str,
        default="end",
        choices=HUB_STRATEGIES,
        help="With --push_to_hub, as transformers' Trainer: end = the final outputs only; every_save = also the "
        "student's weights at every checkpoint; checkpoint = also the newest checkpoint-<step>/ folder, so "
        "`--resume_from_checkpoint <repo_id>:latest` continues the run anywhere. Uploads run in the background.",
    )
    parser.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="Hub repo to push to (default: the output folder's name).",
    )
    parser.add_argument(
        "--hub_token", type=str, default=None, help="Hub token (default: the one `hf auth login` stored)."
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher; do not pass it.")
    parser.add_argument(
        "--demo_eval_limit",
        type=int,
        default=None,
        help="Embedded default only: score the student on N prompts and N edits of ShapesWorld's evaluation set "
        "(the first of each category in turn) instead of all of it.",
    )

    args = parser.parse_args(input_args)
    args.demo = args.pretrained_model_name_or_path is None
    if args.demo:
        # what the command line set, even to a parser default (e.g. --learning_rate 2e-4): the demo fills the rest
        unset = object()
        probe = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
        given = {k for k, v in vars(parser.parse_args(input_args, namespace=probe)).items() if v is not unset}
        args.demo_overrides = {}
        user_fields = any(f in given for f in demo.FIELD_FLAGS)
        for key, value in demo.DEMO_DEFAULTS.items():
            if key in given:
                continue
            if key in demo.FIELDS_DEFAULTS and user_fields:
                continue
            if key == "student_init" and any(f in given for f in demo.FRESH_STUDENT_FLAGS):
                continue  # a fresh LoRA of the user's rank, or a full fine-tune, from the base
            setattr(args, key, value)
            args.demo_overrides[key] = value
    check_flags(args)
    if args.rank is None and not args.full_finetune and not args.student_init:
        args.rank = DEFAULT_RANK  # with --student_init, a LoRA's own rank (main)
    return args


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
        print(
            f"warning: --learning_rate {args.learning_rate:g} is far above AdamW's working range (1e-6 to 1e-2); "
            "the student will diverge. A typo? Pass e.g. --learning_rate 2e-4.",
            file=sys.stderr,
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
        print(
            f"warning: --{ignored[0]} has no effect with --full_finetune (no LoRA is trained); drop it.",
            file=sys.stderr,
        )
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


def build_family(family_cls: type, args: argparse.Namespace):
    """The family adapter with the options this run sets (only those the family has)."""
    import inspect

    accepted = inspect.signature(family_cls.__init__).parameters
    options = {"max_sequence_length": args.max_sequence_length}
    if args.embedded_guidance is not None:
        if "embedded_guidance" not in accepted:
            raise ConfigError(
                f"--embedded_guidance is an input of guidance-distilled Flux checkpoints; the {family_cls.name} family "
                "has none. Drop the flag (use a cfg field for classifier-free guidance)."
            )
        options["embedded_guidance"] = args.embedded_guidance
    return family_cls(**{k: v for k, v in options.items() if k in accepted})


def resolve_fields(args: argparse.Namespace) -> FieldsConfig:
    if args.method == "sft":  # routes are filled with one per data bucket; the field is never queried
        if args.fields_config:
            return parse_fields_config(args.fields_config)
        return FieldsConfig(fields={"base": FieldSpec("base", "base")}, routes=[])
    if args.fields_config:
        config = parse_fields_config(args.fields_config)
    else:
        config = config_from_flags(args.cfg_scale, args.expert_lora, args.expert_checkpoint)
    return soft_routes(config) if args.routing == "soft" else config


def main(args: argparse.Namespace) -> None:
    """A training run; what it holds open (the output folder's lock, its staging folder) is released however it
    ends."""
    with contextlib.ExitStack() as stack:
        _train(args, stack)


def _train(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    from danceopd_diffusers.known_warnings import silence_known_warnings

    silence_known_warnings()
    # ---------------------------------------------------------------- checks that load no weights
    # the files the user named first (fields config, data), then the model's configs, then the output folder
    fields_config = resolve_fields(args)
    columns = DataColumns(args.caption_column, args.task_column, args.source_image_column, args.image_column)
    if args.demo and args.dataset_name is None and args.train_data_dir is None:
        args.dataset_name = demo.demo_data_file()
    dataset, data_dir = load_training_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir
    )
    buckets = TaskBuckets(dataset, columns, data_dir)
    if args.demo:
        args.pretrained_model_name_or_path = demo.base_path()
    info = inspect_pipeline(args.pretrained_model_name_or_path, revision=args.revision)
    from danceopd_diffusers.defaults import describe_fallback_resolution, fill_trained_defaults

    chosen = fill_trained_defaults(args, args.pretrained_model_name_or_path, args.revision)
    family = build_family(info.family_cls, args)
    check_fields_against_model(fields_config, info)
    if args.method != "sft":
        check_something_to_distill(fields_config, warm_start=bool(args.student_init))
    student_targets = (
        [t.strip() for t in args.lora_layers.split(",")]
        if args.lora_layers
        else list(family.default_lora_targets)
    )
    if not args.full_finetune:
        check_lora_targets(student_targets, info.module_names, "--lora_layers")
    init_is_lora = False
    if args.student_init:
        from danceopd_diffusers.lora_io import resolve_lora_file

        if not os.path.exists(args.student_init) and args.student_init.count("/") != 1:
            raise ConfigError(
                f"--student_init {args.student_init} does not exist: pass a LoRA (file, folder or Hub id) or a "
                "transformer checkpoint (diffusers folder or .safetensors file)."
            )
        try:
            init_file = resolve_lora_file(args.student_init, what="--student_init")
            init_header = inspect_lora(init_file, "--student_init")
            init_is_lora = bool(init_header.modules)
        except FileNotFoundError:
            init_is_lora = False
        if args.rank is None and not args.full_finetune:
            args.rank = lora_base_rank(init_header) if init_is_lora else DEFAULT_RANK
        if init_is_lora:
            check_lora_file(
                init_header,
                info.module_names,
                "--student_init",
                expected_rank=None if args.full_finetune else args.rank,
                linear_features=info.linear_features,
            )
        if init_is_lora and not args.full_finetune:
            student_targets = init_header.target_modules or sorted(init_header.modules)
            # the student continues the file's LoRA at the file's own scale (alpha and patterns)
            init_lora_config = student_init_lora_config(init_header, args.rank, args.lora_alpha)
            args.lora_alpha = init_lora_config["lora_alpha"]
        if not init_is_lora:
            check_transformer_checkpoint(args.student_init, None, info, "--student_init")
    if args.method == "sft" and not fields_config.routes:
        fields_config.routes = [RouteSpec(field="base", task=t) for t in sorted(buckets.buckets)]
    if args.per_sample_routing and len({buckets.is_edit_bucket(r.task) for r in fields_config.routes}) > 1:
        raise ConfigError(
            "--per_sample_routing would put edit and text-to-image samples in one batch, which cannot share a "
            "rollout. Use per-step routing (drop --per_sample_routing): each step then draws one bucket."
        )
    for route in fields_config.routes:
        edit_only = [s.name for s in fields_config.resolve_chain(route.field) if s.type in EDIT_ONLY_TYPES]
        if edit_only and not buckets.is_edit_bucket(route.task):
            raise ConfigError(
                f"Route to {route.field!r} uses image guidance ({edit_only[0]!r}) on bucket {route.task!r}, which "
                "has no source images. Route it to an edit bucket or use a cfg field."
            )
    buckets.check_routes(
        fields_config.routes,
        need_target=args.method == "sft",
        can_edit=family.can_edit,
        editing_families=editing_families(),
    )

    # the output folder: apart from every folder the run reads (before anything is written there), writable
    check_apart(args.output_dir, *run_inputs(args, fields_config))
    check_output_dir(args.output_dir)

    # ---------------------------------------------------------------- the Hub: token, repo, Hub resume
    from danceopd_diffusers import hub

    repo_id = None
    if args.push_to_hub:
        repo_id = hub.prepare_push(args.hub_model_id or Path(args.output_dir).name, token=args.hub_token)
    hub_resume = None
    if hub.parse_hub_resume(args.resume_from_checkpoint):
        hub_resume = hub.resolve_hub_checkpoint(args.resume_from_checkpoint, args.output_dir, args.hub_token)

    # ---------------------------------------------------------------- output folder: lock, resume, kind
    from accelerate.utils.environment import get_int_from_env

    # one owner of the output folder (the first thing written to it): the main process, global rank 0 as
    # accelerate reads it, holds its lock
    owner = stack.enter_context(
        OutputFolder(
            args.output_dir,
            main_process=get_int_from_env(
                ["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0
            )
            == 0,
            overwrite=args.overwrite_output_dir,
            full_finetune=args.full_finetune,
        ).open()
    )
    from danceopd_diffusers.export import _public, base_model_reference

    run_settings = {  # recorded with each checkpoint; resuming under other settings is refused
        "base_model": base_model_reference(args.pretrained_model_name_or_path)["name"],
        "revision": args.revision,
        "method": args.method,
        "full_finetune": args.full_finetune,
        "rank": None if args.full_finetune else args.rank,
        "lora_alpha": None if args.full_finetune else args.lora_alpha or args.rank,
        "targets": None if args.full_finetune else sorted(student_targets),
        "fields_config": _public(fields_config.to_dict()),  # no machine paths: checkpoints may be pushed
    }
    if (
        args.query_space != "step"
    ):  # (absent for the paper's law: checkpoints of earlier versions still resume)
        run_settings["query_law"] = [args.query_space, args.query_reference_shift]
    resume_path = None
    if hub_resume is None:  # a Hub checkpoint is checked once downloaded, still before any weights load
        resume_path = owner.resume(args.resume_from_checkpoint, run_settings)

    # ---------------------------------------------------------------- accelerator
    logging_dir = Path(args.output_dir, args.logging_dir)
    from accelerate.utils import is_tensorboard_available

    if args.report_to == "tensorboard" and not is_tensorboard_available():
        print(
            "[danceopd] tensorboard is not installed: logging to the console only (pip install tensorboard)"
        )
        args.report_to = "none"
    # Several processes on a machine without CUDA (`accelerate launch --multi_gpu --num_processes 2` on CPU):
    # run them as gloo CPU processes instead of independent single-process runs.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in ("none", "") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    from danceopd_diffusers.distributed import (
        check_engine,
        end_training,
        full_state_dict,
        gathered,
        unsharded_copy,
    )

    check_engine(accelerator, args.full_finetune, args.cuda_graphs)
    log = get_logger("danceopd")
    precision_from = "--mixed_precision"
    if not args.mixed_precision:
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
        precision_from = (
            "`accelerate launch` / accelerate config" if launched else "default: no accelerate setting"
        )
    args.mixed_precision = accelerator.mixed_precision  # what the card and danceopd_config.json record
    accelerator.print(f"[danceopd] mixed precision: {args.mixed_precision} (from {precision_from})")
    if args.mixed_precision == "no" and torch.cuda.is_available():
        accelerator.print(
            "[danceopd] training in fp32; the paper's recipe is bf16: pass --mixed_precision bf16"
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.seed is None:
        args.seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        seed_tensor = torch.tensor([args.seed], device=accelerator.device)
        from accelerate.utils import broadcast

        args.seed = int(broadcast(seed_tensor, 0).item())
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.demo:
            print(
                "[danceopd] embedded demo: DanceOPD on ShapesWorld (text-to-image + local edits + global edits) "
                f"from the shipped sources at {demo.SOURCES}; settings {args.demo_overrides}",
                flush=True,
            )
        for line in chosen:
            print(f"[danceopd] {line}", flush=True)
    hub_pusher = None
    if repo_id and accelerator.is_main_process:
        hub_pusher = hub.HubPusher(repo_id, args.output_dir, args.hub_strategy, token=args.hub_token)
    if hub_resume is not None:
        if accelerator.is_main_process:
            path = hub.download_hub_checkpoint(hub_resume, args.output_dir, token=args.hub_token)
            print(f"[danceopd] downloaded {hub_resume.repo_id}:{hub_resume.name} to {path}", flush=True)
        accelerator.wait_for_everyone()
        args.resume_from_checkpoint = hub_resume.name
        resume_path = owner.resume(args.resume_from_checkpoint, run_settings)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.disable_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)

    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16
    # A full fine-tune keeps fp32 master weights and computes under autocast, as diffusers' full fine-tuning
    # examples do: Adam's small updates vanish in half-precision weights. Frozen models stay in weight_dtype.
    student_dtype = torch.float32 if args.full_finetune else weight_dtype

    # ---------------------------------------------------------------- models
    from danceopd_diffusers.field_loading import load_pipeline

    with load_errors("--pretrained_model_name_or_path", args.pretrained_model_name_or_path):
        pipe = load_pipeline(
            family,
            args.pretrained_model_name_or_path,
            info.custom_pipeline,
            revision=args.revision,
            variant=args.variant,
            dtype={"transformer": student_dtype, "default": weight_dtype},
        )
    pipe.set_progress_bar_config(disable=True)
    check_loaded_finite(pipe, f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    init_is_checkpoint = bool(args.student_init) and not init_is_lora
    if init_is_checkpoint:
        from danceopd_diffusers.field_loading import load_transformer

        with load_errors("--student_init", args.student_init):
            pipe.transformer = load_transformer(
                family,
                args.student_init,
                None,
                student_dtype,
                config_source=args.pretrained_model_name_or_path,
            )
        pipe.transformer.requires_grad_(False)
        check_loaded_finite(pipe.transformer, f"--student_init {args.student_init}")
    pipe.to(accelerator.device)
    transformer = pipe.transformer
    scope = None
    if args.full_finetune:
        if init_is_lora:
            from danceopd_diffusers.student import load_lora_into_adapter

            load_lora_into_adapter(transformer, *load_lora_for_diffusers(init_file), adapter_name="init")
            transformer.fuse_lora(adapter_names=["init"])
            transformer.unload_lora()
        transformer.requires_grad_(True)
    else:
        from danceopd_diffusers.student import AdapterScope, add_student_lora

        if init_is_lora:
            from danceopd_diffusers.student import load_lora_into_adapter

            state, _ = load_lora_for_diffusers(init_file)
            load_lora_into_adapter(transformer, state, init_lora_config, adapter_name=STUDENT_ADAPTER)
        else:
            add_student_lora(transformer, args.rank, args.lora_alpha or args.rank, student_targets)
        scope = AdapterScope(transformer)
    from danceopd_diffusers.field_loading import build_fields

    shares_base = scope is not None and not init_is_checkpoint
    with load_errors("--fields_config / --expert_*", "the fields' weights"):
        fields = build_fields(
            fields_config,
            family,
            args.pretrained_model_name_or_path,
            transformer,
            scope if shares_base else None,
            weight_dtype,
            accelerator.device,
            args.revision,
        )
    if scope is not None:
        scope.refresh()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not args.full_finetune:
        for p in params:  # LoRA weights train in fp32 under mixed precision
            p.data = p.data.float()
    if args.scale_lr:
        args.learning_rate *= (
            args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        )
    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    # ---------------------------------------------------------------- checkpoint hooks
    def unwrap(model):
        model = accelerator.unwrap_model(model)
        return model._orig_mod if hasattr(model, "_orig_mod") else model

    def save_model_hook(models, weights, output_dir):
        for model in models:
            model = unwrap(model)
            state = full_state_dict(accelerator, model)  # every rank joins the gathering of a sharded model
            if accelerator.is_main_process:
                from danceopd_diffusers.export import save_student_lora

                if state is not None:
                    model = unsharded_copy(model, state)
                if args.full_finetune:
                    model.save_pretrained(os.path.join(output_dir, "transformer"))
                else:
                    save_student_lora(model, family, output_dir, STUDENT_ADAPTER)
                if weights:
                    weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            model = unwrap(models.pop())
            if args.full_finetune:
                loaded = family.transformer_class().from_pretrained(
                    input_dir,
                    subfolder="transformer",
                    use_safetensors=True,  # never a pickle
                )
                model.load_state_dict(loaded.state_dict())
                del loaded
            else:
                from peft import set_peft_model_state_dict

                state, _ = load_lora_for_diffusers(
                    os.path.join(input_dir, "pytorch_lora_weights.safetensors")
                )
                state = {k[len("transformer.") :]: v for k, v in state.items()}
                result = set_peft_model_state_dict(model, state, adapter_name=STUDENT_ADAPTER)
                if getattr(result, "unexpected_keys", None):
                    raise RuntimeError(
                        f"Checkpoint {input_dir} does not match the student: {result.unexpected_keys[:3]}"
                    )
                for p in model.parameters():
                    if p.requires_grad:
                        p.data = p.data.float()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    transformer_ddp, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    # FSDP2 shards pipe.transformer in place, with new parameters: clip (and switch adapters on) those
    params = [p for p in transformer.parameters() if p.requires_grad]
    if scope is not None:
        scope.refresh()
    graphed = None
    if args.cuda_graphs:  # after prepare: accelerate's autocast wrapper of the forward is captured too
        from danceopd_diffusers.cuda_graphs import GraphedNoGradForward

        graphed = GraphedNoGradForward(transformer)
    from danceopd_diffusers.student import mode_switch

    set_training = mode_switch(transformer)  # train()/eval() around each rollout without the recursive walk

    # ---------------------------------------------------------------- state before the loop
    from danceopd_diffusers.caches import PromptCache, SourceCache, TargetCache

    cache_size = len(buckets.dataset) + 1 if args.cache_latents else 4096
    prompt_cache = PromptCache(pipe, family, accelerator.device)
    source_cache = SourceCache(pipe, family, accelerator.device, max_entries=cache_size)
    target_cache = TargetCache(pipe, family, accelerator.device, max_entries=cache_size)
    router = Router(fields_config.routes)
    route_fields = [fields[r.field] for r in fields_config.routes]
    resolution = args.resolution or family.default_resolution(pipe)
    query_law = QueryLaw(args.query_strategy, args.query_space, args.query_reference_shift)
    if args.resolution is None:
        accelerator.print(f"[danceopd] {describe_fallback_resolution(resolution)}")
    if args.cache_latents:  # before training, in fixed chunks: one encoder call per chunk, not per row
        from danceopd_diffusers.caches import precompute_encodings

        line = precompute_encodings(
            buckets,
            [r.task for r in fields_config.routes],
            resolution,
            prompt_cache,
            source_cache,
            target_cache if args.method == "sft" else None,
        )
        accelerator.print(f"[danceopd] {line}")
    global_step = 0
    if args.resume_from_checkpoint and resume_path is None:
        accelerator.print(f"No checkpoint in {args.output_dir} to resume from; starting a new run.")
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        try:
            accelerator.load_state(str(resume_path))
        except Exception as exc:  # its files matched their recorded sizes, so the damage is in their content
            raise ConfigError(f"Cannot resume from {resume_path}: {describe_load_error(exc)}.") from exc
        check_loaded_finite(transformer, f"--resume_from_checkpoint {resume_path}", trainable_only=True)
        global_step = checkpoint_step(resume_path)
    queried_sigma = None
    if args.method in ("danceopd", "offpolicy"):
        # what the query law means on this run's own grid (at the training resolution): the paper's index law
        # reaches sigma 0.55 on its shift-3 grid and far less on an unshifted or small dynamic-shift one
        grid = family.sigmas(
            pipe, args.num_rollout_steps, family.latent_shape(pipe, 1, resolution, resolution), "cpu"
        )
        queried_sigma = {k: round(v, 4) for k, v in query_law.describe(grid).items()}
        accelerator.print(
            f"[danceopd] query law: {query_law.label()}; queried sigma on this run's grid: mean "
            f"{queried_sigma['mean']:.3f}, p10 / p50 / p90 = {queried_sigma['p10']:.3f} / "
            f"{queried_sigma['p50']:.3f} / {queried_sigma['p90']:.3f}"
        )
        if queried_sigma["mean"] < LOW_QUERY_SIGMA and args.query_strategy == "low":
            accelerator.print(
                f"[danceopd] warning: the queries reach a mean sigma of {queried_sigma['mean']:.2f}, a less noisy "
                "regime than the paper's 0.55 on its shift-3 grid; pass --query_space sigma to query the paper's "
                "noise levels on this grid."
            )
    if accelerator.is_main_process:
        tracker_config = {  # never the token: tracker configs are written to disk (hparams.yml) and shared
            k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"
        }
        if queried_sigma is not None:
            tracker_config.update({f"queried_sigma_{k}": v for k, v in queried_sigma.items()})
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
    logging_dir.mkdir(parents=True, exist_ok=True)
    routes_log = open(logging_dir / f"routes_rank{accelerator.process_index}.jsonl", "a")

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if args.method == "sft":  # flow-matching fine-tuning: no field, no rollout
        log.info("***** Running flow-matching fine-tuning (sft) *****")
        log.info(f"  family = {family.name}, buckets = {[r.task for r in fields_config.routes]}")
        rollout = f"timestep weighting = {args.weighting_scheme}"
    else:
        log.info(f"***** Running {args.method} distillation *****")
        log.info(f"  family = {family.name}, fields = {list(fields)}")
        log.info(f"  routes = {[(r.field, r.task, r.weight) for r in fields_config.routes]}")
        rollout = f"N = {args.num_rollout_steps}"
        if args.method != "dense":
            rollout += f", K = {args.query_k}, query = {query_law.label()}"
        else:
            rollout += f", every state, weighting = {args.dense_weighting}"
    log.info(
        f"  total batch = {total_batch}, steps = {args.max_train_steps}, {rollout}, resolution = {resolution}, "
        f"text tokens = {args.max_sequence_length}"
    )

    from tqdm.auto import tqdm

    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    stack.callback(progress_bar.close)  # ends its line, so an error message starts a line of its own
    edit_tasks = {r.task for r in fields_config.routes if buckets.is_edit_bucket(r.task)}

    source_sizes: dict[int, tuple[int, int]] = {}

    def encode_batch(rows: list[int], prompts: list[str], edit: bool):
        """Conditioning (+ the empty-prompt one for CFG), and the size to train at: an edit's keeps its
        source's aspect ratio and both branches keep the source image."""
        if not edit:
            size = family.size_conditioning(pipe, len(prompts), resolution, resolution)
            return (
                prompt_cache(prompts).merge(size),
                prompt_cache.empty(len(prompts)).merge(size),
                resolution,
                resolution,
            )
        if rows[0] not in source_sizes:
            first = buckets.images(rows[:1], columns.source_image)[0]
            source_sizes[rows[0]] = (first.width, first.height)
        height, width = edit_size(*source_sizes[rows[0]], resolution)
        keys = [(row, height, width) for row in rows]

        def fitted(positions: list[int]):  # called only for rows whose encodings are not cached yet
            images = buckets.images([rows[i] for i in positions], columns.source_image)
            return [fit_image(img, height, width) for img in images]

        cond, uncond = prompt_cache(prompts, keys, fitted), prompt_cache.empty(len(prompts), keys, fitted)
        # the state's size travels with each sample (packed families cannot read it off the tokens)
        source = source_cache(rows, fitted, height, width).merge(
            family.size_conditioning(pipe, len(rows), height, width)
        )
        return cond.merge(source), uncond.merge(source), height, width

    sft_scheduler = copy.deepcopy(pipe.scheduler) if args.method == "sft" else None
    batch_rollouts = (
        args.batch_rollouts and args.method in ("danceopd", "dense") and args.gradient_accumulation_steps > 1
    )

    def draw_micro(micro: int, step_route: int) -> SimpleNamespace:
        """One micro-step's rows, conditioning and random draws (and, for sft, its states): everything before the
        rollout. Every rank draws the whole global batch from one generator and keeps its own slice, so N
        processes at batch B train on what one process at batch N·B does (the trailing 0 of the generator's keys
        keeps 1-process runs as before)."""
        gen = step_generator(args.seed, "sample", global_step, micro, 0)
        world_batch = args.train_batch_size * accelerator.num_processes
        mine = slice(rank * args.train_batch_size, (rank + 1) * args.train_batch_size)

        def my_noise(shape: tuple[int, ...], per_sample: int = 1) -> torch.Tensor:
            """Gaussian draws for the global batch (``per_sample`` rows each, sample-major); this rank's rows."""
            n = args.train_batch_size * per_sample
            return torch.randn((world_batch * per_sample, *shape), generator=gen)[rank * n : (rank + 1) * n]

        if args.per_sample_routing:
            world_routes = router.draw(gen, world_batch)
        else:
            world_routes = [step_route] * world_batch
        world_rows = []
        for r in world_routes:
            world_rows += buckets.sample(fields_config.routes[r].task, 1, gen)
        m = SimpleNamespace(sample_routes=world_routes[mine], rows=world_rows[mine], states=None)
        prompts = buckets.prompts(m.rows)
        m.edit = fields_config.routes[m.sample_routes[0]].task in edit_tasks
        if args.method == "sft":
            dropped = (torch.rand(world_batch, generator=gen) < args.caption_dropout_prob)[mine]
            prompts = ["" if drop else p for drop, p in zip(dropped.tolist(), prompts)]
            m.cond, _, m.height, m.width = encode_batch(m.rows, prompts, m.edit)
            if args.cache_latents:
                targets = functools.partial(_images_at_positions, buckets, m.rows, columns.target_image)
                x0 = target_cache(m.rows, targets, m.height, m.width).to(weight_dtype)
            else:
                with torch.no_grad():
                    pixels = images_to_tensor(buckets.images(m.rows, columns.target_image), m.height, m.width)
                    x0 = family.encode_images(pipe, pixels, gen).to(weight_dtype)
            sigma = sample_sft_sigmas(sft_scheduler, world_batch, gen, args.weighting_scheme)[mine]
            m.states = sft_states(x0, sigma, my_noise(x0.shape[1:]), args.weighting_scheme)
            return m
        m.cond, m.uncond, m.height, m.width = encode_batch(m.rows, prompts, m.edit)
        m.targets = RoutedTargets(
            [route_fields[r] for r in m.sample_routes], m.cond, m.uncond, args.num_rollout_steps
        )
        m.shape = family.latent_shape(pipe, len(m.rows), m.height, m.width)
        m.noise = my_noise(m.shape[1:]).to(accelerator.device, weight_dtype)
        m.query_sigmas = None
        if args.method == "dense":
            m.indices = torch.arange(args.num_rollout_steps).repeat(len(m.rows), 1)
        else:
            m.indices, query_sigmas = query_law.sample(args.num_rollout_steps, world_batch, args.query_k, gen)
            m.indices = m.indices[mine]
            m.query_sigmas = None if query_sigmas is None else query_sigmas[mine]
        if args.method == "offpolicy":  # the re-noising draws, for the global batch's K states each
            m.renoise = my_noise(m.shape[1:], per_sample=m.indices.shape[1])
        return m

    loss_history: list[float] = []
    # per routed field, printed at the end: the routes' losses differ by an order of magnitude
    route_history: dict[str, list[float]] = {}
    rank = accelerator.process_index
    last_grid: dict[int, object] = {}  # step -> grid, so the final samples reuse the last validation

    def validation_examples():
        """Validation prompts against the text-to-image routes; the first row of each edit bucket against its
        edit routes (source image shown first)."""
        from danceopd_diffusers.validation import ValidationExample

        def routed_to(tasks):
            names = dict.fromkeys(r.field for r in fields_config.routes if r.task in tasks)
            return [fields[n] for n in names] if args.method != "sft" else []

        t2i_fields = routed_to({r.task for r in fields_config.routes} - edit_tasks)
        examples = [ValidationExample(p, t2i_fields) for p in args.validation_prompt or []]
        for task in sorted(edit_tasks):
            row = buckets.buckets[task][0]
            source = buckets.images([row], columns.source_image)[0]
            examples.append(ValidationExample(buckets.prompts([row])[0], routed_to({task}), source, row))
        return examples

    def validate(step: int):
        from danceopd_diffusers.validation import log_grid, validation_grid

        transformer.eval()
        grid, captions = validation_grid(
            pipe,
            family,
            prompt_cache,
            source_cache,
            validation_examples(),
            args.validation_seeds,
            args.num_rollout_steps,
            resolution,
        )
        transformer.train()
        out = Path(args.output_dir, "validation")
        out.mkdir(parents=True, exist_ok=True)
        grid.save(out / f"step-{step:06d}.png")
        log_grid(accelerator, grid, step)
        log.info(f"validation grid at step {step}: rows {captions}")
        last_grid.clear()
        last_grid[step] = grid
        return grid

    run_validation = bool(args.validation_prompt or edit_tasks)

    def student_rollout(
        targets: RoutedTargets,
        cond: Conditioning,
        noise: torch.Tensor,
        indices: torch.Tensor,
        query_sigmas: torch.Tensor | None,
        height: int,
        width: int,
    ) -> TrainingStates:
        """The student's on-policy rollout, in eval mode, and the routed fields' targets at its queried states."""
        # under FSDP2: gathered once for the rollout and every field (ranks differ in their calls)
        with gathered(transformer):
            set_training(False)
            states = on_policy_states(
                pipe,
                family,
                targets,
                cond,
                noise,
                args.num_rollout_steps,
                indices,
                height,
                width,
                dense=args.method == "dense",
                dense_weighting=args.dense_weighting,
                query_sigmas=query_sigmas,
            )
            set_training(True)
        return states

    def micro_states(m: SimpleNamespace) -> TrainingStates:
        """A micro-step's training states: its own rollout (or the fields' own, off-policy)."""
        if args.method == "offpolicy":
            with gathered(transformer):
                sigmas = family.sigmas(pipe, args.num_rollout_steps, m.shape, accelerator.device)
                return off_policy_states(
                    family, m.targets, m.noise, sigmas, m.indices, m.renoise, m.query_sigmas
                )
        return student_rollout(m.targets, m.cond, m.noise, m.indices, m.query_sigmas, m.height, m.width)

    def student_backward(
        states: TrainingStates, cond: Conditioning, parts: list[SimpleNamespace]
    ) -> list[tuple[float, list[tuple[int, float]]]]:
        """One student forward and backward over ``states`` (rows of ``cond``), whose samples are those of
        ``parts`` (micro-steps, in order): the loss is the sum of each part's velocity MSE. Returns, per part,
        its loss and (sample within the part, error) of each of its rows, brought to the host in one sync."""
        with accelerator.autocast():
            pred = family.velocity(
                transformer_ddp,
                states.x.to(weight_dtype),
                states.sigma.to(accelerator.device),
                cond.select(states.samples),
            )
        losses, starts, start = [], [], 0
        for part in parts:
            mask = (states.samples >= start) & (states.samples < start + len(part.rows))
            rows = mask.nonzero()[:, 0].to(pred.device)
            weight = None if states.weight is None else states.weight[mask.to(states.weight.device)]
            losses.append(velocity_mse(pred[rows], states.target[rows], weight, num_samples=len(part.rows)))
            starts.append(start)
            start += len(part.rows)
        loss = torch.stack(losses).sum()
        with torch.no_grad():  # the losses and each row's error reach the host in one sync
            per_row = (pred.detach().float() - states.target.float()).pow(2).flatten(1).mean(1)
            on_host = torch.cat([torch.stack(losses).detach().float(), per_row]).cpu().tolist()
        if not math.isfinite(sum(on_host[: len(parts)])):  # named by its source: rollout, target, prediction
            error = describe_nonfinite(
                global_step,
                fields_config.routes[step_route].field,
                states.x if args.method in ("danceopd", "dense") else None,
                states.target,
                pred,
                args.learning_rate,
            )
            raise error or NonFiniteError(f"step {global_step + 1}: the loss is not finite (NaN or inf).")
        last_batch[:] = [states, cond]  # the probe of the weights before a save
        accelerator.backward(loss)
        out: list[tuple[float, list[tuple[int, float]]]] = [(value, []) for value in on_host[: len(parts)]]
        for sample, error in zip(states.samples.tolist(), on_host[len(parts) :]):
            part = bisect.bisect_right(starts, sample) - 1
            out[part][1].append((sample - starts[part], error))
        return out

    def step_rows(states: list[TrainingStates]) -> dict[str, int]:
        """Transformer rows of one optimizer step: the student's rollout (no grad), the fields' queries (an
        off-policy field also rolls itself out over all N states) and the student's forward and backward."""
        queried = sum(len(s.samples) for s in states)
        field = queried
        if args.method == "offpolicy":
            field += sum(len(s.samples) // args.query_k for s in states) * args.num_rollout_steps
        elif args.method == "sft":
            field = 0
        return {"rollout": sum(s.sample_steps for s in states), "field": field, "student": queried}

    last_batch: list = []  # (states, conditioning) of the last student forward

    def probe() -> torch.Tensor | None:
        """The student's prediction on the last batch it trained on, with the weights as they are now."""
        if not last_batch:
            return None
        states, cond = last_batch
        with accelerator.autocast():
            return family.velocity(
                transformer_ddp,
                states.x.to(weight_dtype),
                states.sigma.to(accelerator.device),
                cond.select(states.samples),
            )

    guard = WeightGuard(params, args.learning_rate, accelerator)

    # ---------------------------------------------------------------- training loop
    transformer.train()
    stop = StopOnSignal().start()
    while global_step < args.max_train_steps:
        step_route = router.draw_step_route(args.seed, global_step, accelerator)
        route_losses: dict[str, list[float]] = {}
        step_loss = 0.0
        micros = [draw_micro(micro, step_route) for micro in range(args.gradient_accumulation_steps)]
        joint = None
        if batch_rollouts and len({(m.edit, m.height, m.width) for m in micros}) == 1:
            # the student is the same in every micro-step of an optimizer step: one rollout for all of them
            joint_cond = Conditioning.cat([m.cond for m in micros])
            joint = student_rollout(
                RoutedTargets(
                    [f for m in micros for f in m.targets.fields],
                    joint_cond,
                    Conditioning.cat([m.uncond for m in micros]),
                    args.num_rollout_steps,
                ),
                joint_cond,
                torch.cat([m.noise for m in micros]),
                torch.cat([m.indices for m in micros]),
                None if micros[0].query_sigmas is None else torch.cat([m.query_sigmas for m in micros]),
                micros[0].height,
                micros[0].width,
            )
        for i, m in enumerate(micros):
            with accelerator.accumulate(transformer_ddp):
                if joint is None:
                    if m.states is None:
                        m.states = micro_states(m)
                    (m.result,) = student_backward(m.states, m.cond, [m])
                elif i == len(micros) - 1:
                    # and one student forward and backward: the sum of the micro-steps' losses, so the
                    # gradient is the accumulated one (accelerate scales by 1 / accumulation either way)
                    for micro, result in zip(micros, student_backward(joint, joint_cond, micros)):
                        micro.result = result
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        for m in micros:
            loss, errors = m.result
            step_loss += loss / args.gradient_accumulation_steps
            for sample, error in errors:
                route_losses.setdefault(fields_config.routes[m.sample_routes[sample]].field, []).append(error)
        routes_log.write(
            json.dumps(
                {
                    "step": global_step,
                    "loss": step_loss,  # the optimizer step's loss: curves without a tracker (multi-GPU, study)
                    "route": fields_config.routes[step_route].field,
                    "sample_routes": [fields_config.routes[r].field for r in micros[-1].sample_routes],
                    # this rank's work in the step: the measure of compute of the study's equal-compute table
                    "rows": step_rows([joint] if joint is not None else [m.states for m in micros]),
                }
            )
            + "\n"
        )
        routes_log.flush()
        global_step += 1
        guard.check_step(global_step, step_loss)  # the update's weights are finite; warns on a diverging loss
        owner.check_alive(global_step)
        progress_bar.update(1)
        loss_history.append(step_loss)
        logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
        logs.update({f"loss/{name}": sum(v) / len(v) for name, v in route_losses.items()})
        for name, v in route_losses.items():
            route_history.setdefault(name, []).append(sum(v) / len(v))
        progress_bar.set_postfix(loss=f"{step_loss:.4g}", lr=f"{logs['lr']:.2g}")
        accelerator.log(logs, step=global_step)
        path = None
        if global_step % args.checkpointing_steps == 0:
            guard.check_before_save(global_step, probe)
            path = owner.save_checkpoint(accelerator, global_step, args.checkpoints_total_limit, run_settings)
            log.info(f"Saved state to {path}")
            if hub_pusher is not None:
                hub_pusher.on_save(path, global_step)
        signum = stop.requested(accelerator)
        if signum is not None:
            if path is None:
                guard.check_before_save(global_step, probe)
                path = owner.save_checkpoint(
                    accelerator, global_step, args.checkpoints_total_limit, run_settings
                )
            stop.stop()
            routes_log.close()
            progress_bar.close()
            end_training(accelerator)
            raise Interrupted(
                f"stopped by {signal.Signals(signum).name} after step {global_step}; its state is saved in {path}. "
                "Continue with --resume_from_checkpoint latest.",
                signum,
            )
        if run_validation and global_step % args.validation_steps == 0:
            with gathered(transformer):  # every rank joins the gathering; the main process samples
                if accelerator.is_main_process:
                    validate(global_step)
    stop.stop()
    routes_log.close()
    progress_bar.close()
    if graphed is not None:  # before the export fuses and unloads the adapters
        graphed.remove()
    guard.check_before_save(global_step, probe)  # never export a broken student

    # ---------------------------------------------------------------- outputs
    accelerator.wait_for_everyone()
    final_state = full_state_dict(accelerator, transformer)  # a sharded student, gathered on the main process
    if run_validation and global_step not in last_grid:
        with gathered(transformer):
            if accelerator.is_main_process:
                validate(global_step)
    if accelerator.is_main_process:
        from danceopd_diffusers.export import (
            files_to_upload,
            fused_student,
            render_model_card,
            save_pipeline_folder,
            save_student_lora,
            scrub_machine_paths,
            trained_call_kwargs,
            write_run_config,
        )

        if loss_history:
            print(f"[danceopd] loss: {_first_last(loss_history)}", flush=True)
        if len(fields_config.routes) > 1:
            for name, history in route_history.items():
                print(f"[danceopd] loss of route {name} ({len(history)} steps): {_first_last(history)}")
        model = unwrap(transformer_ddp)
        if final_state is not None:
            model = unsharded_copy(model, final_state)
        export_dir = owner.stage()  # a hidden sibling folder; moved into output_dir by renames once complete
        samples_image = None
        if run_validation:
            grid = last_grid.get(global_step) or validate(global_step)
            grid.save(Path(export_dir, "samples.png"))
            samples_image = "samples.png"
        if not args.full_finetune:
            save_student_lora(model, family, export_dir, STUDENT_ADAPTER)
            experts = [n for n in model.peft_config if n != STUDENT_ADAPTER]
            export_model = (
                fused_student(model, STUDENT_ADAPTER, experts) if not args.skip_pipeline_export else None
            )
        else:
            export_model = model.to(weight_dtype)  # the fp32 master weights, exported in the run's dtype
        absorbed = _absorbed_scale(fields_config)
        call = trained_call_kwargs(
            family,
            method=args.method,
            num_steps=args.num_rollout_steps,
            max_sequence_length=args.max_sequence_length,
        )
        if args.skip_pipeline_export:
            if args.full_finetune:
                model.save_pretrained(os.path.join(export_dir, "transformer"))
        else:
            save_pipeline_folder(
                pipe, family, export_model, export_dir, absorbed, call, trained_resolution=resolution
            )
        render_model_card(
            export_dir,
            base_model=args.pretrained_model_name_or_path,
            repo_id=repo_id,
            family=family,
            fields_config=fields_config,
            call_kwargs=call,
            prompt=(args.validation_prompt or [None])[0],
            fields=fields,
            dataset_images=[(t, buckets.buckets[t][0]) for t in sorted(edit_tasks)] if samples_image else [],
            method=args.method,
            hyperparameters=_hyperparameters(args, resolution, queried_sigma),
            absorbed_guidance_scale=absorbed,
            has_lora=not args.full_finetune,
            has_pipeline=not args.skip_pipeline_export,
            samples_image=samples_image,
        )
        write_run_config(
            export_dir,
            base_model=args.pretrained_model_name_or_path,
            fields_config=fields_config,
            hyperparameters=_hyperparameters(args, resolution, queried_sigma),
            call_kwargs=call,
        )
        scrub_machine_paths(export_dir, args.pretrained_model_name_or_path)  # components' _name_or_path
        owner.publish(export_dir, global_step)
        if hub_pusher is not None:
            from danceopd_diffusers.checkpointing import list_checkpoints

            checkpoints = list_checkpoints(args.output_dir)
            hub_pusher.push_final(files_to_upload(args.output_dir), checkpoints[-1] if checkpoints else None)
        print(f"[danceopd] outputs written to {args.output_dir}", flush=True)
        if args.demo and not args.skip_pipeline_export:
            demo.report(args.output_dir, args.demo_eval_limit, args.max_train_steps)
        if hub_pusher is not None:
            hub_pusher.wait()
            print(f"[danceopd] pushed to https://huggingface.co/{repo_id}", flush=True)
    end_training(accelerator)


def _first_last(history: list[float]) -> str:
    k = max(1, len(history) // 10)
    first, last = sum(history[:k]) / k, sum(history[-k:]) / k
    return f"first {k} steps {first:.5f} -> last {k} steps {last:.5f}"


def _images_at_positions(buckets, rows: list[int], column: str, positions: list[int]) -> list:
    return buckets.images([rows[i] for i in positions], column)


def _absorbed_scale(config: FieldsConfig) -> float | None:
    scales = set()
    for route in config.routes:
        for spec in config.resolve_chain(route.field):
            if spec.type == "cfg":
                scales.add(spec.scale)
            elif spec.type == "guider" and "guidance_scale" in spec.guider_kwargs:
                scales.add(float(spec.guider_kwargs["guidance_scale"]))
    return max(scales) if scales else None


def _hyperparameters(args: argparse.Namespace, resolution: int, queried_sigma: dict | None = None) -> dict:
    keys = [
        "method",
        "num_rollout_steps",
        "query_strategy",
        "query_k",
        "per_sample_routing",
        "rank",
        "lora_alpha",
        "full_finetune",
        "learning_rate",
        "lr_scheduler",
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "max_grad_norm",
        "mixed_precision",
        "seed",
        "max_sequence_length",
        "student_init",
    ]
    out = {k: getattr(args, k) for k in keys}
    out["resolution"] = resolution
    if args.query_space != "step":
        out["query_space"] = args.query_space
        out["query_reference_shift"] = args.query_reference_shift
    if queried_sigma is not None:  # the noise levels the queries reached on the run's grid
        out["queried_sigma"] = queried_sigma
    if args.routing != "hard":
        out["routing"] = args.routing
    method_option = {"dense": "dense_weighting", "sft": "weighting_scheme"}.get(args.method)
    if method_option:
        out[method_option] = getattr(args, method_option)
    if out["lora_alpha"] is None and not args.full_finetune:
        out["lora_alpha"] = args.rank
    return out


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one ``error:`` line on stderr and exit status 2, never a traceback."""
    try:
        main(parse_args(argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"[danceopd] {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
