"""The study entry point (issue 10): its plan, and every stage end to end at toy size on the shipped sources."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from danceopd_diffusers.shapesworld import (
    study,
    study_carry,
    study_grid,
    study_report,
    study_results,
    study_settings,
    study_ship,
    study_train,
)
from danceopd_diffusers.shapesworld.prepare import write_buckets

TOY = ["--steps", "2", "--checkpoint_every", "2", "--batch_size", "1", "--num_rollout_steps", "2"]
TOY += ["--warmup_steps", "0", "--jobs", "2", "--eval_limit", "6", "--eval_inference_steps", "2"]
TOY += ["--curve_per_category", "8", "--device", "cpu"]


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_plan_gives_every_method_of_a_setting_the_same_start_and_budget(tmp_path):
    settings = study_settings.Settings()
    runs = {r.name: r for r in study_grid.all_runs(settings)}
    assert not any(r.group == "seeds" for r in runs.values())  # seeds wait for the main runs' scores
    for setting, init in (("A", "edit_lora"), ("B", "local_edit_lora")):
        cmds = {
            k: study_train.train_command(runs[f"{setting}-{k}"], tmp_path, settings, False)
            for k in study_grid.METHODS
        }
        for cmd in cmds.values():
            assert Path(_flag(cmd, "--student_init")).stem == init
            for name, value in (("--max_train_steps", "600"), ("--train_batch_size", "64"), ("--seed", "0")):
                assert _flag(cmd, name) == value
            assert _flag(cmd, "--learning_rate") == "0.0005" and "--resume_from_checkpoint" in cmd
            assert _flag(cmd, "--dataset_name").endswith("all/metadata.jsonl")
        assert {k: _flag(c, "--method") for k, c in cmds.items()} == {
            "danceopd": "danceopd",
            "dense": "dense",
            "offpolicy": "offpolicy",
            "joint": "sft",
            "soft": "danceopd",
        }
        assert _flag(cmds["soft"], "--routing") == "soft" and "--routing" not in cmds["danceopd"]
        assert "--fields_config" not in cmds["joint"]  # sft: one route per data bucket, no field
    configs = study_grid.fields_configs(settings)
    assert [(r["task"], r["field"]) for r in configs["setting_b"]["routes"]] == [
        ("t2i", "base_cfg"),
        ("local_edit", "local_cfg"),
        ("global_edit", "global_cfg"),
    ]
    assert {r["field"] for r in configs["setting_a"]["routes"][1:]} == {"edit_cfg"}
    ablation = study_train.train_command(runs["B-init-base"], tmp_path, settings, False)
    assert "--student_init" not in ablation and _flag(ablation, "--rank") == "32"
    assert _flag(study_train.train_command(runs["B-k4"], tmp_path, settings, False), "--query_k") == "4"
    assert _flag(
        study_train.train_command(runs["cfg-zero"], tmp_path, settings, False), "--dataset_name"
    ).endswith("t2i/metadata.jsonl")
    settings.best_baselines = {"A": "joint", "B": "dense"}
    seeds = [r.name for r in study_grid.seed_runs(settings)]
    assert seeds == [
        f"{s}-{k}-seed{i}"
        for s, k in (("A", "danceopd"), ("A", "joint"), ("B", "danceopd"), ("B", "dense"))
        for i in (1, 2)
    ]
    assert {m.setting for m in study_grid.merges()} == {"A", "B", "init"}


def test_study_end_to_end_at_toy_size(tmp_path, capsys):
    root = tmp_path / "R"
    write_buckets(root, ["t2i", "local", "global", "all"], 1, workers=1)
    assert study.main(["merge", "--root", str(root), "--only", "A-merge-cat-w0.5"]) == 0
    assert study.main(["main", "--root", str(root), "--only", "A-danceopd", "A-soft", *TOY]) == 0
    log = capsys.readouterr().out
    assert log.count("launched") == 2 and log.count("finished") == 2, log
    routes = (root / "runs" / "A-soft" / "logs" / "routes_rank0.jsonl").read_text().splitlines()
    assert {json.loads(line)["route"] for line in routes} <= {
        "soft_t2i",
        "soft_local_edit",
        "soft_global_edit",
    }
    # settings are remembered; a second call skips finished runs
    assert study.main(["main", "--root", str(root), "--only", "A-danceopd"]) == 0
    assert "A-danceopd: done (2 steps), skipped" in capsys.readouterr().out

    assert study.main(["eval", "--root", str(root), "--only", "A-*", "source-base"]) == 0
    evals = root / "evals"
    assert sorted(p.name for p in (evals / "A-danceopd").iterdir()) == ["final.json", "step-000002.json"]
    final = json.loads((evals / "A-danceopd" / "final.json").read_text())
    assert final["n_t2i"] == 6 and final["nfe_per_image"] == 2 and "samples" in final
    # 2 finals, 1 source, the merge on the selection set and then (the grid's best) on the final set, 2 curve points
    assert capsys.readouterr().out.count("[study] eval") == 7
    assert sorted(p.name for p in (evals / "A-merge-cat-w0.5").iterdir()) == ["final.json", "select.json"]
    assert study.main(["eval", "--root", str(root), "--only", "A-*", "source-base"]) == 0
    assert "[study] eval" not in capsys.readouterr().out  # nothing left to score

    out = tmp_path / "report" / "STUDY.md"
    assert study.main(["report", "--root", str(root), "--out", str(out), "--plot_backend", "pil"]) == 0
    text = out.read_text()
    for heading in ("## Setting A: T2I + Edit", "## Setting B: Local + Global", "## Ablations (setting B)"):
        assert heading in text
    assert "## CFG absorption" in text and "## Compute" in text
    number = r"\d\.\d+ \[\d\.\d+, \d\.\d+\]"
    assert re.search(rf"\| DanceOPD \| {number} \| \d\.\d\d \| \d\.\d\d \| {number} \| 2 \| \d+ s", text)
    assert re.search(rf"\| soft routing \| {number} \|", text)
    assert re.search(r"\| weight merge \(best: linear \(cat\), λ = 0\.5\) \| \d", text)
    assert re.search(r"\| soft routing \| [+-]\d\.\d\d \[[+-]\d\.\d\d, [+-]\d\.\d\d\] \| \d\.\d{3} \|", text)
    assert "| DiffusionOPD (dense) | not run |" in text
    assert "## Status of the runs" in text and "- done (2 steps): A-danceopd, A-soft\n" in text
    assert "- not started: A-dense, A-offpolicy, A-joint, B-danceopd," in text
    for plot in ("length_edit_a.png", "length_t2i_a.png"):
        assert Image.open(out.parent / "study" / "plots" / plot).size == (640, 400)

    dest = tmp_path / "ship"
    assert study.main(["ship", "--root", str(root), "--dest", str(dest)]) == 0
    assert sorted(p.name for p in dest.glob("*.safetensors")) == [
        "A-danceopd.safetensors",
        "A-merge-cat-w0.5.safetensors",
        "A-soft.safetensors",
    ]
    with safe_open(str(dest / "A-danceopd.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype.itemsize == 2 for k in f.keys())
    shipped = json.loads((dest / "results.json").read_text())
    assert set(shipped["rescored"]) == set(shipped["shipped"])  # each file re-scored from its fp16 weights
    assert shipped["rescored"]["A-danceopd"]["limit"] == 6
    again_scored = study_ship.rescore_one(dest, "A-danceopd.safetensors", limit=6)
    assert again_scored["t2i"] == shipped["rescored"]["A-danceopd"]["t2i"]
    again = tmp_path / "again" / "STUDY.md"
    assert study.main(["report", "--dest", str(dest), "--out", str(again), "--plot_backend", "pil"]) == 0
    tables = lambda t: t.split("## Setting A", 1)[1]  # noqa: E731
    assert "## Re-score a shipped student on a CPU" in again.read_text()
    assert tables(again.read_text()).split("## Re-score")[0] == tables(
        text
    )  # the shipped results: the same report
    assert str(tmp_path) not in (dest / "results.json").read_text()  # no machine paths shipped

    # a second root that has only A-danceopd (another machine finishing a study) ships into the same place:
    # A-soft and the merge are kept with their files and re-scores, A-danceopd is taken from the new root
    root2 = tmp_path / "R2"
    shutil.copytree(root, root2, ignore=shutil.ignore_patterns("A-soft", "A-merge-*", "merges"))
    (dest / "A-soft.safetensors").touch()  # a changed file would be re-scored: this one must not be
    before = json.loads((dest / "results.json").read_text())
    assert study.main(["ship", "--root", str(root2), "--dest", str(dest)]) == 0
    after = json.loads((dest / "results.json").read_text())
    assert after["shipped"] == before["shipped"]
    assert after["rescored"]["A-soft"] == before["rescored"]["A-soft"]
    assert after["runs"]["A-soft"] == before["runs"]["A-soft"] and after["merges"] == before["merges"]
    assert [h["root"] for h in after["history"]] == ["R", "R2"] and after["history"][1]["runs"] == [
        "A-danceopd"
    ]
    assert after["history"][1]["files"] == ["A-danceopd"]


def test_equal_updates_table_and_merge_ties(tmp_path):
    """With unfinished runs the report compares every method at the last step all of them reached; among merges
    with the same selection score, `eval` and the report pick the same point."""
    point = json.loads((Path(study_settings.SOURCES) / "results.json").read_text())["T2I base"]
    other = json.loads(json.dumps(point))
    other["t2i"]["overall"] = 0.5
    settings = study_settings.Settings(steps=600, curve_per_category=64)
    runs = {
        f"A-{k}": {"done": False, "reached": 300, "curve": {"150": point, "300": point}}
        for k in study_grid.METHODS
    }
    runs["A-dense"]["curve"] = {"150": other}  # dense reached step 150 only
    merges = {
        m.name: {**asdict(m), "seconds": 1.0, "select": point, "final": None}
        for m in study_grid.merges()
        if m.setting == "A"
    }
    collection = {"settings": asdict(settings), "runs": runs, "merges": merges, "teachers": {}}
    best = study_grid.best_merge(collection, "A")
    assert best[0] == max(merges)  # ties go to the last name
    text = "\n".join(study_report._equal_updates(collection, "A"))
    assert "after the same 150 updates (setting A; curve set, 64 per category)" in text
    assert "| DiffusionOPD (dense) | 0.500 [" in text and "| DanceOPD | 0.891 [" in text
    assert f"| weight merge (best: {best[1]['label']}; no training) | 0.891 [" in text
    # paired differences over the same samples: zero against every identical baseline
    assert re.search(r"\| soft routing \| \+0\.00 \[\+0\.00, \+0\.00\] \| 1\.000 \|", text), text
    assert study_report._equal_updates({**collection, "runs": {}}, "A") == []  # no shared step: no table
    status = "\n".join(study_report._status_section(collection))
    assert "- unfinished: A-danceopd (step 300), A-dense (step 300)" in status


def test_merge_collections_takes_what_got_further_and_refuses_other_settings():
    settings = asdict(study_settings.Settings())
    run = lambda done, reached, final=None: {"done": done, "reached": reached, "final": final, "wall_s": 1.0}  # noqa: E731
    previous = {
        "settings": {**settings, "best_baselines": {"A": "joint"}},
        "runs": {"A-dense": run(False, 184), "A-danceopd": run(True, 600, {"x": 1}), "B-k4": run(False, 300)},
        "teachers": {"source-base": {"final": {"x": 1}}},
        "merges": {"A-merge-cat-w0.5": {"select": {"x": 1}, "final": None}},
        "notes": ["earlier"],
    }
    new = {
        "settings": {**settings, "jobs": 4, "best_baselines": {}},
        "runs": {"A-dense": run(True, 600, {"y": 2}), "A-danceopd": run(False, 150), "B-k4": run(False, 150)},
        "teachers": {"source-base": {"final": None}, "base-nocfg": {"final": {"y": 2}}},
        "merges": {"A-merge-cat-w0.5": {"select": None, "final": None}},
    }
    previous["runs"]["A-dense"]["curve"] = {"150": {"old": 150}, "600": {"old": 600}}
    new["runs"]["A-dense"]["curve"] = {600: {"new": 600}}  # resumed from the other root's checkpoint
    merged, kept = study_results.merge_collections(previous, new)
    assert merged["runs"]["A-dense"]["final"] == {"y": 2}  # finished now: taken
    assert merged["runs"]["A-dense"]["curve"] == {"150": {"old": 150}, "600": {"new": 600}}
    assert merged["runs"]["A-danceopd"]["final"] == {"x": 1} and merged["runs"]["B-k4"]["reached"] == 300
    assert sorted(kept) == ["A-danceopd", "B-k4"]
    assert merged["teachers"]["source-base"]["final"] == {"x": 1} and "base-nocfg" in merged["teachers"]
    assert merged["merges"]["A-merge-cat-w0.5"]["select"] == {"x": 1}
    assert merged["settings"]["best_baselines"] == {"A": "joint"} and merged["notes"] == ["earlier"]
    other = {**new, "settings": {**new["settings"], "learning_rate": 1e-4}}
    try:
        study_results.merge_collections(previous, other)
    except SystemExit as exc:
        assert "learning_rate = 0.0005" in str(exc) and "--learning_rate 0.0005" in str(exc)
    else:
        raise AssertionError("a root with another learning rate was merged")


def test_shipped_study_report_is_current_and_a_student_rescores_to_its_numbers(tmp_path):
    """STUDY.md is what `report` writes from the shipped results.json, and a shipped student scored from its fp16
    file on the quick set on this CPU gives the numbers STUDY.md prints for it."""
    out = tmp_path / "STUDY.md"
    assert study.main(["report", "--out", str(out), "--plot_backend", "pil"]) == 0
    assert out.read_text() == study.STUDY_MD.read_text()
    shipped = json.loads((study_ship.SHIP_DIR / "results.json").read_text())
    for name, file in shipped["shipped"].items():
        assert (study_ship.SHIP_DIR / file).is_file(), name
    recorded = shipped["rescored"]["B-danceopd"]
    result = study_ship.rescore_one(study_ship.SHIP_DIR, shipped["shipped"]["B-danceopd"])
    assert result["set"] == recorded["set"] == "quick" and result["nfe_per_image"] == 16
    # another CPU may flip a borderline sample: at most 2 of the 96 prompts, a quarter point of the edit average
    assert abs(result["t2i"]["overall"] - recorded["t2i"]["overall"]) <= 2 / 96 + 1e-9
    assert abs(result["edit"]["average"] - recorded["edit"]["average"]) <= 0.25
    assert f"| `B-danceopd.safetensors` | {recorded['t2i']['overall']:.3f} [" in study.STUDY_MD.read_text()


def test_seeds_stage_counts_baselines_shipped_from_another_root(tmp_path, capsys):
    """A new root that scored no baseline itself takes each setting's best trained baseline from the shipped
    results: the highest (T2I + edit / 10) / 2 among the trained baselines with a final score."""
    shipped = json.loads((study_ship.SHIP_DIR / "results.json").read_text())["runs"]
    expected = {}
    for setting in ("A", "B"):
        scores = {}
        for key in ("dense", "offpolicy", "joint"):
            final = (shipped.get(f"{setting}-{key}") or {}).get("final")
            if final:
                scores[key] = final["t2i"]["overall"] + final["edit"]["average"] / 10
        expected[setting] = max(scores, key=scores.get)
    root = tmp_path / "R"
    write_buckets(root, ["t2i", "local", "global", "all"], 1, workers=1)
    args = ["seeds", "--root", str(root), "--eval_preset", "large", "--only", "no-such-run"]
    assert study.main(args) == 0
    settings = json.loads((root / "study.json").read_text())
    assert settings["best_baselines"] == expected
    capsys.readouterr()
    assert (
        study.main([*args, "--dest", str(tmp_path / "nothing-shipped")]) == 2
    )  # an error line, no traceback
    assert "no trained baseline of setting A is scored yet" in capsys.readouterr().err


def test_claims_verdicts():
    """Each claim's verdict comes from the paired difference: ahead only when positive with p < 0.05."""
    assert study_report._ahead(None) == "not run"
    assert study_report._ahead({"difference": 0.5, "ci": [0.2, 0.8], "p": 0.01}).startswith(
        "ahead: +0.50 [+0.20, +0.80]"
    )
    assert study_report._ahead({"difference": 0.2, "ci": [-0.1, 0.5], "p": 0.2}).startswith(
        "**not significant**"
    )
    assert study_report._ahead({"difference": -0.4, "ci": [-0.6, -0.2], "p": 0.001}).startswith("**behind**")
    shipped = json.loads((study_ship.SHIP_DIR / "results.json").read_text())
    text = "\n".join(study_report._claims_section(shipped))
    # the shipped study: B-danceopd against its own soft-routing run, the same samples as the main table's row
    diff = study_report._paired(shipped["runs"]["B-danceopd"]["final"], shipped["runs"]["B-soft"]["final"])[
        "edit"
    ]
    assert f"| B: hard routing > soft | soft routing | {study_report._ahead(diff)} |" in text
    assert "| B: local-expert init best | init base |" in text


