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
import contextlib
import copy
import math
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast,
    set_seed,
)
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from danceopd_diffusers import distributed, export, hub, objectives, preflight, stopping
from danceopd_diffusers.batches import BatchDrawer, MicroBatch
from danceopd_diffusers.checkpointing import list_checkpoints
from danceopd_diffusers.cli import ArgumentParser, HelpFormatter, run_command
from danceopd_diffusers.config import RouteSpec
from danceopd_diffusers.cuda_graphs import GraphedNoGradForward
from danceopd_diffusers.data import DataColumns, TaskBuckets, check_routes_on_data, load_training_dataset
from danceopd_diffusers.defaults import describe_fallback_resolution, fill_trained_defaults
from danceopd_diffusers.families import Conditioning
from danceopd_diffusers.field_loading import build_fields, load_pipeline
from danceopd_diffusers.flag_checks import check_flags
from danceopd_diffusers.hub import HUB_STRATEGIES
from danceopd_diffusers.known_warnings import silence_known_warnings
from danceopd_diffusers.logging_utils import get_logger, setup_logging
from danceopd_diffusers.objectives import on_policy_states, sft_states
from danceopd_diffusers.output_dir import OutputFolder, check_apart, run_inputs
from danceopd_diffusers.preflight import inspect_pipeline
from danceopd_diffusers.rollout import PAPER_REFERENCE_SHIFT, QUERY_SPACES, QUERY_STRATEGIES, QueryLaw
from danceopd_diffusers.routing import ROUTINGS, run_fields_config
from danceopd_diffusers.shapesworld import demo
from danceopd_diffusers.step_log import StepLog, run_banner
from danceopd_diffusers.student import mode_switch
from danceopd_diffusers.student_init import DEFAULT_RANK, build_student, plan_student
from danceopd_diffusers.validation import save_validation, validation_examples

