"""Z-Image (ZImagePipeline) and Z-Image omni (ZImageOmniPipeline): field equivalence with the stock pipelines,
per-sample edit sources in the rollout, and the training script end to end (CPU, offline, tiny models)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_train
from PIL import Image
from safetensors.torch import load_file

from danceopd_diffusers.families import Conditioning
from danceopd_diffusers.families.z_image import ZImageFamily, ZImageOmniFamily
from danceopd_diffusers.fields import CFGField, FieldQuery, ImageGuidanceField, TransformerField
from danceopd_diffusers.rollout import field_rollout

MAX_LEN = 32
STEPS = 6
RES = 64
#: Without CFG the field rollout and the pipeline run the same float32 operations (observed difference: 0).
#: With CFG ours computes u + (1 + g)(c - u), the pipeline c + g(c - u): equal up to float32 reassociation.
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are a few hundred kB: one thread is several times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("z-image-cache")


@pytest.fixture(scope="module")
def z_image_path(cache) -> str:
    from danceopd_diffusers.tiny import tiny_pipeline_path

    return tiny_pipeline_path("z-image", cache)


@pytest.fixture(scope="module")
def omni_path(cache) -> str:
    from danceopd_diffusers.tiny import tiny_pipeline_path

    return tiny_pipeline_path("z-image-omni", cache)


@pytest.fixture(scope="module")
def omni_no_siglip_path(cache) -> str:
    """An omni checkpoint without SigLIP (model_index has siglip: [null, null], no SigLIP branch)."""
    from danceopd_diffusers.tiny.z_image import build_tiny_z_image_omni_pipeline

    path = cache / "tiny-z-image-omni-no-siglip"
    build_tiny_z_image_omni_pipeline(with_siglip=False).save_pretrained(path)
    return str(path)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _field_rollout(family, pipe, field, cond, uncond, x_t):
    sigmas = family.sigmas(pipe, STEPS, tuple(x_t.shape), "cpu")

    def velocity(x, sigma, step):
        return field.velocity(FieldQuery(x, sigma, cond, uncond))

    with torch.no_grad():
        return field_rollout(velocity, x_t, sigmas)[-1], sigmas


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max()


def _assert_equivalent(family, stock, cond, uncond, x_t, **call):
    """Our fields (TransformerField, and CFGField at 1 + g) against the stock __call__ at guidance g."""
    params = inspect.signature(type(stock).__call__).parameters
    assert params["cfg_normalization"].default is False and params["cfg_truncation"].default == 1.0
    base = TransformerField("base", family, stock.transformer)
    for g in (0.0, 2.0):
        field = base if g == 0 else CFGField("cfg", base, 1.0 + g)
        ours, sigmas = _field_rollout(family, stock, field, cond, uncond, x_t)
        ref = stock(
            latents=x_t.clone(),
            num_inference_steps=STEPS,
            guidance_scale=g,
            cfg_normalization=False,
            cfg_truncation=1.0,
            max_sequence_length=MAX_LEN,
            output_type="latent",
            **call,
        ).images
        assert torch.equal(stock.scheduler.sigmas.float().cpu(), sigmas)  # the pipeline's own grid
        _close(ours, ref)


def test_registry_and_tiny_pipelines(z_image_path, omni_path):
    from diffusers import ZImageTransformer2DModel

    from danceopd_diffusers.families import FAMILIES, family_for_pipeline_class
    from danceopd_diffusers.preflight import inspect_pipeline

    assert FAMILIES["z-image"] is ZImageFamily and not ZImageFamily.can_edit
    assert FAMILIES["z-image-omni"] is ZImageOmniFamily and ZImageOmniFamily.can_edit
    for name in ("ZImagePipeline", "DanceOPDZImagePipeline"):
        assert family_for_pipeline_class(name) is ZImageFamily
    for name in ("ZImageOmniPipeline", "DanceOPDZImageOmniPipeline"):
        assert family_for_pipeline_class(name) is ZImageOmniFamily
    assert inspect_pipeline(z_image_path).family_cls is ZImageFamily
    assert inspect_pipeline(omni_path).family_cls is ZImageOmniFamily
    transformer = ZImageTransformer2DModel.from_pretrained(omni_path, subfolder="transformer")
    for pad in (transformer.x_pad_token, transformer.cap_pad_token, transformer.siglip_pad_token):
        assert torch.isfinite(pad).all() and pad.abs().sum() > 0  # filled, never torch.empty garbage


# ------------------------------------------------------------------------------------- field equivalence
def test_t2i_field_matches_stock_z_image_pipeline(z_image_path):
    from diffusers import ZImagePipeline

    stock = _quiet(ZImagePipeline.from_pretrained(z_image_path))
    family = ZImageFamily(max_sequence_length=MAX_LEN)
    assert family.default_resolution(stock) == RES
    cond = family.encode_prompts(stock, ["a red circle"], "cpu")
    uncond = family.encode_prompts(stock, [""], "cpu")
    assert cond.tensors["prompt_embeds"].shape[1] == MAX_LEN and not cond.has_source
    x_t = torch.randn(family.latent_shape(stock, 1, RES, RES), generator=torch.Generator().manual_seed(0))
    assert x_t.shape == (1, 4, 16, 16)
    # the stock pipeline encodes the prompt itself: this also checks encode_prompts (template, padding)
    _assert_equivalent(family, stock, cond, uncond, x_t, prompt="a red circle", height=RES, width=RES)


def test_t2i_field_matches_stock_omni_pipeline(omni_path):
    from diffusers import ZImageOmniPipeline

    stock = _quiet(ZImageOmniPipeline.from_pretrained(omni_path))
    family = ZImageOmniFamily(max_sequence_length=MAX_LEN)
    cond = family.encode_prompts(stock, ["a red circle"], "cpu")
    uncond = family.encode_prompts(stock, [""], "cpu")
    x_t = torch.randn(family.latent_shape(stock, 1, 48, RES), generator=torch.Generator().manual_seed(1))
    _assert_equivalent(family, stock, cond, uncond, x_t, prompt="a red circle", height=48, width=RES)


def test_edit_field_matches_stock_omni_pipeline_with_siglip(omni_path):
    from diffusers import ZImageOmniPipeline

    from danceopd_diffusers.data import images_to_tensor

    stock = _quiet(ZImageOmniPipeline.from_pretrained(omni_path))
    # diffusers' omni pipeline encodes sources as `vae.encode(image.bfloat16())`: it needs a bfloat16 VAE
    stock.vae.to(torch.bfloat16)
    family = ZImageOmniFamily(max_sequence_length=MAX_LEN)
    source_image = _image(96, RES, seed=0)
    pixels = stock.image_processor.preprocess(source_image, height=RES, width=96, resize_mode="crop")
    assert torch.equal(pixels, images_to_tensor([source_image], RES, 96))  # the script's pixels are these
    source = family.encode_sources(stock, pixels)
    assert set(source.tensors) == {"source_latents", "source_siglip"}
    cond = family.encode_prompts(stock, ["make it green"], "cpu").merge(source)
    uncond = family.encode_prompts(stock, [""], "cpu").merge(source)  # CFG keeps the source, as the pipeline
    x_t = torch.randn(family.latent_shape(stock, 1, RES, 96), generator=torch.Generator().manual_seed(2))
    _assert_equivalent(family, stock, cond, uncond, x_t, image=[source_image], prompt="make it green")


@pytest.mark.parametrize("with_siglip", [True, False], ids=["siglip", "no-siglip"])
def test_rollout_pipeline_edits_each_sample_with_its_own_source(with_siglip, omni_path, omni_no_siglip_path):
    """The training rollout (stock __call__, pre-encoded per-sample sources) equals our field's rollout."""
    from danceopd_diffusers.data import images_to_tensor

    family = ZImageOmniFamily(max_sequence_length=MAX_LEN)
    path = omni_path if with_siglip else omni_no_siglip_path
    pipe = _quiet(family.pipeline_class().from_pretrained(path))
    assert (pipe.siglip is not None) == with_siglip
    pixels = images_to_tensor([_image(96, RES, seed=3), _image(96, RES, seed=4)], 48, RES)
    source = family.encode_sources(pipe, pixels)
    assert ("source_siglip" in source.tensors) == with_siglip
    cond = family.encode_prompts(pipe, ["make it green", "make it red"], "cpu").merge(source)
    x_t = torch.randn(family.latent_shape(pipe, 2, 48, RES), generator=torch.Generator().manual_seed(5))
    call = dict(
        **family.unguided_call_kwargs(),
        num_inference_steps=STEPS,
        height=48,
        width=RES,
        output_type="latent",
    )
    ours, _ = _field_rollout(
        family, pipe, TransformerField("base", family, pipe.transformer), cond, None, x_t
    )
    ref = pipe(**family.pipeline_condition_kwargs(cond), latents=x_t.clone(), **call).images
    _close(ours, ref)
    swapped = Conditioning({k: v.flip(0) if k.startswith("source_") else v for k, v in cond.tensors.items()})
    other = pipe(**family.pipeline_condition_kwargs(swapped), latents=x_t.clone(), **call).images
    for i in range(2):  # each sample was denoised with its own source image
        assert not torch.allclose(other[i], ref[i], atol=1e-3)


