"""Bad input fails before any model weights load, with a message that names the problem and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_lora_file, run_train
from PIL import Image

from danceopd_diffusers.config import ConfigError, parse_fields_config


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to load model weights fails the test: every check must come first (armed by _expect)."""
    from diffusers import ModelMixin
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("model weights were loaded before the input was checked")

    def arm():
        monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(forbidden))
        monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(forbidden))

    _ARMED.append(arm)
    yield
    _ARMED.clear()


_ARMED: list = []


def _data(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "fields.json"
    path.write_text(json.dumps(data))
    return str(path)


def _with_data(args: list[str]) -> list[str]:
    """Data files are checked before the model: give the cases that test later checks a valid one."""
    if "--dataset_name" in args or "--train_data_dir" in args:
        return args
    data = Path(args[args.index("--output_dir") + 1]).parent / "prompts.csv"
    data.write_text("prompt\na red circle\n")
    return [*args, "--dataset_name", str(data)]


def _expect(args: list[str], *fragments: str):
    args = _with_data(args)
    for arm in _ARMED:
        arm()
    with pytest.raises(ConfigError) as info:
        run_train(args)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


BASE_CFG = {
    "fields": {"base": {"type": "base"}, "cfg": {"type": "cfg", "of": "base", "scale": 3.0}},
    "routes": [{"field": "cfg", "task": "t2i"}],
}


def test_unknown_field_in_route(tiny_path, tmp_path, no_weight_loading):
    cfg = _config(tmp_path, {"fields": {"base": {"type": "base"}}, "routes": [{"field": "realism"}]})
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            cfg,
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "unknown field 'realism'",
        "declared fields",
    )


def test_empty_bucket(tiny_path, tmp_path, no_weight_loading):
    data = _data(tmp_path, [{"prompt": "a cat", "task": "t2i"}])
    cfg = _config(tmp_path, {"fields": BASE_CFG["fields"], "routes": [{"field": "cfg", "task": "portraits"}]})
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            cfg,
            "--dataset_name",
            data,
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "Bucket 'portraits'",
        "is empty",
        "['t2i']",
    )


def test_missing_and_unreadable_images(tiny_path, tmp_path, no_weight_loading):
    data = _data(tmp_path, [{"prompt": "a cat", "task": "t2i", "target_image": "img/missing.png"}])
    args = [
        "--pretrained_model_name_or_path",
        tiny_path,
        "--method",
        "sft",
        "--dataset_name",
        data,
        "--output_dir",
        str(tmp_path / "o"),
    ]
    _expect(args, "missing.png", "cannot be opened", "relative paths")
    (tmp_path / "data" / "img").mkdir()
    (tmp_path / "data" / "img" / "missing.png").write_bytes(b"not a png")
    _expect(args, "missing.png", "cannot be opened")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "img" / "missing.png")
    with pytest.raises(AssertionError, match="weights were loaded"):  # now every check passes
        run_train(args)


def test_edit_route_on_a_family_that_cannot_edit(tiny_path, tmp_path, no_weight_loading):
    Image.new("RGB", (8, 8)).save(tmp_path / "src.png")
    data = _data(
        tmp_path, [{"prompt": "make it red", "task": "edit", "source_image": str(tmp_path / "src.png")}]
    )
    cfg = _config(tmp_path, {"fields": BASE_CFG["fields"], "routes": [{"field": "cfg", "task": "edit"}]})
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            cfg,
            "--dataset_name",
            data,
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "cannot edit",
        "Families that can edit: flux-kontext, z-image-omni, qwen-image-edit, flux2, flux2-klein.",
    )


def test_lora_with_unknown_target_modules(tiny_path, tmp_path, no_weight_loading):
    from safetensors.torch import load_file, save_file

    lora = make_lora_file(tiny_path, tmp_path / "lora")
    state = {k.replace("transformer_blocks.0.", "single_blocks.0."): v for k, v in load_file(lora).items()}
    save_file(state, lora)
    cfg = _config(
        tmp_path,
        {
            "fields": {"base": {"type": "base"}, "x": {"type": "lora", "path": str(lora.parent)}},
            "routes": [{"field": "x"}],
        },
    )
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            cfg,
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "does not have",
        "single_blocks.0",
        "LoRA of this base model",
    )


