"""Bad inputs by category (issue 20): each test drives several members of one category through the check that
covers the whole category, so a new member is caught by the same code, not by a row of its own.

Categories: a broken student is never saved (non-finite or overflowing weights, named by their true source);
every data column's type and presence; every PIL mode; every non-regular file kind; bounded configs (alias bombs,
deep nesting, deep or exponential field graphs); the output folder's life (apart from every input, one owner,
never mixed checkpoints, a journaled publish, a deleted folder); pickles; the evaluate and study commands.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _reset_accelerate, make_lora_file, run_train, short_run
from PIL import Image

from danceopd_diffusers.config import ConfigError


@contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: SIGALRM after ``seconds`` (a FIFO opened for reading blocks forever)."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Payload:
    """A pickle that creates a marker folder if anything ever unpickles it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _prompts(folder: Path) -> str:
    path = folder / "prompts.csv"
    path.write_text("prompt\na red circle\ntwo blue squares\n")
    return str(path)


def _run(tiny_path: str, tmp_path: Path, out: Path, **flags) -> list[str]:
    data = flags.pop("dataset_name", None) or _prompts(tmp_path)
    return [
        "--pretrained_model_name_or_path",
        tiny_path,
        "--dataset_name",
        data,
        "--output_dir",
        str(out),
        *short_run(**{"cfg_scale": 3.0, **flags}),
    ]


def _cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """``train_danceopd.cli`` in-process: exit status, the ``error:`` lines, all of stderr."""
    import train_danceopd

    _reset_accelerate()
    try:
        rc = train_danceopd.cli(argv)
    finally:
        from danceopd_diffusers.stopping import StopOnSignal

        StopOnSignal.stop_all()
        _reset_accelerate()
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("error:")], err


# ============================================================================ 1. never save a broken student
@pytest.mark.parametrize("steps,checkpointing", [(1, 500), (1, 1), (3, 1)])
def test_a_diverged_update_is_never_saved(tiny_path, tmp_path, capsys, steps, checkpointing):
    """--learning_rate 1e10 leaves finite but huge weights that draw only NaN: the run fails with one clear line
    and exit status 1, and writes neither a checkpoint nor an export."""
    out = tmp_path / "out"
    argv = _run(
        tiny_path, tmp_path, out, learning_rate=1e10, max_train_steps=steps, checkpointing_steps=checkpointing
    )
    rc, errors, err = _cli(argv, capsys)
    assert rc == 1 and "Traceback" not in err
    assert len(errors) == 1 and "--learning_rate 1e+10" in errors[0] and "Lower --learning_rate" in errors[0]
    assert not list(out.glob("checkpoint-*")), sorted(p.name for p in out.iterdir())
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "model_index.json").exists()
    assert "warning: --learning_rate 1e+10 is far above" in err


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["first", "last", "bf16"])
def test_weight_guard_finds_any_non_finite_weight(bad, where):
    """One fused check over every trainable tensor, whatever its place or dtype; huge finite weights pass."""
    from danceopd_diffusers.stopping import NonFiniteError, WeightGuard

    params = [
        torch.zeros(3, 4),
        torch.ones(5),
        torch.full((2, 2), 1e30),
        torch.zeros(4, dtype=torch.bfloat16),
    ]
    guard = WeightGuard(params, 1e-3)
    guard.check_step(1, 0.1)  # all finite (1e30 included: a max-norm cannot overflow)
    index = {"first": 0, "last": 2, "bf16": 3}[where]
    params[index].view(-1)[-1] = float(bad)
    with pytest.raises(NonFiniteError, match="trainable weights are not finite"):
        guard.check_step(2, 0.1)
    with pytest.raises(NonFiniteError, match="trainable weights are not finite"):
        guard.check_before_save(2)


def test_weight_guard_probe_and_divergence_warning(capsys):
    from danceopd_diffusers.stopping import NonFiniteError, WeightGuard

    guard = WeightGuard([torch.zeros(2)], 0.5)
    guard.check_before_save(1, lambda: torch.ones(3))
    guard.check_before_save(1, lambda: None)  # no batch trained in this process
    for value in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match="prediction on its last training batch is not finite"):
            guard.check_before_save(1, lambda value=value: torch.tensor([1.0, value]))
    for step, loss in enumerate([1.0, 1.2, 0.8, 5.0, 150.0, 300.0, 1e6], start=1):
        guard.check_step(step, loss)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "diverging" in warnings[0] and "--learning_rate 0.5" in warnings[0]


@pytest.mark.parametrize(
    "states,target,prediction,says",
    [
        ("nan", "nan", "nan", "the student's own rollout"),
        ("ok", "nan", "ok", "the target of route 'r' is not finite (NaN or inf) at finite student states"),
        ("ok", "ok", "inf", "the student's prediction is not finite"),
    ],
)
def test_a_non_finite_loss_names_its_source(states, target, prediction, says):
    from danceopd_diffusers.stopping import describe_nonfinite

    def tensor(kind: str) -> torch.Tensor:
        return torch.tensor([1.0, {"ok": 2.0, "nan": float("nan"), "inf": float("inf")}[kind]])

    error = describe_nonfinite(4, "r", tensor(states), tensor(target), tensor(prediction), 1e-3)
    assert error is not None and says in str(error) and str(error).startswith("step 5:")
    assert describe_nonfinite(4, "r", tensor("ok"), tensor("ok"), tensor("ok"), 1e-3) is None


