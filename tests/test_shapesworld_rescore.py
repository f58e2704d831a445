"""``ship --rescore``: re-scores the shipped sources and keeps every finished row when a run is cut short."""

from __future__ import annotations

import json
import shutil

import pytest

from danceopd_diffusers.shapesworld import ship as ship_module
from danceopd_diffusers.shapesworld.demo import SOURCES
from danceopd_diffusers.shapesworld.scorer import SCORER_VERSION


@pytest.fixture
def shipped(tmp_path):
    dest = tmp_path / "sources"
    shutil.copytree(SOURCES / "base", dest / "base")
    for file in ("local_edit_lora.safetensors", "joint_lora.safetensors"):
        shutil.copy(SOURCES / file, dest / file)
    old = {"guidance_scale": 2.0, "num_steps": 2, "t2i": {"overall": 0.5}, "edit": {}, "n_t2i": 96}
    (dest / "results.json").write_text(json.dumps({"T2I base": old, "local-edit expert": old}))
    return dest


def test_rescore_rewrites_each_row_as_it_finishes(shipped, monkeypatch):
    from danceopd_diffusers.shapesworld import evaluate as ev

    calls = []
    original = ev.evaluate

    def cut_after_two(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the device call's time limit
        return original(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate", cut_after_two)
    with pytest.raises(KeyboardInterrupt):
        ship_module.rescore(shipped, per_category=(1, 1), device="cpu", limit=2, log=lambda *_: None)
    rows = json.loads((shipped / "results.json").read_text())
    assert set(rows) == {"T2I base", "local-edit expert"}  # the two finished rows, nothing half-written
    for row in rows.values():
        assert row["scorer_version"] == SCORER_VERSION and row["per_category"] == {"t2i": 1, "edit": 1}
        assert row["guidance_scale"] == 2.0 and row["num_steps"] == 2  # the recorded CFG and steps are kept
        assert row["n_t2i"] == 2 and "samples" in row and "ci" in row
    assert not list(shipped.glob("*.tmp"))

    logged = []
    monkeypatch.setattr(ev, "evaluate", original)
    rows = ship_module.rescore(shipped, per_category=(1, 1), device="cpu", limit=2, log=logged.append)
    assert sum("already scored" in line for line in logged) == 2  # the rerun resumes where the cut was
    assert set(rows) == {"T2I base", "local-edit expert", "joint training (data mixing)"}
    assert rows["joint training (data mixing)"]["guidance_scale"] == 3.0  # a new row gets the sources' CFG 3


def test_rescore_cli_checks_its_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ship_module.main(["--rescore", "--root", str(tmp_path)])
    assert "either --root" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="must hold shipped sources"):
        ship_module.rescore(tmp_path)
