"""The study's scheduler: it launches the training runs ``--jobs`` at a time and makes the weight merges.

Every run is a ``python -m train_danceopd`` process with ``--resume_from_checkpoint latest``, so a stage cut by a
budget (SIGTERM: each run saves a checkpoint) or by a lost machine is simply called again; a run is done when its
folder holds the final LoRA of ``--steps`` steps. The trainer is found as a module, not as a file of a checkout,
so the study runs the same from a wheel install.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .study_grid import SOURCE_LORAS, Merge, Run, fields_configs
from .study_settings import Settings, data_dir, device_of, write_json

#: the trainer, run as ``python -m train_danceopd``: the top-level module that ships in the wheel (and sits at the
#: root of a checkout), so the study runs from any install, not only from a checkout
TRAIN_MODULE = "train_danceopd"


def init_path(root: Path, settings: Settings, init: str | None) -> Path | None:
    """The LoRA a run starts from: a shipped source, the merged init of the ``merge`` stage, or None (fresh)."""
    if init is None:
        return None
    if init == "merged":
        return root / "merges" / "init-merged" / "pytorch_lora_weights.safetensors"
    return Path(settings.sources) / SOURCE_LORAS[init]


def trainer_search_path() -> str:
    """The folder from which this interpreter imports ``train_danceopd`` (site-packages for an install, the
    checkout for a source tree on ``sys.path``): prepended to each run's ``PYTHONPATH``, so the runs execute the
    module this process would import, whatever their working directory."""
    import importlib.util

    spec = importlib.util.find_spec(TRAIN_MODULE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"error: the trainer module {TRAIN_MODULE} is not importable: install the package (`pip install "
            "danceopd-diffusers` from a wheel, or `pip install -e .` in a checkout) and run the study again."
        )
    return str(Path(spec.origin).resolve().parent)


def train_command(run: Run, root: Path, settings: Settings, cuda: bool) -> list[str]:
    """The train_danceopd.py command line of a run (always resumable)."""
    s = settings
    cmd = [
        sys.executable,
        "-m",
        TRAIN_MODULE,
        "--pretrained_model_name_or_path",
        str(Path(s.sources) / "base"),
    ]
    cmd += ["--dataset_name", str(data_dir(root, s) / run.data / "metadata.jsonl")]
    cmd += ["--output_dir", str(root / "runs" / run.name), "--method", run.method]
    if run.fields:
        cmd += ["--fields_config", str(root / "configs" / f"{run.fields}.yaml")]
    init = init_path(root, s, run.init)
    cmd += ["--student_init", str(init)] if init else ["--rank", str(s.rank)]
    cmd += [
        "--resolution",
        "64",
        "--max_sequence_length",
        "32",
        "--num_rollout_steps",
        str(s.num_rollout_steps),
    ]
    cmd += ["--train_batch_size", str(s.batch_size), "--gradient_accumulation_steps", "1"]
    cmd += ["--learning_rate", str(s.learning_rate), "--lr_scheduler", "constant_with_warmup"]
    cmd += ["--lr_warmup_steps", str(s.warmup_steps), "--max_train_steps", str(s.steps)]
    cmd += ["--checkpointing_steps", str(s.checkpoint_every), "--validation_steps", "1000000"]
    cmd += ["--cache_latents", "--allow_tf32", "--report_to", "none", "--seed", str(run.seed)]
    cmd += ["--skip_pipeline_export", "--resume_from_checkpoint", "latest"]
    if cuda:
        cmd.append("--cuda_graphs")
    if s.query_space != "step" and run.method in ("danceopd", "offpolicy"):
        cmd += ["--query_space", s.query_space]
    return cmd + list(run.flags)


def run_done(root: Path, run: Run, settings: Settings) -> bool:
    """Whether the run's folder holds its final LoRA of at least ``settings.steps`` steps (a larger ``--steps``
    later makes it unfinished again, and the next call continues it from its last checkpoint)."""
    out = root / "runs" / run.name
    config = out / "danceopd_config.json"
    if not (out / "pytorch_lora_weights.safetensors").is_file() or not config.is_file():
        return False
    return json.loads(config.read_text()).get("args", {}).get("max_train_steps", 0) >= settings.steps


def write_configs(root: Path, settings: Settings) -> None:
    """Every fields config of the grid as ``R/configs/<name>.yaml``, the files the runs' commands name."""
    import yaml

    for name, config in fields_configs(settings).items():
        path = root / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))


