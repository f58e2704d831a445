"""The ShapesWorld model pieces: vocabulary, pipeline and the deterministic VAE."""

from __future__ import annotations

import numpy as np
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
