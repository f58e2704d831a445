"""Flux.2 [klein] and [dev]: our fields reproduce the stock pipelines (patchified + batch-normed latents, 4-D ids,
time, Klein's true CFG and is_distilled, [dev]'s embedded guidance, reference tokens after the noisy ones), and the
training script trains, exports and reloads a Klein student offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_train
from PIL import Image
from safetensors.torch import load_file

from danceopd_diffusers.families import FAMILIES, Conditioning, family_for_pipeline_class
from danceopd_diffusers.families.flux2 import SOURCE_LATENTS, Flux2Family, Flux2KleinFamily
from danceopd_diffusers.fields import CFGField, FieldQuery, ImageGuidanceField, TransformerField
from danceopd_diffusers.pipelines.pipeline_flux2_source import unpack
from danceopd_diffusers.rollout import field_rollout

# Prompt lengths: Klein's template is short; [dev]'s carries the system message (one token per byte here).
KLEIN_LEN, DEV_LEN = 48, 256
# Equivalence tolerance: the same fp32 ops in the same order, except that our CFG batches the two branches in one
# call where the pipeline makes two; measured differences are ~1e-6 on latents of magnitude ~1.
ATOL = 1e-5
PROMPTS = ["a red circle", "two blue squares"]
HEIGHT, WIDTH = 32, 48  # non-square on purpose: a wrong token grid or id layout cannot pass
SRC_H, SRC_W = 64, 96  # Flux.2 refuses references under 64 px
STEPS = 5


@pytest.fixture(scope="module")
def klein_path(tmp_path_factory) -> str:
    from danceopd_diffusers.tiny import tiny_pipeline_path

    return tiny_pipeline_path("flux2-klein", tmp_path_factory.mktemp("klein-cache"))


@pytest.fixture(scope="module")
def dev_path(tmp_path_factory) -> str:
    from danceopd_diffusers.tiny import tiny_pipeline_path

    return tiny_pipeline_path("flux2", tmp_path_factory.mktemp("flux2-cache"))


def _load(family, path: str, stock: bool = False):
    """The family's training class (packed latents, per-sample sources), or the stock class."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path) if stock else family.pipeline_class().from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _prompt_conds(family, pipe) -> tuple[Conditioning, Conditioning]:
    cond = family.encode_prompts(pipe, PROMPTS, "cpu")
    empty = family.encode_prompts(pipe, [""], "cpu")
    uncond = Conditioning({k: v.expand(len(PROMPTS), *v.shape[1:]) for k, v in empty.tensors.items()})
    size = family.size_conditioning(pipe, len(PROMPTS), HEIGHT, WIDTH)  # states are HEIGHT x WIDTH, not square
    return cond.merge(size), uncond.merge(size)


def _our_rollout(field, family, pipe, x, cond, uncond) -> torch.Tensor:
    sigmas = family.sigmas(pipe, STEPS, x.shape, "cpu")
    return field_rollout(lambda xx, s, i: field.velocity(FieldQuery(xx, s, cond, uncond)), x, sigmas)[-1]