@pytest.fixture(scope="module")
def poisoned(tiny_path, tmp_path_factory):
    """Weights files holding a NaN or an inf: a LoRA, a transformer checkpoint, a base pipeline."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("poisoned")
    lora = make_lora_file(tiny_path, root / "lora")
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()

    def poison(state: dict, value: float) -> dict:
        key = sorted(k for k in state if state[k].is_floating_point())[1]
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
        return state

    (root / "nan_lora").mkdir()
    save_file(poison(load_file(lora), float("nan")), root / "nan_lora/pytorch_lora_weights.safetensors", meta)
    save_file(poison(load_file(lora), float("inf")), root / "inf_lora.safetensors", meta)
    weights = Path(tiny_path) / "transformer/diffusion_pytorch_model.safetensors"
    save_file(poison(load_file(weights), float("-inf")), root / "inf_transformer.safetensors")
    shutil.copytree(tiny_path, root / "nan_base")
    save_file(poison(load_file(weights), float("nan")), root / "nan_base/transformer/" / weights.name)
    return root


@pytest.mark.parametrize(
    "case",
    ["lora field", "student_init lora", "student_init checkpoint", "expert checkpoint", "base", "resume"],
)
def test_non_finite_weights_are_named_as_their_file(case, poisoned, tiny_path, tmp_path, capsys):
    """A NaN or inf in a loaded file is reported as that file (before training), never as a route's target."""
    out = tmp_path / "out"
    flags: dict = {"max_train_steps": 1}
    base = tiny_path
    if case == "lora field":
        flags["expert_lora"] = poisoned / "nan_lora"
        fragment = "nan_lora"
    elif case == "student_init lora":
        flags["student_init"] = poisoned / "inf_lora.safetensors"
        fragment = "inf_lora.safetensors"
    elif case == "student_init checkpoint":
        flags.update(student_init=poisoned / "inf_transformer.safetensors", rank=None)
        fragment = "--student_init"
    elif case == "expert checkpoint":
        flags["expert_checkpoint"] = poisoned / "inf_transformer.safetensors"
        fragment = "inf_transformer.safetensors"
    elif case == "base":
        base = str(poisoned / "nan_base")
        fragment = "nan_base"
    else:  # a checkpoint whose LoRA holds a NaN
        run_train(_run(tiny_path, tmp_path, out, max_train_steps=1, checkpointing_steps=1))
        lora = out / "checkpoint-1/pytorch_lora_weights.safetensors"
        from safetensors.torch import load_file, save_file

        state = load_file(lora)
        key = sorted(state)[0]
        state[key][0, 0] = float("nan")
        save_file(state, lora, metadata={"format": "pt"})
        record = json.loads((out / "checkpoint-1/danceopd_checkpoint.json").read_text())
        record["files"]["pytorch_lora_weights.safetensors"] = lora.stat().st_size
        (out / "checkpoint-1/danceopd_checkpoint.json").write_text(json.dumps(record))
        flags.update(max_train_steps=2, resume_from_checkpoint="latest")
        fragment = "NaN or inf"
    argv = _run(tiny_path, tmp_path, out, **flags)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = base
    rc, errors, err = _cli(argv, capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "NaN or inf" in errors[0] and fragment in errors[0] and "route" not in errors[0], errors[0]


# ============================================================================ 2. data rows and images
def _buckets(tmp_path: Path, rows: list[dict], **columns):
    from datasets import Dataset

    from danceopd_diffusers.data import DataColumns, TaskBuckets

    return TaskBuckets(Dataset.from_list(rows), DataColumns(**columns), tmp_path)


BAD_TEXT = [None, "", "   \t", 5, 1.5, True, ["a prompt"], {"en": "a prompt"}]


@pytest.mark.parametrize("value", BAD_TEXT, ids=repr)
@pytest.mark.parametrize("column", ["prompt", "task"])
def test_every_text_column_is_text(tmp_path, column, value):
    """A prompt or a task that is not non-empty text is an error naming the row and the column: never emptied,
    turned into its repr, or put in a bucket of its own."""
    good = {"prompt": "a red circle", "task": "t2i"}
    rows = [dict(good), dict(good), {**good, column: value}]
    try:
        from datasets import Dataset

        Dataset.from_list(rows)
    except Exception:  # a column of mixed types arrow refuses: that row is alone in its file
        rows = [{**good, column: value}]
    with pytest.raises(ConfigError, match=rf"Row {len(rows) - 1}: its {column} \(column '{column}'\) is"):
        _buckets(tmp_path, rows)


@pytest.mark.parametrize("value", [5, 2.5, True, ["a.png"], {"size": 3}], ids=repr)
@pytest.mark.parametrize("column", ["source_image", "target_image"])
def test_every_image_column_holds_images(tmp_path, column, value):
    rows = [{"prompt": "a red circle", column: value}]
    with pytest.raises(ConfigError, match=rf"Row 0: its {column.replace('_', ' ')} \(column '{column}'\) is"):
        _buckets(tmp_path, rows)


@pytest.mark.parametrize("flag,key", [("task", "task"), ("source_image", "source_image")])
def test_a_column_the_user_named_must_exist(tmp_path, flag, key):
    with pytest.raises(ConfigError, match="the dataset has no such column"):
        _buckets(tmp_path, [{"prompt": "a"}], **{key: "no_such_column"})


@pytest.mark.parametrize(
    "text,prompts",
    [
        ("prompt,task\n007,t2i\n1984,t2i\n", ["007", "1984"]),  # numbers stay the text they are
        ("prompt\n3.10\n1e5\n", ["3.10", "1e5"]),
        (",prompt\n0,a red circle\n", ["a red circle"]),  # a saved index column
        ("\ufeffprompt,task\r\nTrue,t2i\r\n", ["True"]),
    ],
)
def test_csv_cells_are_read_as_the_text_they_are(text, prompts, tmp_path):
    from danceopd_diffusers.data import DataColumns, TaskBuckets, load_training_dataset

    path = tmp_path / "data.csv"
    path.write_text(text, encoding="utf-8")
    dataset, folder = load_training_dataset(str(path))
    assert TaskBuckets(dataset, DataColumns(), folder).prompts(range(len(prompts))) == prompts


@pytest.mark.parametrize("column", ["prompt", "task"])
def test_text_that_is_not_utf8_is_named(column, tmp_path):
    from danceopd_diffusers.data import DataColumns, TaskBuckets, load_training_dataset

    row = {"prompt": "a red circle", "task": "t2i"}
    line = json.dumps(row).replace(row[column], "a \udcff b").encode("utf-8", "surrogateescape")
    (tmp_path / "data.jsonl").write_bytes(line + b"\n")
    dataset, folder = load_training_dataset(str(tmp_path / "data.jsonl"))
    with pytest.raises(ConfigError, match=f"column '{column}' holds text that is not valid UTF-8"):
        TaskBuckets(dataset, DataColumns(), folder)


@pytest.mark.parametrize(
    "content", [b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"%PDF-1.4", b"", b"\x89PNG\r\n\x1a\n"]
)
def test_files_that_are_no_image_are_named_by_path(content, tmp_path):
    from danceopd_diffusers.data import open_image

    (tmp_path / "picture.png").write_bytes(content)
    with pytest.raises((ValueError, OSError), match="picture.png"):
        open_image("picture.png", tmp_path)


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    from danceopd_diffusers.data import load_training_dataset

    (tmp_path / "data.csv").write_text("prompt,task,prompt\na,t2i,b\n")
    with pytest.raises(ConfigError, match="names column 'prompt' twice"):
        load_training_dataset(str(tmp_path / "data.csv"))


@pytest.mark.parametrize(
    "columns",
    [{"prompt": "task"}, {"prompt": "target_image"}, {"source_image": "target_image"}, {"task": "prompt"}],
)
def test_one_column_cannot_take_two_roles(tmp_path, columns):
    rows = [{"prompt": "a", "task": "t2i", "source_image": "x.png", "target_image": "y.png"}]
    with pytest.raises(ConfigError, match="both name column"):
        _buckets(tmp_path, rows, **columns)


def test_routes_cover_every_row_and_every_edit_row_has_its_source(tmp_path, capsys):
    from danceopd_diffusers.config import RouteSpec

    Image.new("RGB", (8, 8)).save(tmp_path / "src.png")
    buckets = _buckets(
        tmp_path,
        [
            {"prompt": "a", "task": "t2i", "source_image": None},
            {"prompt": "b", "task": "edit", "source_image": "src.png"},
            {"prompt": "c", "task": "edit", "source_image": None},
            {"prompt": "d", "task": "typo", "source_image": ""},
        ],
    )
    buckets.check_routes(
        [RouteSpec("f", "t2i")], False, True, []
    )  # a subset of the buckets: said, not silent
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert (
        len(warnings) == 1 and "'edit' (2 row(s), first row 1), 'typo' (1 row(s), first row 3)" in warnings[0]
    )
    with pytest.raises(ConfigError, match="Row 2 of bucket 'edit' has no source_image"):
        buckets.check_routes(
            [RouteSpec("f", "t2i"), RouteSpec("f", "edit"), RouteSpec("f", "typo")], False, True, []
        )


def _mode_image(mode: str) -> tuple[Image.Image, tuple[int, int, int]]:
    """A 4x4 image of ``mode`` and the RGB its pixels mean."""
    if mode in ("I;16", "I;16B", "I;16L"):
        return Image.new(mode, (4, 4), 32896), (128, 128, 128)  # 32896 / 65535 * 255 = 128
    if mode == "I":
        return Image.fromarray(np.full((4, 4), 65535, np.int32)), (255, 255, 255)
    if mode == "F":
        return Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128)
    if mode == "F255":
        return Image.fromarray(np.full((4, 4), 200.0, np.float32)), (200, 200, 200)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):  # fully transparent: white, whatever colour is stored
        color = {"LA": (0, 0), "La": (0, 0), "PA": (0, 0), "RGBA": (0, 0, 0, 0), "RGBa": (0, 0, 0, 0)}[mode]
        return Image.new(mode, (4, 4), color), (255, 255, 255)
    if mode == "P+transparency":
        image = Image.new("P", (4, 4), 0)
        image.putpalette([10, 20, 30] * 256)
        image.info["transparency"] = 0
        return image, (255, 255, 255)
    if mode == "RGB+tRNS":
        image = Image.new("RGB", (4, 4), (1, 2, 3))
        image.info["transparency"] = (1, 2, 3)
        return image, (255, 255, 255)
    if mode == "1":
        return Image.new("1", (4, 4), 1), (255, 255, 255)
    if mode == "CMYK":
        return Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)
    if mode == "P":
        image = Image.new("P", (4, 4), 1)
        image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
        return image, (200, 100, 50)
    if mode == "L":
        return Image.new("L", (4, 4), 77), (77, 77, 77)
    if mode == "YCbCr":
        return Image.new("YCbCr", (4, 4), (128, 128, 128)), (128, 128, 128)
    if mode == "HSV":
        return Image.new("HSV", (4, 4), (0, 0, 255)), (255, 255, 255)
    return Image.new(mode, (4, 4), (40, 50, 60)), (40, 50, 60)  # RGB