def test_calibrated_study_queries_in_sigma_where_a_run_chooses_its_states(tmp_path):
    """The second edition (``--query_space sigma``): every run that draws a query state reads the paper's law on a
    shift-3 grid; dense (every state), joint (no rollout) and the first edition's runs are unchanged."""
    settings = study_settings.Settings(query_space="sigma")
    runs = study_grid.all_runs(settings)
    spaces = {
        r.name: _flag(study_train.train_command(r, tmp_path, settings, False), "--query_space") for r in runs
    }
    for run in runs:
        chooses = run.method in ("danceopd", "offpolicy")
        assert spaces[run.name] == ("sigma" if chooses else None), run.name
    assert spaces["B-query-mid"] == "sigma" and spaces["cfg-3"] == "sigma" and spaces["A-dense"] is None
    first = study_settings.Settings()
    assert not any("--query_space" in study_train.train_command(r, tmp_path, first, False) for r in runs)


def test_carry_starts_a_second_edition_from_the_query_free_results(tmp_path):
    """Dense, joint, merges and teachers draw no query state: a sigma-space edition on the same grid takes them from
    the shipped first edition (files too), and nothing that queries; a second carry into the same place is refused."""
    dest = tmp_path / "study2"
    carried = study_carry.carry_stage(study_ship.SHIP_DIR, dest, "sigma", log=lambda *a: None)
    assert {r["method"] for r in carried["runs"].values()} == {"dense", "sft"}
    assert not any(n.endswith(("danceopd", "offpolicy", "soft")) for n in carried["runs"])
    assert carried["settings"]["query_space"] == "sigma" and carried["merges"]
    assert all((dest / f).is_file() for f in carried["shipped"].values())
    with pytest.raises(SystemExit, match="exists already"):
        study_carry.carry_stage(study_ship.SHIP_DIR, dest, "sigma", log=lambda *a: None)
    # a root of the other space cannot be shipped on top of it
    first = json.loads((study_ship.SHIP_DIR / "results.json").read_text())
    with pytest.raises(SystemExit, match="query_space"):
        study_results.merge_collections(carried, first)
    assert carried["settings"]["best_baselines"] == {}  # the new edition chooses its own seeds' baselines
    assert carried["carried"] == {
        "edition": 2,
        "query_space": "step",
        "runs": ["A-dense", "A-joint", "B-dense", "B-joint"],
        "from": "study",
    }
    out = tmp_path / "STUDY.md"
    study_report.write_report(carried, out, "pil", source="test")
    text = out.read_text()
    assert study_report.QUERY_REGIMES["sigma"] in text and "## This edition" in text
    # a partial edition: everything that draws a query is "not run yet", nothing crashes
    (missing,) = [line for line in text.splitlines() if line.startswith("- **Not run yet**")]
    assert "A-danceopd" in missing and "(B-k4)" in missing and "seeds" in missing
    assert "| DiffusionOPD (dense) *(carried)* | 0.787 [" in text and "| DanceOPD | not run |" in text


