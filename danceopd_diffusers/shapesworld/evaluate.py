"""Score a pipeline on the ShapesWorld evaluation set: the paper-style table with 95 % CIs, a picture grid, JSON.

    python -m danceopd_diffusers.shapesworld.evaluate --pipeline PATH [--lora PATH] [--guidance_scale S]
        [--preset quick|large | --per_category N] [--device cuda] [--json F]
    python -m danceopd_diffusers.shapesworld.evaluate compare A.json B.json [--row_a NAME] [--row_b NAME]

Sets: ``quick`` (the default: 16 T2I prompts and 8 edits per category, a minute on a CPU) and ``large`` (192 and
256 per category, 1,152 prompts and 1,536 edits; generation batched on the device and scoring spread over the CPU
cores). A smaller set is a prefix of a larger one, sample for sample: each sample's noise is drawn from its own
generator, seeded by (seed, category, index) through numpy's SeedSequence, so no two samples or seeds share noise.
Every headline carries a 95 % stratified bootstrap interval; the JSON keeps every sample's score, and ``compare``
gives the paired-bootstrap difference of two results on the same set and seed.

Sampling goes through the library's fields on the family adapter (the same code the field-equivalence tests
check against each stock pipeline): the pipeline's own sigma grid, Euler steps, and for ``--guidance_scale``
α > 1 the CFG field ``u + α (c − u)`` (uncond = empty prompt; an edit's keeps its source image). α is in that
one convention for every family (Z-Image's own ``guidance_scale`` g is α − 1). NFE per image = steps × (2 with
CFG, else 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..caches import PromptCache, SourceCache
from ..families import FamilyAdapter
from ..fields import CFGField, Field, FieldQuery, GuiderField, TransformerField
from ..rollout import field_rollout
from ..stock_loading import family_of_index, load_stock_pipeline
from ..validation import image_grid
from .scorer import SCORER_VERSION, score_job, summarize_edit, summarize_t2i
from .stats import bootstrap_ci, paired_bootstrap
from .world import (
    EDIT_CATEGORIES,
    EVAL_EDIT_PER_CATEGORY,
    EVAL_T2I_PER_CATEGORY,
    GLOBAL_EDIT_CATEGORIES,
    LOCAL_EDIT_CATEGORIES,
    T2I_CATEGORIES,
    edit_rows,
    t2i_rows,
)

#: named evaluation sets: (T2I prompts, edits) per category
PRESETS: dict[str, tuple[int, int]] = {
    "quick": (EVAL_T2I_PER_CATEGORY, EVAL_EDIT_PER_CATEGORY),
    "large": (192, 256),
}
_NOISE_STREAM = 0x5EED  # first SeedSequence word of every sample's noise generator
_TASK_CODE = {"t2i": 1, "edit": 2}
_CATEGORY_CODE = {c: i for i, c in enumerate(T2I_CATEGORIES + EDIT_CATEGORIES)}


def set_name(t2i_per_category: int, edit_per_category: int) -> str:
    """The preset's name for these sizes, else ``"T2I x N / edit x M"``."""
    for name, sizes in PRESETS.items():
        if sizes == (t2i_per_category, edit_per_category):
            return name
    return f"{t2i_per_category} T2I / {edit_per_category} edits per category"


def sample_seed(seed: int, task: str, category: str, index: int) -> int:
    """The noise seed of one sample: a hash of (seed, task, category, index within the category).

    Seeds 0 and 1 share no noise (``seed + j`` did), and the first N samples of a category draw the same noise
    whatever the set size, so the quick set is a sample-for-sample prefix of the large one.
    """
    entropy = [_NOISE_STREAM, int(seed), _TASK_CODE[task], _CATEGORY_CODE[category], int(index)]
    hi, lo = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)  # < 2**63: a valid torch seed


def prompt_length(path: str, override: int | None = None) -> int | None:
    """The text length the model was trained with: prompts are padded to it, and a transformer trained on
    32 text tokens is out of distribution on 512. From ``--max_sequence_length``, else the exported folder's
    ``danceopd_config.json``, else the T5 tokenizer's own ``model_max_length`` when it is below 512."""
    if override is not None:
        return override
    config = Path(path, "danceopd_config.json")
    if config.is_file():
        length = json.loads(config.read_text(encoding="utf-8")).get("args", {}).get("max_sequence_length")
        if length:
            return int(length)
    tokenizer_config = Path(path, "tokenizer_2", "tokenizer_config.json")
    if tokenizer_config.is_file():
        length = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("model_max_length")
        if isinstance(length, int) and length < 512:
            return length
    return None


