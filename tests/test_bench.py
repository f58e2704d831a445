"""benchmarks/bench_train_step.py: the recipe through train_danceopd.main at toy size, its FLOP limit, and the
official runner's config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, _reset_accelerate

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train_step as bench  # noqa: E402
import compare  # noqa: E402
import run_official  # noqa: E402

TIMING_FIELDS = (
    "measured_steps",
    "measured_samples",
    "s_per_sample",
    "samples_per_s",
    "s_per_optimizer_step",
    "step_times_s",
    "rollout_s_per_sample",
    "targets_s_per_sample",
    "student_s_per_sample",
    "mean_rollout_steps",
    "peak_memory_gib",
)
LIMIT_FIELDS = (
    "flops_tflop",
    "expected_rollout_steps",
    "matmul_tflops",
    "limit_s_per_sample",
    "limit_s_per_sample_measured_routes",
    "percent_of_limit",
)


def test_tiny_run_through_the_training_script(tmp_path, capsys):
    """2 optimizer steps of the recipe (batch 1, accumulation 4) through train_danceopd.main: one JSON line with
    every field, the split adding up to the step, 4 rollouts timed in the measured step."""
    import train_danceopd
    from danceopd_diffusers.objectives import RoutedTargets

    original = train_danceopd.on_policy_states, RoutedTargets.__call__
    out = tmp_path / "bench.json"
    _reset_accelerate()
    try:
        results = bench.main(
            ["--tiny", "--resolutions", "64", "--steps", "1", "--warmup", "1"]
            + ["--work_dir", str(tmp_path / "work"), "--json", str(out), "--profile", str(tmp_path / "prof")]
        )
    finally:
        _reset_accelerate()
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == results == json.loads(out.read_text())
    # the profile of the measured step: its wall time, then the ops (host only on a CPU)
    profile = (tmp_path / "prof.64").read_text()
    assert "torch.profiler over 1 steps" in profile and "aten::" in profile
    (r,) = results
    for field in TIMING_FIELDS + LIMIT_FIELDS + ("resolution", "measured_routes", "toolkit"):
        assert field in r, field
    assert r["resolution"] == 64 and r["measured_steps"] == 1 and r["measured_samples"] == 4
    assert len(r["measured_routes"]) == 1 and r["measured_routes"][0] in ("expert_a", "expert_b", "base_cfg")
    assert min(r["rollout_s_per_sample"], r["targets_s_per_sample"], r["student_s_per_sample"]) > 0
    split = r["rollout_s_per_sample"] + r["targets_s_per_sample"] + r["student_s_per_sample"]
    assert split == pytest.approx(r["s_per_sample"])
    assert r["s_per_sample"] == pytest.approx(r["step_times_s"][0] / 4)
    assert 1 <= r["mean_rollout_steps"] <= 16
    assert r["expected_rollout_steps"] == pytest.approx(10.93, abs=0.005)
    limit = r["flops_tflop"]["per_sample"]["total"] / r["matmul_tflops"]
    assert r["limit_s_per_sample"] == pytest.approx(limit)
    assert r["percent_of_limit"] == pytest.approx(100 * limit / r["s_per_sample"])
    rows = compare.table(results).splitlines()
    assert len(rows) == 3 and rows[2].startswith("| danceopd-diffusers: this checkout | 64² |")
    # the wrappers are taken off the script's names (and the targets' class) again
    assert (train_danceopd.on_policy_states, RoutedTargets.__call__) == original
    # the folder is reused: its experts are PEFT adapters both toolkits read
    work = tmp_path / "work"
    assert (work / "pipeline" / "model_index.json").is_file()
    for name in bench.EXPERTS:
        assert (work / "experts" / name / "adapter_config.json").is_file()


def test_sd35_medium_forward_flops_on_meta():
    """F(1024²) of the SD3.5-Medium shape = the audit's 11.250 TFLOP (7.016 linear + 4.233 attention), and the
    student LoRA's count = 2·r·(d_in + d_out) per token and adapted layer."""
    flops = bench.count_flops("sd3", 1024, rank=128)
    assert round(flops["F"] / 1e12, 3) == 11.250
    assert round(flops["F_linear"] / 1e12, 3) == 7.016
    assert round(flops["F_attention"] / 1e12, 3) == 4.233
    # 4 projections x (24 joint + 13 attn2 layers) on the 4096 image tokens; 3 x 24 + 23 context projections
    # (the last block has no to_add_out) on the 333 text tokens; d_in + d_out = 2 x 1536
    adapted_tokens = 4 * 37 * 4096 + (3 * 24 + 23) * 333
    assert flops["lora"] == 2 * 128 * 3072 * adapted_tokens


