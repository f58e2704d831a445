"""Soft routing (the paper's soft-mixing ablation): the `mix` field and `--routing soft`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_lora_file, run_train, short_run

from danceopd_diffusers.config import ConfigError, parse_fields_config
from danceopd_diffusers.families import Conditioning, SD3Family
from danceopd_diffusers.field_loading import build_fields
from danceopd_diffusers.fields import FieldQuery
from danceopd_diffusers.routing import soft_routes

FAMILY = SD3Family(max_sequence_length=32)


def _query(pipe):
    cond = FAMILY.encode_prompts(pipe, ["a red circle", "two blue squares"], "cpu")
    empty = FAMILY.encode_prompts(pipe, [""], "cpu")
    uncond = Conditioning({k: v.expand(2, *v.shape[1:]) for k, v in empty.tensors.items()})
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return FieldQuery(x, torch.full((2,), 0.6), cond, uncond, step_index=3, num_steps=8)


def test_mix_is_the_weighted_mean_of_its_fields(tiny_pipe, tiny_path, tmp_path):
    lora = make_lora_file(tiny_path, tmp_path / "expert")
    config = parse_fields_config(
        {
            "fields": {
                "base": {"type": "base"},
                "cfg": {"type": "cfg", "of": "base", "scale": 4.0},
                "expert": {"type": "lora", "path": str(lora)},
                "mix": {"type": "mix", "of": ["cfg", "expert", "base"], "weights": [1, 2, 5]},
                "even": {"type": "mix", "of": ["cfg", "expert"]},
            },
            "routes": [{"field": "mix"}],
        }
    )
    fields = build_fields(config, FAMILY, tiny_path, tiny_pipe.transformer, None, torch.float32, "cpu")
    query = _query(tiny_pipe)
    with torch.no_grad():
        v = {name: fields[name].velocity(query) for name in ("base", "cfg", "expert", "mix", "even")}
    expected = (1 * v["cfg"] + 2 * v["expert"] + 5 * v["base"]) / 8
    assert torch.allclose(v["mix"], expected, atol=1e-5), (v["mix"] - expected).abs().max()
    assert torch.allclose(v["even"], (v["cfg"] + v["expert"]) / 2, atol=1e-5)
    assert not torch.allclose(v["mix"], v["cfg"], atol=1e-3)  # it is a blend, not one of its fields
    assert fields["mix"].describe() == "mix(0.125 cfg + 0.25 expert + 0.625 base)"
    assert [s.name for s in config.resolve_chain("mix")] == ["mix", "cfg", "base", "expert"]  # each once


@pytest.mark.parametrize(
    "mix, message",
    [
        ({"type": "mix", "of": "base"}, "needs `of`: a list of field names"),
        ({"type": "mix", "of": ["base", "nope"]}, "unknown field 'nope'"),
        ({"type": "mix", "of": ["base", "base"]}, "names a field twice"),
        ({"type": "mix", "of": ["base", "cfg"], "weights": [1]}, "1 weights for 2 fields"),
        ({"type": "mix", "of": ["base", "cfg"], "weights": [1, 0]}, "weight 0 must be a finite number > 0"),
        ({"type": "cfg", "of": ["base"], "scale": 2}, "only a mix field takes a list"),
        ({"type": "mix", "of": ["base", "m"]}, "in a cycle"),
    ],
)
def test_mix_config_errors(mix, message):
    data = {
        "fields": {"base": {"type": "base"}, "cfg": {"type": "cfg", "of": "base", "scale": 2}, "m": mix},
        "routes": [{"field": "m"}],
    }
    with pytest.raises(ConfigError, match=message):
        parse_fields_config(data)


def test_soft_routes_keep_buckets_and_mix_by_route_weight():
    config = parse_fields_config(
        {
            "fields": {
                "base": {"type": "base"},
                "t2i": {"type": "cfg", "of": "base", "scale": 3},
                "edit": {"type": "cfg", "of": "base", "scale": 5},
            },
            "routes": [
                {"field": "t2i", "task": "t2i"},
                {"field": "edit", "task": "local_edit", "weight": 2},
                {"field": "edit", "task": "global_edit"},
            ],
        }
    )
    soft = soft_routes(config)
    assert [(r.field, r.task, r.weight) for r in soft.routes] == [
        ("soft_t2i", "t2i", 1.0),
        ("soft_local_edit", "local_edit", 2.0),
        ("soft_global_edit", "global_edit", 1.0),
    ]
    for route in soft.routes:
        spec = soft.fields[route.field]
        assert spec.type == "mix" and spec.of == ["t2i", "edit"] and spec.weights == [1.0, 3.0]
    clashing = parse_fields_config(
        {
            "fields": {"base": {"type": "base"}, "soft_t2i": {"type": "cfg", "of": "base", "scale": 2}},
            "routes": [{"field": "soft_t2i"}],
        }
    )
    with pytest.raises(ConfigError, match="already declares a field of that name"):
        soft_routes(clashing)


def test_routing_soft_trains_and_logs_the_mix(tiny_path, tmp_path):
    (tmp_path / "prompts.csv").write_text("prompt\na red circle\ntwo blue squares\n")
    config = tmp_path / "f.json"
    config.write_text(
        json.dumps(
            {
                "fields": {
                    "base": {"type": "base"},
                    "lo": {"type": "cfg", "of": "base", "scale": 1.5},
                    "hi": {"type": "cfg", "of": "base", "scale": 4},
                },
                "routes": [{"field": "lo", "task": "t2i"}, {"field": "hi", "task": "t2i", "weight": 3}],
            }
        )
    )
    out = tmp_path / "o"
    run_train(
        ["--pretrained_model_name_or_path", tiny_path, "--fields_config", str(config), "--routing", "soft"]
        + ["--dataset_name", str(tmp_path / "prompts.csv"), "--output_dir", str(out)]
        + short_run(max_train_steps=1, checkpointing_steps=100)
    )
    log = [json.loads(line) for line in (out / "logs" / "routes_rank0.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["route"] == "soft_t2i"
    recorded = json.loads((out / "danceopd_config.json").read_text())
    assert recorded["fields_config"]["fields"]["soft_t2i"] == {
        "type": "mix",
        "of": ["lo", "hi"],
        "weights": [1.0, 3.0],
    }
    assert recorded["args"]["routing"] == "soft"
    assert "mix(0.25 lo + 0.75 hi)" in (out / "README.md").read_text()


def test_routing_soft_refused_with_sft(tiny_path, tmp_path):
    import train_danceopd

    with pytest.raises(ConfigError, match="--routing soft mixes fields"):
        train_danceopd.parse_args(
            ["--pretrained_model_name_or_path", tiny_path, "--method", "sft", "--routing", "soft"]
        )