def test_lora_rank_mismatch(tiny_path, tmp_path, no_weight_loading):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    lora = make_lora_file(tiny_path, tmp_path / "lora", rank=4)
    good = make_lora_file(tiny_path, tmp_path / "init", rank=4)
    with safe_open(str(lora), "pt") as f:
        meta = dict(f.metadata())
    packed = json.loads(meta["lora_adapter_metadata"])
    packed["transformer.r"] = 8
    meta["lora_adapter_metadata"] = json.dumps(packed)
    save_file(load_file(lora), lora, metadata=meta)
    cfg = _config(
        tmp_path,
        {
            "fields": {"base": {"type": "base"}, "x": {"type": "lora", "path": str(lora)}},
            "routes": [{"field": "x"}],
        },
    )
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            cfg,
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "declares rank r=8",
        "rank 4",
    )
    # the student's own warm start: --rank must match the LoRA it continues
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--cfg_scale",
            "3",
            "--student_init",
            str(good),
            "--rank",
            "16",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "has rank 4",
        "--rank 4",
    )


def test_student_lora_layers_must_exist(tiny_path, tmp_path, no_weight_loading):
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--cfg_scale",
            "3",
            "--lora_layers",
            "attn.to_qkv",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "'attn.to_qkv' does not exist",
    )


def test_scheduler_that_is_not_flow_matching(tiny_path, tmp_path, no_weight_loading):
    folder = tmp_path / "ddim"
    shutil.copytree(tiny_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    _expect(
        [
            "--pretrained_model_name_or_path",
            str(folder),
            "--cfg_scale",
            "3",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "DDIMScheduler",
        "not a flow-matching scheduler",
    )


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--cfg_scale", "3", "--fields_config", "X"], "both given"),
        (["--method", "sft", "--cfg_scale", "3"], "uses no field"),
        (
            ["--full_finetune", "--lora_layers", "attn.to_q", "--cfg_scale", "3"],
            "--lora_layers has no effect",
        ),
        (["--query_k", "0", "--cfg_scale", "3"], "--query_k"),
        (["--num_rollout_steps", "1", "--cfg_scale", "3"], "--num_rollout_steps"),
        (["--report_to", "wandb", "--hub_token", "x", "--cfg_scale", "3"], "expose the token"),
        (["--expert_lora", "a", "--expert_checkpoint", "b"], "both given"),
        ([], "Nothing to distill"),
    ],
)
def test_conflicting_flags(tiny_path, tmp_path, no_weight_loading, extra, fragment):
    cfg = _config(tmp_path, BASE_CFG)
    extra = [cfg if a == "X" else a for a in extra]
    _expect(
        ["--pretrained_model_name_or_path", tiny_path, "--output_dir", str(tmp_path / "o"), *extra], fragment
    )


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"fields": {}, "routes": []}, "declares no fields"),
        ({"fields": {"a": {"type": "teacher"}}, "routes": [{"field": "a"}]}, "unknown type 'teacher'"),
        ({"fields": {"a": {"type": "lora"}}, "routes": [{"field": "a"}]}, "needs `path`"),
        (
            {"fields": {"a": {"type": "cfg", "of": "b", "scale": 2}}, "routes": [{"field": "a"}]},
            "unknown field 'b'",
        ),
        (
            {
                "fields": {
                    "a": {"type": "cfg", "of": "b", "scale": 2},
                    "b": {"type": "cfg", "of": "a", "scale": 2},
                },
                "routes": [{"field": "a"}],
            },
            "cycle",
        ),
        (
            {
                "fields": {
                    "b": {"type": "base"},
                    "a": {"type": "guider", "of": "b", "guider": "MagicGuidance"},
                },
                "routes": [{"field": "a"}],
            },
            "diffusers.guiders does not have",
        ),
        ({"fields": {"b": {"type": "base"}}, "routes": [{"field": "b", "weight": 0}]}, "weights must be > 0"),
        (
            {"fields": {"b": {"type": "base", "colour": 1}}, "routes": [{"field": "b"}]},
            "unknown key(s) ['colour']",
        ),
    ],
)
def test_config_errors(data, fragment):
    with pytest.raises(ConfigError) as info:
        parse_fields_config(data)
    assert fragment in str(info.value)


