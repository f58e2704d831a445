"""The ShapesWorld evaluation command: plumbing from pipeline to table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from danceopd_diffusers.shapesworld import build_t2i_dataset, t2i_rows
from danceopd_diffusers.shapesworld import evaluate as ev
from danceopd_diffusers.shapesworld.stats import bootstrap_ci, paired_bootstrap
from danceopd_diffusers.shapesworld.world import T2I_CATEGORIES


def _record_prompts(monkeypatch) -> list[list[str]]:
    """Each batch's (non-empty) prompts, in the order the prompt cache encodes them."""
    batches = []
    original = ev.PromptCache.__call__

    def spy(self, prompts, *args, **kwargs):
        if prompts and prompts[0] != "":
            batches.append(list(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(ev.PromptCache, "__call__", spy)
    return batches


def test_perfect_generator_scores_one_and_random_model_scores_low(tiny_path, tmp_path, monkeypatch):
    pipe, family = ev.load_pipeline(tiny_path)
    real = ev.evaluate(pipe, family, guidance_scale=3.0, num_steps=4, limit=8, progress=False)
    assert real["n_t2i"] == 8 and real["nfe_per_image"] == 8 and real["edit"] == {}
    assert real["t2i"]["overall"] < 0.5  # an untrained model draws no shapes

    truth = {row["prompt"]: row["target_image"] for row in build_t2i_dataset("eval")}

    batch_prompts = _record_prompts(monkeypatch)

    def ground_truth(pipe, family, field, cond, uncond, height, width, seeds, num_steps):
        # the prompts of this batch, recovered from the prompt cache's order of encoding
        return [truth[p] for p in batch_prompts.pop(0)]

    monkeypatch.setattr(ev, "sample", ground_truth)
    perfect = ev.evaluate(pipe, family, progress=False)
    assert perfect["n_t2i"] == 96 and perfect["t2i"]["overall"] == 1.0
    assert perfect["nfe_per_image"] == 16
    table = ev.format_table({"truth": perfect, "tiny": real})
    one = "1.000 [1.00, 1.00]"
    assert f"| truth | {one} | {one} | {one} | {one} | {one} | {one} | {one} | 16 |" in table
    assert "n/a" in table and "set: quick, seed 0, scorer version 2" in table
    assert perfect["samples"]["t2i"]["counting"] == [1.0] * 16  # each sample's verdict is kept


def test_cli_writes_table_json_and_grid(tiny_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        ev.main(["--pipeline", tiny_path, "--limit", "6", "--num_inference_steps", "3", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "single_object" in printed and "cannot edit" in printed
    assert "wall time:" in printed
    data = json.loads(out.read_text())
    # --limit takes the first prompt of each category in turn: 6 prompts cover the 6 categories
    assert data["n_t2i"] == 6 and set(data["t2i"]) == {"overall", *T2I_CATEGORIES}
    assert set(data["ci"]["t2i"]) == {"overall", *T2I_CATEGORIES}
    assert all(len(data["samples"]["t2i"][c]) == 1 for c in T2I_CATEGORIES)
    assert (tmp_path / "eval.png").exists()
    assert ev.main(["--pipeline", str(tmp_path / "missing")]) == 2
    assert ev.main(["--pipeline", tiny_path, "--per_category", "0"]) == 2
    if not torch.cuda.is_available():
        assert ev.main(["--pipeline", tiny_path, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--per_category must be at least 1" in err


def test_prompt_length_follows_training_then_tokenizer(tmp_path):
    """Sampling pads prompts to the length the model was trained with, not the family default of 512."""
    from danceopd_diffusers.shapesworld.evaluate import prompt_length

    (tmp_path / "tokenizer_2").mkdir()
    (tmp_path / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    assert prompt_length(str(tmp_path)) == 32
    (tmp_path / "danceopd_config.json").write_text(json.dumps({"args": {"max_sequence_length": 16}}))
    assert prompt_length(str(tmp_path)) == 16
    assert prompt_length(str(tmp_path), 8) == 8
    (tmp_path / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (tmp_path / "danceopd_config.json").unlink()
    assert prompt_length(str(tmp_path)) is None


def test_sample_seeds_are_disjoint_across_seeds_samples_and_tasks():
    """``seed + j`` made seed 1 reuse seed 0's noise shifted by one prompt; hashed seeds share nothing."""
    large_t2i, large_edit = ev.PRESETS["large"]
    keys = [("t2i", c, i) for c in ev.T2I_CATEGORIES for i in range(large_t2i)]
    keys += [("edit", c, i) for c in ev.EDIT_CATEGORIES for i in range(large_edit)]
    drawn = [ev.sample_seed(seed, *key) for seed in (0, 1, 10_000) for key in keys]
    assert len(set(drawn)) == len(drawn)
    assert all(0 <= s < 2**63 for s in drawn)
    assert ev.sample_seed(0, "t2i", "counting", 3) == ev.sample_seed(0, "t2i", "counting", 3)


def _spy_sampler(monkeypatch):
    """Replace the sampler: record each batch's seeds and return ground truth (or blank) images."""
    calls = []

    def fake(pipe, family, field, cond, uncond, height, width, seeds, num_steps):
        calls.append(list(seeds))
        from PIL import Image

        return [Image.new("RGB", (width, height)) for _ in seeds]

    monkeypatch.setattr(ev, "sample", fake)
    return calls


def test_set_size_batches_and_prefix(tiny_path, monkeypatch):
    pipe, family = ev.load_pipeline(tiny_path)
    calls = _spy_sampler(monkeypatch)
    small = ev.evaluate(pipe, family, per_category=(2, 1), batch_size=512, progress=False)
    assert len(calls) == 1 and len(calls[0]) == 12  # one device batch for the whole set
    assert small["n_t2i"] == 12 and small["set"] == "2 T2I / 1 edits per category"
    assert all(len(v) == 2 for v in small["samples"]["t2i"].values())
    bigger = ev.evaluate(pipe, family, per_category=(3, 1), batch_size=5, progress=False)
    seeds_small, seeds_big = calls[0], [s for c in calls[1:] for s in c]
    assert [seeds_big[3 * k : 3 * k + 2] for k in range(6)] == [
        seeds_small[2 * k : 2 * k + 2] for k in range(6)
    ]
    assert (
        bigger["per_category"] == {"t2i": 3, "edit": 1} and len(calls) == 1 + 4
    )  # 18 prompts in batches of 5
    # every headline carries an interval that contains it
    for name, value in bigger["t2i"].items():
        lo, hi = bigger["ci"]["t2i"][name]
        assert lo <= value <= hi
    assert ev.set_name(*ev.PRESETS["large"]) == "large" and ev.PRESETS["large"] == (192, 256)


def test_scoring_pool_gives_the_in_process_scores(tiny_path, monkeypatch):
    pipe, family = ev.load_pipeline(tiny_path)
    truth = {row["prompt"]: row["target_image"] for row in t2i_rows("eval", 2)}
    batches = _record_prompts(monkeypatch)

    def half_truth(pipe, family, field, cond, uncond, height, width, seeds, num_steps):
        from PIL import Image

        prompts = batches.pop(0)
        return [truth[p] if i % 2 else Image.new("RGB", (width, height)) for i, p in enumerate(prompts)]

    monkeypatch.setattr(ev, "sample", half_truth)
    inline = ev.evaluate(pipe, family, per_category=(2, 1), batch_size=4, progress=False)
    pooled = ev.evaluate(pipe, family, per_category=(2, 1), batch_size=4, progress=False, score_workers=2)
    assert inline["samples"] == pooled["samples"] and inline["t2i"] == pooled["t2i"]
    assert inline["t2i"]["overall"] == 0.5 and set(inline["samples"]["t2i"]["colors"]) == {0.0, 1.0}


def test_bootstrap_interval_matches_the_binomial_standard_error():
    rng = np.random.default_rng(0)
    samples = {c: (rng.random(400) < 0.7).astype(float).tolist() for c in ev.T2I_CATEGORIES}
    ci = bootstrap_ci("t2i", samples)
    se = np.sqrt(0.7 * 0.3 / 400 / len(ev.T2I_CATEGORIES))  # overall = mean of 6 independent category means
    assert ci["overall"][1] - ci["overall"][0] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci("t2i", {"colors": [1.0] * 5}) == {"colors": [1.0, 1.0], "overall": [1.0, 1.0]}
    edit = bootstrap_ci("edit", {"subject_add": [10.0, 0.0], "style_change": [5.0, 5.0]})
    assert set(edit) == {"subject_add", "style_change", "local", "global", "average"}


def test_paired_bootstrap_difference_ci_and_p():
    rng = np.random.default_rng(1)
    a = {c: (rng.random(200) < 0.5).astype(float).tolist() for c in ev.T2I_CATEGORIES}
    same = paired_bootstrap("t2i", a, a)
    assert same["overall"]["difference"] == 0.0 and same["overall"]["p"] == 1.0
    better = {c: [1.0] * 200 for c in a}
    d = paired_bootstrap("t2i", a, better)["overall"]
    assert d["difference"] > 0.4 and d["ci"][0] > 0.4 and d["p"] < 0.001
    noise = {c: [v if rng.random() < 0.9 else 1 - v for v in a[c]] for c in a}  # 10 % verdicts flipped
    assert paired_bootstrap("t2i", a, noise)["overall"]["p"] > 0.01


def _fake_result(seed=0, per=(4, 2), shift=0.0):
    rng = np.random.default_rng(seed + int(shift * 10))
    t2i = {c: (rng.random(per[0]) < 0.5 + shift).astype(float).tolist() for c in ev.T2I_CATEGORIES}
    edit = {c: (10 * rng.random(per[1])).round(2).tolist() for c in ev.EDIT_CATEGORIES}
    from danceopd_diffusers.shapesworld.stats import headlines

    return {
        "t2i": {k: float(v) for k, v in headlines("t2i", {c: np.mean(v) for c, v in t2i.items()}).items()},
        "edit": {k: float(v) for k, v in headlines("edit", {c: np.mean(v) for c, v in edit.items()}).items()},
        "samples": {"t2i": t2i, "edit": edit},
        "set": ev.set_name(*per),
        "per_category": {"t2i": per[0], "edit": per[1]},
        "limit": None,
        "seed": seed,
        "scorer_version": ev.SCORER_VERSION,
        "n_t2i": 6 * per[0],
        "n_edit": 6 * per[1],
    }


def test_compare_command(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_fake_result()))
    b.write_text(json.dumps(_fake_result(shift=0.3)))
    assert ev.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    for headline in ("t2i overall", "edit local", "edit global", "edit average", "t2i counting"):
        assert f"| {headline} |" in out
    rows = tmp_path / "results.json"  # results.json keeps several rows: pick them by name
    rows.write_text(json.dumps({"base": _fake_result(), "joint": _fake_result(shift=0.3)}))
    assert ev.main(["compare", str(rows), str(rows), "--row_a", "base", "--row_b", "joint"]) == 0
    assert capsys.readouterr().out.splitlines()[3:] == out.splitlines()[3:]
    assert ev.main(["compare", str(rows), str(a)]) == 2
    assert "pick one with --row_a" in capsys.readouterr().err
    for other in (_fake_result(seed=1), _fake_result(per=(4, 3))):
        b.write_text(json.dumps(other))
        assert ev.main(["compare", str(a), str(b)]) == 2
        err = capsys.readouterr().err
        assert "refusing to compare" in err and ("seed" in err or "per_category" in err)
    old = _fake_result()
    del old["samples"]
    b.write_text(json.dumps(old))
    assert ev.main(["compare", str(a), str(b)]) == 2
    assert "no per-sample scores" in capsys.readouterr().err
