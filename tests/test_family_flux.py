"""Flux.1 and Flux.1 Kontext: our fields reproduce the stock pipelines (packing, ids, time, embedded guidance, true
CFG, Kontext's source tokens), and the training script trains, exports and reloads both families offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_train
from PIL import Image
from safetensors.torch import load_file

from danceopd_diffusers.config import parse_fields_config
from danceopd_diffusers.families import FAMILIES, Conditioning, family_for_pipeline_class
from danceopd_diffusers.families.flux import SOURCE_LATENTS, FluxFamily, FluxKontextFamily
from danceopd_diffusers.field_loading import build_fields
from danceopd_diffusers.fields import CFGField, FieldQuery, ImageGuidanceField, TransformerField
from danceopd_diffusers.rollout import field_rollout

MAX_LEN = 16  # T5 prompt length of every test (the stock calls are given the same)
# Equivalence tolerance: the same fp32 ops in the same order, except that our CFG batches the two branches in one
# call where the pipeline makes two; measured differences are ~1e-6 on latents of magnitude ~1.
ATOL = 1e-5
PROMPTS = ["a red circle", "two blue squares"]
HEIGHT, WIDTH = 32, 48  # non-square on purpose: a wrong token grid or id layout cannot pass
STEPS = 5


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory) -> str:
    from danceopd_diffusers.tiny import tiny_pipeline_path

    return tiny_pipeline_path("flux", tmp_path_factory.mktemp("flux-cache"))


@pytest.fixture(scope="module")
def kontext_path(tmp_path_factory) -> str:
    from danceopd_diffusers.tiny import tiny_pipeline_path

    return tiny_pipeline_path("flux-kontext", tmp_path_factory.mktemp("kontext-cache"))


def _load(path: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
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


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=ATOL), (a - b).abs().max()


# ------------------------------------------------------------------------------------------------ the adapters
def test_registry_and_lora_targets(flux_path, kontext_path):
    from diffusers import FluxTransformer2DModel

    assert FAMILIES["flux"] is FluxFamily and not FluxFamily.can_edit
    assert FAMILIES["flux-kontext"] is FluxKontextFamily and FluxKontextFamily.can_edit
    for name in ("FluxPipeline", "DanceOPDFluxPipeline"):
        assert family_for_pipeline_class(name) is FluxFamily
    for name in ("FluxKontextPipeline", "DanceOPDFluxKontextPipeline"):
        assert family_for_pipeline_class(name) is FluxKontextFamily
    modules = {
        n
        for n, _ in FluxTransformer2DModel.from_pretrained(flux_path, subfolder="transformer").named_modules()
    }
    for family in (FluxFamily, FluxKontextFamily):
        for (
            target
        ) in family.default_lora_targets:  # each matches a module, in the double or the single blocks
            assert any(n.endswith("." + target) for n in modules), target
    assert "proj_mlp" in FluxKontextFamily.default_lora_targets
    assert (
        FluxFamily().embedded_guidance == 3.5 and FluxFamily(embedded_guidance=2.5).embedded_guidance == 2.5
    )
    with pytest.raises(ValueError, match="512"):
        FluxFamily(max_sequence_length=1024)


def test_latent_layout_and_vae_round_trip(flux_path):
    pipe = _load(flux_path)
    family = FluxFamily(max_sequence_length=MAX_LEN)
    shape = family.latent_shape(pipe, 2, HEIGHT, WIDTH)
    assert shape == (2, (HEIGHT // 4) * (WIDTH // 4), 16)  # vae factor 2, 2x2 packing, 4 latent channels
    pixels = torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        x0 = family.encode_images(pipe, pixels, torch.Generator().manual_seed(0))
        images = family.decode_latents(pipe, x0, HEIGHT, WIDTH)
    assert x0.shape == shape
    assert [im.size for im in images] == [(WIDTH, HEIGHT)] * 2
    # the same grid the pipeline unpacks: pack(unpack(x)) is the identity
    unpacked = pipe._unpack_latents(x0, HEIGHT, WIDTH, pipe.vae_scale_factor)
    assert torch.equal(pipe._pack_latents(unpacked, 2, 4, HEIGHT // 2, WIDTH // 2), x0)
    size = family.size_conditioning(pipe, 2, HEIGHT, WIDTH)
    assert family.token_grid(shape[1], size) == (HEIGHT // 4, WIDTH // 4)
    # the adapter remembers no size between calls: without the sample's own, a square or an error
    assert FluxFamily().token_grid(64, Conditioning()) == (8, 8)
    with pytest.raises(ValueError, match="size_conditioning"):
        family.token_grid(shape[1], Conditioning())  # 24 tokens: not square, size not given


# ------------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("family_name", ["flux", "flux-kontext"])
def test_t2i_fields_reproduce_the_stock_pipeline(family_name, flux_path, kontext_path):
    """Base field = the pipeline with true CFG off; CFGField(s) = true_cfg_scale=s with negative_prompt=""."""
    pipe = _load(flux_path if family_name == "flux" else kontext_path)
    family = FAMILIES[family_name](max_sequence_length=MAX_LEN, embedded_guidance=2.5)
    assert pipe.transformer.config.guidance_embeds
    cond, uncond = _prompt_conds(family, pipe)
    x = torch.randn(family.latent_shape(pipe, 2, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(0))
    base = TransformerField("base", family, pipe.transformer)
    cfg = CFGField("cfg", base, 4.0)
    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="latent", latents=x)
    # Kontext rescales to max_area (1024² by default) unless told the call's own area
    stock_kw = dict(common, prompt=PROMPTS, max_sequence_length=MAX_LEN)
    if family.can_edit:
        stock_kw.update(max_area=HEIGHT * WIDTH, _auto_resize=False)
    with torch.no_grad():
        # the student's rollout call of the training loop
        rollout = pipe(
            **family.pipeline_condition_kwargs(cond),
            **family.unguided_call_kwargs(),
            **family.size_call_kwargs(HEIGHT, WIDTH),
            **common,
        ).images
        stock = pipe(guidance_scale=2.5, **stock_kw).images
        stock_cfg = pipe(
            negative_prompt=[""] * len(PROMPTS), true_cfg_scale=4.0, guidance_scale=2.5, **stock_kw
        ).images
        other_guidance = pipe(guidance_scale=5.0, **stock_kw).images
        ours = _our_rollout(base, family, pipe, x, cond, uncond)
        ours_cfg = _our_rollout(cfg, family, pipe, x, cond, uncond)
    _close(rollout, stock)
    _close(ours, stock)
    _close(ours_cfg, stock_cfg)
    assert not torch.allclose(ours_cfg, ours, atol=1e-3)
    assert not torch.allclose(other_guidance, stock, atol=1e-3)  # the embedded guidance is a live input


def test_a_field_can_query_its_model_at_its_own_embedded_guidance(flux_path):
    """`embedded_guidance` on a field: that field's model sees it, the student keeps the family's value."""
    pipe = _load(flux_path)
    family = FAMILIES["flux"](max_sequence_length=MAX_LEN, embedded_guidance=2.5)
    cond, uncond = _prompt_conds(family, pipe)
    x = torch.randn(family.latent_shape(pipe, 2, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        at_5 = _our_rollout(
            TransformerField("t", family, pipe.transformer, embedded_guidance=5.0),
            family,
            pipe,
            x,
            cond,
            uncond,
        )
        stock_5 = pipe(
            prompt=PROMPTS,
            guidance_scale=5.0,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            output_type="latent",
            latents=x,
            max_sequence_length=MAX_LEN,
        ).images
        default = _our_rollout(TransformerField("s", family, pipe.transformer), family, pipe, x, cond, uncond)
    _close(at_5, stock_5)
    assert not torch.allclose(at_5, default, atol=1e-3)
    config = parse_fields_config(
        {
            "fields": {
                "t": {"type": "base", "embedded_guidance": 5.0},
                "c": {"type": "cfg", "of": "t", "scale": 2.0},
            },
            "routes": [{"field": "c"}],
        }
    )
    fields = build_fields(config, family, flux_path, pipe.transformer, None, torch.float32, "cpu")
    assert fields["t"].embedded_guidance == 5.0 and "embedded guidance 5.0" in fields["t"].describe()


def test_checkpoint_without_guidance_embeds(tmp_path):
    """FLUX.1-schnell-like transformers take no guidance input; the adapter passes none."""
    from danceopd_diffusers.tiny.flux import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(seed=1, guidance_embeds=False)
    pipe.set_progress_bar_config(disable=True)
    family = FluxFamily(max_sequence_length=MAX_LEN)
    cond, uncond = _prompt_conds(family, pipe)
    x = torch.randn(family.latent_shape(pipe, 2, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = pipe(
            PROMPTS,
            max_sequence_length=MAX_LEN,
            latents=x,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            output_type="latent",
        ).images
        ours = _our_rollout(TransformerField("base", family, pipe.transformer), family, pipe, x, cond, uncond)
    _close(ours, stock)


def _source_pixels(height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.rand(len(PROMPTS), 3, height, width, generator=gen) * 2 - 1


def test_kontext_edit_fields_reproduce_the_stock_pipeline(kontext_path):
    """Source tokens after the noisy ones (ids[...,0] = 1), prediction sliced back; CFG keeps the source."""
    pipe = _load(kontext_path)
    family = FluxKontextFamily(max_sequence_length=MAX_LEN)
    cond, uncond = _prompt_conds(family, pipe)
    with torch.no_grad():
        source = family.encode_sources(pipe, _source_pixels(), torch.Generator().manual_seed(0))
    assert source.tensors[SOURCE_LATENTS].shape == (2, 4, HEIGHT // 2, WIDTH // 2)
    cond, uncond = cond.merge(source), uncond.merge(source)
    x = torch.randn(family.latent_shape(pipe, 2, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(2))
    base = TransformerField("base", family, pipe.transformer)
    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="latent")
    kwargs = {
        **family.pipeline_condition_kwargs(cond),
        **family.unguided_call_kwargs(),
        **family.size_call_kwargs(HEIGHT, WIDTH),
    }
    assert kwargs["max_area"] == HEIGHT * WIDTH and kwargs["_auto_resize"] is False
    assert kwargs["image"] is source.tensors[SOURCE_LATENTS]
    with torch.no_grad():
        rollout = pipe(
            **kwargs, latents=x, **common
        ).images  # the student's rollout call of the training loop
        stock_cfg = pipe(
            image=source.tensors[SOURCE_LATENTS],
            prompt=PROMPTS,
            negative_prompt=[""] * len(PROMPTS),
            true_cfg_scale=3.0,
            max_sequence_length=MAX_LEN,
            max_area=HEIGHT * WIDTH,
            _auto_resize=False,
            latents=x,
            **common,
        ).images
        t2i = pipe(
            prompt=PROMPTS,
            max_sequence_length=MAX_LEN,
            max_area=HEIGHT * WIDTH,
            _auto_resize=False,
            latents=x,
            **common,
        ).images
        ours = _our_rollout(base, family, pipe, x, cond, uncond)
        ours_cfg = _our_rollout(CFGField("cfg", base, 3.0), family, pipe, x, cond, uncond)
        # a fresh adapter that was never told the size finds the grid from the source latents
        fresh = FluxKontextFamily(max_sequence_length=MAX_LEN)
        v_fresh = fresh.velocity(pipe.transformer, x, torch.full((2,), 0.6), cond)
        v_known = family.velocity(pipe.transformer, x, torch.full((2,), 0.6), cond)
    _close(ours, rollout)
    _close(ours_cfg, stock_cfg)
    assert torch.equal(v_fresh, v_known)
    assert not torch.allclose(ours, t2i, atol=1e-3)  # the source tokens matter


def test_kontext_source_encoding_is_the_pipelines_own(kontext_path):
    """Pre-encoded ``image=`` latents give what the pipeline computes from the same (PIL) image itself."""
    pipe = _load(kontext_path)
    family = FluxKontextFamily(max_sequence_length=MAX_LEN)
    pil = pipe.image_processor.postprocess(_source_pixels(), output_type="pil")
    with torch.no_grad():
        # pixels in [-1, 1] at the edit size, as the training script's SourceCache hands them over
        source = family.encode_sources(pipe, pipe.image_processor.preprocess(pil), None)
    x = torch.randn(family.latent_shape(pipe, 2, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(3))
    common = dict(
        prompt=PROMPTS,
        max_sequence_length=MAX_LEN,
        height=HEIGHT,
        width=WIDTH,
        max_area=HEIGHT * WIDTH,
        _auto_resize=False,
        num_inference_steps=3,
        output_type="latent",
        latents=x,
    )
    with torch.no_grad():
        from_pixels = pipe(image=pil, **common).images
        ours = pipe(image=source.tensors[SOURCE_LATENTS], **common).images
    _close(ours, from_pixels)


def test_kontext_image_guidance_drops_the_source_in_its_image_free_branch(kontext_path):
    pipe = _load(kontext_path)
    family = FluxKontextFamily(max_sequence_length=MAX_LEN)
    cond, uncond = _prompt_conds(family, pipe)
    with torch.no_grad():
        source = family.encode_sources(pipe, _source_pixels(), None)
    x = torch.randn(family.latent_shape(pipe, 2, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(4))
    base = TransformerField("base", family, pipe.transformer)
    sigma = torch.full((2,), 0.7)
    q = FieldQuery(x, sigma, cond.merge(source), uncond.merge(source))
    with torch.no_grad():
        v = ImageGuidanceField("ig", base, text_scale=2.0, image_scale=1.5).velocity(q)
        full = family.velocity(pipe.transformer, x, sigma, cond.merge(source))
        image = family.velocity(pipe.transformer, x, sigma, uncond.merge(source))
        none = family.velocity(pipe.transformer, x, sigma, uncond)
    _close(v, none + 1.5 * (image - none) + 2.0 * (full - image))
    assert not torch.allclose(image, none, atol=1e-4)


def test_kontext_guider_field_keeps_the_source_in_both_branches(kontext_path):
    """A ``diffusers.guiders`` guider on Kontext edits: its CFG equals CFGField (same source in both branches)."""
    from diffusers.guiders import ClassifierFreeGuidance

    from danceopd_diffusers.fields import GuiderField

    pipe = _load(kontext_path)
    family = FluxKontextFamily(max_sequence_length=MAX_LEN)
    cond, uncond = _prompt_conds(family, pipe)
    with torch.no_grad():
        source = family.encode_sources(pipe, _source_pixels(), None)
    x = torch.randn(family.latent_shape(pipe, 2, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(6))
    base = TransformerField("base", family, pipe.transformer)
    q = FieldQuery(
        x, torch.full((2,), 0.8), cond.merge(source), uncond.merge(source), step_index=3, num_steps=8
    )
    with torch.no_grad():
        guided = GuiderField("g", base, ClassifierFreeGuidance(guidance_scale=2.5)).velocity(q)
        cfg = CFGField("cfg", base, 2.5).velocity(q)
    _close(guided, cfg)


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
    str(MAX_LEN),
    "--learning_rate",
    "1e-3",
    "--resolution",
    "32",
    "--seed",
    "7",
]


def _write_data(folder: Path, edits: bool) -> Path:
    """t2i prompts and (for Kontext) edit pairs whose sources are not square: the edit size keeps their aspect."""
    rows = [
        {"prompt": "a red circle", "task": "t2i", "target_image": "red.png"},
        {"prompt": "two blue squares", "task": "t2i", "target_image": "blue.png"},
    ]
    Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (40, 40), (30, 30, 200)).save(folder / "blue.png")
    if edits:
        Image.new("RGB", (64, 32), (200, 30, 30)).save(folder / "wide.png")
        Image.new("RGB", (64, 32), (30, 200, 30)).save(folder / "wide_green.png")
        rows += [
            {
                "prompt": "make it green",
                "task": "edit",
                "source_image": "wide.png",
                "target_image": "wide_green.png",
            },
            {
                "prompt": "make it red",
                "task": "edit",
                "source_image": "wide_green.png",
                "target_image": "wide.png",
            },
        ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(path: str, folder: Path, routes: str, method: str = "danceopd", steps: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "fields.yaml"
    config.write_text(
        "fields:\n  base: {type: base}\n  base_cfg: {type: cfg, of: base, scale: 3.0}\n"
        "  edit_cfg: {type: cfg, of: base, scale: 3.0}\nroutes:\n" + routes
    )
    data = _write_data(folder, edits="edit" in routes)
    out = folder / "out"
    args = ["--pretrained_model_name_or_path", path, "--dataset_name", str(data), "--output_dir", str(out)]
    args += ["--fields_config", str(config)] if method != "sft" else ["--method", "sft"]
    args += ["--max_train_steps", str(steps), "--validation_prompt", "a red circle", *SHORT]
    run_train(args)
    return out


@pytest.fixture(scope="module")
def trained_flux(flux_path, tmp_path_factory) -> Path:
    return _train(flux_path, tmp_path_factory.mktemp("flux-run"), "  - {field: base_cfg, task: t2i}\n")


@pytest.fixture(scope="module")
def trained_kontext(kontext_path, tmp_path_factory) -> Path:
    """One student for both: text-to-image with absorbed CFG, and edits with absorbed CFG (source kept)."""
    routes = "  - {field: base_cfg, task: t2i}\n  - {field: edit_cfg, task: edit}\n"
    return _train(kontext_path, tmp_path_factory.mktemp("kontext-run"), routes, steps=6)


def _count_calls(pipe) -> list:
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_flux_training_exports_a_cfg_free_pipeline(trained_flux, flux_path, tmp_path):
    from diffusers import DiffusionPipeline, FluxPipeline

    routes = [
        json.loads(r)["route"]
        for r in (trained_flux / "logs" / "routes_rank0.jsonl").read_text().splitlines()
    ]
    assert routes == ["base_cfg"] * 4
    pipe = DiffusionPipeline.from_pretrained(trained_flux, trust_remote_code=True)
    assert type(pipe).__name__ == "DanceOPDFluxPipeline"
    assert pipe.config.absorbed_guidance_scale == 3.0
    pipe.set_progress_bar_config(disable=True)
    calls = _count_calls(pipe)
    kwargs = dict(
        height=32, width=32, num_inference_steps=4, output_type="latent", max_sequence_length=MAX_LEN
    )
    exported = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert len(calls) == 4  # one transformer call per denoising step
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(again).__name__ == "DanceOPDFluxPipeline"
    # the LoRA file is the student for the stock pipeline
    lora = load_file(trained_flux / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    assert any("ff.net.0.proj" in k for k in lora)
    stock, plain = FluxPipeline.from_pretrained(flux_path), FluxPipeline.from_pretrained(flux_path)
    stock.load_lora_weights(trained_flux)
    out = {}
    for name, p in (("stock", stock), ("plain", plain)):
        p.set_progress_bar_config(disable=True)
        out[name] = p("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.allclose(out["stock"], exported, atol=1e-4), (out["stock"] - exported).abs().max()
    assert not torch.allclose(out["plain"], exported, atol=1e-4)


def test_kontext_one_student_for_t2i_and_edits(trained_kontext, kontext_path, tmp_path):
    from diffusers import DiffusionPipeline, FluxKontextPipeline

    routes = {
        json.loads(r)["route"]
        for r in (trained_kontext / "logs" / "routes_rank0.jsonl").read_text().splitlines()
    }
    assert routes == {"base_cfg", "edit_cfg"}  # both tasks were trained into the one student
    pipe = DiffusionPipeline.from_pretrained(trained_kontext, trust_remote_code=True)
    assert type(pipe).__name__ == "DanceOPDFluxKontextPipeline"
    pipe.set_progress_bar_config(disable=True)
    calls = _count_calls(pipe)
    source = Image.new("RGB", (48, 32), (200, 30, 30))
    edit_kwargs = dict(
        height=32,
        width=48,
        max_area=32 * 48,
        _auto_resize=False,
        num_inference_steps=3,
        output_type="latent",
        max_sequence_length=MAX_LEN,
    )
    edited = pipe(
        image=source, prompt="make it green", generator=torch.Generator().manual_seed(0), **edit_kwargs
    )
    assert len(calls) == 3 and edited.images.shape == (1, 8 * 12, 16)
    t2i = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **edit_kwargs).images
    assert len(calls) == 6 and not torch.allclose(t2i, edited.images, atol=1e-3)
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(again).__name__ == "DanceOPDFluxKontextPipeline"
    stock = FluxKontextPipeline.from_pretrained(kontext_path)
    stock.load_lora_weights(trained_kontext)
    stock.set_progress_bar_config(disable=True)
    lora_edit = stock(
        image=source, prompt="make it green", generator=torch.Generator().manual_seed(0), **edit_kwargs
    )
    assert torch.allclose(lora_edit.images, edited.images, atol=1e-4), (
        (lora_edit.images - edited.images).abs().max()
    )
    assert any("proj_mlp" in k for k in load_file(trained_kontext / "pytorch_lora_weights.safetensors"))


def test_kontext_sft_on_t2i_and_edit_pairs(kontext_path, tmp_path):
    routes = "  - {field: base, task: t2i}\n  - {field: base, task: edit}\n"
    out = _train(kontext_path, tmp_path / "sft", routes, method="sft")
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_kontext_sft_cache_latents_opens_fewer_images(kontext_path, tmp_path, monkeypatch):
    """With --cache_latents a target is read and encoded once, not at every step; training still learns."""
    import danceopd_diffusers.data as data

    opened = []
    original = data.open_image
    monkeypatch.setattr(data, "open_image", lambda *a, **k: opened.append(1) or original(*a, **k))
    counts = {}
    for flag in ([], ["--cache_latents"]):
        opened.clear()
        folder = tmp_path / ("cached" if flag else "plain")
        folder.mkdir()
        data_file = _write_data(folder, edits=True)
        run_train(
            ["--pretrained_model_name_or_path", kontext_path, "--dataset_name", str(data_file)]
            + ["--output_dir", str(folder / "out"), "--method", "sft", "--max_train_steps", "16", *SHORT]
            + flag
        )
        counts[bool(flag)] = len(opened)
        lora = load_file(folder / "out" / "pytorch_lora_weights.safetensors")
        assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    # uncached, each of the 2 samples of each of the 16 steps opens its target (32 reads); cached, only the
    # first batches that meet a new row read theirs (4 rows)
    assert counts[True] + 16 <= counts[False], counts


def _t2i_and_edit_args(kontext_path: str, folder: Path) -> list[str]:
    """Kontext with one CFG field per task (the routes log tells t2i steps from edit steps), on wide edits."""
    config = folder / "fields.yaml"
    config.write_text(
        "fields:\n  base: {type: base}\n  base_cfg: {type: cfg, of: base, scale: 3.0}\n"
        "  edit_cfg: {type: cfg, of: base, scale: 2.0}\n"
        "routes:\n  - {field: base_cfg, task: t2i}\n  - {field: edit_cfg, task: edit}\n"
    )
    data = _write_data(folder, edits=True)
    return [
        "--pretrained_model_name_or_path",
        kontext_path,
        "--dataset_name",
        str(data),
        "--fields_config",
        str(config),
    ]


def test_kontext_cache_latents_resumes_exactly(kontext_path, tmp_path, capsys):
    """The encodings --cache_latents computes before training depend only on the data: a run cut after 2 steps
    and resumed ends bit for bit where the uninterrupted 4-step run does, edits and t2i both trained."""
    base = [
        *_t2i_and_edit_args(kontext_path, tmp_path),
        "--cache_latents",
        "--checkpointing_steps",
        "2",
        *SHORT,
    ]
    resume = ["--resume_from_checkpoint", "latest"]
    for folder, steps, extra in (("full", 4, []), ("cut", 2, []), ("cut", 4, resume)):
        run_train(
            [
                *base,
                "--skip_pipeline_export",
                "--output_dir",
                str(tmp_path / folder),
                "--max_train_steps",
                str(steps),
                *extra,
            ]
        )
    full = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    cut = load_file(tmp_path / "cut" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    routes = (tmp_path / "full" / "logs" / "routes_rank0.jsonl").read_text()
    assert '"route": "base_cfg"' in routes and '"route": "edit_cfg"' in routes
    assert capsys.readouterr().out.count("--cache_latents: 5 prompts, 2 edit sources and 0 targets") == 3


def test_kontext_batched_rollouts_equal_sequential_ones(kontext_path, tmp_path):
    """--batch_rollouts on edits: the micro-steps' sources ride along in the joint rollout, and the student is the
    one the sequential micro-steps train."""
    base = [
        *_t2i_and_edit_args(kontext_path, tmp_path),
        "--max_train_steps",
        "3",
        "--skip_pipeline_export",
        *SHORT,
    ]
    base += ["--gradient_accumulation_steps", "2"]
    for folder, extra in (("seq", []), ("joint", ["--batch_rollouts"])):
        run_train([*base, "--output_dir", str(tmp_path / folder), *extra])
    seq = load_file(tmp_path / "seq" / "pytorch_lora_weights.safetensors")
    joint = load_file(tmp_path / "joint" / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(seq[k], joint[k], atol=1e-6) for k in seq)
    routes = (tmp_path / "joint" / "logs" / "routes_rank0.jsonl").read_text()
    assert routes.count('"route"') == 3 and '"route": "edit_cfg"' in routes


def test_flux_full_finetune_student(flux_path, tmp_path):
    folder = tmp_path / "full"
    folder.mkdir()
    data = _write_data(folder, edits=False)
    out = folder / "out"
    run_train(
        ["--pretrained_model_name_or_path", flux_path, "--dataset_name", str(data), "--output_dir", str(out)]
        + ["--cfg_scale", "3.0", "--full_finetune", "--max_train_steps", "2", *SHORT]
    )
    from diffusers import FluxTransformer2DModel

    before = FluxTransformer2DModel.from_pretrained(flux_path, subfolder="transformer").state_dict()
    after = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer").state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