MODES = [
    "1",
    "L",
    "P",
    "P+transparency",
    "LA",
    "La",
    "PA",
    "RGB",
    "RGB+tRNS",
    "RGBA",
    "RGBa",
    "CMYK",
    "YCbCr",
    "HSV",
    "I",
    "I;16",
    "I;16B",
    "I;16L",
    "F",
    "F255",
]


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_becomes_the_rgb_it_means(mode, tmp_path):
    """In memory (an image cell) and, where the mode can be saved, through a file (a path cell)."""
    from danceopd_diffusers.data import open_image

    image, expected = _mode_image(mode)
    got = open_image(image, None)
    assert got.mode == "RGB" and got.size == (4, 4)
    assert np.abs(np.asarray(got).astype(int) - expected).max() <= 2, (mode, np.asarray(got)[0, 0])
    for fmt in ("PNG",) if "transparency" in image.info else ("PNG", "TIFF"):  # TIFF drops a palette's tRNS
        path = tmp_path / f"image.{fmt.lower()}"
        try:
            image.save(path, fmt, **({"transparency": 0} if mode == "P+transparency" else {}))
        except (OSError, KeyError, ValueError):
            continue  # a mode the format cannot hold
        with Image.open(path) as reopened:
            saved_mode = reopened.mode
        from_file = np.asarray(open_image(str(path), None)).astype(int)
        assert np.abs(from_file - expected).max() <= 2, (mode, fmt, saved_mode, from_file[0, 0])


