"""Defaults read from the base model, labelled grids, --help, silenced library warnings, the sft log, and the
demo's summary table."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import pytest
from conftest import run_train, short_run
from PIL import Image

SHORT = short_run(max_sequence_length=None, max_train_steps=1, checkpointing_steps=100)


def _prompts(tmp_path: Path) -> str:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\na red circle\ntwo blue squares\n")
    return str(path)


def test_trained_size_of_the_shapesworld_base_and_the_tiny_model(tiny_path):
    from danceopd_diffusers.defaults import trained_size
    from danceopd_diffusers.shapesworld import demo

    size = trained_size(demo.base_path())
    assert (size.resolution, size.max_sequence_length) == (64, 32)
    assert size.resolution_reason == "the VAE's sample_size"
    assert (
        size.length_reason == "the model_max_length of tokenizer_2"
    )  # T5's; CLIP's 77 is not the prompt length
    size = trained_size(tiny_path)
    assert (size.resolution, size.max_sequence_length) == (32, 64)
    assert size.resolution_reason == "the transformer's sample_size 16 x the VAE's factor 2"


def test_a_run_without_size_flags_trains_at_what_the_exported_base_records(tiny_path, tmp_path, capsys):
    first = tmp_path / "first"
    run_train(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--cfg_scale",
            "3",
            "--dataset_name",
            _prompts(tmp_path),
            "--output_dir",
            str(first),
            "--resolution",
            "48",
            "--max_sequence_length",
            "12",
            *SHORT,
        ]
    )
    capsys.readouterr()
    second = tmp_path / "second"
    run_train(
        [
            "--pretrained_model_name_or_path",
            str(first),
            "--cfg_scale",
            "3",
            "--dataset_name",
            _prompts(tmp_path),
            "--output_dir",
            str(second),
            "--skip_pipeline_export",
            *SHORT,
        ]
    )
    out = capsys.readouterr().out
    assert f"--resolution 48 (recorded in {first}/danceopd_config.json" in out
    assert f"--max_sequence_length 12 (recorded in {first}/danceopd_config.json" in out
    recorded = json.loads((second / "danceopd_config.json").read_text())["args"]
    assert (recorded["resolution"], recorded["max_sequence_length"]) == (48, 12)


def test_sft_log_names_no_rollout_settings_and_runs_without_known_warnings(tiny_path, tmp_path, caplog):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "imgs" / "0.png")
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"prompt": "a red square", "target_image": "imgs/0.png"}) + "\n"
    )
    caplog.set_level(logging.INFO, logger="danceopd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_train(
            [
                "--pretrained_model_name_or_path",
                tiny_path,
                "--method",
                "sft",
                "--dataset_name",
                str(tmp_path / "data.jsonl"),
                "--output_dir",
                str(tmp_path / "o"),
                "--skip_pipeline_export",
                *SHORT,
            ]
        )
    log = caplog.text
    assert "Running flow-matching fine-tuning (sft)" in log
    assert "Running DanceOPD" not in log and "K = " not in log and "N = " not in log
    assert not [
        w for w in caught if "torch_dtype" in str(w.message)
    ]  # we pass dtype=, not the deprecated name


def test_known_library_warnings_are_silenced_narrowly():
    from danceopd_diffusers.known_warnings import silence_known_warnings

    silence_known_warnings()
    peft_message = (
        "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters in the "
        "model. Make sure to know what you are doing!"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(peft_message, UserWarning, stacklevel=1)
        warnings.warn("another peft warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another peft warning"]
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers.utils.import_utils")
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
            "backward compatibility."
        )
        logger.warning("some other import problem")
    finally:
        logger.removeHandler(handler)
    assert records == ["some other import problem"]


def test_loading_a_transformer_lora_for_evaluation_prints_no_text_encoder_notice():
    from diffusers.utils import logging as diffusers_logging

    from danceopd_diffusers.shapesworld.demo import STUDENT_INIT, base_path
    from danceopd_diffusers.shapesworld.evaluate import load_pipeline

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("diffusers.loaders.lora_base")
    for installed in [f for f in logger.filters if type(f).__name__ == "_DropMessages"]:
        logger.removeFilter(installed)  # earlier tests may have installed it: load_pipeline must
    handler, verbosity = Keep(), diffusers_logging.get_verbosity()
    logger.addHandler(handler)
    diffusers_logging.set_verbosity_warning()  # other tests may have turned it down
    try:
        load_pipeline(base_path(), str(STUDENT_INIT))
        logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='unet'. Open an issue")
    finally:
        logger.removeHandler(handler)
        diffusers_logging.set_verbosity(verbosity)
    # the text encoders' notice is dropped, anything else from that logger still shows
    assert records == ["No LoRA keys associated to CLIPTextModel found with the prefix='unet'. Open an issue"]


def _parser():
    import train_danceopd

    holder = {}

    def grab(self, *args, **kwargs):
        holder["parser"] = self
        raise SystemExit

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            train_danceopd.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return holder["parser"]


@pytest.mark.parametrize("columns", ["40", "50", "60", "80", "200"])
def test_help_documents_every_option_with_defaults_and_examples(columns, monkeypatch):
    """What --help says, whatever the terminal width (argparse wraps at $COLUMNS) and the program's path: the
    text is compared with its line breaks and indentation collapsed."""
    monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr("sys.argv", ["/a path/with spaces/train_danceopd.py"])
    parser = _parser()
    undocumented = [a.option_strings[0] for a in parser._actions if not (a.help or "").strip()]
    assert not undocumented, undocumented
    text = " ".join(parser.format_help().split())
    assert "(default: 0.0002)" in text and "(default: danceopd)" in text and "(default: end)" in text
    assert "examples:" in text and "--resume_from_checkpoint you/my-student:latest" in text
    assert "(default: None)" not in text
    assert "the embedded default" in text and "--max_train_steps 100" in text and "--seed 0" in text


def test_grid_is_enlarged_and_labelled():
    from danceopd_diffusers.validation import image_grid

    cells = [[Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]]
    grid = image_grid(cells, titles=["prompt: 'a red circle'"], labels=[["student (no CFG)", "t2i"]])
    plain = image_grid(cells)
    assert grid.width >= 2 * 192 and grid.height > plain.height  # 64 px cells shown at 192 px, text above
    # the pixels are enlarged, not smoothed: a cell is one flat colour
    top = grid.height - 4 - 192
    assert {grid.getpixel((4 + x, top + y)) for x in (0, 100, 191) for y in (0, 100, 191)} == {(255, 0, 0)}
    # text was drawn above the images (dark pixels in the title and label band)
    band = grid.crop((0, 0, grid.width, top)).convert("L")
    assert band.getextrema()[0] < 100


def test_limited_evaluation_covers_every_category_and_tables_show_no_partial_average():
    from danceopd_diffusers.shapesworld.demo import summary_cells
    from danceopd_diffusers.shapesworld.evaluate import format_table, spread_over_categories
    from danceopd_diffusers.shapesworld.world import T2I_CATEGORIES, t2i_rows

    subset = spread_over_categories(t2i_rows("eval", 16), 8)
    assert len(subset) == 8 and {r["category"] for r in subset} == set(T2I_CATEGORIES)
    partial = {
        "t2i": {"single_object": 1.0, "overall": 1.0},
        "edit": {"subject_add": 2.0, "local": 2.0, "average": 2.0},
        "nfe_per_image": 16,
    }
    assert summary_cells(partial) == ["-", "-", "-"]
    table = format_table({"m": partial})
    assert "nan" not in table and "1.000 | - | - | - | - | - | - | 16" in table
    assert "| m | 2.00 | - | - | - | - | - | - |" in table


@pytest.mark.parametrize(
    "argv, guess",
    [
        (["--learnig_rate", "1e-4"], "--learning_rate"),
        (["--learning-rate", "1e-4"], "--learning_rate"),
        (["--max_trian_steps=3"], "--max_train_steps"),
        (["--output_dir", "x", "--resolutoin", "64"], "--resolution"),
        (["--zzzz"], None),
    ],
)
def test_a_mistyped_flag_is_one_error_line_with_a_suggestion(argv, guess, capsys):
    import train_danceopd

    with pytest.raises(SystemExit) as stop:
        train_danceopd.parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err
    assert err.startswith("train_danceopd.py: error: unrecognized arguments:") or "error:" in err
    assert (f"did you mean {guess}?" in err) if guess else ("did you mean" not in err)


def test_a_mistyped_flag_under_accelerate_launch_is_not_buried(tmp_path):
    """The launcher prints the child's stderr, then raises with it: the usage block (60 lines) appeared twice.
    Now the error is the first line, and only the launcher's own traceback (which no script controls) follows."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
    ]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", str(repo / "train_danceopd.py")]
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run(
        launch + ["--learnig_rate", "1e-4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("train_danceopd.py: error: unrecognized arguments: --learnig_rate 1e-4")
    assert "did you mean --learning_rate?" in lines[0]
    assert "usage:" not in proc.stderr and "--pretrained_model_name_or_path" not in proc.stderr
    assert len(lines) <= 25, proc.stderr  # was 133 lines
