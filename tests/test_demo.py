"""The embedded default: `accelerate launch train_danceopd.py` with no model argument, as a user runs it, and the
ShapesWorld sources it is built from."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import python_blocks, run_card_blocks

from danceopd_diffusers.shapesworld import demo

REPO = Path(__file__).resolve().parents[1]


def test_embedded_default_runs_setting_a_from_the_edit_source_and_scores_the_student(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", DANCEOPD_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "demo"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
    ]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_danceopd.py")]
    # the default is 100 steps and the whole quick evaluation set (about 3 minutes on 2 cores); the test runs fewer
    args = ["--output_dir", str(out), "--max_train_steps", "4", "--demo_eval_limit", "8"]
    proc = subprocess.run(launch + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = proc.stdout + proc.stderr
    assert "embedded demo: DanceOPD on ShapesWorld" in text and "Steps: 100%" in text
    # the base's size and text length, read from its files (no flag sets them)
    assert "--resolution 64 (the VAE's sample_size" in text
    assert "--max_sequence_length 32 (the model_max_length of tokenizer_2" in text
    config = json.loads((out / "danceopd_config.json").read_text())
    assert config["args"]["resolution"] == 64 and config["args"]["max_sequence_length"] == 32
    assert config["args"]["seed"] == 0  # the demo's fixed default seed
    # the paper's query regime on ShapesWorld's unshifted grid (issue 21): the law in sigma, recorded and printed
    assert config["args"]["query_space"] == "sigma" and config["args"]["queried_sigma"]["mean"] > 0.5
    assert "queried sigma on this run's grid: mean 0.547" in text and "pass --query_space sigma" not in text
    routed = {r["task"]: r["field"] for r in config["fields_config"]["routes"]}
    assert routed == {"t2i": "t2i", "local_edit": "edit_cfg", "global_edit": "edit_cfg"}
    # the student starts from the edit source (its rank and alpha from the file): after 4 steps at lr 1e-4 its
    # LoRA is still close to the edit source's, where a fresh LoRA would start from B = 0
    assert f"'student_init': '{demo.STUDENT_INIT}'" in text and config["args"]["rank"] == 32
    from safetensors.torch import load_file

    init, student = (
        load_file(str(demo.STUDENT_INIT)),
        load_file(str(out / "pytorch_lora_weights.safetensors")),
    )
    lora_b = [k for k in init if "lora_B" in k]
    assert lora_b and set(lora_b) <= set(student)
    for key in lora_b[:4]:
        a, b = init[key].float(), student[key].float()
        assert (a - b).norm() < 0.1 * a.norm(), key
    rows = [json.loads(line) for line in (out / "logs" / "routes_rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # one route per step, with its loss
    assert all(isinstance(r["loss"], float) and 0 < r["loss"] < 10 for r in rows), rows
    assert re.search(r"loss of route (t2i|edit_cfg) \(\d steps\): first", text)
    # the table: README.md's columns, the recorded sources, the recorded students (4 steps has no expected row)
    # and this run's student, scored on a limited set that covers every category
    assert "| model | T2I overall | local edits | global edits |" in text
    for name, recorded in demo.recorded_sources().items():
        assert f"| {name} (recorded, {recorded['set']} set) |" in text
    assert "| the student's start (the edit source without CFG" in text
    assert (
        "| DanceOPD student, 100 steps (recorded:" in text
        and "| DanceOPD student, 600 steps (recorded:" in text
    )
    row = re.search(
        r"\| DanceOPD student \(this run, quick set, 8 prompts / edits spread over the categories\) \|(.*)\|",
        text,
    )
    cells = [c.strip() for c in row.group(1).split("|")]
    assert len(cells) == 3 and all(re.fullmatch(r"\d+\.\d+", c) for c in cells), cells
    assert "nan" not in text.split("ShapesWorld evaluation")[1]
    scores = json.loads((out / "shapesworld_eval.json").read_text())
    assert scores["n_t2i"] == 8 and scores["n_edit"] == 8 and scores["nfe_per_image"] == 16
    for name in ("pytorch_lora_weights.safetensors", "model_index.json", "README.md", "shapesworld_eval.png"):
        assert (out / name).exists(), name
    # the verdict: start -> end with intervals and the paired test, in words (no band: 4 steps, a limited set)
    assert (
        "[danceopd] Verdict: the student's start -> after 4 steps (set quick, seed 0, 8 prompts and 8 edits"
        in text
    )
    assert re.search(r"T2I overall +0\.\d{3} \[0\.\d{3}, 0\.\d{3}\] -> 0\.\d{3} .* p = \d\.\d{3}: ", text)
    assert re.search(r"In short: .*(rose|fell|did not change) significantly", text)
    assert "Expected for this run" not in text
    assert set(scores["verdict"]) == {"overall", "local", "global"}
    # the card: the base is the shipped folder (not on the Hub), the init recorded; its code runs with diffusers
    # alone once `base` points at that folder, as the card says
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "ships with danceopd-diffusers" in card and "`--student_init`" in card
    assert "edit_lora.safetensors" in card and str(REPO) not in card
    assert "which is an image of the training data (row " in card  # the grid's edit sources
    runs = run_card_blocks(
        python_blocks(card), "demo", out, demo.base_path(), tmp_path / "reader", "FluxTransformer2DModel"
    )
    assert [len(r["calls"]) for r in runs] == [16, 16] and all(r["image"].shape[:2] == (64, 64) for r in runs)
    assert abs(runs[0]["image"] - runs[1]["image"]).max() <= 2


def test_shipped_sources_fit_the_budget_and_load_in_the_stock_pipeline():
    from diffusers import FluxKontextPipeline

    from danceopd_diffusers.config import parse_fields_config

    files = [p for p in demo.SOURCES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    for path in (demo.FUSION_CONFIG, demo.SETTING_A_CONFIG):
        for spec in parse_fields_config(path).fields.values():
            if spec.path:
                assert Path(spec.path).is_file(), spec.path
    assert demo.STUDENT_INIT.is_file()
    pipe = FluxKontextPipeline.from_pretrained(demo.base_path())
    before = pipe.transformer.transformer_blocks[0].attn.to_q.weight.clone()
    pipe.load_lora_weights(str(demo.SOURCES / "local_edit_lora.safetensors"))
    pipe.fuse_lora()
    assert not (pipe.transformer.transformer_blocks[0].attn.to_q.weight == before).all()
    recorded = demo.recorded_sources()
    assert set(recorded) == {
        "T2I base",
        "local-edit expert",
        "global-edit expert",
        "joint training (data mixing)",
        "edit source (local + global edits)",
    }
    assert all({"t2i", "edit", "nfe_per_image"} <= set(r) for r in recorded.values())


@pytest.mark.parametrize("flag", ["--cfg_scale", "--fields_config"])
def test_user_fields_replace_the_demo_fusion(flag, tmp_path):
    import train_danceopd

    value = "3" if flag == "--cfg_scale" else str(tmp_path / "f.yaml")
    args = train_danceopd.parse_args([flag, value])
    assert args.demo and "fields_config" not in args.demo_overrides
    assert (
        args.student_init is None
    )  # the edit source belongs to the demo's setting A, not to the user's fields


def test_a_flag_given_at_its_parser_default_is_kept_in_the_demo():
    import train_danceopd

    parser_default = train_danceopd.parse_args(["--pretrained_model_name_or_path", "x"]).learning_rate
    assert demo.DEMO_DEFAULTS["learning_rate"] != parser_default
    args = train_danceopd.parse_args(["--learning_rate", str(parser_default)])
    assert args.learning_rate == parser_default and "learning_rate" not in args.demo_overrides
    assert train_danceopd.parse_args([]).learning_rate == demo.DEMO_DEFAULTS["learning_rate"]


@pytest.mark.parametrize("flags", [["--rank", "8"], ["--lora_alpha", "16"], ["--full_finetune"]])
def test_a_fresh_student_in_the_demo_starts_from_the_base(flags):
    import train_danceopd

    args = train_danceopd.parse_args(flags)
    assert args.student_init is None and args.fields_config == str(demo.SETTING_A_CONFIG)
    assert train_danceopd.parse_args([]).student_init == str(demo.STUDENT_INIT)


def test_demo_eval_limit_without_the_demo_is_an_error():
    import train_danceopd
    from danceopd_diffusers.config import ConfigError

    with pytest.raises(ConfigError, match="--demo_eval_limit applies only to the embedded default"):
        train_danceopd.parse_args(["--pretrained_model_name_or_path", "some/model", "--demo_eval_limit", "8"])


def _start_result() -> dict:
    return json.loads(demo.STUDENT_START_RESULT.read_text(encoding="utf-8"))


def test_the_shipped_start_is_the_recorded_start_on_the_quick_set():
    start = _start_result()
    assert start["set"] == "quick" and start["seed"] == 0 and start["limit"] is None
    assert start["nfe_per_image"] == 16 and start["guidance_scale"] == 1.0  # the edit source without CFG
    assert round(start["t2i"]["overall"], 3) == demo.STUDENT_START["t2i"]
    assert round(start["edit"]["local"], 2) == demo.STUDENT_START["local"]
    assert round(start["edit"]["global"], 2) == demo.STUDENT_START["global"]


def test_the_verdict_reads_start_to_end_with_intervals_a_paired_test_and_the_band():
    """A student that fixed a third of the start's failed T2I prompts and left edits alone: T2I up (the paired
    interval above 0), edits 'no significant change' (difference 0, p = 1); the band and whether the run is in it."""
    import copy

    start = _start_result()
    end = copy.deepcopy(start)
    for category, values in end["samples"]["t2i"].items():
        failed = [i for i, v in enumerate(values) if v < 1]
        for i in failed[::3]:
            values[i] = 1.0
        end["t2i"][category] = sum(values) / len(values)
    text, numbers = demo.verdict(end, start, steps=100)
    assert numbers["overall"]["reading"] == "up" and numbers["overall"]["change"]["ci"][0] > 0
    assert numbers["overall"]["end"] > numbers["overall"]["start"]
    for key in ("local", "global"):
        assert numbers[key]["reading"] == "no significant change" and numbers[key]["change"]["difference"] == 0
        assert numbers[key]["start_ci"][0] <= numbers[key]["start"] <= numbers[key]["start_ci"][1]
    assert "In short: T2I overall rose significantly; local edits and global edits did not change significantly." in text
    assert "Expected for this run: T2I " in text and "not its digits" in text
    lo, hi = demo.expected_band()["t2i"]
    assert numbers["band"]["t2i"] == [lo, hi] and lo < hi
    assert numbers["inside_band"] == (lo <= round(numbers["overall"]["end"], 3) <= hi)
    # a limited evaluation is paired with the start's same samples (each category's first rows); no band
    limited = copy.deepcopy(start)
    limited["samples"] = {t: {c: v[:2] for c, v in per.items()} for t, per in start["samples"].items()}
    limited["limit"] = 24
    text, numbers = demo.verdict(limited, start, steps=100)
    assert numbers["overall"]["change"]["difference"] == 0 and "Expected for this run" not in text
    assert "did not change significantly (the clearest move: " in text  # nothing moved: says what would tell