@pytest.mark.parametrize(
    "values", [[-5.0, 1.0], [0.0, 1e6], [float("nan"), 1.0]], ids=["negative", "huge", "nan"]
)
def test_float_images_without_an_intensity_meaning_are_refused(values):
    from danceopd_diffusers.data import to_rgb

    with pytest.raises(ValueError, match="save it as an 8-bit RGB image"):
        to_rgb(Image.fromarray(np.array([values], np.float32)))


def _special_files(root: Path) -> dict[str, Path]:
    """One path of each non-regular kind: FIFO, folder, character device, socket, a symlink to a FIFO."""
    root.mkdir(parents=True, exist_ok=True)
    os.mkfifo(root / "fifo.png")
    (root / "folder.png").mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "socket.png"))
    os.symlink(root / "fifo.png", root / "link-to-fifo.png")
    return {
        "fifo": root / "fifo.png",
        "folder": root / "folder.png",
        "device": Path("/dev/zero"),
        "socket": root / "socket.png",
        "symlink to fifo": root / "link-to-fifo.png",
    }


KINDS = ["fifo", "folder", "device", "socket", "symlink to fifo"]


@pytest.mark.parametrize("kind", KINDS)
def test_non_regular_files_are_refused_without_being_opened(kind, tmp_path, tiny_path, capsys):
    """As an image path, a data file, a fields config, a LoRA, a --student_init and a model's model_index.json:
    one error line naming what the path is, at once (never blocking on a FIFO or reading a device)."""
    from danceopd_diffusers.config import RouteSpec
    from danceopd_diffusers.data import open_image

    path = _special_files(tmp_path / "special")[kind]
    with deadline(10):
        with pytest.raises(ValueError, match="not a regular file"):
            open_image(str(path), None)
        buckets = _buckets(tmp_path, [{"prompt": "a", "target_image": str(path)}])
        with pytest.raises(ConfigError, match="Row 0 of bucket 't2i': target_image .*not a regular file"):
            buckets.check_routes([RouteSpec("base", "t2i")], True, False, [])
        model = tmp_path / "model"
        shutil.copytree(tiny_path, model)
        (model / "model_index.json").unlink()
        os.symlink(path, model / "model_index.json")
        for flags, names in (
            ({"dataset_name": str(path)}, "--dataset_name"),
            ({"fields_config": str(path), "cfg_scale": None}, "--fields_config"),
            ({"expert_lora": str(path)}, "Field 'expert'"),
            ({"student_init": str(path)}, "--student_init"),
            ({"expert_checkpoint": str(path)}, "Field 'expert'"),
            ({"pretrained_model_name_or_path": str(model)}, "--pretrained_model_name_or_path"),
        ):
            model_flag = flags.pop("pretrained_model_name_or_path", tiny_path)
            argv = _run(tiny_path, tmp_path, tmp_path / "out", **flags)
            argv[argv.index("--pretrained_model_name_or_path") + 1] = model_flag
            if kind == "folder" and ("expert_checkpoint" in flags or "student_init" in flags):
                continue  # a folder is a legal checkpoint path (its config is read, and refused, elsewhere)
            rc, errors, err = _cli(argv, capsys)
            assert rc == 2 and len(errors) == 1 and "Traceback" not in err, (flags, err[-1500:])
            assert names in errors[0], errors[0]  # the flag or field the path came from
            if kind != "folder":
                assert "not a regular file" in errors[0] or "not a folder" in errors[0], errors[0]