def test_yaml_config_with_relative_paths(tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "a.safetensors").write_bytes(b"")
    (tmp_path / "f.yaml").write_text(
        "fields:\n  base: {type: base}\n  a: {type: lora, path: loras/a.safetensors}\n"
        "  a_cfg: {type: cfg, of: a, scale: 3.5}\n  hub: {type: lora, path: someone/some-lora}\n"
        "routes:\n  - {field: a_cfg, task: t2i, weight: 2}\n  - {field: hub, task: photo}\n"
    )
    config = parse_fields_config(tmp_path / "f.yaml")
    assert config.fields["a"].path == str(tmp_path / "loras" / "a.safetensors")
    assert config.fields["hub"].path == "someone/some-lora"
    assert [(r.field, r.task, r.weight) for r in config.routes] == [
        ("a_cfg", "t2i", 2.0),
        ("hub", "photo", 1.0),
    ]
    assert config.transformer_field("a_cfg").name == "a"


def test_image_guidance_needs_an_edit_bucket(tiny_path, tmp_path, no_weight_loading):
    data = _data(tmp_path, [{"prompt": "a cat", "task": "t2i"}])
    cfg = _config(
        tmp_path,
        {
            "fields": {
                "base": {"type": "base"},
                "ig": {"type": "image_guidance", "of": "base", "text_scale": 7.5, "image_scale": 1.5},
            },
            "routes": [{"field": "ig", "task": "t2i"}],
        },
    )
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            cfg,
            "--dataset_name",
            data,
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "image guidance",
        "no source images",
    )
    with pytest.raises(ConfigError, match="needs `text_scale` and `image_scale`"):
        parse_fields_config(
            {
                "fields": {"b": {"type": "base"}, "ig": {"type": "image_guidance", "of": "b"}},
                "routes": [{"field": "ig"}],
            }
        )


def test_per_sample_routing_cannot_mix_edits_and_t2i(tiny_path, tmp_path, no_weight_loading):
    Image.new("RGB", (8, 8)).save(tmp_path / "src.png")
    data = _data(
        tmp_path,
        [
            {"prompt": "a cat", "task": "t2i"},
            {"prompt": "make it red", "task": "edit", "source_image": str(tmp_path / "src.png")},
        ],
    )
    cfg = _config(
        tmp_path,
        {
            "fields": BASE_CFG["fields"],
            "routes": [{"field": "cfg", "task": "t2i"}, {"field": "base", "task": "edit"}],
        },
    )
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            cfg,
            "--dataset_name",
            data,
            "--per_sample_routing",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "--per_sample_routing",
        "per-step routing",
    )


def test_embedded_guidance_only_for_families_that_have_it(tiny_path, tmp_path, no_weight_loading):
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--cfg_scale",
            "3",
            "--embedded_guidance",
            "2.5",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "--embedded_guidance",
        "sd3 family has none",
    )


def test_field_embedded_guidance_only_on_flux(tiny_path, tmp_path, no_weight_loading):
    cfg = _config(
        tmp_path,
        {
            "fields": {
                "base": {"type": "base", "embedded_guidance": 3.5},
                "c": {"type": "cfg", "of": "base", "scale": 2.0},
            },
            "routes": [{"field": "c"}],
        },
    )
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--fields_config",
            cfg,
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "sets `embedded_guidance`",
        "sd3 family has none",
    )


def test_student_init_that_does_not_exist(tiny_path, tmp_path, no_weight_loading):
    _expect(
        [
            "--pretrained_model_name_or_path",
            tiny_path,
            "--cfg_scale",
            "3",
            "--student_init",
            str(tmp_path / "nowhere"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        "--student_init",
        "does not exist",
    )