STUDY2 = study_settings.HERE / "study2"
STUDY2_MD = study_settings.HERE / "STUDY2.md"
#: the second edition's new runs with the large-set headlines the GPU printed for them (T2I overall, edit
#: average), trained with --query_space sigma on one H100 on 2026-12-07
SECOND_EDITION = {
    "A-danceopd": ("0.786", "6.20"),
    "A-offpolicy": ("0.721", "4.66"),
    "A-soft": ("0.484", "4.70"),
    "B-danceopd": ("0.805", "6.49"),
    "B-init-base": ("0.773", "0.51"),
    "B-init-global": ("0.734", "2.25"),
    "B-offpolicy": ("0.747", "4.19"),
    "B-query-high": ("0.703", "6.19"),
    "B-query-mid": ("0.801", "6.33"),
    "B-soft": ("0.646", "0.58"),
}


def test_second_edition_report_is_current_and_says_what_it_is(tmp_path):
    """STUDY2.md is what `report` writes from the shipped study2/results.json (plots in a folder of its own), says
    near its top what changed, what is new, carried and not run yet, and prints the GPU's large-set numbers."""
    out = tmp_path / "STUDY2.md"
    args = ["report", "--dest", str(STUDY2), "--out", str(out), "--plot_backend", "pil"]
    assert study.main(args) == 0
    text = out.read_text()
    assert text == STUDY2_MD.read_text(), (
        "STUDY2.md is stale: run `study report --dest ... --out ...STUDY2.md`"
    )
    assert (tmp_path / "study2" / "plots" / "ablations.png").is_file()
    top = text.split("## Setting A")[0]
    assert (
        "second edition" in top.splitlines()[0] and "`--query_space sigma`" in top and "paper's regime" in top
    )
    (new,) = [line for line in top.splitlines() if line.startswith("- **New in this edition**")]
    assert "one NVIDIA H100 on 2026-12-07" in new and new.endswith(", ".join(sorted(SECOND_EDITION)) + ".")
    (carried,) = [
        line for line in top.splitlines() if line.startswith("- **Carried from the first edition**")
    ]
    assert "A-dense, A-joint, B-dense, B-joint, the 21 weight merges and the 10 teachers" in carried
    (missing,) = [line for line in top.splitlines() if line.startswith("- **Not run yet**")]
    for what in (
        "(B-k4)",
        "(B-init-merged)",
        "CFG absorption (cfg-1.5, cfg-3, cfg-5, cfg-apg, cfg-zero)",
        "seeds",
    ):
        assert what in missing
    shipped = json.loads((STUDY2 / "results.json").read_text())
    first = json.loads((study_ship.SHIP_DIR / "results.json").read_text())
    assert shipped["settings"]["query_space"] == "sigma" and shipped["settings"]["best_baselines"] == {}
    for name, (t2i, edit) in SECOND_EDITION.items():
        final = shipped["runs"][name]["final"]
        assert final["set"] == "large" and final["per_category"] == {"t2i": 192, "edit": 256}
        assert (f"{final['t2i']['overall']:.3f}", f"{final['edit']['average']:.2f}") == (t2i, edit), name
    for name in shipped["carried"]["runs"]:  # the query-free runs: the first edition's results, unchanged
        assert shipped["runs"][name] == first["runs"][name]
    assert shipped["merges"] == first["merges"] and shipped["teachers"] == first["teachers"]
    for name in ("B-k4", "B-init-merged", "cfg-3"):
        assert name not in shipped["runs"]
    claims = "\n".join(study_report._claims_section(shipped))
    assert "| B: K = 1 ≥ K = 4 | K = 4 | not run |" in claims
    assert "| A: DanceOPD ahead on edits | DiffusionOPD (dense) *(carried)* |" in claims