def train_stage(
    runs: list[Run], root: Path, settings: Settings, budget_s: float | None = None, log: Any = print
) -> int:
    """Run ``runs`` ``jobs`` at a time; returns the number of failed runs. Finished runs are skipped; with a
    budget, runs still going when it is spent get SIGTERM (they checkpoint and stop) and resume next call."""
    import torch

    cuda = device_of(settings).startswith("cuda") and torch.cuda.is_available()
    jobs = settings.jobs or (max(1, (os.cpu_count() or 4) * 3 // 8) if cuda else 1)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    trainer_path = trainer_search_path()
    write_configs(root, settings)
    pending = []
    for run in runs:
        if run_done(root, run, settings):
            log(f"[study] {run.name}: done ({settings.steps} steps), skipped")
        elif run.init == "merged" and not init_path(root, settings, "merged").is_file():
            log(f"[study] {run.name}: needs the merged init: run the `merge` stage first; skipped")
        else:
            pending.append(run)
    start = time.monotonic()
    running: dict[str, tuple[subprocess.Popen, float, Run, Any]] = {}
    failed = 0
    stop = {"signal": None}
    stopping: set[str] = set()

    def on_signal(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            out_of_time = budget_s is not None and time.monotonic() - start > budget_s
            if out_of_time or stop["signal"]:
                pending.clear()
                for name, (proc, *_) in running.items():
                    if proc.poll() is None and name not in stopping:  # once: a second SIGTERM kills
                        proc.send_signal(signal.SIGTERM)
                        stopping.add(name)
            while pending and len(running) < jobs:
                run = pending.pop(0)
                out = root / "runs" / run.name
                out.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [trainer_path, env.get("PYTHONPATH")]))
                logfile = open(out / "train.log", "a", encoding="utf-8")
                cmd = train_command(run, root, settings, cuda)
                logfile.write(f"\n[study] {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {' '.join(cmd)}\n")
                logfile.flush()
                proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, cwd=root)
                running[run.name] = (proc, time.monotonic(), run, logfile)
                log(f"[study] {run.name}: launched ({len(running)} running, {len(pending)} waiting)")
            for name, (proc, started, _run, logfile) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                logfile.close()
                seconds = time.monotonic() - started
                _record_launch(root / "runs" / name, seconds, rc, jobs)
                del running[name]
                if rc == 0:
                    log(f"[study] {name}: finished in {seconds:.0f} s")
                elif name in stopping or rc in (128 + signal.SIGTERM, 128 + signal.SIGINT):
                    log(
                        f"[study] {name}: stopped after {seconds:.0f} s with its state saved; call the stage again"
                    )
                else:
                    failed += 1
                    tail = (root / "runs" / name / "train.log").read_text().splitlines()[-15:]
                    log(f"[study] {name}: FAILED (exit {rc}); the end of its train.log:\n" + "\n".join(tail))
            time.sleep(0.5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return failed


def _record_launch(folder: Path, seconds: float, rc: int, jobs: int) -> None:
    path = folder / "study_run.json"
    record = json.loads(path.read_text()) if path.is_file() else {"launches": []}
    record["launches"].append({"seconds": round(seconds, 1), "exit": rc, "jobs": jobs})
    write_json(path, record)


def merge_stage(items: list[Merge], root: Path, settings: Settings, log: Any = print) -> None:
    """Each merge not made yet, with ``lora_merge`` (no training; DARE draws with torch seed 0)."""
    import torch

    from ..lora_merge import merge_and_save

    for merge in items:
        out = root / "merges" / merge.name
        if (out / "pytorch_lora_weights.safetensors").is_file():
            log(f"[study] {merge.name}: merged already, skipped")
            continue
        started = time.monotonic()
        torch.manual_seed(0)  # DARE's random drops
        loras = [str(Path(settings.sources) / SOURCE_LORAS[e]) for e in merge.experts]
        merge_and_save(
            str(Path(settings.sources) / "base"),
            loras,
            list(merge.weights),
            out,
            merge.combination,
            merge.density,
            merge.svd_rank,
        )
        write_json(out / "study_merge.json", {"seconds": round(time.monotonic() - started, 1)})
        log(f"[study] {merge.name}: merged ({merge.label})")