def load_pipeline(
    path: str,
    lora: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int | None = None,
):
    """Any supported pipeline folder (stock or exported) and its family adapter; a LoRA is fused in if given."""
    from diffusers import DiffusionPipeline

    family_cls = family_of_index(DiffusionPipeline.load_config(path), path).family_cls
    length = prompt_length(path, max_sequence_length)
    family = family_cls(max_sequence_length=length) if length else family_cls()
    # an exported folder is loaded by the stock class: its pipeline_danceopd.py is never imported
    pipe = load_stock_pipeline(family.pipeline_class(), path, dtype=dtype)
    if lora:
        from ..known_warnings import silence_known_warnings

        silence_known_warnings()  # our LoRAs adapt the transformer alone: no "no text-encoder keys" notice
        pipe.load_lora_weights(lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family


@torch.no_grad()
def sample(
    pipe: Any,
    family: FamilyAdapter,
    field: Field,
    cond: Any,
    uncond: Any,
    height: int,
    width: int,
    seeds: Sequence[int],
    num_steps: int,
) -> list[Image.Image]:
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    shape = family.latent_shape(pipe, 1, height, width)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
        device, dtype
    )
    sigmas = family.sigmas(pipe, num_steps, noise.shape, device)

    def velocity(x, sigma, step):
        return field.velocity(FieldQuery(x, sigma.to(dtype), cond, uncond, step, num_steps))

    x0 = field_rollout(velocity, noise, sigmas)[-1]
    return family.decode_latents(pipe, x0, height, width)


def device_defaults(device: str, batch_size: int | None, score_workers: int | None) -> tuple[int, int]:
    """Batch size and scorer processes: on a CPU, small batches scored in-process (the cores generate); on an
    accelerator, batches of 512 and a scorer process per CPU core, so scoring hides behind generation."""
    on_cpu = torch.device(device).type == "cpu"
    batch_size = batch_size or (8 if on_cpu else 512)
    workers = score_workers if score_workers is not None else (0 if on_cpu else os.cpu_count() or 1)
    return batch_size, workers


def _scoring_pool(workers: int):
    """A process pool for the scorer (numpy only, so forking a process that holds a GPU context is safe)."""
    if workers <= 0:
        return None
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers)


