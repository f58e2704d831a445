"""Two CPU processes under `accelerate launch`: DDP, and FSDP2 through accelerate's own engine (gloo).

One route per step, the same on both processes; FSDP2 trains the same LoRA as DDP, exports a pipeline that loads,
and resumes exactly from its sharded checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FSDP_ON_CPU = REPO / "tests" / "fsdp_on_cpu.py"


def _launch(launcher: list[str], script: Path, args: list[str], cwd: Path, port: int, timeout: int = 600):
    # accelerate's `--cpu` launcher starts a single process unless MPI is installed; `--multi_gpu` (or an FSDP
    # config) on a machine without CUDA starts two torchrun processes, which the script runs as gloo processes.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(script),
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _train_args(tiny_path: str, root: Path, out: Path, steps: int = 6) -> list[str]:
    config = root / "fields.yaml"
    config.write_text(
        "fields:\n  base: {type: base}\n  c2: {type: cfg, of: base, scale: 2.0}\n  c5: {type: cfg, of: base, scale: 5.0}\n"
        "routes:\n  - {field: c2, task: t2i}\n  - {field: c5, task: t2i}\n"
    )
    data = root / "prompts.csv"
    data.write_text("prompt\na red circle\ntwo blue squares\na green star\n")
    # per-rank query indices make the ranks' rollouts stop at different steps: the case FSDP must survive
    return [
        *("--pretrained_model_name_or_path", tiny_path, "--fields_config", str(config)),
        *("--dataset_name", str(data), "--output_dir", str(out), "--max_train_steps", str(steps)),
        *("--checkpointing_steps", "3", "--num_rollout_steps", "4", "--rank", "4", "--train_batch_size", "1"),
        *("--gradient_accumulation_steps", "2", "--max_sequence_length", "16", "--report_to", "none"),
        *("--seed", "3"),
    ]


def _routes(out: Path) -> list[list[dict]]:
    return [
        [json.loads(line) for line in (out / "logs" / f"routes_rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]


@pytest.fixture(scope="module")
def ddp_run(tiny_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    out = root / "out"
    proc = _launch(
        ["--multi_gpu"], REPO / "train_danceopd.py", _train_args(tiny_path, root, out), root, 29533
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_two_processes_take_the_same_routes(ddp_run):
    logs = _routes(ddp_run)
    assert [e["step"] for e in logs[0]] == list(range(6))
    assert [e["route"] for e in logs[0]] == [e["route"] for e in logs[1]]
    assert len({e["route"] for e in logs[0]}) == 2  # both routes were drawn over the run
    assert (ddp_run / "pytorch_lora_weights.safetensors").exists()
    assert (ddp_run / "checkpoint-6" / "random_states_1.pkl").exists()
    assert (ddp_run / "model_index.json").exists()


def test_two_processes_train_what_one_process_does_at_the_global_batch(ddp_run, tiny_path, tmp_path):
    """Every rank draws the global batch and keeps its slice: 2 processes at batch 1 give, step by step, the loss
    of 1 process at batch 2 (the mean of the ranks' losses), and the same student."""
    from conftest import run_train

    out = tmp_path / "one"
    args = _train_args(tiny_path, tmp_path, out)
    args[args.index("--train_batch_size") + 1] = "2"
    run_train([*args, "--skip_pipeline_export"])
    one = [json.loads(line) for line in (out / "logs" / "routes_rank0.jsonl").read_text().splitlines()]
    two = _routes(ddp_run)
    assert [e["route"] for e in one] == [e["route"] for e in two[0]]
    for single, a, b in zip(one, *two):
        mean = (a["loss"] + b["loss"]) / 2
        assert abs(single["loss"] - mean) <= 1e-5 * max(1.0, abs(mean)), (
            single["step"],
            single["loss"],
            mean,
        )
    assert len(one) == 6 and len({round(e["loss"], 6) for e in one}) > 1
    lora, ddp = (load_file(p / "pytorch_lora_weights.safetensors") for p in (out, ddp_run))
    for key in lora:
        assert torch.allclose(lora[key], ddp[key], atol=1e-5), (key, (lora[key] - ddp[key]).abs().max())


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_batched_micro_steps_train_what_sequential_ones_do(engine, ddp_run, tiny_path, tmp_path):
    """--batch_rollouts under DDP and FSDP2: one rollout and one student forward / backward per optimizer step
    (gradients exchanged once, in the step's last micro-step) give the sequential micro-steps' losses and student."""
    out = tmp_path / "batched"
    args = [*_train_args(tiny_path, tmp_path, out), "--batch_rollouts", "--skip_pipeline_export"]
    if engine == "ddp":
        launcher, script, port = ["--multi_gpu"], REPO / "train_danceopd.py", 29539
    else:
        launcher = ["--config_file", str(REPO / "accelerate_configs" / "fsdp2_lora.yaml")]
        script, port = FSDP_ON_CPU, 29540
    proc = _launch(launcher, script, args, tmp_path, port)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for batched, sequential in zip(_routes(out), _routes(ddp_run)):
        assert [e["route"] for e in batched] == [e["route"] for e in sequential]
        for a, b in zip(batched, sequential):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(b["loss"])), (a["step"], a["loss"], b["loss"])
    joint, ddp = (load_file(p / "pytorch_lora_weights.safetensors") for p in (out, ddp_run))
    for key in ddp:
        assert torch.allclose(joint[key], ddp[key], atol=1e-5), (key, (joint[key] - ddp[key]).abs().max())


