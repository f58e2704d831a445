"""Edits whose sources have different aspect ratios, met in one optimizer step (gradient accumulation > 1).

Every micro-step of an optimizer step is prepared (its size, its noise) before any is rolled out. An adapter that
remembered the last prepared size (Kontext's ``max_area``, the Flux token grids) rolled the first micro-steps out
at the last one's size: a RoPE shape mismatch. Each editing family trains here on wide, tall and square sources in
one step, with sequential micro-steps and with ``--batch_rollouts`` (which falls back to sequential rollouts when
the sizes differ), and both give the same student. The target is image guidance, whose image-free branch has no
source to read the state's grid from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_train
from PIL import Image
from safetensors.torch import load_file

from danceopd_diffusers.families import FAMILIES

#: family -> (tiny pipeline, --resolution, --max_sequence_length)
CASES = {
    "flux-kontext": ("flux-kontext", 32, 16),
    "qwen-image-edit": ("qwen-image-edit", 64, 64),
    "z-image-omni": ("z-image-omni", 64, 32),
    "flux2-klein": ("flux2-klein", 64, 48),
}
#: source sizes (width, height): three aspect ratios, so an optimizer step of 4 micro-steps mixes them
SOURCES = {"wide": (96, 48), "tall": (48, 96), "square": (64, 64)}
ACCUMULATION = 4


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    from danceopd_diffusers.tiny import tiny_pipeline_path

    cache = tmp_path_factory.mktemp("mixed-sizes-cache")
    return lambda name: tiny_pipeline_path(name, cache)


@pytest.fixture
def small_qwen_source_area(monkeypatch):
    """The stock Qwen edit pipeline resizes sources to ~1024² for its VL encoder (7 s per encode on a CPU): the
    same function at 1/64 of the area."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module

    original = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: original(area / 64, ratio))


def _write_data(folder: Path) -> Path:
    rows = []
    for i, (name, (w, h)) in enumerate(SOURCES.items()):
        for j in range(2):
            pixels = np.random.RandomState(10 * i + j).randint(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{j}.png")
        rows.append(
            {"prompt": f"edit the {name} one", "task": "edit", "source_image": f"{name}_0.png"}
            | {"target_image": f"{name}_1.png"}
        )
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("family_name", list(CASES))
def test_mixed_aspect_ratio_edits_in_one_optimizer_step(
    family_name, tiny_paths, tmp_path, monkeypatch, small_qwen_source_area
):
    pipeline_name, resolution, text_len = CASES[family_name]
    path = tiny_paths(pipeline_name)
    config = tmp_path / "fields.yaml"
    config.write_text(
        # image guidance: its image-free branch drops the source, so the state's size must travel on its own
        "fields:\n  base: {type: base}\n"
        "  edit_ig: {type: image_guidance, of: base, text_scale: 2.0, image_scale: 1.5}\n"
        "routes:\n  - {field: edit_ig, task: edit}\n"
    )
    data = _write_data(tmp_path)
    # record every size prepared for a rollout, in order: one group of ACCUMULATION per optimizer step
    family_cls = FAMILIES[family_name]
    sizes: list[tuple[int, int]] = []
    latent_shape = family_cls.latent_shape

    def recording(self, pipe, batch_size, height, width):
        sizes.append((int(height), int(width)))
        return latent_shape(self, pipe, batch_size, height, width)

    monkeypatch.setattr(family_cls, "latent_shape", recording)
    common = [
        "--pretrained_model_name_or_path",
        path,
        "--dataset_name",
        str(data),
        "--fields_config",
        str(config),
        "--max_train_steps",
        "2",
        "--num_rollout_steps",
        "3",
        "--rank",
        "4",
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        str(ACCUMULATION),
        "--learning_rate",
        "1e-3",
        "--resolution",
        str(resolution),
        "--max_sequence_length",
        str(text_len),
        "--seed",
        "3",
        "--report_to",
        "none",
        "--skip_pipeline_export",
    ]
    students = {}
    for mode, extra in (("sequential", []), ("batched", ["--batch_rollouts"])):
        sizes.clear()
        out = tmp_path / mode
        run_train([*common, "--output_dir", str(out), *extra])
        steps = [sizes[i : i + ACCUMULATION] for i in range(0, 2 * ACCUMULATION, ACCUMULATION)]
        assert len(sizes) >= 2 * ACCUMULATION
        # the case under test: some optimizer step prepared rollouts of different aspect ratios
        assert any(len({h / w for h, w in step}) > 1 for step in steps), steps
        students[mode] = load_file(out / "pytorch_lora_weights.safetensors")
    seq, joint = students["sequential"], students["batched"]
    assert all(torch.isfinite(v).all() for v in seq.values())
    assert seq.keys() == joint.keys() and all(torch.allclose(seq[k], joint[k], atol=1e-6) for k in seq)


@pytest.mark.parametrize("family_name", list(CASES))
def test_adapters_keep_no_call_order_state(family_name, tiny_paths):
    """One adapter object serves the student and every field: preparing states of other sizes (latent_shape,
    encode_images) must not change what it is, or a later velocity call would depend on the order of calls."""
    import copy

    from diffusers import DiffusionPipeline

    pipeline_name, resolution, text_len = CASES[family_name]
    pipe = DiffusionPipeline.from_pretrained(tiny_paths(pipeline_name))
    family = FAMILIES[family_name](max_sequence_length=text_len)
    before = copy.deepcopy(vars(family))
    for height, width in ((32, 64), (64, 32), (48, 48)):
        family.latent_shape(pipe, 1, height, width)
        pixels = torch.zeros(1, 3, height, width)
        with torch.no_grad():
            family.encode_images(pipe, pixels, torch.Generator().manual_seed(0))
        family.size_conditioning(pipe, 1, height, width)
        family.size_call_kwargs(height, width)
    assert vars(family).keys() == before.keys()
    assert all(_same(vars(family)[k], v) for k, v in before.items())


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b