def _noise(family, pipe, seed: int, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    shape = family.latent_shape(pipe, len(PROMPTS), height, width)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _unpacked(x: torch.Tensor, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """The stock pipelines' ``latents=`` layout of a state (vae factor 4 x 2x2 patch)."""
    return unpack(x, height // 8, width // 8)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=ATOL), (a - b).abs().max()


def _source_pixels() -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.rand(len(PROMPTS), 3, SRC_H, SRC_W, generator=gen) * 2 - 1


# ------------------------------------------------------------------------------------------------ the adapters
def test_registry_lora_targets_and_options(klein_path):
    from diffusers import Flux2Transformer2DModel

    assert FAMILIES["flux2-klein"] is Flux2KleinFamily and FAMILIES["flux2"] is Flux2Family
    assert Flux2KleinFamily.can_edit and Flux2Family.can_edit
    assert Flux2Family.has_embedded_guidance and not Flux2KleinFamily.has_embedded_guidance
    for name in ("Flux2KleinPipeline", "DanceOPDFlux2KleinPipeline"):
        assert family_for_pipeline_class(name) is Flux2KleinFamily
    for name in ("Flux2Pipeline", "DanceOPDFlux2Pipeline"):
        assert family_for_pipeline_class(name) is Flux2Family
    transformer = Flux2Transformer2DModel.from_pretrained(klein_path, subfolder="transformer")
    modules = {n for n, _ in transformer.named_modules()}
    for (
        target
    ) in Flux2KleinFamily.default_lora_targets:  # each matches a module of the double or single blocks
        assert any(n.endswith("." + target) for n in modules), target
    assert (
        Flux2Family().embedded_guidance == 4.0 and Flux2Family(embedded_guidance=2.5).embedded_guidance == 2.5
    )
    with pytest.raises(ValueError, match="512"):
        Flux2KleinFamily(max_sequence_length=1024)


def test_latent_layout_batch_norm_and_vae_round_trip(klein_path):
    family = Flux2KleinFamily(max_sequence_length=KLEIN_LEN)
    pipe = _load(family, klein_path)
    shape = family.latent_shape(pipe, 2, HEIGHT, WIDTH)
    assert shape == (2, (HEIGHT // 8) * (WIDTH // 8), 16)  # vae factor 4, 2x2 patchify of 4 latent channels
    pixels = torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        x0 = family.encode_images(pipe, pixels, torch.Generator().manual_seed(0))
        vae_latents = family.vae_latents(pipe, x0, HEIGHT, WIDTH)
        raw = pipe.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
        images = family.decode_latents(pipe, x0, HEIGHT, WIDTH)
    assert x0.shape == shape
    _close(vae_latents, raw)  # states undo exactly to the VAE's latents (patchify + batch norm inverted)
    assert not torch.allclose(pipe._patchify_latents(raw), unpack(x0, HEIGHT // 8, WIDTH // 8), atol=1e-2)
    assert [im.size for im in images] == [(WIDTH, HEIGHT)] * 2
    size = family.size_conditioning(pipe, 2, HEIGHT, WIDTH)
    assert family.token_grid(shape[1], size) == (HEIGHT // 8, WIDTH // 8)
    # the adapter remembers no size between calls: without the sample's own, a square or an error
    assert Flux2KleinFamily().token_grid(64, Conditioning()) == (8, 8)
    with pytest.raises(ValueError, match="size_conditioning"):
        family.token_grid(shape[1], Conditioning())  # not square, size not given


# ------------------------------------------------------------------------------------------------ equivalence
def test_klein_t2i_fields_reproduce_the_stock_pipeline(klein_path):
    """Base field = Klein with guidance_scale 1; CFGField(g) = Klein's true CFG at guidance_scale g."""
    family = Flux2KleinFamily(max_sequence_length=KLEIN_LEN)
    pipe, stock_pipe = _load(family, klein_path), _load(family, klein_path, stock=True)
    assert type(stock_pipe).__name__ == "Flux2KleinPipeline" and not stock_pipe.config.is_distilled
    cond, uncond = _prompt_conds(family, pipe)
    x = _noise(family, pipe, 0)
    base = TransformerField("base", family, pipe.transformer)
    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="latent")
    stock_kw = dict(common, prompt=PROMPTS, max_sequence_length=KLEIN_LEN, latents=_unpacked(x))
    with torch.no_grad():
        # the student's rollout call of the training loop: packed latents in, pre-encoded prompts
        rollout = pipe(
            **family.pipeline_condition_kwargs(cond), **family.unguided_call_kwargs(), latents=x, **common
        ).images
        stock = stock_pipe(guidance_scale=1.0, **stock_kw).images
        stock_cfg = stock_pipe(guidance_scale=4.0, **stock_kw).images
        ours = family.vae_latents(pipe, _our_rollout(base, family, pipe, x, cond, uncond), HEIGHT, WIDTH)
        ours_cfg = _our_rollout(CFGField("cfg", base, 4.0), family, pipe, x, cond, uncond)
        ours_cfg = family.vae_latents(pipe, ours_cfg, HEIGHT, WIDTH)
    _close(rollout, stock)
    _close(ours, stock)
    _close(ours_cfg, stock_cfg)
    assert not torch.allclose(ours_cfg, ours, atol=1e-3)


def test_klein_is_distilled_turns_the_pipelines_cfg_off(klein_path):
    """A step-distilled Klein ignores guidance_scale; the student's rollout call is the same either way."""
    from diffusers import Flux2KleinPipeline

    family = Flux2KleinFamily(max_sequence_length=KLEIN_LEN)
    pipe = _load(family, klein_path, stock=True)
    distilled = Flux2KleinPipeline.from_pretrained(klein_path, is_distilled=True)
    distilled.set_progress_bar_config(disable=True)
    assert distilled.config.is_distilled
    x = _unpacked(_noise(family, pipe, 1))
    kw = dict(prompt=PROMPTS, max_sequence_length=KLEIN_LEN, height=HEIGHT, width=WIDTH, latents=x)
    kw.update(num_inference_steps=3, output_type="latent")
    with torch.no_grad():
        guided = pipe(guidance_scale=4.0, **kw).images
        plain = pipe(**family.unguided_call_kwargs(), **kw).images
        distilled_guided = distilled(guidance_scale=4.0, **kw).images
    _close(distilled_guided, plain)
    assert not torch.allclose(guided, plain, atol=1e-3)


def _edit_case(family, pipe, seed: int) -> tuple[Conditioning, Conditioning, torch.Tensor, list]:
    """Prompts + one reference per sample (both samples share it, as the stock call's one image list)."""
    pil = pipe.image_processor.postprocess(_source_pixels()[:1], output_type="pil")
    cond, uncond = _prompt_conds(family, pipe)
    with torch.no_grad():
        # pixels in [-1, 1] at the edit size, as the training script's SourceCache hands them over
        source = family.encode_sources(pipe, pipe.image_processor.preprocess(pil * len(PROMPTS)), None)
    assert source.tensors[SOURCE_LATENTS].shape == (2, 16, SRC_H // 8, SRC_W // 8)
    return cond.merge(source), uncond.merge(source), _noise(family, pipe, seed), pil


def test_klein_edit_fields_reproduce_the_stock_pipeline(klein_path):
    """Reference tokens after the noisy ones (t coordinate 10), prediction sliced back; CFG keeps the reference."""
    family = Flux2KleinFamily(max_sequence_length=KLEIN_LEN)
    pipe, stock_pipe = _load(family, klein_path), _load(family, klein_path, stock=True)
    cond, uncond, x, pil = _edit_case(family, pipe, 2)
    base = TransformerField("base", family, pipe.transformer)
    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="latent")
    stock_kw = dict(common, image=pil, prompt=PROMPTS, max_sequence_length=KLEIN_LEN, latents=_unpacked(x))
    with torch.no_grad():
        rollout = pipe(
            **family.pipeline_condition_kwargs(cond), **family.unguided_call_kwargs(), latents=x, **common
        ).images
        stock = stock_pipe(guidance_scale=1.0, **stock_kw).images
        stock_cfg = stock_pipe(guidance_scale=3.0, **stock_kw).images
        t2i = stock_pipe(**{**stock_kw, "image": None}, guidance_scale=1.0).images
        ours = family.vae_latents(pipe, _our_rollout(base, family, pipe, x, cond, uncond), HEIGHT, WIDTH)
        ours_cfg = _our_rollout(CFGField("cfg", base, 3.0), family, pipe, x, cond, uncond)
        ours_cfg = family.vae_latents(pipe, ours_cfg, HEIGHT, WIDTH)
        v = family.velocity(pipe.transformer, x, torch.full((2,), 0.6), cond)
        v_no_ref = family.velocity(pipe.transformer, x, torch.full((2,), 0.6), cond.without_source())
    _close(rollout, stock)
    _close(ours, stock)
    _close(ours_cfg, stock_cfg)
    assert v.shape == x.shape
    assert not torch.allclose(ours, t2i, atol=1e-3)  # the reference tokens matter
    assert not torch.allclose(v, v_no_ref, atol=1e-4)


def test_per_sample_references(klein_path):
    """Each sample of a batch is conditioned on its own reference (the stock call shares one list)."""
    family = Flux2KleinFamily(max_sequence_length=KLEIN_LEN)
    pipe = _load(family, klein_path)
    cond, _ = _prompt_conds(family, pipe)
    with torch.no_grad():
        cond = cond.merge(family.encode_sources(pipe, _source_pixels(), None))  # two different references
    x = _noise(family, pipe, 3)
    kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=3, output_type="latent", guidance_scale=1.0)
    with torch.no_grad():
        both = pipe(**family.pipeline_condition_kwargs(cond), latents=x, **kw).images
        alone = [
            pipe(**family.pipeline_condition_kwargs(cond.select([i])), latents=x[i : i + 1], **kw).images
            for i in range(2)
        ]
        with pytest.raises(ValueError, match="not both"):
            pipe(image=Image.new("RGB", (64, 64)), **family.pipeline_condition_kwargs(cond), latents=x, **kw)
        one_source = Conditioning({**cond.tensors, SOURCE_LATENTS: cond.tensors[SOURCE_LATENTS][:1]})
        with pytest.raises(ValueError, match="1 samples but the call generates 2"):
            pipe(**family.pipeline_condition_kwargs(one_source), latents=x, **kw)
        no_size = {k: v for k, v in kw.items() if k not in ("height", "width")}
        at_source_size = pipe(**family.pipeline_condition_kwargs(cond), **no_size).images
        with pytest.raises(TypeError, match="keyword"):
            pipe(None, **family.pipeline_condition_kwargs(cond), latents=x, **kw)
    assert at_source_size.shape[-2:] == (SRC_H // 4, SRC_W // 4)  # VAE latents at the reference's size
    _close(both[:1], alone[0])
    _close(both[1:], alone[1])
    assert not torch.allclose(alone[0], alone[1], atol=1e-4)


def test_klein_image_guidance_drops_the_reference_in_its_image_free_branch(klein_path):
    family = Flux2KleinFamily(max_sequence_length=KLEIN_LEN)
    pipe = _load(family, klein_path)
    cond, uncond, x, _ = _edit_case(family, pipe, 4)
    base = TransformerField("base", family, pipe.transformer)
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():
        v = ImageGuidanceField("ig", base, text_scale=2.0, image_scale=1.5).velocity(
            FieldQuery(x, sigma, cond, uncond)
        )
        full = family.velocity(pipe.transformer, x, sigma, cond)
        image = family.velocity(pipe.transformer, x, sigma, uncond)
        none = family.velocity(pipe.transformer, x, sigma, uncond.without_source())
    _close(v, none + 1.5 * (image - none) + 2.0 * (full - image))
    assert not torch.allclose(image, none, atol=1e-4)


@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "edit"])
def test_dev_fields_reproduce_the_stock_pipeline(dev_path, edit):
    """[dev]: the embedded guidance is the model's input (same value in rollout and fields), no CFG in the stock
    pipeline; reference editing as Klein's. Outputs are the packed states themselves."""
    family = Flux2Family(max_sequence_length=DEV_LEN, embedded_guidance=2.5)
    pipe, stock_pipe = _load(family, dev_path), _load(family, dev_path, stock=True)
    assert pipe.transformer.config.guidance_embeds
    if edit:
        cond, uncond, x, pil = _edit_case(family, pipe, 6)
    else:
        (cond, uncond), x, pil = _prompt_conds(family, pipe), _noise(family, pipe, 6), None
    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="latent")
    stock_kw = dict(common, image=pil, prompt=PROMPTS, max_sequence_length=DEV_LEN, latents=_unpacked(x))
    with torch.no_grad():
        rollout = pipe(
            **family.pipeline_condition_kwargs(cond), **family.unguided_call_kwargs(), latents=x, **common
        ).images
        stock = stock_pipe(guidance_scale=2.5, **stock_kw).images
        other_guidance = stock_pipe(guidance_scale=5.0, **stock_kw).images
        ours = _our_rollout(TransformerField("base", family, pipe.transformer), family, pipe, x, cond, uncond)
        at_5 = TransformerField("t5", family, pipe.transformer, embedded_guidance=5.0)
        ours_at_5 = _our_rollout(at_5, family, pipe, x, cond, uncond)
        ours_cfg = _our_rollout(CFGField("cfg", at_5, 2.0), family, pipe, x, cond, uncond)
    _close(rollout, stock)
    _close(ours, stock)
    _close(ours_at_5, other_guidance)  # a field may query its model at its own embedded guidance
    assert not torch.allclose(other_guidance, stock, atol=1e-3)  # the embedded guidance is a live input
    assert not torch.allclose(ours_cfg, ours_at_5, atol=1e-3)  # true CFG on top of it is a different field


# ------------------------------------------------------------------------------------------------ training
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
    str(KLEIN_LEN),
    "--learning_rate",
    "1e-3",
    "--resolution",
    "64",
    "--seed",
    "7",
]


def _write_data(folder: Path) -> Path:
    """t2i prompts and edit pairs whose sources are not square: the edit size keeps their aspect."""
    Image.new("RGB", (128, 64), (200, 30, 30)).save(folder / "wide.png")
    Image.new("RGB", (128, 64), (30, 200, 30)).save(folder / "wide_green.png")
    rows = [
        {"prompt": "a red circle", "task": "t2i"},
        {"prompt": "two blue squares", "task": "t2i"},
        {"prompt": "make it green", "task": "edit", "source_image": "wide.png"},
        {"prompt": "make it red", "task": "edit", "source_image": "wide_green.png"},
    ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained_klein(klein_path, tmp_path_factory) -> Path:
    """One LoRA student for both tasks: text-to-image and edits, each with Klein's CFG 3 absorbed."""
    folder = tmp_path_factory.mktemp("klein-run")
    config = folder / "fields.yaml"
    config.write_text(
        "fields:\n  base: {type: base}\n  t2i_cfg: {type: cfg, of: base, scale: 3.0}\n"
        "  edit_cfg: {type: cfg, of: base, scale: 3.0}\n"
        "routes:\n  - {field: t2i_cfg, task: t2i}\n  - {field: edit_cfg, task: edit}\n"
    )
    out = folder / "out"
    run_train(
        ["--pretrained_model_name_or_path", klein_path, "--dataset_name", str(_write_data(folder))]
        + ["--output_dir", str(out), "--fields_config", str(config), "--max_train_steps", "6"]
        + ["--validation_prompt", "a red circle", *SHORT]
    )
    return out


def test_klein_one_student_for_t2i_and_edits(trained_klein, klein_path, tmp_path):
    from diffusers import DiffusionPipeline, Flux2KleinPipeline

    routes = {
        json.loads(r)["route"]
        for r in (trained_klein / "logs" / "routes_rank0.jsonl").read_text().splitlines()
    }
    assert routes == {"t2i_cfg", "edit_cfg"}  # both tasks were trained into the one student
    pipe = DiffusionPipeline.from_pretrained(trained_klein, trust_remote_code=True)
    assert type(pipe).__name__ == "DanceOPDFlux2KleinPipeline"
    assert pipe.config.absorbed_guidance_scale == 3.0
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    source = Image.new("RGB", (96, 64), (200, 30, 30))
    kw = dict(height=64, width=96, num_inference_steps=3, output_type="latent", max_sequence_length=KLEIN_LEN)
    edited = pipe(
        image=source, prompt="make it green", generator=torch.Generator().manual_seed(0), **kw
    ).images
    assert len(calls) == 3  # one transformer call per step: no CFG by default
    t2i = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert len(calls) == 6 and not torch.allclose(t2i, edited, atol=1e-3)
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(again).__name__ == "DanceOPDFlux2KleinPipeline"
    # the LoRA file is the student for the stock pipeline
    lora = load_file(trained_klein / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    assert any("to_qkv_mlp_proj" in k for k in lora)
    stock, plain = (
        Flux2KleinPipeline.from_pretrained(klein_path),
        Flux2KleinPipeline.from_pretrained(klein_path),
    )
    stock.load_lora_weights(trained_klein)
    out = {}
    for name, p in (("stock", stock), ("plain", plain)):
        p.set_progress_bar_config(disable=True)
        out[name] = p(
            image=source,
            prompt="make it green",
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).images
    assert torch.allclose(out["stock"], edited, atol=1e-4), (out["stock"] - edited).abs().max()
    assert not torch.allclose(out["plain"], edited, atol=1e-4)
    assert (trained_klein / "samples.png").exists()


def test_dev_training_smoke(dev_path, tmp_path):
    """[dev]: a LoRA student for T2I (true CFG absorbed) and edits, at the embedded guidance the run sets; the
    export reloads, edits with ``image=`` in one call per step and keeps ``guidance_scale`` as the embedded input."""
    from diffusers import DiffusionPipeline

    folder = tmp_path / "dev"
    folder.mkdir()
    config = folder / "fields.yaml"
    config.write_text(
        "fields:\n  base: {type: base}\n  t2i_cfg: {type: cfg, of: base, scale: 2.0}\n"
        "routes:\n  - {field: t2i_cfg, task: t2i}\n  - {field: base, task: edit}\n"
    )
    out = folder / "out"
    short = [a if a != str(KLEIN_LEN) else str(DEV_LEN) for a in SHORT]
    run_train(
        ["--pretrained_model_name_or_path", dev_path, "--dataset_name", str(_write_data(folder))]
        + ["--output_dir", str(out), "--fields_config", str(config), "--embedded_guidance", "3.0"]
        + ["--max_train_steps", "4", *short]
    )
    routes = {json.loads(r)["route"] for r in (out / "logs" / "routes_rank0.jsonl").read_text().splitlines()}
    assert routes == {"t2i_cfg", "base"}
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "DanceOPDFlux2Pipeline"
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    kw = dict(height=64, width=96, num_inference_steps=2, output_type="latent", max_sequence_length=DEV_LEN)
    edited = pipe(image=Image.new("RGB", (96, 64)), prompt="make it green", guidance_scale=3.0, **kw).images
    assert len(calls) == 2 and edited.shape == (1, 8 * 12, 16)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_is_distilled_survives_export_and_reload(tmp_path):
    """A step-distilled Klein base exports (and reloads as a training base) still marked ``is_distilled``."""
    from diffusers import DiffusionPipeline

    from danceopd_diffusers.export import save_pipeline_folder
    from danceopd_diffusers.field_loading import load_pipeline
    from danceopd_diffusers.tiny.flux2 import build_tiny_flux2_klein_pipeline

    build_tiny_flux2_klein_pipeline(is_distilled=True).save_pretrained(tmp_path / "base")
    family = Flux2KleinFamily(max_sequence_length=KLEIN_LEN)
    pipe = load_pipeline(family, str(tmp_path / "base"))
    assert pipe.config.is_distilled
    save_pipeline_folder(pipe, family, pipe.transformer, tmp_path / "out", absorbed_guidance_scale=None)
    exported = DiffusionPipeline.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(exported).__name__ == "DanceOPDFlux2KleinPipeline" and exported.config.is_distilled
    again = load_pipeline(family, str(tmp_path / "out"), custom_pipeline="pipeline_danceopd")
    assert type(again) is family.pipeline_class() and again.config.is_distilled