def evaluate(
    pipe: Any,
    family: FamilyAdapter,
    guidance_scale: float = 1.0,
    num_steps: int = 16,
    seed: int = 0,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    per_category: tuple[int, int] | None = None,
    score_workers: int = 0,
    guider: Any | None = None,
) -> dict[str, Any]:
    """Generate and score the eval set; per-category numbers with 95 % CIs, each sample's score, NFE, examples.

    ``per_category``: (T2I prompts, edits) per category, default the quick set. ``score_workers`` > 0 scores in
    that many processes while the device generates the next batch. ``guider``: a ``diffusers.guiders`` guider
    to sample with instead of CFG α (the library's guider field; ``guidance_scale`` is then ignored).
    """
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    n_t2i_cat, n_edit_cat = per_category or PRESETS["quick"]
    base = TransformerField("model", family, pipe.transformer)
    field: Field = CFGField("model_cfg", base, guidance_scale) if guidance_scale != 1.0 else base
    calls_per_step = 2 if guidance_scale != 1.0 else 1
    if guider is not None:
        field, calls_per_step = GuiderField("model_guided", base, guider), guider.num_conditions
    device = pipe.transformer.device
    prompts, sources = PromptCache(pipe, family, device), SourceCache(pipe, family, device)
    t2i = t2i_rows("eval", n_t2i_cat)
    edits = edit_rows("eval", n_per_category=n_edit_cat) if family.can_edit else []
    for rows in (t2i, edits):  # each row's index within its category names its noise (sample_seed)
        counts: dict[str, int] = {}
        for row in rows:
            row["index"] = counts[row["category"]] = counts.get(row["category"], -1) + 1
    t2i, edits = spread_over_categories(t2i, limit), spread_over_categories(edits, limit)
    bar = tqdm(total=len(t2i) + len(edits), desc="ShapesWorld eval", disable=not progress)
    pool = _scoring_pool(score_workers)
    jobs: list[tuple] = []  # (task, spec, image, source) in sample order
    seeds = {"t2i": [], "edit": []}
    examples: dict[str, list[Image.Image]] = {}
    example_prompts: dict[str, str] = {}
    try:
        pending = []
        for task, rows in (("t2i", t2i), ("edit", edits)):
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                size = batch[0]["target_image"].width
                texts = [r["prompt"] for r in batch]
                batch_seeds = [sample_seed(seed, task, r["category"], r["index"]) for r in batch]
                seeds[task] += batch_seeds
                if task == "t2i":
                    srcs = None
                    cond, uncond = prompts(texts), prompts.empty(len(batch))
                else:
                    keys = [("eval-edit", n_edit_cat, start + i) for i in range(len(batch))]
                    srcs = [r["source_image"].convert("RGB") for r in batch]
                    source = sources(keys, srcs, size, size)
                    cond = prompts(texts, keys, srcs).merge(source)
                    uncond = prompts.empty(len(batch), keys, srcs).merge(source)
                images = sample(pipe, family, field, cond, uncond, size, size, batch_seeds, num_steps)
                batch_jobs = []
                for i, (row, image) in enumerate(zip(batch, images)):
                    if image.size != (size, size):
                        image = image.resize((size, size), Image.NEAREST)
                    src = None if srcs is None else np.asarray(srcs[i])
                    batch_jobs.append((task, row["spec"], np.asarray(image.convert("RGB")), src))
                    shown = (
                        [image, row["target_image"]]
                        if srcs is None
                        else [srcs[i], image, row["target_image"]]
                    )
                    examples.setdefault(row["category"], shown)
                    example_prompts.setdefault(row["category"], row["prompt"])
                if pool is not None:
                    pending.append(pool.map_async(score_job, batch_jobs))
                jobs += batch_jobs
                bar.update(len(batch))
        if pool is not None:
            results = [r for p in pending for r in p.get()]
        else:
            results = [score_job(job) for job in jobs]
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    bar.close()
    t2i_results = [r for job, r in zip(jobs, results) if job[0] == "t2i"]
    edit_results = [r for job, r in zip(jobs, results) if job[0] == "edit"]
    samples = {
        "t2i": _per_category([r["score"] for r in t2i_results], t2i_results),
        "edit": _per_category([round(r["overall"], 4) for r in edit_results], edit_results),
    }
    return {
        "t2i": summarize_t2i(t2i_results) if t2i_results else {},
        "edit": summarize_edit(edit_results) if edit_results else {},
        "ci": {task: bootstrap_ci(task, per) for task, per in samples.items()},
        "set": set_name(n_t2i_cat, n_edit_cat),
        "per_category": {"t2i": n_t2i_cat, "edit": n_edit_cat},
        "limit": limit,
        "seed": seed,
        "scorer_version": SCORER_VERSION,
        "nfe_per_image": num_steps * calls_per_step,
        "guidance_scale": guidance_scale,
        **({"guider": field.describe()} if guider is not None else {}),
        "num_steps": num_steps,
        "n_t2i": len(t2i_results),
        "n_edit": len(edit_results),
        "can_edit": family.can_edit,
        "wall_time_s": round(time.perf_counter() - start_time, 2),
        "samples": samples,
        "_examples": examples,
        "_example_prompts": example_prompts,
    }


