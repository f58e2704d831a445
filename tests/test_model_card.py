"""The model card's code runs as written against the exported tiny pipeline, and reproduces the trained call.

Every Python block of a card is executed in a process where ``danceopd_diffusers`` cannot be imported (a card
reader has only diffusers), offline, with only what the card tells its reader to replace: the repo id becomes the
local folder, the ``base = ...`` line the tiny base. Counting the transformer's calls and their batch shows the
step count and that no guidance branch ran; the exported pipeline and the LoRA on the stock base must give the
same image. What a user typed (folder, repo id, prompt, field names) stays data in the card; no path of the
training machine is in any file an export publishes.
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
from conftest import make_lora_file, python_blocks, run_card_blocks, run_train

STEPS, MAX_LEN, RES = 3, 16, 32


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
    export.save_pipeline_folder(pipe, family, transformer, out, 3.0, call, trained_resolution=RES)
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
def test_card_code_runs_and_samples_the_trained_call(family_name, options, guidance, tmp_path, tiny_path):
    """Both snippets run as written with diffusers alone; one transformer call of batch 1 per trained step; same
    image."""
    base, family, call, card = export_tiny(family_name, tmp_path / "student", **options)
    assert (
        guidance in card
        and f"num_inference_steps={STEPS}" in card
        and f"max_sequence_length={MAX_LEN}" in card
    )
    assert f"height={RES}" in card and "prompt=" in card
    blocks = python_blocks(card)
    assert len(blocks) == 2 and "trust_remote_code=True" in blocks[0] and "load_lora_weights" in blocks[1]
    runs = run_card_blocks(
        blocks,
        "someone/student",
        tmp_path / "student",
        base,
        tmp_path / "reader",
        family.transformer_class().__name__,
    )
    for run in runs:
        assert run["calls"] == [1] * STEPS, (family_name, run["calls"])  # the trained steps, no guidance
        assert run["image"].shape[:2] == (RES, RES)
    images = [run["image"] for run in runs]
    assert np.abs(images[0] - images[1]).max() <= 2, "the LoRA on the stock base is not the exported student"
    assert json.loads((tmp_path / "student" / "model_index.json").read_text())["trained_call_kwargs"] == call


def test_exported_pipeline_renders_the_trained_size_unless_told_and_warns_far_from_it(tmp_path, caplog):
    """Kontext's stock call renders at max_area 1024² whatever height/width say; the export renders the trained
    size with just a prompt, honours a given size, sizes an edit at the trained area and its source's aspect
    ratio, warns when the area is more than 2x off, and keeps the trained size through save/reload."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    export_tiny("flux-kontext", tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student", trust_remote_code=True)
    pipe.save_pretrained(tmp_path / "copy")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert pipe.config.trained_resolution == RES
    pipe.set_progress_bar_config(disable=True)
    tokens: list[int] = []

    def count_tokens(module, args, kwargs):
        tokens.append(kwargs["hidden_states"].shape[1])
        assert tokens[-1] <= 1024, "the call renders far larger than asked (Kontext's 1024² default?)"

    pipe.transformer.register_forward_pre_hook(count_tokens, with_kwargs=True)

    def size(**kwargs) -> tuple[int, int]:
        return pipe(prompt="a red circle", num_inference_steps=1, **kwargs).images[0].size

    caplog.set_level("WARNING")
    assert size() == (RES, RES)  # just a prompt: the trained size
    assert size(height=48, width=32) == (32, 48)  # a given size is honoured, not rescaled to max_area
    assert size(height=16, width=32) == (32, 16)
    assert "trained at" not in caplog.text  # within 2x of the trained area: no warning
    source = Image.new("RGB", (64, 32), "red")
    assert size(image=source, _auto_resize=False) == (32, 16)  # the source's 2:1 at about the trained area
    assert "trained at" not in caplog.text
    assert size(height=96, width=96) == (96, 96)
    assert f"trained at {RES}x{RES} pixels" in caplog.text and "96x96" in caplog.text


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


def _machine_paths(*paths: str) -> list[bytes]:
    """Absolute paths of this machine a published file must not hold, as bytes (binary files are scanned too)."""
    found = {os.path.realpath(p) for p in paths} | {os.path.abspath(p) for p in paths}
    return sorted(p.encode() for p in found if p not in ("/", ""))