# ============================================================================ 3. bounded configs
def _bombs() -> dict[str, str]:
    head = "fields:\n  base: {type: base}\n  c: {type: cfg, of: base, scale: 2}\nroutes:\n  - {field: c}\n"
    lists = "x0: &x0 [a, a, a, a, a, a, a, a, a]\n" + "".join(
        f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]\n" for i in range(1, 9)
    )
    maps = "m0: &m0 {a: 1, b: 2}\n" + "".join(
        f"m{i}: &m{i} {{{', '.join(f'k{j}: *m{i - 1}' for j in range(7))}}}\n" for i in range(1, 12)
    )
    merges = "g0: &g0 {a: 1}\n" + "".join(
        f"g{i}: &g{i} {{<<: *g{i - 1}, {', '.join(f'k{j}: *g{i - 1}' for j in range(5))}}}\n"
        for i in range(1, 14)
    )
    few_aliases = (
        "y0: &y0 ["
        + ", ".join(["a"] * 3000)
        + "]\n"
        + "".join(f"y{i}: &y{i} [*y{i - 1}, *y{i - 1}, *y{i - 1}]\n" for i in range(1, 12))
    )
    return {
        "list laughs": head + lists,
        "mapping laughs": head + maps,
        "merge-key laughs": head + merges,
        "few aliases, big expansion": head + few_aliases,
        "recursive alias": "fields: &f {base: {type: base}, again: *f}\nroutes: [{field: base}]\n",
        "deep lists": "fields: " + "[" * 5000 + "]" * 5000 + "\n",
        "deep mappings": "fields: " + "{a: " * 200 + "1" + "}" * 200 + "\n",
        "big file": head + "# " + "x" * (2 << 20) + "\n",
        "deep chain of fields": "fields:\n  base: {type: base}\n"
        + "".join(
            f"  c{i}: {{type: cfg, of: {'base' if i == 0 else f'c{i - 1}'}, scale: 1.5}}\n"
            for i in range(200)
        )
        + "routes:\n  - {field: c199}\n",
        "lattice of mixes": "fields:\n  base: {type: base}\n  a0: {type: cfg, of: base, scale: 2}\n"
        "  b0: {type: cfg, of: base, scale: 3}\n"
        + "".join(
            f"  a{i}: {{type: mix, of: [a{i - 1}, b{i - 1}]}}\n  b{i}: {{type: mix, of: [b{i - 1}, a{i - 1}]}}\n"
            for i in range(1, 40)
        )
        + "routes:\n  - {field: a39}\n",
        "too many fields": "fields:\n"
        + "".join(f"  f{i}: {{type: base}}\n" for i in range(600))
        + "routes:\n  - {field: f0}\n",
        "long cycle": "fields:\n  base: {type: base}\n"
        + "".join(f"  c{i}: {{type: cfg, of: c{(i + 1) % 200}, scale: 2}}\n" for i in range(200))
        + "routes:\n  - {field: c0}\n",
    }


#: what each bomb is refused for (alias graphs: while composing, before any value is built, so a line is named)
BOMB_SAYS = {
    "list laughs": "YAML aliases",
    "mapping laughs": "YAML aliases",
    "merge-key laughs": "YAML aliases",
    "few aliases, big expansion": "expands to more than",
    "recursive alias": "contain itself",
    "deep lists": "nest more than",
    "deep mappings": "nest more than",
    "big file": "bytes",
    "deep chain of fields": "levels deep",
    "lattice of mixes": "paths",
    "long cycle": "cycle",
    "too many fields": "at most 256 are supported",
}


@pytest.mark.parametrize("shape", list(_bombs()))
def test_config_bombs_fail_fast_with_one_line(shape, tmp_path):
    import diffusers.guiders  # noqa: F401  (imported once, so the timing is the check's own)

    from danceopd_diffusers.config import parse_fields_config

    path = tmp_path / "fields.yaml"
    path.write_text(_bombs()[shape])
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        parse_fields_config(path)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert BOMB_SAYS[shape] in message, message


@pytest.mark.parametrize(
    "text", ['{"fields": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"a": ' * 50 + "1" + "}" * 50]
)
def test_deep_json_configs_fail_fast(text, tmp_path):
    from danceopd_diffusers.config import parse_fields_config

    path = tmp_path / "fields.json"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="nest"):
        parse_fields_config(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "route,says",
    [
        ("{field: 1}", "`field` must be a non-empty name"),
        ("{field: c, task: null}", "`task` must be a non-empty name"),
        ("{field: c, task: 7}", "`task` must be a non-empty name"),
        ("{field: c, task: [a]}", "`task` must be a non-empty name"),
        ("{field: c, weight: 1" + "0" * 400 + "}", "must be a finite number"),
        ("{field: c, weight: .inf}", "must be a finite number"),
    ],
)
def test_route_values_are_typed(route, says, tmp_path):
    from danceopd_diffusers.config import parse_fields_config

    path = tmp_path / "fields.yaml"
    path.write_text(
        f"fields:\n  base: {{type: base}}\n  c: {{type: cfg, of: base, scale: 2}}\nroutes:\n  - {route}\n"
    )
    with pytest.raises(ConfigError, match=says):
        parse_fields_config(path)


@pytest.mark.parametrize(
    "kwargs,says",
    [
        ("{guidance_scale: [1, 2]}", "guider_kwargs.guidance_scale must be a number"),
        ("{guidance_scale: high}", "guider_kwargs.guidance_scale must be a number"),
        ("{guidance_scale: true}", "guider_kwargs.guidance_scale must be a number"),
        ("{enabled: 3}", "guider_kwargs.enabled must be true or false"),
        ("{guidance_scale: 3, start: 0.9, stop: 0.1}", "fails: Expected `stop`"),
    ],
)
def test_guider_kwargs_are_typed_and_built_before_any_weights(kwargs, says, tmp_path):
    from danceopd_diffusers.config import parse_fields_config

    path = tmp_path / "fields.yaml"
    path.write_text(
        "fields:\n  base: {type: base}\n  g: {type: guider, of: base, guider: ClassifierFreeGuidance, "
        f"guider_kwargs: {kwargs}}}\nroutes:\n  - {{field: g}}\n"
    )
    with pytest.raises(ConfigError, match=says):
        parse_fields_config(path)


@pytest.mark.parametrize("routes", ["abc", "{field: c}", "5", "true"])
def test_routes_must_be_a_list(routes, tmp_path):
    from danceopd_diffusers.config import parse_fields_config

    path = tmp_path / "fields.yaml"
    path.write_text(
        f"fields:\n  base: {{type: base}}\n  c: {{type: cfg, of: base, scale: 2}}\nroutes: {routes}\n"
    )
    with pytest.raises(ConfigError, match="`routes` must be a list of mappings"):
        parse_fields_config(path)


