"""The model card's code runs as written against the exported tiny pipeline, and reproduces the trained call.

Every Python block of a card is executed (offline: the repo id becomes the local folder, the base the tiny
base). Counting the transformer's calls and their batch shows the step count and that no guidance branch ran;
the exported pipeline and the LoRA on the stock base must give the same image.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_lora_file, run_train

STEPS, MAX_LEN, RES = 3, 16, 32


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def run_card_block(code: str, repo_id: str, repo: Path, base: str, workdir: Path) -> dict:
    """Execute one card block as a user would, with the repo id and the base pointed at local folders."""
    assert f'"{repo_id}"' in code, code
    code = code.replace(f'"{repo_id}"', repr(str(repo)))
    code = re.sub(r"^base = .*$", f"base = {base!r}", code, flags=re.M)
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        torch.manual_seed(0)  # the card passes no generator: the pipelines draw their noise from this
        exec(compile(code, "<model card>", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


@pytest.fixture
def transformer_calls(monkeypatch):
    """``watch(cls)`` -> list of the batch size of every forward of ``cls`` (the card builds its own pipe)."""

    def watch(cls: type) -> list[int]:
        batches: list[int] = []
        forward = cls.forward

        def counting(module, *args, **kwargs):
            x = kwargs.get("hidden_states", kwargs.get("x", args[0] if args else None))
            batches.append(len(x))
            return forward(module, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counting)
        return batches

    return watch


def export_tiny(family_name: str, out: Path, method: str = "danceopd", **family_options) -> tuple:
    """What train_danceopd.py's export does, on an untrained tiny base with a random student LoRA."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    from danceopd_diffusers import export
    from danceopd_diffusers.config import FieldsConfig, FieldSpec, RouteSpec
    from danceopd_diffusers.families import FAMILIES
    from danceopd_diffusers.tiny import tiny_pipeline_path

    base = tiny_pipeline_path(family_name)
    family = FAMILIES[family_name](max_sequence_length=MAX_LEN, **family_options)
    pipe = DiffusionPipeline.from_pretrained(base)
    transformer = pipe.transformer
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=list(family.default_lora_targets)),
        adapter_name="student",
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out.mkdir(parents=True)
    export.save_student_lora(transformer, family, out, "student")
    export.fused_student(transformer, "student", [])
    call = export.trained_call_kwargs(family, method=method, num_steps=STEPS, max_sequence_length=MAX_LEN)
    export.save_pipeline_folder(pipe, family, transformer, out, 3.0, call)
    fields = FieldsConfig(
        fields={
            "base": FieldSpec("base", "base"),
            "base_cfg": FieldSpec("base_cfg", "cfg", of="base", scale=3.0),
        },
        routes=[RouteSpec("base_cfg")],
    )
    card = export.render_model_card(
        out,
        base_model=base,
        repo_id="someone/student",
        family=family,
        fields_table="| `base_cfg` | CFG(scale=3.0) of base |",
        routes_table="| `base_cfg` | `t2i` | 1.0 |",
        method=method,
        hyperparameters={"method": method, "num_rollout_steps": STEPS, "resolution": RES},
        call_kwargs=call,
        absorbed_guidance_scale=3.0,
        has_lora=True,
        has_pipeline=True,
        samples_image=None,
        fields_config=fields,
    )
    return base, family, call, card


def _image(namespace: dict) -> np.ndarray:
    return np.asarray(namespace["image"], dtype=np.float32)


@pytest.mark.parametrize(
    "family_name, options, guidance",
    [
        ("sd3", {}, "guidance_scale=1.0"),
        ("z-image", {}, "guidance_scale=0.0"),  # Z-Image guides whenever guidance_scale > 0
        ("flux", {"embedded_guidance": 2.0}, "guidance_scale=2.0"),  # Flux's trained embedded guidance
        ("flux-kontext", {}, "guidance_scale=3.5"),
        ("qwen-image", {}, "true_cfg_scale=1.0"),
        ("qwen-image-edit", {}, "true_cfg_scale=1.0"),
        ("z-image-omni", {}, "guidance_scale=0.0"),
    ],
)
def test_card_code_runs_and_samples_the_trained_call(
    family_name, options, guidance, tmp_path, tiny_path, transformer_calls
):
    """Both snippets run as written; one transformer call of batch 1 per trained step; same image."""
    base, family, call, card = export_tiny(family_name, tmp_path / "student", **options)
    assert (
        guidance in card
        and f"num_inference_steps={STEPS}" in card
        and f"max_sequence_length={MAX_LEN}" in card
    )
    assert f"height={RES}" in card and "prompt=" in card
    blocks = python_blocks(card)
    assert len(blocks) == 2 and "trust_remote_code=True" in blocks[0] and "load_lora_weights" in blocks[1]
    images = []
    for code in blocks:
        calls = transformer_calls(family.transformer_class())
        namespace = run_card_block(code, "someone/student", tmp_path / "student", base, tmp_path)
        assert calls == [1] * STEPS, (family_name, calls)  # the trained steps, no guidance batch or pass
        assert _image(namespace).shape[:2] == (RES, RES)
        images.append(_image(namespace))
    assert np.abs(images[0] - images[1]).max() <= 2, "the LoRA on the stock base is not the exported student"
    assert json.loads((tmp_path / "student" / "model_index.json").read_text())["trained_call_kwargs"] == call