def test_trained_export_names_no_local_path_and_its_card_runs_without_the_package(tiny_path, tmp_path):
    """A real run: no path of the training machine in any file the export publishes (configs of every component,
    card, LoRA metadata, ...); the base and the student's init recorded; the card's code runs with diffusers
    alone."""
    lora = make_lora_file(tiny_path, tmp_path / "my-expert")
    init = make_lora_file(tiny_path, tmp_path / "my-init", seed=2, scale=0.05)
    data = tmp_path / "prompts.csv"
    data.write_text("prompt\na red circle\ntwo blue squares\n")
    out = tmp_path / "out"
    run_train(
        ["--pretrained_model_name_or_path", tiny_path, "--expert_lora", str(lora.parent), "--cfg_scale", "3"]
        + ["--dataset_name", str(data), "--output_dir", str(out), "--max_train_steps", "1", "--rank", "4"]
        + ["--num_rollout_steps", str(STEPS), "--max_sequence_length", str(MAX_LEN), "--report_to", "none"]
        + ["--train_batch_size", "1", "--resolution", str(RES), "--student_init", str(init.parent)]
        + ["--validation_prompt", "a red circle"]
    )
    from danceopd_diffusers.export import files_to_upload

    published = files_to_upload(out)
    assert {"transformer/config.json", "vae/config.json", "README.md", "samples.png"} <= set(published)
    forbidden = _machine_paths(str(tmp_path), tiny_path, os.path.dirname(tiny_path), str(out))
    for name in published:
        content = (out / name).read_bytes()
        leaked = [p.decode() for p in forbidden if p in content]
        assert not leaked, f"{name} holds {leaked}"
    for component in ("transformer", "vae"):
        config = json.loads((out / component / "config.json").read_text())
        assert config["_name_or_path"] == Path(tiny_path).name  # the base by its name, not its path
    card = (out / "README.md").read_text(encoding="utf-8")
    run_config = (out / "danceopd_config.json").read_text()
    assert "base + LoRA my-expert" in card
    assert "started from the LoRA `my-init`" in card and "| `student_init` | `my-init` |" in card
    assert "local folder, `" + Path(tiny_path).name + "`" in card  # where the base comes from
    assert "every image of the grid was generated by this run." in card  # no dataset image in a T2I grid
    recorded = json.loads(run_config)
    assert recorded["base_model"] == Path(tiny_path).name and recorded["args"]["student_init"] == "my-init"
    assert recorded["fields_config"]["fields"]["expert"]["path"] == "my-expert"
    assert recorded["trained_call_kwargs"] == {
        "num_inference_steps": STEPS,
        "max_sequence_length": MAX_LEN,
        "guidance_scale": 1.0,
    }
    assert json.loads((out / "model_index.json").read_text())["trained_resolution"] == RES
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.license and data.license != "" and "danceopd" in data.tags and "diffusers" in data.tags
    blocks = python_blocks(card)  # the training script's own card runs too
    assert len(blocks) == 2
    for run in run_card_blocks(
        blocks, out.name, out, tiny_path, tmp_path / "reader", "SD3Transformer2DModel"
    ):
        assert run["image"].shape[:2] == (RES, RES) and run["calls"] == [1] * STEPS


HOSTILE = 'x"\'\n```python\nimport os; os.system("echo pwned")\n```\n# |</p><script>`'


