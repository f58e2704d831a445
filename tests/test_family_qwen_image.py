"""Qwen-Image and Qwen-Image-Edit: our fields reproduce the stock pipelines (packing, img_shapes, time, the
prompt mask, Qwen's norm-rescaled true CFG, the edit's source tokens and VL-encoded image), and the training
script trains, exports and reloads both families offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_train
from PIL import Image
from safetensors.torch import load_file

from danceopd_diffusers.families import FAMILIES, Conditioning, family_for_pipeline_class
from danceopd_diffusers.families.qwen_image import QwenImageEditFamily, QwenImageFamily
from danceopd_diffusers.fields import CFGField, FieldQuery, ImageGuidanceField, TransformerField
from danceopd_diffusers.pipelines.pipeline_danceopd import qwen_image_t2i_view
from danceopd_diffusers.rollout import field_rollout

MAX_LEN = 64  # text tokens kept (the stock text-to-image calls are given the same)
# Equivalence tolerance. Without CFG the same fp32 ops run in the same order (measured difference: exactly 0).
# Our CFG batches the two branches in one masked call where the pipeline makes two unmasked ones: ~1e-6 on
# latents of magnitude ~4.
ATOL = 1e-5
PROMPTS = ["a red circle", "two blue squares on a big green field"]  # different lengths: the mask matters
T2I_SIZE = 64  # text-to-image states are square (the training script samples them so)
EDIT_H, EDIT_W = 96, 160  # non-square: a wrong token grid cannot pass
STEPS = 4


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory) -> str:
    from danceopd_diffusers.tiny import tiny_pipeline_path

    return tiny_pipeline_path("qwen-image", tmp_path_factory.mktemp("qwen-cache"))


@pytest.fixture(scope="module")
def edit_path(tmp_path_factory) -> str:
    from danceopd_diffusers.tiny import tiny_pipeline_path

    return tiny_pipeline_path("qwen-image-edit", tmp_path_factory.mktemp("qwen-edit-cache"))


@pytest.fixture
def small_source_area(monkeypatch):
    """The stock edit pipeline resizes every source to ~1024^2 pixels (hard-coded ``calculate_dimensions(1024 *
    1024, ratio)``): 7 s per VAE encode on CPU. Same function, 1/64 of the area: a 160x96 source stays 160x96."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module

    original = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: original(area / 64, ratio))
    assert edit_module.calculate_dimensions(1024 * 1024, EDIT_W / EDIT_H)[:2] == (EDIT_W, EDIT_H)


def _load(path: str, cls=None):
    from diffusers import DiffusionPipeline

    pipe = (cls or DiffusionPipeline).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rollout(field, family, pipe, x, cond, uncond) -> torch.Tensor:
    sigmas = family.sigmas(pipe, STEPS, x.shape, "cpu")
    with torch.no_grad():
        return field_rollout(lambda xx, s, i: field.velocity(FieldQuery(xx, s, cond, uncond)), x, sigmas)[-1]


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol), (a - b).abs().max()


def _sources() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (EDIT_H, EDIT_W, 3), dtype=np.uint8)) for _ in PROMPTS]


def _edit_conds(family, pipe, sources):
    from danceopd_diffusers.data import images_to_tensor

    cond = family.encode_prompts(pipe, PROMPTS, "cpu", source_images=sources)
    uncond = family.encode_prompts(pipe, [""] * len(PROMPTS), "cpu", source_images=sources)
    with torch.no_grad():  # the training script's SourceCache: pixels in [-1, 1] at the edit size
        source = family.encode_sources(pipe, images_to_tensor(sources, EDIT_H, EDIT_W), None)
    return cond.merge(source), uncond.merge(source)