def test_image_guidance_drops_the_source_in_its_image_free_branch(omni_path):
    from danceopd_diffusers.data import images_to_tensor

    family = ZImageOmniFamily(max_sequence_length=MAX_LEN)
    pipe = family.pipeline_class().from_pretrained(omni_path)
    source = family.encode_sources(pipe, images_to_tensor([_image(64, 64, 6)], RES, RES))
    cond = family.encode_prompts(pipe, ["make it green"], "cpu")
    uncond = family.encode_prompts(pipe, [""], "cpu")
    x = torch.randn(family.latent_shape(pipe, 1, RES, RES), generator=torch.Generator().manual_seed(7))
    sigma = torch.full((1,), 0.6)
    base = TransformerField("base", family, pipe.transformer)
    with torch.no_grad():
        v = ImageGuidanceField("ig", base, 2.0, 1.5).velocity(
            FieldQuery(x, sigma, cond.merge(source), uncond.merge(source))
        )
        full = family.velocity(pipe.transformer, x, sigma, cond.merge(source))
        image = family.velocity(pipe.transformer, x, sigma, uncond.merge(source))
        none = family.velocity(pipe.transformer, x, sigma, uncond)  # the pipeline without an image
    _close(v, none + 1.5 * (image - none) + 2.0 * (full - image))
    assert not torch.allclose(image, none, atol=1e-4)


