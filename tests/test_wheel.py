"""The built wheel carries what an export copies (the pipeline file, the card template) and export finds them
through importlib.resources, not the source tree. (.ci/run also trains and exports from a fresh wheel venv.)"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("pipeline_danceopd.py", "model_card_template.md")


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
            top = REPO / ("pipelines" if name.endswith(".py") else "") / name
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