# ------------------------------------------------------------------------------------------------ the adapters
def test_registry_layout_and_lora_targets(qwen_path):
    from diffusers import QwenImageTransformer2DModel

    assert FAMILIES["qwen-image"] is QwenImageFamily and not QwenImageFamily.can_edit
    assert FAMILIES["qwen-image-edit"] is QwenImageEditFamily and QwenImageEditFamily.can_edit
    assert QwenImageEditFamily.prompt_uses_source and not QwenImageFamily.prompt_uses_source
    for name in ("QwenImagePipeline", "DanceOPDQwenImagePipeline"):
        assert family_for_pipeline_class(name) is QwenImageFamily
    for name in ("QwenImageEditPipeline", "DanceOPDQwenImageEditPipeline"):
        assert family_for_pipeline_class(name) is QwenImageEditFamily
    transformer = QwenImageTransformer2DModel.from_pretrained(qwen_path, subfolder="transformer")
    modules = {n for n, _ in transformer.named_modules()}
    for target in QwenImageFamily.default_lora_targets:
        assert any(n.endswith(".attn." + target) for n in modules), target

    pipe = _load(qwen_path)
    family = QwenImageFamily(max_sequence_length=MAX_LEN)
    shape = family.latent_shape(pipe, 2, 32, 48)
    assert shape == (2, 2 * 3, 16)  # vae factor 8, 2x2 packing, 4 latent channels
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        x0 = family.encode_images(pipe, pixels, torch.Generator().manual_seed(0))
        images = family.decode_latents(pipe, x0, 32, 48)
    assert x0.shape == shape and [im.size for im in images] == [(48, 32)] * 2
    # our unpack/pack are the pipeline's
    unpacked = pipe._unpack_latents(x0, 32, 48, pipe.vae_scale_factor)
    assert torch.equal(pipe._pack_latents(unpacked, 2, 4, 4, 6), x0)
    with pytest.raises(ValueError, match="square"):  # a text-to-image state must be square
        family.velocity(
            pipe.transformer, x0, torch.full((2,), 0.5), family.encode_prompts(pipe, PROMPTS, "cpu")
        )


# ------------------------------------------------------------------------------------------------ equivalence
def test_t2i_fields_reproduce_the_stock_pipeline(qwen_path):
    """Base field = the pipeline without CFG; CFGField(s, norm_rescale=True) = true_cfg_scale=s, negative ""."""
    pipe = _load(qwen_path)
    family = QwenImageFamily(max_sequence_length=MAX_LEN)
    cond = family.encode_prompts(pipe, PROMPTS, "cpu")
    uncond = Conditioning.cat([family.encode_prompts(pipe, [""], "cpu")] * len(PROMPTS))
    assert cond.tensors["prompt_embeds"].shape[1] == MAX_LEN  # fixed length: conditionings stack
    x = torch.randn(
        family.latent_shape(pipe, 2, T2I_SIZE, T2I_SIZE), generator=torch.Generator().manual_seed(0)
    )
    base = TransformerField("base", family, pipe.transformer)
    common = dict(height=T2I_SIZE, width=T2I_SIZE, num_inference_steps=STEPS, output_type="latent", latents=x)
    with torch.no_grad():
        # the pipeline encodes the text itself
        stock = pipe(prompt=PROMPTS, true_cfg_scale=1.0, max_sequence_length=MAX_LEN, **common).images
        rollout = pipe(
            **family.pipeline_condition_kwargs(cond), **family.unguided_call_kwargs(), **common
        ).images
        stock_cfg = pipe(
            prompt=PROMPTS,
            negative_prompt=[""] * 2,
            true_cfg_scale=4.0,
            max_sequence_length=MAX_LEN,
            **common,
        ).images
    assert torch.equal(family.sigmas(pipe, STEPS, x.shape, "cpu"), pipe.scheduler.sigmas.float())
    ours = _rollout(base, family, pipe, x, cond, uncond)
    ours_cfg = _rollout(CFGField("cfg", base, 4.0, norm_rescale=True), family, pipe, x, cond, uncond)
    plain_cfg = _rollout(CFGField("plain", base, 4.0), family, pipe, x, cond, uncond)
    _close(rollout, stock)
    _close(ours, stock)
    _close(ours_cfg, stock_cfg)
    assert not torch.allclose(ours_cfg, ours, atol=1e-2)
    # Plain CFG (the fields config's ``cfg`` type) is not Qwen's true CFG: it lacks the per-token norm rescale.
    assert not torch.allclose(plain_cfg, stock_cfg, atol=1e-2)