def test_limit_formula_reproduces_the_audit():
    """With the audit's counts (old student targets: LoRA r128 = 0.334 TFLOP), the formula gives its 167.9 TFLOP
    per sample on the A/B routes and 171.6 on the full route mix, at E[rollout steps] = 10.93."""
    flops = {"F": 11.250e12, "F_linear": 7.016e12, "F_attention": 4.233e12, "lora": 0.334e12}
    steps = bench.expected_rollout_steps(16, "low", 1, 1)
    assert steps == pytest.approx(10.93, abs=0.005)
    ab = bench.per_sample_tflop(flops, 0.167e12, steps, ["expert_a", "expert_b"])
    assert ab["student"] == pytest.approx(29.85, abs=0.01)
    assert ab["total"] == pytest.approx(167.9, abs=0.1)
    full = bench.per_sample_tflop(flops, 0.167e12, steps, ["expert_a", "expert_b", "base_cfg"])
    assert full["total"] == pytest.approx(171.6, abs=0.1)
    assert full["total"] / 780 == pytest.approx(0.220, abs=0.001)


def test_expected_rollout_steps_of_a_batch_matches_the_sampler():
    """The exact E[max over the batch] agrees with the library's own query sampler."""
    from danceopd_diffusers.rollout import sample_query_indices

    gen = torch.Generator().manual_seed(0)
    idx = sample_query_indices(16, 4 * 50000, 1, "low", gen).view(50000, 4)
    sampled = float(idx.amax(1).clamp(min=1).double().mean())
    assert bench.expected_rollout_steps(16, "low", 1, 4) == pytest.approx(sampled, abs=0.03)
    assert bench.expected_rollout_steps(16, "low", 1, 4) > bench.expected_rollout_steps(16, "low", 1, 1) + 1


def test_measured_window_attributes_calls_to_their_step():
    """Calls made while k optimizer steps were done belong to step k; the warm-up step's calls are dropped."""
    stamps = [10.0, 12.0, 15.0]  # the ends of steps 0, 1, 2
    calls = [
        (0, "rollout", 5.0, 16),
        (1, "targets", 0.25, None),
        (1, "rollout", 1.0, 9),
        (2, "rollout", 2.0, 3),
    ]
    times, rollout, targets, lengths = bench.measured_window(stamps, calls, warmup=1)
    assert times == [2.0, 3.0] and targets == 0.25 and rollout == 2.75 and lengths == [9, 3]
    _, rollout, _, _ = bench.measured_window(stamps, calls, 1, targets_inside_rollout=False)
    assert rollout == 3.0


def test_official_config_names_the_same_folder_experts_and_recipe(tmp_path):
    paths = {
        "model": tmp_path / "pipeline",
        "experts": {n: tmp_path / "experts" / n for n in bench.EXPERTS},
        "prompts_csv": tmp_path / "prompts_official.csv",
    }
    (tmp_path / "official" / "danceopd" / "core").mkdir(parents=True)
    (tmp_path / "official" / "danceopd" / "core" / "engine.py").write_text("")
    args = run_official.parse_args(
        ["--official_dir", str(tmp_path / "official"), "--teacher_cfg_scale", "3.5"]
    )
    config = run_official.official_config(paths, args, 512, str(tmp_path / "run"))
    teachers = {t["name"]: t["lora_dir"] for t in config["teachers"]}
    assert teachers == {
        "expert_a": str(paths["experts"]["expert_a"]),
        "expert_b": str(paths["experts"]["expert_b"]),
        "base": None,
    }
    assert [r["teacher"] for r in config["routing"]["routes"]] == ["expert_a", "expert_b", "base"]
    assert config["model"]["pretrained_model"] == str(paths["model"])
    t = config["training"]
    assert (t["resolution"], t["rollout_steps"], t["k"], t["query_bias"], t["grad_accum"]) == (
        512,
        16,
        1,
        "low_t",
        4,
    )
    assert (t["lr"], t["mixed_precision"], t["max_sequence_length"], t["teacher_cfg_scale"]) == (
        2e-4,
        "bf16",
        256,
        3.5,
    )
    assert config["student"]["lora_rank"] == config["student"]["lora_alpha"] == 128


def test_official_runner_refuses_a_folder_that_is_not_the_toolkit(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_official.parse_args(["--official_dir", str(tmp_path)])
    assert "not a checkout of worldbench/DanceOPD" in capsys.readouterr().err


def test_bench_needs_a_gpu_without_tiny(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--tiny"):
        bench.main(["--work_dir", str(tmp_path)])
    assert not Path(tmp_path, "built.json").exists()


def test_code_dir_must_hold_the_training_script(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--code_dir", str(tmp_path)])
    assert "holds no train_danceopd.py" in capsys.readouterr().err