def test_user_strings_stay_data_in_the_card(tmp_path):
    """A repo id, a prompt, field and bucket names holding quotes, line breaks, triple backticks, pipes and HTML:
    the card's code blocks are the same code as for plain names (only string constants differ, and they hold the
    values exactly), the markdown keeps its fences, title and table rows."""
    from danceopd_diffusers import export
    from danceopd_diffusers.config import FieldsConfig, FieldSpec, RouteSpec
    from danceopd_diffusers.families import FAMILIES
    from danceopd_diffusers.tiny import tiny_pipeline_path

    family = FAMILIES["sd3"](max_sequence_length=MAX_LEN)
    call = export.trained_call_kwargs(family, method="danceopd", num_steps=STEPS, max_sequence_length=MAX_LEN)
    base = tiny_pipeline_path("sd3")

    class Described:
        def __init__(self, text: str):
            self.text = text

        def describe(self) -> str:
            return self.text

    def card_for(text: str, folder: Path) -> str:
        folder.mkdir(parents=True)
        fields = FieldsConfig(
            fields={"base": FieldSpec("base", "base"), text: FieldSpec(text, "cfg", of="base", scale=3.0)},
            routes=[RouteSpec(text, task=text)],
        )
        return export.render_model_card(
            folder,
            base_model=base,
            repo_id=None,
            family=family,
            fields={"base": Described("base model"), text: Described(f"CFG(scale=3.0) of {text}")},
            fields_config=fields,
            method="danceopd",
            hyperparameters={"method": "danceopd", "resolution": RES, "student_init": text},
            call_kwargs=call,
            absorbed_guidance_scale=3.0,
            has_lora=True,
            has_pipeline=True,
            samples_image="samples.png",
            prompt=text,
            dataset_images=[(text, 3)],
        )

    plain = card_for("plain", tmp_path / "plain" / "student")
    hostile = card_for(HOSTILE, tmp_path / HOSTILE.replace("/", "_") / HOSTILE.replace("/", "_"))

    def shape(code: str) -> str:  # the code with every string constant blanked
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                node.value = ""
        return ast.dump(tree)

    def fences(card: str) -> list[str]:  # the lines that open or close a fenced block (inline spans do not)
        return [line for line in card.splitlines() if line.lstrip(" ").startswith(("```", "~~~"))]

    assert fences(plain) == fences(hostile) and len(fences(plain)) == 4
    plain_blocks, hostile_blocks = python_blocks(plain), python_blocks(hostile)
    assert len(plain_blocks) == len(hostile_blocks) == 2
    for a, b in zip(plain_blocks, hostile_blocks):
        assert shape(a) == shape(b)  # no statement, call or name more: the strings stayed strings
        constants = {n.value for n in ast.walk(ast.parse(b)) if isinstance(n, ast.Constant)}
        assert HOSTILE in constants  # the prompt exactly as given
        assert HOSTILE.replace("/", "_") in constants  # the folder name, as the repo id

    def prose(card: str) -> list[str]:  # the lines outside code blocks, after the metadata
        lines, inside = [], False
        for line in card.split("---\n", 2)[2].splitlines():
            inside = not inside if line.startswith("```") else inside
            if not inside and not line.startswith("```"):
                lines.append(line)
        return lines

    def headings(card: str) -> list[str]:
        return [line for line in prose(card) if line.startswith("#")]

    assert len(headings(hostile)) == len(headings(plain)) and headings(hostile)[1:] == headings(plain)[1:]
    for table_line in [line for line in prose(hostile) if line.startswith("| ")]:
        cells = re.split(r"(?<!\\)\|", table_line.strip())[1:-1]
        assert len(cells) in (2, 3), table_line  # a pipe in a name did not add a column
    # outside code spans (where markdown shows HTML as text) no HTML of the names reaches the page
    text = re.sub(r"(?<![`\\])(`+)(?!`).+?(?<!`)\1(?!`)", "", "\n".join(prose(hostile)))
    assert "script" in text and not re.search(r"(?<!\\)<", text)  # every < escaped (\<script\>)


def test_hub_shapesworld_and_local_bases_say_where_the_base_comes_from(tmp_path):
    from danceopd_diffusers import export
    from danceopd_diffusers.shapesworld import demo

    hub = export.base_model_reference("stabilityai/stable-diffusion-3.5-medium")
    assert hub["hub_id"] == "stabilityai/stable-diffusion-3.5-medium"
    assert export.base_load_line(hub) == "base = 'stabilityai/stable-diffusion-3.5-medium'"
    assert "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium" in hub["where"]
    shapes = export.base_model_reference(demo.base_path())
    assert shapes["name"] == "ShapesWorld base" and shapes["hub_id"] is None
    line = export.base_load_line(shapes)
    assert line.startswith("base = 'danceopd_diffusers/shapesworld/sources/base'  # set this")
    assert "import" not in line and "/" + "work" not in line + shapes["where"]
    assert (
        "not on the Hub" in shapes["where"]
        and "danceopd_diffusers/shapesworld/sources/base" in shapes["where"]
    )
    local = tmp_path / "my base"
    local.mkdir()
    mine = export.base_model_reference(str(local))
    assert mine["name"] == "my base" and str(tmp_path) not in export.base_load_line(mine) + mine["where"]
    assert "local folder" in mine["where"]
    # a Hub model given by its cache folder is named by its Hub id
    snapshot = tmp_path / "hub" / "models--someone--a-model" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    cached = export.base_model_reference(str(snapshot))
    assert (
        cached["hub_id"] == "someone/a-model" and export.base_load_line(cached) == "base = 'someone/a-model'"
    )
    assert export._base_license(shapes) == {"license": "apache-2.0"}
    assert export._base_license(hub)["license_link"].endswith("stabilityai/stable-diffusion-3.5-medium")
    assert export.public_path(demo.base_path()) == "danceopd_diffusers/shapesworld/sources/base"


def test_pipeline_file_imports_only_diffusers():
    """Exported folders load without danceopd_diffusers: their pipeline file imports only diffusers."""
    from danceopd_diffusers.export import package_file

    tree = ast.parse(package_file("pipelines/pipeline_danceopd.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules <= {"__future__", "inspect", "json", "os", "shutil", "diffusers", "huggingface_hub"}, (
        modules
    )


def test_exported_class_table_mirrors_the_factory():
    """``export.exported_pipelines()`` (class name -> stock class) is the factory's table, for every family."""
    import diffusers

    from danceopd_diffusers.export import exported_pipelines
    from danceopd_diffusers.families import FAMILIES
    from danceopd_diffusers.pipelines import pipeline_danceopd as module

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