def test_edit_fields_reproduce_the_stock_pipeline(edit_path, small_source_area):
    """Source tokens after the noisy ones, both grids in img_shapes, the image in the VL prompt; CFG's uncond is
    the empty prompt with the same image. The stock pipeline is given the PIL images and encodes all itself."""
    family = QwenImageEditFamily(max_sequence_length=MAX_LEN)
    stock_pipe = _load(edit_path)
    pipe = _load(edit_path, family.pipeline_class())  # what the training script loads for its rollouts
    sources = _sources()
    cond, uncond = _edit_conds(family, pipe, sources)
    assert cond.tensors["source_latents"].shape == (2, 4, 1, EDIT_H // 8, EDIT_W // 8)
    x = torch.randn(family.latent_shape(pipe, 2, EDIT_H, EDIT_W), generator=torch.Generator().manual_seed(1))
    base = TransformerField("base", family, pipe.transformer)
    common = dict(height=EDIT_H, width=EDIT_W, num_inference_steps=STEPS, output_type="latent", latents=x)
    with torch.no_grad():
        stock = stock_pipe(image=sources, prompt=PROMPTS, true_cfg_scale=1.0, **common).images
        stock_cfg = stock_pipe(
            image=sources, prompt=PROMPTS, negative_prompt=[""] * 2, true_cfg_scale=3.0, **common
        ).images
        # the student's rollout: the same source latents, pre-encoded
        kwargs = {**family.pipeline_condition_kwargs(cond), **family.unguided_call_kwargs()}
        assert kwargs["image"] is cond.tensors["source_latents"]
        rollout = pipe(**kwargs, **common).images
        uncond_kwargs = family.pipeline_condition_kwargs(uncond)
        rollout_cfg = pipe(
            **kwargs | {"true_cfg_scale": 3.0},
            negative_prompt_embeds=uncond_kwargs["prompt_embeds"],
            negative_prompt_embeds_mask=uncond_kwargs["prompt_embeds_mask"],
            **common,
        ).images
        from_pixels = pipe(image=sources, prompt=PROMPTS, true_cfg_scale=1.0, **common).images  # stock path
        no_image_tokens = pipe(**kwargs | {"image": None}, **common).images
    ours = _rollout(base, family, pipe, x, cond, uncond)
    ours_cfg = _rollout(CFGField("cfg", base, 3.0, norm_rescale=True), family, pipe, x, cond, uncond)
    _close(ours, stock)
    _close(rollout, stock)
    _close(from_pixels, stock)
    _close(ours_cfg, stock_cfg)
    _close(rollout_cfg, stock_cfg)
    assert not torch.allclose(ours, no_image_tokens, atol=1e-2)  # the source tokens matter


def test_edit_family_text_to_image_is_qwen_images_path(edit_path):
    """Without a source, the edit family is Qwen-Image on the same components (what the exported edit pipeline
    runs without ``image``): its template, no source tokens."""
    family = QwenImageEditFamily(max_sequence_length=MAX_LEN)
    pipe = _load(edit_path, family.pipeline_class())
    t2i = qwen_image_t2i_view(pipe)
    assert type(t2i).__name__ == "QwenImagePipeline" and t2i.transformer is pipe.transformer
    cond = family.encode_prompts(pipe, PROMPTS, "cpu")
    uncond = Conditioning.cat([family.encode_prompts(pipe, [""], "cpu")] * len(PROMPTS))
    x = torch.randn(
        family.latent_shape(pipe, 2, T2I_SIZE, T2I_SIZE), generator=torch.Generator().manual_seed(2)
    )
    common = dict(height=T2I_SIZE, width=T2I_SIZE, num_inference_steps=STEPS, output_type="latent", latents=x)
    with torch.no_grad():
        stock = t2i(prompt=PROMPTS, true_cfg_scale=1.0, max_sequence_length=MAX_LEN, **common).images
        rollout = pipe(
            **family.pipeline_condition_kwargs(cond), **family.unguided_call_kwargs(), **common
        ).images
    _close(rollout, stock)
    _close(_rollout(TransformerField("base", family, pipe.transformer), family, pipe, x, cond, uncond), stock)


def test_image_guidance_drops_the_image_from_both_paths(edit_path, small_source_area):
    """The image-free branch has neither source tokens nor the image in the VL prompt: it is text-to-image."""
    family = QwenImageEditFamily(max_sequence_length=MAX_LEN)
    pipe = _load(edit_path, family.pipeline_class())
    cond, uncond = _edit_conds(family, pipe, _sources())
    x = torch.randn(family.latent_shape(pipe, 2, EDIT_H, EDIT_W), generator=torch.Generator().manual_seed(3))
    sigma = torch.full((2,), 0.7)
    base = TransformerField("base", family, pipe.transformer)
    with torch.no_grad():
        v = ImageGuidanceField("ig", base, text_scale=2.0, image_scale=1.5).velocity(
            FieldQuery(x, sigma, cond, uncond)
        )
        full = family.velocity(pipe.transformer, x, sigma, cond)
        image = family.velocity(pipe.transformer, x, sigma, uncond)
        none = family.velocity(pipe.transformer, x, sigma, uncond.without_source())
        # by hand: Qwen-Image's empty-prompt encoding, no source tokens, the state's own 12x20 grid
        t2i_empty = family.encode_prompts(pipe, ["", ""], "cpu").tensors
        by_hand = pipe.transformer(
            hidden_states=x,
            timestep=sigma,
            encoder_hidden_states=t2i_empty["prompt_embeds"][
                :, : int(t2i_empty["prompt_embeds_mask"].sum(1).max())
            ],
            img_shapes=[[(1, EDIT_H // 16, EDIT_W // 16)]] * 2,
            return_dict=False,
        )[0]
    _close(v, none + 1.5 * (image - none) + 2.0 * (full - image))
    _close(none, by_hand)
    assert not torch.allclose(image, none, atol=1e-3)


def test_guider_field_on_edits_equals_cfg(edit_path, small_source_area):
    """A ``diffusers.guiders`` guider sees both branches with the same source (latents and VL image)."""
    from diffusers.guiders import ClassifierFreeGuidance

    from danceopd_diffusers.fields import GuiderField

    family = QwenImageEditFamily(max_sequence_length=MAX_LEN)
    pipe = _load(edit_path, family.pipeline_class())
    cond, uncond = _edit_conds(family, pipe, _sources())
    x = torch.randn(family.latent_shape(pipe, 2, EDIT_H, EDIT_W), generator=torch.Generator().manual_seed(4))
    base = TransformerField("base", family, pipe.transformer)
    q = FieldQuery(x, torch.full((2,), 0.8), cond, uncond, step_index=2, num_steps=8)
    with torch.no_grad():
        guided = GuiderField("g", base, ClassifierFreeGuidance(guidance_scale=2.5)).velocity(q)
        cfg = CFGField("cfg", base, 2.5).velocity(q)
    _close(guided, cfg)


def test_prompts_are_encoded_per_source(edit_path):
    """The VL encoder reads the source: the prompt cache keys (prompt, sample)."""
    from danceopd_diffusers.caches import PromptCache

    family = QwenImageEditFamily(max_sequence_length=MAX_LEN)
    pipe = _load(edit_path, family.pipeline_class())
    cache = PromptCache(pipe, family, "cpu")
    red, blue = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    a = cache(["make it green", "make it green"], [(0, 48, 64), (1, 48, 64)], [red, blue])
    b = cache(["make it green", ""], [(1, 48, 64), (1, 48, 64)], [blue, blue])
    assert cache.encoded == 3
    assert torch.equal(a.tensors["source_prompt_embeds"][1], b.tensors["source_prompt_embeds"][0])
    assert not torch.allclose(a.tensors["source_prompt_embeds"][0], a.tensors["source_prompt_embeds"][1])
    assert torch.equal(a.tensors["prompt_embeds"][0], a.tensors["prompt_embeds"][1])  # text-only part


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
    "64",
    "--seed",
    "7",
    "--report_to",
    "none",
    "--checkpointing_steps",
    "100",
]


def _write_data(folder: Path) -> Path:
    """t2i prompts and edit pairs whose 48x32 sources are not square (edit size 64x48 at --resolution 64)."""
    rows = [
        {"prompt": "a red circle", "task": "t2i", "target_image": "red.png"},
        {"prompt": "two blue squares", "task": "t2i", "target_image": "green.png"},
    ]
    Image.new("RGB", (48, 32), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (48, 32), (30, 200, 30)).save(folder / "green.png")
    rows += [
        {"prompt": "make it green", "task": "edit", "source_image": "red.png", "target_image": "green.png"},
        {"prompt": "make it red", "task": "edit", "source_image": "green.png", "target_image": "red.png"},
    ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(
    path: str, folder: Path, routes: str, method: str = "danceopd", steps: int = 3, extra: tuple = ()
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "fields.yaml"
    config.write_text(
        "fields:\n  base: {type: base}\n  base_cfg: {type: cfg, of: base, scale: 3.0}\n"
        "  edit_cfg: {type: cfg, of: base, scale: 3.0}\n"
        "  edit_ig: {type: image_guidance, of: base, text_scale: 3.0, image_scale: 1.5}\nroutes:\n" + routes
    )
    out = folder / "out"
    args = ["--pretrained_model_name_or_path", path, "--dataset_name", str(_write_data(folder))]
    args += ["--output_dir", str(out), "--max_train_steps", str(steps), *SHORT, *extra]
    args += ["--fields_config", str(config)] if method != "sft" else ["--method", "sft"]
    run_train(args)
    return out


def _count_calls(pipe) -> list:
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def _routes(out: Path) -> set[str]:
    return {json.loads(r)["route"] for r in (out / "logs" / "routes_rank0.jsonl").read_text().splitlines()}


def test_qwen_image_training_exports_a_cfg_free_pipeline(qwen_path, tmp_path):
    from diffusers import DiffusionPipeline, QwenImagePipeline

    out = _train(qwen_path, tmp_path / "run", "  - {field: base_cfg, task: t2i}\n")
    assert _routes(out) == {"base_cfg"}
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "DanceOPDQwenImagePipeline"
    assert pipe.config.absorbed_guidance_scale == 3.0
    pipe.set_progress_bar_config(disable=True)
    calls = _count_calls(pipe)
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="latent")
    seed = dict(generator=torch.Generator().manual_seed(0))
    exported = pipe("a red circle", negative_prompt="blurry", **kwargs, **seed).images
    assert len(calls) == 3  # one transformer call per step: a negative prompt alone does not turn CFG on
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(again).__name__ == "DanceOPDQwenImagePipeline"
    # the LoRA file is the student for the stock pipeline
    assert any(
        v.abs().sum() > 0
        for k, v in load_file(out / "pytorch_lora_weights.safetensors").items()
        if "lora_B" in k
    )
    stock, plain = _load(qwen_path, QwenImagePipeline), _load(qwen_path, QwenImagePipeline)
    stock.load_lora_weights(out)
    lora = stock(
        "a red circle", true_cfg_scale=1.0, **kwargs, generator=torch.Generator().manual_seed(0)
    ).images
    base = plain(
        "a red circle", true_cfg_scale=1.0, **kwargs, generator=torch.Generator().manual_seed(0)
    ).images
    _close(lora, exported, atol=1e-4)
    assert not torch.allclose(base, exported, atol=1e-4)


def test_qwen_image_edit_one_student_for_edits_and_t2i(edit_path, tmp_path, small_source_area):
    """CFG and image guidance on edits (sources kept / dropped), CFG on text-to-image, one student; exported."""
    from diffusers import DiffusionPipeline, QwenImageEditPipeline

    routes = "  - {field: edit_cfg, task: edit}\n  - {field: edit_ig, task: edit}\n  - {field: base_cfg, task: t2i}\n"
    extra = ("--seed", "0", "--validation_prompt", "a red circle")  # seed 0 draws routes 2, 1, 0
    out = _train(edit_path, tmp_path / "run", routes, extra=extra)
    assert _routes(out) == {"edit_cfg", "edit_ig", "base_cfg"}  # every route was trained
    # validation rows: the prompt (text-to-image) and the edit bucket's first source, each beside its fields
    assert Image.open(out / "samples.png").height > 2 * 64
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "DanceOPDQwenImageEditPipeline"
    pipe.set_progress_bar_config(disable=True)
    calls = _count_calls(pipe)
    source = Image.new("RGB", (EDIT_W, EDIT_H), (200, 30, 30))
    kwargs = dict(height=EDIT_H, width=EDIT_W, num_inference_steps=3, output_type="latent")
    edited = pipe(
        source,
        "make it green",
        negative_prompt="blurry",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images
    assert len(calls) == 3 and edited.shape == (1, (EDIT_H // 16) * (EDIT_W // 16), 16)
    t2i = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=3, output_type="latent").images
    assert len(calls) == 6 and t2i.shape == (1, 16, 16)  # text-to-image without an image, CFG-free too
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(again).__name__ == "DanceOPDQwenImageEditPipeline"
    stock, plain = _load(edit_path, QwenImageEditPipeline), _load(edit_path, QwenImageEditPipeline)
    stock.load_lora_weights(out)
    outs = [
        p(
            source, "make it green", true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), **kwargs
        ).images
        for p in (stock, plain)
    ]
    _close(outs[0], edited, atol=1e-4)
    assert not torch.allclose(outs[1], edited, atol=1e-4)


def test_qwen_image_edit_sft_full_student(edit_path, tmp_path):
    """Flow matching on the dataset's target images (edit pairs and t2i rows), every transformer weight trained."""
    from diffusers import DiffusionPipeline, QwenImageTransformer2DModel

    out = _train(edit_path, tmp_path / "sft", "", method="sft", steps=2, extra=("--full_finetune",))
    assert "`method` | `sft`" in (out / "README.md").read_text()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    trained = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(trained).__name__ == "DanceOPDQwenImageEditPipeline"
    original = QwenImageTransformer2DModel.from_pretrained(edit_path, subfolder="transformer")
    diff = max(
        (a - b).abs().max().item() for a, b in zip(trained.transformer.parameters(), original.parameters())
    )
    assert diff > 0