def test_fsdp2_lora_trains_as_ddp_exports_and_resumes_exactly(ddp_run, tiny_path, tmp_path):
    from diffusers import DiffusionPipeline

    fsdp = ["--config_file", str(REPO / "accelerate_configs" / "fsdp2_lora.yaml")]
    out = tmp_path / "out"
    proc = _launch(fsdp, FSDP_ON_CPU, _train_args(tiny_path, tmp_path, out), tmp_path, 29534)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = _routes(out)
    assert (
        [e["route"] for e in logs[0]]
        == [e["route"] for e in logs[1]]
        == [e["route"] for e in _routes(ddp_run)[0]]
    )
    # the checkpoint went through accelerate's FSDP state dicts (sharded model and optimizer) and our hook
    assert (out / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir()
    assert (out / "checkpoint-3" / "optimizer_0").is_dir()
    assert (out / "checkpoint-3" / "pytorch_lora_weights.safetensors").exists()
    # the same student as DDP (only the order of float sums differs)
    lora, ddp = (load_file(p / "pytorch_lora_weights.safetensors") for p in (out, ddp_run))
    assert lora.keys() == ddp.keys()
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    for key in lora:
        assert torch.allclose(lora[key], ddp[key], atol=1e-5), (key, (lora[key] - ddp[key]).abs().max())
    # the exported pipeline loads, with the student fused into the gathered weights
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    reference = DiffusionPipeline.from_pretrained(ddp_run, trust_remote_code=True)
    for (name, a), b in zip(
        pipe.transformer.state_dict().items(), reference.transformer.state_dict().values()
    ):
        assert torch.allclose(a, b, atol=1e-5), name
    # exact resume from the sharded checkpoint
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(out / "checkpoint-3", cut / "checkpoint-3")
    args = [
        *_train_args(tiny_path, tmp_path, cut),
        "--resume_from_checkpoint",
        "latest",
        "--skip_pipeline_export",
    ]
    proc = _launch(fsdp, FSDP_ON_CPU, args, tmp_path, 29535)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = load_file(cut / "pytorch_lora_weights.safetensors")
    for key in lora:
        assert torch.equal(resumed[key], lora[key]), key
    three = load_file(out / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    assert any(not torch.allclose(three[k], lora[k]) for k in lora)  # steps 4-6 did change the weights


def test_fsdp2_adapters_on_the_sharded_base(tiny_path, tmp_path):
    """Base (adapters off), LoRA experts and the student evaluated on the FSDP2-sharded transformer: a call
    all-gathers each block at most once; inside ``gathered`` one all-gather serves any number of calls and adapter
    switches, the ranks' call counts may differ, and every output equals the unsharded model's."""
    fsdp = ["--config_file", str(REPO / "accelerate_configs" / "fsdp2_lora.yaml")]
    worker = REPO / "tests" / "fsdp_adapter_worker.py"
    # mismatched collectives hang gloo: a run that does not finish in time has failed
    proc = _launch(fsdp, worker, [tiny_path, str(tmp_path)], tmp_path, 29536, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        groups = report["groups"]
        assert groups > 1  # the blocks are sharded units of their own
        # the first call gathers every group; later ones the groups resharded after forward (the blocks)
        assert report["sharded_calls"][0] == groups
        assert all(0 < n <= groups for n in report["sharded_calls"])
        assert report["gathered"] == {"on_entry": groups, "inside": 0}
        assert report["match"] == {"base": True, "expert": True, "student": True}
        assert report["adapters_differ"]


def test_fsdp2_full_finetune_exports_and_resumes_exactly(tiny_path, tmp_path):
    from diffusers import SD3Transformer2DModel

    fsdp = ["--config_file", str(REPO / "accelerate_configs" / "fsdp2_full.yaml")]
    args = [
        "--full_finetune",
        "--learning_rate",
        "1e-4",
        "--skip_pipeline_export",
        "--checkpointing_steps",
        "1",
    ]
    out, cut = tmp_path / "out", tmp_path / "cut"
    proc = _launch(
        fsdp, FSDP_ON_CPU, [*_train_args(tiny_path, tmp_path, out, steps=2), *args], tmp_path, 29537
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir()
    cut.mkdir()
    shutil.copytree(out / "checkpoint-1", cut / "checkpoint-1")
    resume = [*_train_args(tiny_path, tmp_path, cut, steps=2), *args, "--resume_from_checkpoint", "latest"]
    proc = _launch(fsdp, FSDP_ON_CPU, resume, tmp_path, 29538)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trained, resumed, one, base = (
        SD3Transformer2DModel.from_pretrained(p, subfolder="transformer").state_dict()
        for p in (out, cut, out / "checkpoint-1", tiny_path)
    )
    assert trained.keys() == base.keys()
    for key in trained:
        assert torch.equal(trained[key], resumed[key]), key
    assert any(not torch.equal(trained[k], one[k]) for k in trained)  # step 2 changed the weights
    assert any(not torch.equal(one[k], base[k]) for k in trained)  # and so did step 1


def test_multi_gpu_benchmark_runs_and_its_loss_curves_agree(tmp_path):
    """benchmarks/bench_multi_gpu.py on 2 gloo processes: the scaling stage reports both runs, and the 1-process
    and 2-process loss curves at the same global batch agree (fp32 here, so to round-off)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_multi_gpu

    out = tmp_path / "multi.json"
    results = bench_multi_gpu.main(
        [
            "--tiny",
            "--processes",
            "2",
            "--steps",
            "1",
            "--curve_steps",
            "3",
            "--work_dir",
            str(tmp_path / "w"),
        ]
        + ["--json", str(out), "--port", "29621"]
    )
    scaling, curve = results
    assert json.loads(out.read_text()) == results
    assert scaling["stage"] == "scaling" and set(scaling["samples_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in scaling["samples_per_s"].values())
    assert curve["steps"] == 3 and curve["global_batch"] == 8
    assert curve["within_tolerance"] and curve["max_relative_difference"] < 1e-4, curve