def test_student_lora_covers_feed_forward_and_every_weight_gets_a_gradient(omni_path):
    """Default targets include w1/w2/w3; a text-to-image forward leaves no trainable weight without a gradient
    (DDP with find_unused_parameters=False needs one for each, the SigLIP refiner's LoRA included)."""
    from danceopd_diffusers.preflight import check_lora_targets
    from danceopd_diffusers.student import add_student_lora

    family = ZImageOmniFamily(max_sequence_length=MAX_LEN)
    pipe = family.pipeline_class().from_pretrained(omni_path)
    names = {n for n, _ in pipe.transformer.named_modules()}
    check_lora_targets(family.default_lora_targets, names, "default")
    assert {"w1", "w2", "w3"} <= set(family.default_lora_targets)
    add_student_lora(pipe.transformer, 4, 4, family.default_lora_targets)
    trainable = {n: p for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert any("siglip_refiner" in n for n in trainable) and any("feed_forward.w2" in n for n in trainable)
    cond = family.encode_prompts(pipe, ["a red circle"], "cpu")
    x = torch.randn(family.latent_shape(pipe, 1, RES, RES), generator=torch.Generator().manual_seed(8))
    v = family.velocity(pipe.transformer, x, torch.full((1,), 0.5), cond)
    v.pow(2).mean().backward()
    assert sorted(n for n, p in trainable.items() if p.grad is None) == []


# ------------------------------------------------------------------------------------------- training
SHORT = [
    "--num_rollout_steps",
    "4",
    "--rank",
    "4",
    "--train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "1",
    "--max_sequence_length",
    str(MAX_LEN),
    "--learning_rate",
    "1e-3",
    "--resolution",
    str(RES),
    "--report_to",
    "none",
    "--seed",
    "7",
]
FIELDS = (
    "fields:\n  base: {type: base}\n  base_cfg: {type: cfg, of: base, scale: 3.0}\n"
    "  edit_cfg: {type: cfg, of: base, scale: 3.0}\n"
    "  edit_ig: {type: image_guidance, of: base, text_scale: 3.0, image_scale: 1.5}\nroutes:\n"
)


def _write_data(folder: Path, t2i: bool = True, edits: bool = True) -> Path:
    """t2i prompts and edit pairs whose 3:2 sources are trained at the edit size 48x64 (aspect kept)."""
    rows = []
    if t2i:
        Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "red.png")
        rows += [
            {"prompt": "a red circle", "task": "t2i", "target_image": "red.png"},
            {"prompt": "two blue squares", "task": "t2i", "target_image": "red.png"},
        ]
    if edits:
        _image(96, 64, seed=10).save(folder / "wide.png")
        _image(96, 64, seed=11).save(folder / "wide_2.png")
        rows += [
            {
                "prompt": "make it green",
                "task": "edit",
                "source_image": "wide.png",
                "target_image": "wide_2.png",
            },
            {
                "prompt": "make it red",
                "task": "edit",
                "source_image": "wide_2.png",
                "target_image": "wide.png",
            },
        ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(path: str, folder: Path, routes: str, method: str = "danceopd", steps: int = 4, **data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "fields.yaml"
    config.write_text(FIELDS + routes)
    out = folder / "out"
    args = ["--pretrained_model_name_or_path", path, "--dataset_name", str(_write_data(folder, **data))]
    args += ["--output_dir", str(out), "--max_train_steps", str(steps), *SHORT]
    args += ["--fields_config", str(config)] if method != "sft" else ["--method", "sft"]
    run_train(args)
    return out


def _routes(out: Path) -> list[str]:
    return [json.loads(r)["route"] for r in (out / "logs" / "routes_rank0.jsonl").read_text().splitlines()]


def _count_calls(pipe) -> list:
    calls: list = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def _trained_lora(out: Path) -> dict[str, torch.Tensor]:
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained
    assert any(".feed_forward.w1." in k for k in lora) and any(".attention.to_q." in k for k in lora)
    return lora


def test_z_image_training_exports_a_cfg_free_pipeline(z_image_path, tmp_path):
    from diffusers import DiffusionPipeline, ZImagePipeline

    out = _train(z_image_path, tmp_path / "run", "  - {field: base_cfg, task: t2i}\n", edits=False)
    assert _routes(out) == ["base_cfg"] * 4
    _trained_lora(out)
    pipe = _quiet(DiffusionPipeline.from_pretrained(out, trust_remote_code=True))
    assert type(pipe).__name__ == "DanceOPDZImagePipeline" and pipe.config.absorbed_guidance_scale == 3.0
    calls = _count_calls(pipe)
    kwargs = dict(
        height=RES, width=RES, num_inference_steps=4, output_type="latent", max_sequence_length=MAX_LEN
    )
    exported = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert len(calls) == 4  # one transformer call per denoising step: CFG off by default
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(again).__name__ == "DanceOPDZImagePipeline"
    stock = _quiet(ZImagePipeline.from_pretrained(z_image_path))
    plain = _quiet(ZImagePipeline.from_pretrained(z_image_path))
    stock.load_lora_weights(out)
    got = {
        name: p(
            "a red circle", generator=torch.Generator().manual_seed(0), guidance_scale=0.0, **kwargs
        ).images
        for name, p in (("stock", stock), ("plain", plain))
    }
    _close(got["stock"], exported, atol=1e-4)
    assert not torch.allclose(got["plain"], exported, atol=1e-4)


def test_z_image_t2i_pipeline_refuses_edit_routes(z_image_path, tmp_path):
    from danceopd_diffusers.config import ConfigError

    with pytest.raises(ConfigError, match="z-image-omni"):
        _train(z_image_path, tmp_path / "run", "  - {field: edit_cfg, task: edit}\n")


def test_omni_one_student_for_t2i_and_edits(omni_path, tmp_path):
    from diffusers import DiffusionPipeline, ZImageOmniPipeline

    routes = "  - {field: base_cfg, task: t2i}\n  - {field: edit_cfg, task: edit}\n"
    out = _train(omni_path, tmp_path / "run", routes)
    assert set(_routes(out)) == {"base_cfg", "edit_cfg"}  # both tasks went into the one student
    _trained_lora(out)
    pipe = _quiet(DiffusionPipeline.from_pretrained(out, trust_remote_code=True))
    assert type(pipe).__name__ == "DanceOPDZImageOmniPipeline" and pipe.siglip is not None
    calls = _count_calls(pipe)
    source = _image(96, 64, seed=12)
    kwargs = dict(num_inference_steps=3, output_type="latent", max_sequence_length=MAX_LEN)
    edited = pipe(
        image=[source], prompt="make it green", generator=torch.Generator().manual_seed(0), **kwargs
    )
    # one call per step, at the size the student was trained at for this source: its aspect ratio at the trained
    # area (edit_size(96, 64, 64) = 48 x 64 pixels, latents 12 x 16), not the source's own 64 x 96
    assert len(calls) == 3 and edited.images.shape == (1, 4, 12, 16)
    t2i = pipe(
        prompt="a red circle", height=64, width=96, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert len(calls) == 6 and t2i.images.shape == (1, 4, 16, 24)  # a size given is honoured
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(again).__name__ == "DanceOPDZImageOmniPipeline" and again.siglip is not None
    # the LoRA file is the student for the stock pipeline, text-to-image and edits
    stock = _quiet(ZImageOmniPipeline.from_pretrained(omni_path))
    plain = _quiet(ZImageOmniPipeline.from_pretrained(omni_path))
    stock.load_lora_weights(out)
    kwargs["guidance_scale"] = 0.0  # the stock pipeline's default is 5
    t2i_kwargs = dict(prompt="a red circle", height=64, width=96, **kwargs)
    ref = stock(generator=torch.Generator().manual_seed(0), **t2i_kwargs).images
    _close(ref, t2i.images, atol=1e-4)
    assert not torch.allclose(
        plain(generator=torch.Generator().manual_seed(0), **t2i_kwargs).images, ref, atol=1e-4
    )
    stock.vae.to(torch.bfloat16)  # the stock omni pipeline encodes sources in bfloat16
    pipe.vae.to(torch.bfloat16)
    edits = {
        name: p(
            image=[source],
            prompt="make it green",
            height=64,  # the stock pipeline's default for an edit: the source's size
            width=96,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        for name, p in (("stock", stock), ("exported", pipe))
    }
    _close(edits["stock"].images, edits["exported"].images, atol=1e-4)


def test_omni_sft_on_edit_pairs(omni_path, tmp_path):
    out = _train(omni_path, tmp_path / "run", "", method="sft", steps=2, t2i=False)
    assert _routes(out) == ["base", "base"]
    _trained_lora(out)
    config = json.loads((out / "danceopd_config.json").read_text())
    assert config["fields_config"]["routes"] == [{"field": "base", "task": "edit", "weight": 1.0}]


def test_omni_without_siglip_trains_and_edits(omni_no_siglip_path, tmp_path):
    from diffusers import DiffusionPipeline

    out = _train(omni_no_siglip_path, tmp_path / "run", "  - {field: edit_ig, task: edit}\n", steps=2)
    assert _routes(out) == ["edit_ig", "edit_ig"]
    _trained_lora(out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["siglip"] == [None, None] and index["_class_name"][1] == "DanceOPDZImageOmniPipeline"
    pipe = _quiet(DiffusionPipeline.from_pretrained(out, trust_remote_code=True))
    assert pipe.siglip is None
    calls = _count_calls(pipe)
    edited = pipe(
        image=[_image(96, 64, seed=13)],
        prompt="make it green",
        num_inference_steps=2,
        output_type="latent",
        max_sequence_length=MAX_LEN,
    ).images
    # the trained area at the source's aspect ratio (as above)
    assert len(calls) == 2 and edited.shape == (1, 4, 12, 16) and torch.isfinite(edited).all()


def test_ragged_rollout_drops_finished_samples_from_z_image_prompt_lists(z_image_path):
    """Z-Image's loop holds the prompts as a list of unpadded tensors: dropping a finished sample drops its entry,
    and the recorded states are those of the full-batch rollout."""
    from diffusers import ZImagePipeline
    from test_fast_paths import assert_same_states, ragged_and_full_rollouts

    pipe = _quiet(ZImagePipeline.from_pretrained(z_image_path))
    family = ZImageFamily(max_sequence_length=MAX_LEN)
    cond = family.encode_prompts(pipe, ["a red circle", "two blue squares", "a green cross"], "cpu")
    noise = torch.randn(family.latent_shape(pipe, 3, RES, RES), generator=torch.Generator().manual_seed(3))
    indices = torch.tensor([[4], [1], [2]])
    (ragged, ragged_sizes), (full, full_sizes) = ragged_and_full_rollouts(
        pipe, family, cond, noise, indices, STEPS, RES
    )
    assert full_sizes == [3] * 4 and ragged_sizes == [3, 2, 1, 1]
    assert_same_states(ragged, full)
