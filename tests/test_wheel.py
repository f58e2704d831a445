"""The built wheel carries what an export copies (the pipeline file, the card template) and export finds them
through importlib.resources, not the source tree; it carries the trainer as a top-level module with a console
entry point, the license, and what the README's CLIs read. (.ci/run also trains and exports from a fresh wheel
venv.)"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("pipelines/pipeline_danceopd.py", "model_card_template.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
        check=True,
        cwd=out,
    )
    (found,) = out.glob("danceopd_diffusers-*.whl")
    return found


def test_wheel_carries_the_exported_files(wheel):
    with zipfile.ZipFile(wheel) as zf:
        for name in SHIPPED:
            packaged = zf.read(f"danceopd_diffusers/{name}")
            assert packaged == (REPO / "danceopd_diffusers" / name).read_bytes()
            # the top-level paths of the repository layout are the same files
            top = REPO / ("pipelines" if name.endswith(".py") else "") / Path(name).name
            assert top.read_bytes() == packaged


def test_installed_wheel_exports_from_its_own_files(wheel, tmp_path):
    """Installed (not editable) and run from elsewhere, export reads the files inside the installed package."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import danceopd_diffusers, sys; from danceopd_diffusers.export import package_file\n"
        "print(danceopd_diffusers.__file__)\n"
        f"for name in {SHIPPED!r}: print(package_file(name))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert len(out) == 3 and all(Path(p).resolve().is_relative_to(target.resolve()) for p in out), out


def test_wheel_carries_the_trainer_the_license_and_an_entry_point(wheel):
    """``accelerate launch -m train_danceopd`` and ``danceopd-train`` need the script inside the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert zf.read("train_danceopd.py") == (REPO / "train_danceopd.py").read_bytes()
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert zf.read(license_file) == (REPO / "LICENSE").read_bytes()
        assert b"Apache License" in zf.read(license_file) and b"Version 2.0" in zf.read(license_file)
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "danceopd-train = train_danceopd:cli" in zf.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "Apache-2.0" in zf.read(metadata).decode()
        assert "danceopd_diffusers/shapesworld/study/results.json" in names  # `study report` reads it
        assert "danceopd_diffusers/shapesworld/study2/results.json" in names  # the second edition's
        assert "danceopd_diffusers/shapesworld/STUDY2.md" in names
        assert "danceopd_diffusers/shapesworld/study2/plots/ablations.png" in names


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed (not editable) into a folder named like an environment's site-packages."""
    target = tmp_path_factory.mktemp("venv") / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    return target


def _run_installed(target: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_wheel_runs_the_trainer_entry_points(installed, tmp_path):
    """``python -m train_danceopd`` and the ``danceopd-train`` script start the installed trainer from outside
    the source tree (``--help``: the parser, its imports and the embedded default's epilog)."""
    module = _run_installed(installed, tmp_path, sys.executable, "-m", "train_danceopd", "--help")
    assert module.returncode == 0, module.stderr
    assert "usage:" in module.stdout and "--pretrained_model_name_or_path" in module.stdout
    script = _run_installed(installed, tmp_path, str(installed / "bin" / "danceopd-train"), "--help")
    assert script.returncode == 0, script.stderr
    assert "--pretrained_model_name_or_path" in script.stdout
    where = _run_installed(
        installed, tmp_path, sys.executable, "-c", "import train_danceopd; print(train_danceopd.__file__)"
    )
    assert Path(where.stdout.strip()).resolve().is_relative_to(installed.resolve()), where


def test_installed_wheel_runs_the_study_cli(installed, tmp_path):
    """``study report`` (a CLI the README names) works from the wheel: it reads the shipped results and writes
    into the working folder, not into site-packages; the study's runs would start the installed trainer."""
    done = _run_installed(
        installed,
        tmp_path,
        sys.executable,
        "-m",
        "danceopd_diffusers.shapesworld.study",
        "report",
        "--plot_backend",
        "pil",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "STUDY.md").is_file() and "## Setting A" in (tmp_path / "STUDY.md").read_text()
    assert (tmp_path / "study" / "plots" / "ablations.png").is_file()
    code = "from danceopd_diffusers.shapesworld import study_train; print(study_train.trainer_search_path())"
    found = _run_installed(installed, tmp_path, sys.executable, "-c", code)
    assert Path(found.stdout.strip()) == installed.resolve(), found