def test_sft_card_keeps_the_base_guidance(tmp_path):
    _, _, call, card = export_tiny("sd3", tmp_path / "student", method="sft")
    assert "no classifier-free guidance" not in card.lower() and "absorbed no guidance" in card
    assert call["guidance_scale"] == 7.0 and call["num_inference_steps"] == 28  # the stock pipeline's own
    assert "guidance_scale=7.0" in card


def test_resaved_exported_pipeline_keeps_the_trained_call(tmp_path):
    """save_pretrained of the loaded export keeps the module file and the trained call; its defaults apply."""
    from diffusers import DiffusionPipeline, SD3Transformer2DModel

    _, _, call, _ = export_tiny("sd3", tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", trust_remote_code=True)
    pipe.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "pipeline_danceopd.py").is_file()
    again = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(again).__name__ == "DanceOPDStableDiffusion3Pipeline"
    assert dict(again.config.trained_call_kwargs) == call and again.config.absorbed_guidance_scale == 3.0
    again.set_progress_bar_config(disable=True)
    lengths, steps = [], []
    again.text_encoder_3.register_forward_pre_hook(
        lambda m, a, k: lengths.append((k or {}).get("input_ids", a[0] if a else None).shape[1]),
        with_kwargs=True,
    )
    again.transformer.register_forward_pre_hook(lambda m, a: steps.append(1))
    again(prompt="a red circle", height=RES, width=RES, output_type="latent")
    assert len(steps) == STEPS and lengths == [MAX_LEN]  # the trained steps and text length, no CFG
    steps.clear()
    again(prompt="a red circle", height=RES, width=RES, output_type="latent", num_inference_steps=2)
    assert len(steps) == 2  # an explicit argument wins
    assert SD3Transformer2DModel  # the stock transformer class, loaded without danceopd_diffusers code


def test_trained_card_and_config_name_no_local_paths(tiny_path, tmp_path):
    """A real run: no path of the training machine in README.md or danceopd_config.json; the base recorded."""
    lora = make_lora_file(tiny_path, tmp_path / "my-expert")
    data = tmp_path / "prompts.csv"
    data.write_text("prompt\na red circle\ntwo blue squares\n")
    out = tmp_path / "out"
    run_train(
        ["--pretrained_model_name_or_path", tiny_path, "--expert_lora", str(lora.parent), "--cfg_scale", "3"]
        + ["--dataset_name", str(data), "--output_dir", str(out), "--max_train_steps", "1", "--rank", "4"]
        + ["--num_rollout_steps", str(STEPS), "--max_sequence_length", str(MAX_LEN), "--report_to", "none"]
        + ["--train_batch_size", "1", "--resolution", str(RES)]
    )
    card = (out / "README.md").read_text()
    run_config = (out / "danceopd_config.json").read_text()
    for text in (card, run_config):
        assert str(tmp_path) not in text and tiny_path not in text and os.path.dirname(tiny_path) not in text
    assert "base + LoRA my-expert" in card
    recorded = json.loads(run_config)
    assert recorded["base_model"] == Path(tiny_path).name
    assert recorded["fields_config"]["fields"]["expert"]["path"] == "my-expert"
    assert recorded["trained_call_kwargs"] == {
        "num_inference_steps": STEPS,
        "max_sequence_length": MAX_LEN,
        "guidance_scale": 1.0,
    }
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.license and data.license != "" and "danceopd" in data.tags and "diffusers" in data.tags
    for code in python_blocks(card):  # the training script's own card runs too
        namespace = run_card_block(code, out.name, out, tiny_path, tmp_path)
        assert _image(namespace).shape[:2] == (RES, RES)


def test_hub_and_shapesworld_bases_in_metadata(tmp_path):
    from danceopd_diffusers import demo, export

    hub = export.base_model_reference("stabilityai/stable-diffusion-3.5-medium")
    assert hub["hub_id"] == "stabilityai/stable-diffusion-3.5-medium"
    assert hub["load"] == "base = 'stabilityai/stable-diffusion-3.5-medium'"
    shapes = export.base_model_reference(demo.base_path())
    assert shapes["name"] == "ShapesWorld base" and shapes["hub_id"] is None
    assert "base_path()" in shapes["load"] and "/" + "work" not in shapes["load"]
    assert export._base_license(shapes) == {"license": "apache-2.0"}
    assert export._base_license(hub)["license_link"].endswith("stabilityai/stable-diffusion-3.5-medium")
    assert export.public_path(demo.base_path()) == "danceopd_diffusers/shapesworld/sources/base"


def test_pipeline_file_imports_only_diffusers():
    """Exported folders load without danceopd_diffusers: their pipeline file imports only diffusers."""
    from danceopd_diffusers.export import package_file

    tree = ast.parse(package_file("pipeline_danceopd.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules <= {"__future__", "inspect", "json", "os", "shutil", "diffusers", "huggingface_hub"}, (
        modules
    )


def test_exported_class_table_mirrors_the_factory():
    """``export.exported_pipelines()`` (class name -> stock class) is the factory's table, for every family."""
    import diffusers

    from danceopd_diffusers import pipeline_danceopd as module
    from danceopd_diffusers.export import exported_pipelines
    from danceopd_diffusers.families import FAMILIES

    table = exported_pipelines()
    assert table == {module.CLASS_PREFIX + k: k for k in module.UNGUIDED_DEFAULTS}
    for family_cls in FAMILIES.values():
        family = family_cls()
        exported = getattr(module, family.custom_pipeline_class_name)
        assert issubclass(exported, getattr(diffusers, table[family.custom_pipeline_class_name]))
        assert (
            module.UNGUIDED_DEFAULTS[table[exported.__name__]].items()
            <= family.unguided_call_kwargs().items()
        )