logger = get_logger("train")


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
"""


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(  # a bad flag: one error line and a "did you mean", not the usage block
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG + demo.flags_epilog(),
        formatter_class=HelpFormatter,
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
        choices=objectives.METHODS,
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
        choices=objectives.DENSE_WEIGHTINGS,
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
        demo.apply_defaults(parser, args, input_args)
    check_flags(args)
    return (
        args  # --rank left out: plan_student chooses it (a --student_init LoRA's own rank, else the default)
    )


def main(args: argparse.Namespace) -> None:
    """A training run; what it holds open (the output folder's lock, its staging folder) is released however it
    ends."""
    with contextlib.ExitStack() as stack:
        _train(args, stack)


def _train(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    setup_logging()  # per process, before anything is said; set again from the accelerator below
    silence_known_warnings()
    # ---------------------------------------------------------------- checks that load no weights
    # the files the user named first (fields config, data), then the model's configs, then the output folder
    fields_config = run_fields_config(
        args.method,
        args.fields_config,
        args.cfg_scale,
        args.expert_lora,
        args.expert_checkpoint,
        args.routing,
    )
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
    chosen = fill_trained_defaults(args, args.pretrained_model_name_or_path, args.revision)
    family = info.family_cls.for_run(args.max_sequence_length, args.embedded_guidance)
    preflight.check_fields_against_model(fields_config, info)
    if args.method != "sft":
        preflight.check_something_to_distill(fields_config, warm_start=bool(args.student_init))
    plan = plan_student(info, family.default_lora_targets, args)
    args.rank, args.lora_alpha = plan.rank, plan.lora_alpha  # what the checkpoints and the card record
    if args.method == "sft" and not fields_config.routes:  # sft: one route per data bucket
        fields_config.routes = [RouteSpec(field="base", task=t) for t in sorted(buckets.buckets)]
    check_routes_on_data(
        fields_config, buckets, family, args.per_sample_routing, need_target=args.method == "sft"
    )
    # the output folder: apart from every folder the run reads (before anything is written there), writable
    check_apart(args.output_dir, *run_inputs(args, fields_config))
    preflight.check_output_dir(args.output_dir)

    # ---------------------------------------------------------------- the Hub: token, repo, Hub resume
    repo_id = None
    if args.push_to_hub:
        repo_id = hub.prepare_push(args.hub_model_id or Path(args.output_dir).name, token=args.hub_token)
    hub_resume = None
    if hub.parse_hub_resume(args.resume_from_checkpoint):
        hub_resume = hub.resolve_hub_checkpoint(args.resume_from_checkpoint, args.output_dir, args.hub_token)

    # ---------------------------------------------------------------- output folder: lock, resume, kind
    # one owner of the output folder (the first thing written to it): the main process holds its lock
    owner = stack.enter_context(
        OutputFolder(
            args.output_dir, overwrite=args.overwrite_output_dir, full_finetune=args.full_finetune
        ).open()
    )
    run_settings = export.checkpoint_settings(args, fields_config, plan.targets)
    resume_path = None
    if hub_resume is None:  # a Hub checkpoint is checked once downloaded, still before any weights load
        resume_path = owner.resume(args.resume_from_checkpoint, run_settings)

    # ---------------------------------------------------------------- accelerator
    logging_dir = Path(args.output_dir, args.logging_dir)
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
    setup_logging(accelerator.is_local_main_process)
    distributed.check_engine(accelerator, args.full_finetune, args.cuda_graphs)
    for line in distributed.describe_precision(accelerator, args.mixed_precision):
        logger.info(line)
    args.mixed_precision = accelerator.mixed_precision  # what the card and danceopd_config.json record
    if args.seed is None:  # one seed for every process
        args.seed = int(broadcast(torch.randint(0, 2**31 - 1, (1,), device=accelerator.device), 0).item())
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.demo:
            logger.info(demo.describe(args.demo_overrides))
        for line in chosen:
            logger.info(line)
    hub_pusher = None
    if repo_id and accelerator.is_main_process:
        hub_pusher = hub.HubPusher(repo_id, args.output_dir, args.hub_strategy, token=args.hub_token)
    if hub_resume is not None:
        if accelerator.is_main_process:
            path = hub.download_hub_checkpoint(hub_resume, args.output_dir, token=args.hub_token)
            logger.info(f"downloaded {hub_resume.repo_id}:{hub_resume.name} to {path}")
        accelerator.wait_for_everyone()
        args.resume_from_checkpoint = hub_resume.name
        resume_path = owner.resume(args.resume_from_checkpoint, run_settings)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.disable_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # A full fine-tune keeps fp32 master weights and computes under autocast, as diffusers' full fine-tuning
    # examples do: Adam's small updates vanish in half-precision weights. Frozen models stay in weight_dtype.
    student_dtype = torch.float32 if args.full_finetune else weight_dtype

    # ---------------------------------------------------------------- models
    with preflight.load_errors("--pretrained_model_name_or_path", args.pretrained_model_name_or_path):
        pipe = load_pipeline(
            family,
            args.pretrained_model_name_or_path,
            info.custom_pipeline,
            revision=args.revision,
            variant=args.variant,
            dtype={"transformer": student_dtype, "default": weight_dtype},
        )
    pipe.set_progress_bar_config(disable=True)
    stopping.check_loaded_finite(
        pipe, f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}"
    )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    scope = build_student(
        pipe,
        family,
        plan,
        student_dtype,
        accelerator.device,
        config_source=args.pretrained_model_name_or_path,
    )
    transformer = pipe.transformer
    shares_base = scope is not None and not plan.init_is_checkpoint
    with preflight.load_errors("--fields_config / --expert_*", "the fields' weights"):
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
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    # ---------------------------------------------------------------- checkpoint hooks: the student's own files
    distributed.register_student_hooks(accelerator, family, args.full_finetune)
    transformer_ddp, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    # FSDP2 shards pipe.transformer in place, with new parameters: clip (and switch adapters on) those
    params = [p for p in transformer.parameters() if p.requires_grad]
    if scope is not None:
        scope.refresh()
    graphed = None
    if args.cuda_graphs:  # after prepare: accelerate's autocast wrapper of the forward is captured too
        graphed = GraphedNoGradForward(transformer)
    set_training = mode_switch(transformer)  # train()/eval() around each rollout without the recursive walk

    # ---------------------------------------------------------------- state before the loop
    route_fields = [fields[r.field] for r in fields_config.routes]
    resolution = args.resolution or family.default_resolution(pipe)
    if args.resolution is None:
        logger.info(describe_fallback_resolution(resolution))
    drawer = BatchDrawer(
        pipe,
        family,
        buckets,
        columns,
        fields_config.routes,
        resolution,
        seed=args.seed,
        batch_size=args.train_batch_size,
        num_processes=accelerator.num_processes,
        rank=accelerator.process_index,
        per_sample_routing=args.per_sample_routing,
        device=accelerator.device,
        cache_everything=args.cache_latents,
    )
    if args.cache_latents:  # before training, in fixed chunks: one encoder call per chunk, not per row
        logger.info(drawer.precompute(targets=args.method == "sft"))
    query_law = QueryLaw(args.query_strategy, args.query_space, args.query_reference_shift)
    global_step = 0
    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"No checkpoint in {args.output_dir} to resume from; starting a new run.")
    if resume_path is not None:
        global_step = owner.restore(accelerator, resume_path, transformer)
    queried_sigma = None
    if args.method in ("danceopd", "offpolicy"):  # what the query law means on this run's own grid
        grid = family.sigmas(
            pipe, args.num_rollout_steps, family.latent_shape(pipe, 1, resolution, resolution), "cpu"
        )
        queried_sigma, line, warning = query_law.report(grid)
        logger.info(line)
        if warning:  # a note on the run's regime, printed with its settings (stdout), not an input error
            logger.info(f"warning: {warning}")
    if accelerator.is_main_process:
        accelerator.init_trackers(
            args.tracker_project_name, config=export.tracker_config(args, queried_sigma)
        )
    logging_dir.mkdir(parents=True, exist_ok=True)
    step_log = StepLog(
        logging_dir / f"routes_rank{accelerator.process_index}.jsonl",
        fields_config.routes,
        args.method,
        args.num_rollout_steps,
        args.query_k,
    )

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    for line in run_banner(
        args, family.name, fields, fields_config.routes, total_batch, resolution, query_law.label()
    ):
        logger.info(line)
    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    stack.callback(progress_bar.close)  # ends its line, so an error message starts a line of its own
    sft_scheduler = copy.deepcopy(pipe.scheduler) if args.method == "sft" else None
    batch_rollouts = (
        args.batch_rollouts and args.method in ("danceopd", "dense") and args.gradient_accumulation_steps > 1
    )

    def draw_micro(micro: int, step_route: int) -> MicroBatch:
        """One micro-step's rows, conditioning and random draws (and, for sft, its states): all before the rollout."""
        m = drawer.draw(global_step, micro, step_route)
        if args.method == "sft":
            drawer.drop_captions(m, args.caption_dropout_prob)
            drawer.encode(m)
            x0 = drawer.target_latents(m, args.cache_latents, weight_dtype)
            sigma = drawer.mine(
                objectives.sample_sft_sigmas(
                    sft_scheduler, drawer.world_batch, m.generator, args.weighting_scheme
                )
            )
            m.states = sft_states(x0, sigma, drawer.noise(m, x0.shape[1:]), args.weighting_scheme)
            return m
        drawer.encode(m)
        m.targets = objectives.RoutedTargets(
            [route_fields[r] for r in m.sample_routes], m.cond, m.uncond, args.num_rollout_steps
        )
        m.shape = family.latent_shape(pipe, len(m.rows), m.height, m.width)
        m.noise = drawer.noise(m, m.shape[1:]).to(accelerator.device, weight_dtype)
        if args.method == "dense":
            m.indices = torch.arange(args.num_rollout_steps).repeat(len(m.rows), 1)
        else:
            m.indices, query_sigmas = query_law.sample(
                args.num_rollout_steps, drawer.world_batch, args.query_k, m.generator
            )
            m.indices = drawer.mine(m.indices)
            m.query_sigmas = None if query_sigmas is None else drawer.mine(query_sigmas)
        if args.method == "offpolicy":  # the re-noising draws, for the global batch's K states each
            m.renoise = drawer.noise(m, m.shape[1:], per_sample=m.indices.shape[1])
        return m

    last_grid: dict[int, object] = {}  # step -> grid, so the final samples reuse the last validation
    examples = validation_examples(
        fields_config.routes,
        fields,
        buckets,
        columns.source_image,
        args.validation_prompt or [],
        drawer.edit_tasks,
        show_fields=args.method != "sft",
    )
    run_validation = bool(examples)

    def validate(step: int):
        caches, seeds = (drawer.prompt_cache, drawer.source_cache), args.validation_seeds
        grid = save_validation(
            pipe,
            family,
            caches,
            examples,
            seeds,
            args.num_rollout_steps,
            resolution,
            args.output_dir,
            accelerator,
            step,
        )
        last_grid.clear()
        last_grid[step] = grid
        return grid

    def student_rollout(m: MicroBatch) -> objectives.TrainingStates:
        """The student's on-policy rollout, in eval mode, and the routed fields' targets at its queried states."""
        # under FSDP2: gathered once for the rollout and every field
        with distributed.gathered(transformer):
            set_training(False)
            states = on_policy_states(
                pipe,
                family,
                m.targets,
                m.cond,
                m.noise,
                args.num_rollout_steps,
                m.indices,
                m.height,
                m.width,
                dense=args.method == "dense",
                dense_weighting=args.dense_weighting,
                query_sigmas=m.query_sigmas,
            )
            set_training(True)
        return states

    def micro_states(m: MicroBatch) -> objectives.TrainingStates:
        """A micro-step's training states: its own rollout (or the fields' own, off-policy)."""
        if args.method == "offpolicy":
            with distributed.gathered(transformer):
                sigmas = family.sigmas(pipe, args.num_rollout_steps, m.shape, accelerator.device)
                return objectives.off_policy_states(
                    family, m.targets, m.noise, sigmas, m.indices, m.renoise, m.query_sigmas
                )
        return student_rollout(m)

    def student_velocity(states: objectives.TrainingStates, cond: Conditioning) -> torch.Tensor:
        with accelerator.autocast():
            x, sigma = states.x.to(weight_dtype), states.sigma.to(accelerator.device)
            return family.velocity(transformer_ddp, x, sigma, cond.select(states.samples))

    def student_backward(
        states: objectives.TrainingStates, cond: Conditioning, parts: list[MicroBatch]
    ) -> list[tuple]:
        """One student forward and backward over ``states`` (rows of ``cond``) whose samples are those of ``parts``
        (micro-steps, in order): the loss is the sum of each part's velocity MSE. Returns, per part, its loss and
        (sample within the part, error) of each of its rows, brought to the host in one sync."""
        pred = student_velocity(states, cond)
        losses, results = objectives.part_losses(pred, states, [len(p.rows) for p in parts])
        if not math.isfinite(
            sum(loss for loss, _ in results)
        ):  # named by its source: rollout, target, prediction
            rollout = states.x if args.method in ("danceopd", "dense") else None
            route = fields_config.routes[step_route].field
            error = stopping.describe_nonfinite(
                global_step, route, rollout, states.target, pred, args.learning_rate
            )
            raise error or stopping.NonFiniteError(
                f"step {global_step + 1}: the loss is not finite (NaN or inf)."
            )
        last_batch[:] = [states, cond]  # the probe of the weights before a save
        accelerator.backward(losses.sum())
        return results

    last_batch: list = []  # (states, conditioning) of the last student forward
    guard = stopping.WeightGuard(params, args.learning_rate, accelerator)

    def probe() -> torch.Tensor | None:
        """The student's prediction on the last batch it trained on, with the weights as they are now."""
        return student_velocity(*last_batch) if last_batch else None

    # ---------------------------------------------------------------- training loop
    transformer.train()
    stop = stopping.StopOnSignal().start()
    while global_step < args.max_train_steps:
        step_route = drawer.router.draw_step_route(args.seed, global_step, accelerator)
        micros = [draw_micro(micro, step_route) for micro in range(args.gradient_accumulation_steps)]
        joint = None
        if batch_rollouts and len({(m.edit, m.height, m.width) for m in micros}) == 1:
            # the student is the same in every micro-step of an optimizer step: one rollout for all of them
            joint = MicroBatch.joined(micros, args.num_rollout_steps)
            joint.states = student_rollout(joint)
        for i, m in enumerate(micros):
            with accelerator.accumulate(transformer_ddp):
                if joint is None:
                    if m.states is None:
                        m.states = micro_states(m)
                    (m.result,) = student_backward(m.states, m.cond, [m])
                elif i == len(micros) - 1:
                    # and one student forward and backward: the sum of the micro-steps' losses, so the
                    # gradient is the accumulated one (accelerate scales by 1 / accumulation either way)
                    for micro, result in zip(micros, student_backward(joint.states, joint.cond, micros)):
                        micro.result = result
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        states = [joint.states] if joint is not None else [m.states for m in micros]
        step_loss = step_log.record(
            global_step, step_route, [(m.sample_routes, m.result) for m in micros], states
        )
        global_step += 1
        guard.check_step(global_step, step_loss)  # the update's weights are finite; warns on a diverging loss
        owner.check_alive(global_step)
        progress_bar.update(1)
        logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], **step_log.last}
        progress_bar.set_postfix(loss=f"{step_loss:.4g}", lr=f"{logs['lr']:.2g}")
        accelerator.log(logs, step=global_step)
        path = None
        if global_step % args.checkpointing_steps == 0:
            guard.check_before_save(global_step, probe)
            path = owner.save_checkpoint(accelerator, global_step, args.checkpoints_total_limit, run_settings)
            logger.info(f"Saved state to {path}")
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
            step_log.close()
            progress_bar.close()
            distributed.end_training(accelerator)
            raise stopping.Interrupted(
                f"stopped by {signal.Signals(signum).name} after step {global_step}; its state is saved in {path}. "
                "Continue with --resume_from_checkpoint latest.",
                signum,
            )
        if run_validation and global_step % args.validation_steps == 0:
            # every rank joins the gathering; the main process samples
            with distributed.gathered(transformer):
                if accelerator.is_main_process:
                    validate(global_step)
    stop.stop()
    step_log.close()
    progress_bar.close()
    if graphed is not None:  # before the export fuses and unloads the adapters
        graphed.remove()
    guard.check_before_save(global_step, probe)  # never export a broken student

    # ---------------------------------------------------------------- outputs
    accelerator.wait_for_everyone()
    # a sharded student, gathered on the main process (every rank joins)
    final_state = distributed.full_state_dict(accelerator, transformer)
    if run_validation and global_step not in last_grid:
        with distributed.gathered(transformer):
            if accelerator.is_main_process:
                validate(global_step)
    if accelerator.is_main_process:
        for line in step_log.summary():
            logger.info(line)
        model = distributed.unwrap(accelerator, transformer_ddp)
        if final_state is not None:
            model = distributed.unsharded_copy(model, final_state)
        export_dir = owner.stage()  # a hidden sibling folder; moved into output_dir by renames once complete
        samples_image = None
        if run_validation:
            (last_grid.get(global_step) or validate(global_step)).save(Path(export_dir, "samples.png"))
            samples_image = "samples.png"
        export.export_student(
            export_dir,
            pipe,
            family,
            model,
            base_model=args.pretrained_model_name_or_path,
            fields_config=fields_config,
            fields=fields,
            hyperparameters=export.run_hyperparameters(args, resolution, queried_sigma),
            full_finetune=args.full_finetune,
            skip_pipeline_export=args.skip_pipeline_export,
            dtype=weight_dtype,
            repo_id=repo_id,
            prompt=(args.validation_prompt or [None])[0],
            samples_image=samples_image,
            dataset_images=[(t, buckets.buckets[t][0]) for t in sorted(drawer.edit_tasks)]
            if samples_image
            else [],
        )
        owner.publish(export_dir, global_step)
        if hub_pusher is not None:
            checkpoints = list_checkpoints(args.output_dir)
            hub_pusher.push_final(
                export.files_to_upload(args.output_dir), checkpoints[-1] if checkpoints else None
            )
        logger.info(f"outputs written to {args.output_dir}")
        if args.demo and not args.skip_pipeline_export:
            demo.report(args.output_dir, args.demo_eval_limit, args.max_train_steps)
        if hub_pusher is not None:
            hub_pusher.wait()
            logger.info(f"pushed to https://huggingface.co/{repo_id}")
    distributed.end_training(accelerator)


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one ``error:`` line on stderr and exit status 2, never a traceback."""
    return run_command(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