# ============================================================================ 4. the output folder's life
@pytest.mark.parametrize(
    "case",
    [
        "is the base",
        "inside the base",
        "symlink into the base",
        "is a LoRA's folder",
        "inside a LoRA folder",
        "holds the base",
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_is_apart_from_every_input(case, overwrite, tiny_path, tmp_path, capsys):
    lora = make_lora_file(tiny_path, tmp_path / "loras" / "expert")
    base = tmp_path / "base"
    shutil.copytree(tiny_path, base)
    flags: dict = {"max_train_steps": 1}
    out = {
        "is the base": base,
        "inside the base": base / "transformer" / "out",
        "symlink into the base": tmp_path / "link",
        "is a LoRA's folder": lora.parent,
        "inside a LoRA folder": lora.parent / "out",
        "holds the base": tmp_path,
    }[case]
    if case == "symlink into the base":
        os.symlink(base / "vae", out)
    if "LoRA" in case:
        flags["expert_lora"] = str(lora.parent if "inside" in case else lora)
    argv = _run(tiny_path, tmp_path, out, **flags) + (["--overwrite_output_dir"] if overwrite else [])
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(base)
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*")}
    rc, errors, err = _cli(argv, capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-1500:]
    assert "--output_dir" in errors[0] and ("folder of" in errors[0] or "lies inside" in errors[0]), errors[0]
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*")} == before


def test_a_rerun_never_mixes_checkpoints(tiny_path, tmp_path, capsys):
    """Other settings: refused without --overwrite_output_dir. Same settings or --overwrite_output_dir: the new
    run's first checkpoint replaces every checkpoint of the earlier run, and `latest` never takes an old one."""
    from danceopd_diffusers.checkpointing import read_record, resolve_resume

    out = tmp_path / "out"
    run_train(_run(tiny_path, tmp_path, out, max_train_steps=3, checkpointing_steps=1))
    first = read_record(out / "checkpoint-3")["lineage"]
    rc, errors, _ = _cli(_run(tiny_path, tmp_path, out, max_train_steps=1, rank=8), capsys)
    assert rc == 2 and "holds checkpoints of a run with other settings" in errors[0]
    assert "rank: 4 in the checkpoint, 8 in this run" in errors[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    run_train(
        _run(
            tiny_path,
            tmp_path,
            out,
            max_train_steps=2,
            checkpointing_steps=2,
            rank=8,
        )
        + ["--overwrite_output_dir"]
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert read_record(out / "checkpoint-2")["lineage"] != first
    assert resolve_resume(out, "latest") == out / "checkpoint-2"


def test_a_new_run_is_preferred_by_latest_before_the_old_is_pruned(tmp_path):
    """A kill between a new run's first checkpoint and the pruning of the earlier run's: `latest` takes the new
    run's checkpoint, though the old run's step is higher."""
    from danceopd_diffusers.checkpointing import RECORD, resolve_resume

    for name, lineage, started in (("checkpoint-5", ["old"], 100.0), ("checkpoint-1", ["new"], 200.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / RECORD).write_text(
            json.dumps({"files": {}, "lineage": lineage, "started": started})
        )
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1"


def _exports(root: Path) -> tuple[Path, Path]:
    """An old export in ``root/out`` and a new staged one, each file saying which export it belongs to."""
    from danceopd_diffusers.output_dir import OutputFolder

    out = root / "out"
    out.mkdir()
    for name in ("README.md", "model_index.json", "pytorch_lora_weights.safetensors", "danceopd_config.json"):
        (out / name).write_text(f"old {name}")
    for folder in ("transformer", "vae", "scheduler"):
        (out / folder).mkdir()
        (out / folder / "config.json").write_text(f"old {folder}")
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "keep").write_text("a checkpoint")
    (out / "logs").mkdir()
    owner = OutputFolder(out)
    stage = owner.stage()
    for name in ("README.md", "model_index.json", "pytorch_lora_weights.safetensors", "samples.png"):
        (stage / name).write_text(f"new {name}")
    for folder in ("transformer", "vae"):
        (stage / folder).mkdir()
        (stage / folder / "config.json").write_text(f"new {folder}")
    return out, stage


def _export_state(out: Path) -> str:
    """ "old" or "new" when the folder holds exactly that complete export, else what it holds."""
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")} - {"checkpoint-3", "logs"}
    texts = {
        p.name: (p / "config.json" if p.is_dir() else p).read_text() for p in out.iterdir() if p.name in names
    }
    if all(t.startswith("old") for t in texts.values()) and len(texts) == 7:
        return "old"
    if all(t.startswith("new") for t in texts.values()) and len(texts) == 6:
        return "new"
    return f"mixed {sorted(texts.items())}"


def test_publish_killed_at_any_rename_leaves_old_or_new(tmp_path, monkeypatch):
    """The publish is killed before each of its renames in turn (an exception stands for the kill): the card never
    sits beside weights of the other export, and the next owner of the folder finishes the publish."""
    from danceopd_diffusers import output_dir as module

    total = None
    for kill_at in range(40):
        root = tmp_path / f"k{kill_at}"
        root.mkdir()
        out, stage = _exports(root)
        real, calls = os.replace, []

        def dying(src, dst, real=real, calls=calls, kill_at=kill_at):
            if len(calls) == kill_at:
                raise KeyboardInterrupt("killed")
            calls.append((src, dst))
            return real(src, dst)

        monkeypatch.setattr(module.os, "replace", dying)
        try:
            module.publish(stage, out)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(module.os, "replace", real)
        state = _export_state(out)
        card = (out / "README.md").read_text() if (out / "README.md").exists() else None
        weights = (
            (out / "pytorch_lora_weights.safetensors").read_text()
            if (out / "pytorch_lora_weights.safetensors").exists()
            else None
        )
        if card is not None:  # a card always describes the weights beside it
            assert state in ("old", "new"), (kill_at, state)
        assert not (card and weights) or card.split()[0] == weights.split()[0], kill_at
        module.OutputFolder(out).open().close()  # the next run: finishes an interrupted publish
        journal_written = finished or kill_at >= 1  # the first rename puts the journal in place
        assert _export_state(out) == ("new" if journal_written else "old"), (kill_at, _export_state(out))
        assert (out / "checkpoint-3" / "keep").read_text() == "a checkpoint" and (out / "logs").is_dir()
        assert not (out / module.JOURNAL).exists()
        if finished:
            total = kill_at
            break
    assert total is not None and total >= 10  # every rename was interrupted once


def test_kill_before_the_journal_keeps_the_old_export(tmp_path):
    from danceopd_diffusers import output_dir as module

    out, stage = _exports(tmp_path)
    module.OutputFolder(out).open().close()  # a run that died while staging: its stage is dropped
    assert _export_state(out) == "old"


def test_a_deleted_output_dir_stops_the_run(tiny_path, tmp_path, monkeypatch, capsys):
    """The folder removed (or replaced by another) while the run trains: one error line at the next step, and
    nothing is written to whatever now has the folder's name."""
    import train_danceopd

    out = tmp_path / "out"
    real, calls = train_danceopd.on_policy_states, []

    def delete_during_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            shutil.rmtree(out)
            out.mkdir()  # even a new folder of the same name is not the run's
        return real(*args, **kwargs)

    monkeypatch.setattr(train_danceopd, "on_policy_states", delete_during_second_step)
    rc, errors, err = _cli(_run(tiny_path, tmp_path, out, max_train_steps=4, checkpointing_steps=1), capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert "was deleted or replaced while the run trained (noticed after step 2)" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("config", ["{not json", "[1, 2]", '"text"'])
def test_a_damaged_adapter_config_beside_a_lora_is_reported(config, tiny_path, tmp_path, capsys):
    lora = make_lora_file(tiny_path, tmp_path / "peft")
    lora.rename(lora.with_name("adapter_model.safetensors"))
    (tmp_path / "peft" / "adapter_config.json").write_text(config)
    rc, errors, err = _cli(_run(tiny_path, tmp_path, tmp_path / "out", expert_lora=tmp_path / "peft"), capsys)
    assert rc == 2 and len(errors) == 1 and "adapter_config.json" in errors[0] and "Traceback" not in err


# ============================================================================ 6. pickles
@pytest.fixture
def pickles(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(str(marker)))
    return tmp_path, marker, payload


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
@pytest.mark.parametrize(
    "role",
    ["lora file", "lora folder", "student_init", "expert checkpoint", "checkpoint folder", "base component"],
)
def test_pickled_weights_are_refused_before_loading(suffix, role, pickles, tiny_path, capsys):
    root, marker, payload = pickles
    flags: dict = {"max_train_steps": 1}
    base = tiny_path
    if role == "lora file":
        (root / f"lora{suffix}").write_bytes(payload)
        flags["expert_lora"] = str(root / f"lora{suffix}")
    elif role == "lora folder":
        (root / "lora").mkdir()
        (root / "lora" / f"adapter_model{suffix}").write_bytes(payload)
        flags["expert_lora"] = str(root / "lora")
    elif role == "student_init":
        (root / f"init{suffix}").write_bytes(payload)
        flags["student_init"] = str(root / f"init{suffix}")
    elif role == "expert checkpoint":
        (root / f"ckpt{suffix}").write_bytes(payload)
        flags["expert_checkpoint"] = str(root / f"ckpt{suffix}")
    elif role == "checkpoint folder":
        (root / "ckpt").mkdir()
        shutil.copy(Path(tiny_path) / "transformer/config.json", root / "ckpt/config.json")
        (root / "ckpt" / f"diffusion_pytorch_model{suffix}").write_bytes(payload)
        flags["expert_checkpoint"] = str(root / "ckpt")
    else:
        shutil.copytree(tiny_path, root / "base")
        (root / "base/transformer/diffusion_pytorch_model.safetensors").unlink()
        (root / "base/transformer" / f"diffusion_pytorch_model{suffix}").write_bytes(payload)
        base = str(root / "base")
    argv = _run(tiny_path, root, root / "out", **flags)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = base
    rc, errors, err = _cli(argv, capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-1500:]
    assert "pickle" in errors[0] and "never loaded" in errors[0] and "unpickling can run code" in errors[0]
    assert "weights_only=False" not in err and not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_resume_checkpoint_with_a_code_pickle_is_refused(name, pickles, tiny_path, capsys):
    root, marker, payload = pickles
    out = root / "out"
    run_train(_run(tiny_path, root, out, max_train_steps=1, checkpointing_steps=1))
    target = out / "checkpoint-1" / name
    size = target.stat().st_size
    target.write_bytes(payload + b"\0" * max(size - len(payload), 0))
    record = json.loads((out / "checkpoint-1/danceopd_checkpoint.json").read_text())
    record["files"][name] = target.stat().st_size
    (out / "checkpoint-1/danceopd_checkpoint.json").write_text(json.dumps(record))
    rc, errors, err = _cli(
        _run(tiny_path, root, out, max_train_steps=2, resume_from_checkpoint="latest"), capsys
    )
    assert rc == 2 and len(errors) == 1 and name in errors[0] and "Traceback" not in err, err[-1500:]
    assert "weights_only=False" not in err and not marker.exists()


def test_load_errors_never_advise_weights_only_false():
    from danceopd_diffusers.preflight import describe_load_error

    advice = "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed"
    for exc in (pickle.UnpicklingError(advice), RuntimeError(advice), OSError(advice)):
        text = describe_load_error(exc)
        assert "weights_only" not in text and "pickle" in text


# ============================================================================ 7. evaluate and study
EVALUATE_BAD = [
    ["--num_inference_steps", "0"],
    ["--seed", "-1"],
    ["--batch_size", "0"],
    ["--score_workers", "-2"],
    ["--limit", "0"],
    ["--max_sequence_length", "0"],
    ["--guidance_scale", "nan"],
    ["--guidance_scale", "-1"],
    ["--per_category", "-3"],
    ["--device", "toaster"],
    ["--device", "cuda:9"],
    ["--json", "{missing}/x.json"],
    ["--json", "{folder}"],
    ["--grid", "{folder}"],
    ["--lora", "{pickle}"],
    ["--lora", "{missing}"],
    ["--pipeline", "{file}"],
    ["--pipeline", "{fifo}"],
    ["--pipeline", "{folder}"],
    ["--preset", "huge"],
    ["--num_inference_steps", "many"],
]


@pytest.mark.parametrize("args", EVALUATE_BAD, ids=lambda a: " ".join(a))
def test_evaluate_bad_arguments(args, tiny_path, tmp_path, capsys):
    from danceopd_diffusers.shapesworld import evaluate as ev

    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "lora.bin").write_bytes(pickle.dumps({"a": 1}))
    os.mkfifo(tmp_path / "fifo")
    values = {
        "{missing}": str(tmp_path / "missing"),
        "{folder}": str(tmp_path / "folder"),
        "{pickle}": str(tmp_path / "lora.bin"),
        "{file}": str(tmp_path / "file"),
        "{fifo}": str(tmp_path / "fifo"),
    }
    argv = ["--pipeline", tiny_path, "--limit", "1"] + [
        values.get(a, a).replace("{missing}", str(tmp_path / "missing")) for a in args
    ]
    with deadline(60):
        try:
            rc = ev.main(argv)
        except SystemExit as exc:  # argparse's own errors (a choice, a type): usage, then one error line
            rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-1500:]
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


@pytest.mark.parametrize(
    "content",
    ["not json", "[1, 2]", '{"samples": 3}', '{"samples": {"t2i": {}}}', json.dumps({"x": {"y": 1}})],
)
def test_evaluate_compare_bad_files(content, tmp_path, capsys):
    from danceopd_diffusers.shapesworld import evaluate as ev

    (tmp_path / "a.json").write_text(content)
    assert ev.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("error:")]) == 1, err


def _exit_status(main, argv: list[str]) -> int:
    """A command's exit status, whether it returns it or exits like argparse (SystemExit(2))."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_study_report_never_overwrites_study_md_from_an_empty_root(tmp_path, capsys, monkeypatch):
    from danceopd_diffusers.shapesworld import study

    copy = tmp_path / "shipped" / "STUDY.md"  # the default --out, a copy: the shipped file is never at risk
    copy.parent.mkdir()
    shutil.copy(study.STUDY_MD, copy)
    monkeypatch.setattr(study, "STUDY_MD", copy)
    shipped = study.STUDY_MD.read_bytes()
    (tmp_path / "R").mkdir()
    for root in (tmp_path / "R", tmp_path / "no-such-root"):
        assert _exit_status(study.main, ["report", "--root", str(root), "--plot_backend", "pil"]) == 2
        assert "Traceback" not in capsys.readouterr().err
        assert study.STUDY_MD.read_bytes() == shipped
    assert not (tmp_path / "R" / "study.json").exists() and not (tmp_path / "no-such-root").exists()
    empty = tmp_path / "dest"
    empty.mkdir()
    (empty / "results.json").write_text(json.dumps({"runs": {}, "merges": {}, "teachers": {}}))
    assert _exit_status(study.main, ["report", "--dest", str(empty), "--plot_backend", "pil"]) == 2
    assert study.STUDY_MD.read_bytes() == shipped


STUDY_BAD = [
    ["plan", "--steps", "0"],
    ["plan", "--learning_rate", "nan"],
    ["plan", "--learning_rate", "5"],
    ["plan", "--jobs", "0"],
    ["plan", "--rank", "-4"],
    ["plan", "--num_rollout_steps", "1"],
    ["plan", "--eval_preset", "huge"],
    ["plan", "--device", "toaster"],
    ["plan", "--sources", "{missing}"],
    ["main", "--budget_s", "-5"],
    ["plan", "--root", "{file}"],
    ["plan", "--root", "{badjson}"],
    ["report", "--root", "{root}", "--out", "{folder}"],
    ["report", "--root", "{root}", "--out", "{file}/x.md"],
    ["bogus-stage"],
]


@pytest.mark.parametrize("args", STUDY_BAD, ids=lambda a: " ".join(a))
def test_study_bad_arguments(args, tmp_path, capsys):
    from danceopd_diffusers.shapesworld import study

    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "study.json").write_text("{broken")
    (tmp_path / "root").mkdir()
    values = {
        "{missing}": str(tmp_path / "missing"),
        "{folder}": str(tmp_path / "folder"),
        "{file}": str(tmp_path / "file"),
        "{badjson}": str(tmp_path / "badjson"),
        "{root}": str(tmp_path / "root"),
    }
    argv = [values.get(a, a).replace("{file}", str(tmp_path / "file")) for a in args]
    if "--root" not in argv and argv[0] not in ("bogus-stage",):
        argv += ["--root", str(tmp_path / "root")]
    try:
        rc = study.main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-1500:]
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