def _per_category(values: list[float], results: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each sample's score grouped by category, in sample order (the JSON's verdicts, the bootstrap's input)."""
    out: dict[str, list[float]] = {}
    for v, r in zip(values, results):
        out.setdefault(r["category"], []).append(float(v))
    return out


#: headline -> the categories it averages; shown only when all of them were scored (a subset's average would
#: pass for the whole)
AGGREGATES = {
    ("t2i", "overall"): T2I_CATEGORIES,
    ("edit", "local"): LOCAL_EDIT_CATEGORIES,
    ("edit", "global"): GLOBAL_EDIT_CATEGORIES,
    ("edit", "average"): EDIT_CATEGORIES,
}


def spread_over_categories(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """At most ``limit`` rows, taken from each category in turn (its first rows first), so a limited evaluation
    covers every category instead of the first one only; every row when ``limit`` is None."""
    if limit is None or limit >= len(rows):
        return rows
    by_category: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_category.setdefault(row["category"], []).append(i)
    turns = itertools.zip_longest(*by_category.values())
    order = [i for turn in turns for i in turn if i is not None]
    return [rows[i] for i in sorted(order[:limit])]


def _cell(r: dict[str, Any], task: str, name: str, digits: int) -> str:
    needed = AGGREGATES.get((task, name), ())
    if name not in r[task] or any(c not in r[task] for c in needed):
        return "-"
    text = f"{r[task][name]:.{digits}f}"
    ci = r.get("ci", {}).get(task, {}).get(name)
    return text + (f" [{ci[0]:.{digits - 1}f}, {ci[1]:.{digits - 1}f}]" if ci else "")


def _set_line(r: dict[str, Any]) -> str:
    if "set" not in r:
        return "set: quick, seed 0 (scorer version 1, before sets were named; no intervals)"
    first = f", {r['limit']} prompts / edits only (spread over the categories)" if r.get("limit") else ""
    return f"set: {r['set']}{first}, seed {r['seed']}, scorer version {r.get('scorer_version')}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Paper-style table; ``results`` maps a model name to :func:`evaluate`'s output. A result that carries
    bootstrap intervals (``ci``) shows each headline's 95 % interval in brackets after it."""
    t2i_cols = list(T2I_CATEGORIES) + ["overall"]
    edit_cols = list(EDIT_CATEGORIES) + ["local", "global", "average"]
    lines = [
        "T2I (GenEval rules, accuracy 0-1)",
        "| model | " + " | ".join(t2i_cols) + " | NFE |",
        "|---" * (len(t2i_cols) + 2) + "|",
    ]
    for name, r in results.items():
        vals = [_cell(r, "t2i", c, 3) for c in t2i_cols]
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {r['nfe_per_image']} |")
    lines += [
        "",
        "Edits (GEdit scheme, overall = SC 0-10)",
        "| model | " + " | ".join(edit_cols) + " |",
        "|---" * (len(edit_cols) + 1) + "|",
    ]
    for name, r in results.items():
        if not r["edit"]:
            lines.append(f"| {name} | " + " | ".join(["n/a"] * len(edit_cols)) + " |")
            continue
        lines.append(f"| {name} | " + " | ".join(_cell(r, "edit", c, 2) for c in edit_cols) + " |")
    lines.append("")
    lines += sorted({_set_line(r) for r in results.values()})
    if any("ci" in r for r in results.values()):
        lines.append("[lo, hi]: 95 % stratified bootstrap interval")
    return "\n".join(lines)


class UsageError(Exception):
    """A bad argument or input file of the evaluate command: printed as one ``error:`` line, exit status 2."""


def _load_result(path: str, row: str | None) -> dict[str, Any]:
    """One evaluation from an ``evaluate --json`` file, or the row ``row`` of a multi-row file (results.json)."""
    from ..config import regular_file_problem

    problem = regular_file_problem(path)
    if problem is not None:
        raise UsageError(f"{path}: {problem}; pass an `evaluate --json` file or results.json")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a JSON result file ({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds no evaluation (a JSON object of results is expected)")
    if "samples" in data or "t2i" in data:
        if row is not None:
            raise SystemExit(f"error: {path} holds a single result; drop the row name {row!r}")
        result = data
    elif row is None:
        raise SystemExit(
            f"error: {path} holds several results ({', '.join(data)}); pick one with --row_a/--row_b"
        )
    elif row not in data:
        raise SystemExit(f"error: {path} has no row {row!r}; it has: {', '.join(data)}")
    else:
        result = data[row]
    if not isinstance(result, dict) or "samples" not in result:
        raise SystemExit(
            f"error: {path} keeps no per-sample scores (written before scorer version 2); evaluate it again"
        )
    samples = result["samples"]
    if not isinstance(samples, dict) or not all(isinstance(samples.get(t), dict) for t in ("t2i", "edit")):
        raise UsageError(
            f"{path}: its `samples` are not an evaluation's per-sample scores; evaluate it again"
        )
    return result


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Paired-bootstrap difference B - A of every headline; refuses results on different sets, seeds or scorers."""
    keys = ("per_category", "limit", "seed", "scorer_version", "n_t2i", "n_edit")
    differ = [k for k in keys if a.get(k) != b.get(k)]
    if differ:
        what = ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in differ)
        raise ValueError(
            f"refusing to compare results of different evaluations ({what}): a paired comparison needs the same "
            "samples; evaluate both with the same --preset/--per_category, --limit and --seed"
        )
    return {task: paired_bootstrap(task, a["samples"][task], b["samples"][task]) for task in ("t2i", "edit")}


def format_comparison(
    diff: dict[str, dict[str, dict[str, Any]]], a: dict, b: dict, names: tuple[str, str]
) -> str:
    lines = [
        f"B - A, paired bootstrap over the same samples (A = {names[0]}, B = {names[1]}; set {a.get('set')}, "
        f"seed {a.get('seed')})",
        "| headline | A | B | B - A | 95 % CI | p |",
        "|---|---|---|---|---|---|",
    ]
    for task, digits in (("t2i", 3), ("edit", 2)):
        for name, d in diff[task].items():
            lo, hi = d["ci"]
            lines.append(
                f"| {task} {name} | {a[task][name]:.{digits}f} | {b[task][name]:.{digits}f} | "
                f"{d['difference']:+.{digits}f} | [{lo:+.{digits}f}, {hi:+.{digits}f}] | {d['p']:.3f} |"
            )
    return "\n".join(lines)


def compare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m danceopd_diffusers.shapesworld.evaluate compare",
        description="Paired-bootstrap difference (B - A) of two ShapesWorld results on the same set and seed.",
    )
    parser.add_argument("a", help="result A: an evaluate --json file, or results.json with --row_a")
    parser.add_argument("b", help="result B")
    parser.add_argument(
        "--row_a", default=None, help="the row of A's file, when it holds several (results.json)"
    )
    parser.add_argument("--row_b", default=None, help="the row of B's file")
    args = parser.parse_args(argv)
    a, b = _load_result(args.a, args.row_a), _load_result(args.b, args.row_b)
    try:
        diff = compare(a, b)
        table = format_comparison(diff, a, b, (args.row_a or args.a, args.row_b or args.b))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, IndexError) as err:
        raise UsageError(
            f"{args.a} and {args.b} are not both complete evaluate results ({type(err).__name__}: {err}); "
            "evaluate them again"
        ) from err
    print(table)
    return 0


def examples_grid(result: dict[str, Any]) -> Image.Image:
    """One row per category: its first prompt, the model's image and the world's target (edits: source first)."""
    examples, prompts = result["_examples"], result.get("_example_prompts", {})
    titles = [f"{category}: {prompts.get(category, '')!r}" for category in examples]
    labels = [(["source"] if len(row) == 3 else []) + ["model", "target"] for row in examples.values()]
    return image_grid(list(examples.values()), titles=titles, labels=labels)


def main(argv: list[str] | None = None) -> int:
    """The command line: a bad argument or input is one ``error:`` line and exit status 2, never a traceback."""
    try:
        return _main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # messages raised as SystemExit("error: ...") below
        if isinstance(exc.code, str):
            print(exc.code if exc.code.startswith("error:") else f"error: {exc.code}", file=sys.stderr)
            return 2
        raise


def _number_problems(args: argparse.Namespace) -> str | None:
    """The first numeric argument out of its range, as a message."""
    import math

    ranges = {
        "num_inference_steps": (1, None),
        "seed": (0, 2**63 - 1),
        "per_category": (1, None),
        "batch_size": (1, None),
        "score_workers": (0, 1024),
        "limit": (1, None),
        "max_sequence_length": (1, None),
    }
    for name, (low, high) in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            return f"--{name} must be {bounds}, got {value}"
    if not math.isfinite(args.guidance_scale) or args.guidance_scale < 0:
        return f"--guidance_scale must be a finite number >= 0 (1 = no CFG), got {args.guidance_scale}"
    return None


def _output_problem(flag: str, path: str | None) -> str | None:
    """Why ``path`` cannot be written as an output file (its folder missing, it a folder), or None."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        return f"{flag} {path} is a folder; pass a file path"
    if os.path.lexists(target) and not target.is_file():
        return f"{flag} {path} exists and is not a regular file; pass another path"
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return f"{flag} {path}: its folder {parent} does not exist; create it or pass another path"
    if not os.access(parent, os.W_OK):
        return f"{flag} {path}: its folder {parent} is not writable; pass another path"
    return None


def _check_device(device: str) -> str | None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device; pass cpu, cuda or cuda:N"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device} but torch sees no CUDA device; pass --device cpu"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"--device {device}: there are {torch.cuda.device_count()} CUDA devices; pass cuda:0 .. cuda:N-1"
    elif parsed.type not in ("cpu", "mps", "xpu"):
        return f"--device {device}: use cpu or cuda"
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        return "--device mps but torch sees no MPS device; pass --device cpu"
    return None


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    parser = argparse.ArgumentParser(description="Score a pipeline on ShapesWorld's evaluation set.")
    parser.add_argument(
        "--pipeline", required=True, help="pipeline folder (stock or exported by train_danceopd.py)"
    )
    parser.add_argument("--lora", default=None, help="a LoRA to fuse in first (file or folder)")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="CFG α (u + α(c-u)); 1 = no CFG")
    parser.add_argument("--num_inference_steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="text tokens per prompt (default: the value the pipeline folder was trained with)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="quick (default): 16 T2I prompts and 8 edits per category; large: 192 and 256",
    )
    size.add_argument("--per_category", type=int, default=None, help="N T2I prompts and N edits per category")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="images per device batch (8 on CPU, 512 else)"
    )
    parser.add_argument(
        "--score_workers",
        type=int,
        default=None,
        help="scorer processes (default: every CPU core when generating on a GPU, else 0 = in this process)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score only N prompts / edits, the first of each category in turn",
    )
    parser.add_argument(
        "--grid", default=None, help="where to write the picture grid (default: next to --json)"
    )
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--name", default=None, help="row name in the table")
    args = parser.parse_args(argv)
    if not Path(args.pipeline).exists():
        print(f"error: --pipeline {args.pipeline} does not exist", file=sys.stderr)
        return 2
    problem = (
        _number_problems(args) or _output_problem("--json", args.json) or _output_problem("--grid", args.grid)
    )
    if problem is not None:
        raise UsageError(problem)
    if args.lora and not Path(args.lora).exists():
        print(f"error: --lora {args.lora} does not exist", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = _check_device(device)
    if problem is not None:
        raise UsageError(problem)
    from ..config import ConfigError
    from ..preflight import inspect_pipeline, load_errors

    try:  # the folder's configs and files (pickles, FIFOs, ...) before any weights load
        inspect_pipeline(args.pipeline, flag="--pipeline")
        if args.lora:
            from ..lora_io import check_safetensors, resolve_lora_file

            try:
                lora_file = resolve_lora_file(args.lora)
            except FileNotFoundError as exc:
                raise ConfigError(f"--lora {args.lora}: {exc}") from exc
            check_safetensors(lora_file, "--lora")
        per_category = (args.per_category,) * 2 if args.per_category else PRESETS[args.preset or "quick"]
        batch_size, workers = device_defaults(device, args.batch_size, args.score_workers)
        with load_errors("--pipeline / --lora", args.pipeline):
            pipe, family = load_pipeline(
                args.pipeline, args.lora, device, max_sequence_length=args.max_sequence_length
            )
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    result = evaluate(
        pipe,
        family,
        args.guidance_scale,
        args.num_inference_steps,
        args.seed,
        batch_size,
        args.limit,
        per_category=per_category,
        score_workers=workers,
    )
    name = args.name or Path(args.pipeline).name + (f" + {Path(args.lora).name}" if args.lora else "")
    print(format_table({name: result}))
    if not family.can_edit:
        print(f"(the {family.name} family cannot edit: edit categories are n/a)")
    print(
        f"wall time: {result['wall_time_s']:.1f} s for {result['n_t2i']} T2I prompts and {result['n_edit']} edits "
        f"on {device} (batch {batch_size}, {workers or 'no'} scorer processes; model loading not included)"
    )
    grid_path = args.grid or (
        str(Path(args.json).with_suffix(".png")) if args.json else "shapesworld_eval.png"
    )
    examples_grid(result).save(grid_path)
    print(f"grid: {grid_path}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=1), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