def test_carry_beside_the_first_edition_names_its_files_instead_of_copying(tmp_path):
    """Editions shipped side by side (the package's study/ and study2/): the carried students are the first
    edition's files, named relative to the new folder, so the package holds each student once."""
    import shutil

    first = tmp_path / "study"
    shutil.copytree(study_ship.SHIP_DIR, first, ignore=shutil.ignore_patterns("plots"))
    carried = study_carry.carry_stage(first, tmp_path / "study2", "sigma", log=lambda *a: None)
    assert carried["shipped"] and all(f.startswith("../study/") for f in carried["shipped"].values())
    assert not list((tmp_path / "study2").glob("*.safetensors"))
    assert all((tmp_path / "study2" / f).resolve().is_file() for f in carried["shipped"].values())
    shipped = json.loads((study_ship.SHIP_DIR.parent / "study2" / "results.json").read_text())
    assert not list((study_ship.SHIP_DIR.parent / "study2").glob("*dense*.safetensors"))  # nothing shipped twice
    assert shipped["shipped"]["A-dense"] == "../study/A-dense.safetensors"


def test_second_edition_students_are_fp16_and_load(tmp_path):
    """The shipped second-edition students: small fp16 files with the first edition's keys; the carried ones are
    the first edition's own files (named through ``../study/``, never shipped twice), the new ones are not; a new
    one fuses into the base as B @ A at scale 1."""
    from safetensors.torch import load_file

    from danceopd_diffusers.shapesworld.evaluate import load_pipeline

    shipped = json.loads((STUDY2 / "results.json").read_text())
    first = json.loads((study_ship.SHIP_DIR / "results.json").read_text())
    with safe_open(str(study_ship.SHIP_DIR / "B-danceopd.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert set(shipped["shipped"]) == set(first["shipped"])
    for name, file in shipped["shipped"].items():
        path = STUDY2 / file
        assert path.stat().st_size < 2 * 2**20, name
        with safe_open(str(path), "pt") as f:
            assert set(f.keys()) == keys and all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
        same = path.read_bytes() == (study_ship.SHIP_DIR / first["shipped"][name]).read_bytes()
        assert same == (name in shipped["carried"]["runs"] or name in shipped["merges"]), name
    base = Path(study_settings.SOURCES) / "base"
    plain, _ = load_pipeline(str(base))
    student, _ = load_pipeline(str(base), str(STUDY2 / "B-danceopd.safetensors"))
    lora = load_file(str(STUDY2 / "B-danceopd.safetensors"))
    module = "single_transformer_blocks.0.attn.to_k"
    delta = (
        lora[f"transformer.{module}.lora_B.weight"].float()
        @ lora[f"transformer.{module}.lora_A.weight"].float()
    )
    got = student.transformer.get_submodule(module).weight - plain.transformer.get_submodule(module).weight
    assert delta.abs().max() > 0 and torch.allclose(got, delta, atol=1e-4), (got - delta).abs().max()
