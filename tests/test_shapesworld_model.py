"""The ShapesWorld model pieces: vocabulary, pipeline and the deterministic VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danceopd_diffusers.shapesworld.pipeline import build_shapesworld_pipeline, world_vocabulary
from danceopd_diffusers.shapesworld.train_vae import train_vae, world_images


def test_vocabulary_covers_every_prompt_word():
    from danceopd_diffusers.shapesworld import build_dataset

    vocab = set(world_vocabulary())
    words = {w for p in build_dataset("eval")["prompt"] for w in p.split()}
    assert words <= vocab
    tok = build_shapesworld_pipeline().tokenizer_2
    ids = tok("a photo of three red crosses left of a circle").input_ids
    assert tok.unk_token_id not in ids and len(ids) == 11  # one token per word (10) + </s>


def _t5_outputs(pipe, prompt: str) -> tuple[list[str], torch.Tensor]:
    ids = pipe.tokenizer_2(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.tokenizer_2.convert_ids_to_tokens(ids[0]), pipe.text_encoder_2(ids).last_hidden_state[0]


def test_text_encoder_carries_word_order():
    # Flux gives text tokens no positions: a bag-of-words T5 makes these prompt pairs identical to the transformer
    pipe = build_shapesworld_pipeline()
    tokens, red_first = _t5_outputs(pipe, "a photo of a red circle left of a blue square")
    _, blue_first = _t5_outputs(pipe, "a photo of a blue circle left of a red square")
    circle = tokens.index("\u2581circle")
    assert torch.nn.functional.cosine_similarity(red_first[circle], blue_first[circle], dim=0) < 0.95
    _, left = _t5_outputs(pipe, "a photo of a square left of a triangle")
    _, swapped = _t5_outputs(pipe, "a photo of a triangle left of a square")
    distance = torch.cdist(left, swapped).min(dim=1).values  # every token of one prompt vs its nearest in the other
    assert distance.max() > 0.1 * left.norm(dim=1).mean()


def test_shipped_text_encoder_is_the_one_the_builder_makes():
    from safetensors.torch import load_file

    from danceopd_diffusers.shapesworld.demo import SOURCES

    shipped = load_file(SOURCES / "base" / "text_encoder_2" / "model.safetensors")
    built = build_shapesworld_pipeline().text_encoder_2.state_dict()
    assert all(torch.equal(shipped[k].float(), built[k]) for k in shipped)


def test_vae_training_reduces_loss_and_encodes_deterministically():
    vae, history = train_vae(12, batch_size=8, log_every=0)
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3
    x = world_images(2, np.random.default_rng(1))
    with torch.no_grad():
        a = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
        b = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-5)  # sampling the posterior is its mode
    z = (a - vae.config.shift_factor) * vae.config.scaling_factor
    assert 0.2 < z.std().item() < 5


def test_ship_writes_fp16_sources_and_scores_what_it_wrote(tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file

    from danceopd_diffusers.shapesworld.demo import SOURCES
    from danceopd_diffusers.shapesworld.ship import LORA_FILE, TRANSFORMER_FILE, ship

    root = tmp_path / "root"  # a train_sources.sh root, made from the shipped files
    shutil.copytree(SOURCES / "base", root / "init")
    vae_config = root / "init" / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "_name_or_path": "/tmp/x/vae"}))
    (root / "base" / "transformer").mkdir(parents=True)
    full = {k: v.float() for k, v in load_file(SOURCES / "base" / TRANSFORMER_FILE).items()}
    from safetensors.torch import save_file

    save_file(full, root / "base" / TRANSFORMER_FILE)
    (root / "local").mkdir()
    shutil.copy(SOURCES / "local_edit_lora.safetensors", root / "local" / LORA_FILE)
    dest = tmp_path / "sources"
    results = ship(root, dest, limit=2)
    written = load_file(dest / "base" / TRANSFORMER_FILE)
    assert all(t.dtype == torch.float16 for t in written.values()) and written.keys() == full.keys()
    assert (dest / "local_edit_lora.safetensors").is_file() and not (
        dest / "global_edit_lora.safetensors"
    ).exists()
    assert set(results) == {"T2I base", "local-edit expert"}
    assert "_name_or_path" not in json.loads((dest / "base" / "vae" / "config.json").read_text())
    assert json.loads((dest / "results.json").read_text())["T2I base"]["n_t2i"] == 2
    with pytest.raises(FileNotFoundError, match="train_sources.sh data and base"):
        ship(tmp_path / "nothing", dest)
