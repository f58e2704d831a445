"""The weight-merging baseline: peft's add_weighted_adapter over expert LoRA files, written for stock loaders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_lora_file

TARGETS = ("attn.to_q", "attn.to_v")


def _deltas(transformer, adapter: str) -> dict[str, torch.Tensor]:
    """Each adapted module's weight delta B @ A * (alpha / r)."""
    out = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            out[name] = module.get_delta_weight(adapter).detach()
    return out


def _loaded_deltas(tiny_path: str, file) -> dict[str, torch.Tensor]:
    from diffusers import SD3Transformer2DModel

    from danceopd_diffusers.lora_io import load_lora_for_diffusers
    from danceopd_diffusers.student import load_lora_into_adapter

    transformer = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer")
    load_lora_into_adapter(transformer, *load_lora_for_diffusers(str(file)), adapter_name="x")
    return _deltas(transformer, "x")


def test_cat_merge_is_the_weighted_sum_of_the_expert_deltas_and_loads_in_the_stock_pipeline(
    tiny_path, tmp_path
):
    from diffusers import StableDiffusion3Pipeline

    from danceopd_diffusers.lora_merge import main

    a = make_lora_file(tiny_path, tmp_path / "a", rank=4, seed=1, targets=TARGETS)
    b = make_lora_file(tiny_path, tmp_path / "b", rank=2, seed=2, targets=TARGETS)
    out = tmp_path / "merged"
    main(
        ["--pretrained_model_name_or_path", tiny_path, "--lora", str(a), "--lora", str(b)]
        + ["--weights", "0.3", "0.7", "--combination", "cat", "--output_dir", str(out)]
    )
    merged = _loaded_deltas(tiny_path, out / "pytorch_lora_weights.safetensors")
    da, db = _loaded_deltas(tiny_path, a), _loaded_deltas(tiny_path, b)
    assert set(merged) == set(da) == set(db) and merged
    for name in merged:
        torch.testing.assert_close(merged[name], 0.3 * da[name] + 0.7 * db[name], atol=1e-6, rtol=1e-5)
    record = json.loads((out / "merge_config.json").read_text())
    assert record["combination"] == "cat" and record["rank"] == 6 and record["weights"] == [0.3, 0.7]
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    pipe.load_lora_weights(str(out))  # the stock loader reads it


def test_ties_svd_merge_prunes_and_keeps_the_requested_rank(tiny_path, tmp_path):
    from danceopd_diffusers.lora_io import inspect_lora
    from danceopd_diffusers.lora_merge import merge_and_save

    a = make_lora_file(tiny_path, tmp_path / "a", rank=4, seed=1, targets=TARGETS)
    b = make_lora_file(tiny_path, tmp_path / "b", rank=4, seed=2, targets=TARGETS)
    dense = merge_and_save(tiny_path, [str(a), str(b)], [0.5, 0.5], tmp_path / "cat", "cat")
    pruned = merge_and_save(tiny_path, [str(a), str(b)], [0.5, 0.5], tmp_path / "ties", "ties_svd", 0.3, 4)
    assert set(inspect_lora(str(pruned)).modules.values()) == {4}
    d_cat, d_ties = _loaded_deltas(tiny_path, dense), _loaded_deltas(tiny_path, pruned)
    # TIES keeps 30 % of each delta and elects signs: a different, rank-4 model
    name = next(iter(d_cat))
    assert not torch.allclose(d_cat[name], d_ties[name], atol=1e-4)
    assert torch.linalg.matrix_rank(d_ties[name]) <= 4


def test_merge_refuses_bad_requests(tiny_path, tmp_path):
    from danceopd_diffusers.lora_merge import main

    a = make_lora_file(tiny_path, tmp_path / "a", rank=4, seed=1, targets=TARGETS)
    base = [
        "--pretrained_model_name_or_path",
        tiny_path,
        "--lora",
        str(a),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit):
        main(base + ["--combination", "ties_svd"])  # no density
    with pytest.raises(SystemExit):
        main(base + ["--weights", "0.5", "0.5"])  # two weights, one LoRA
    assert not (tmp_path / "o").exists()
