"""The ShapesWorld evaluation command: plumbing from pipeline to table."""

from __future__ import annotations

import json

from danceopd_diffusers.shapesworld import build_t2i_dataset
from danceopd_diffusers.shapesworld import evaluate as ev
from danceopd_diffusers.shapesworld.world import T2I_CATEGORIES


def test_perfect_generator_scores_one_and_random_model_scores_low(tiny_path, tmp_path, monkeypatch):
    pipe, family = ev.load_pipeline(tiny_path)
    real = ev.evaluate(pipe, family, guidance_scale=3.0, num_steps=4, limit=8, progress=False)
    assert real["n_t2i"] == 8 and real["nfe_per_image"] == 8 and real["edit"] == {}
    assert real["t2i"]["overall"] < 0.5  # an untrained model draws no shapes

    truth = {row["prompt"]: row["target_image"] for row in build_t2i_dataset("eval")}

    def ground_truth(pipe, family, field, cond, uncond, height, width, seeds, num_steps):
        # the prompts of this batch, recovered from the prompt cache's order of encoding
        return [truth[p] for p in batch_prompts.pop(0)]

    batch_prompts = []
    original = ev.PromptCache.__call__

    def spy(self, prompts, *args, **kwargs):
        if prompts and prompts[0] != "":
            batch_prompts.append(list(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(ev.PromptCache, "__call__", spy)
    monkeypatch.setattr(ev, "sample", ground_truth)
    perfect = ev.evaluate(pipe, family, progress=False)
    assert perfect["n_t2i"] == 96 and perfect["t2i"]["overall"] == 1.0
    assert perfect["nfe_per_image"] == 16
    table = ev.format_table({"truth": perfect, "tiny": real})
    assert "| truth | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 16 |" in table
    assert "n/a" in table


def test_cli_writes_table_json_and_grid(tiny_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        ev.main(["--pipeline", tiny_path, "--limit", "6", "--num_inference_steps", "3", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "single_object" in printed and "cannot edit" in printed
    data = json.loads(out.read_text())
    # --limit takes the first prompt of each category in turn: 6 prompts cover the 6 categories
    assert data["n_t2i"] == 6 and set(data["t2i"]) == {"overall", *T2I_CATEGORIES}
    assert (tmp_path / "eval.png").exists()
    assert ev.main(["--pipeline", str(tmp_path / "missing")]) == 2


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
