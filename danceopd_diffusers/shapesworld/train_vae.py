"""Train the ShapesWorld VAE on world renders (every style and background the world draws).

    python -m danceopd_diffusers.shapesworld.train_vae --output_dir sw-vae --steps 3000 --batch_size 64

A deterministic autoencoder in AutoencoderKL's clothes: reconstruction MSE on the posterior's mode, and at the end
the log-variance output is pinned to -30 so ``latent_dist.sample()`` (what flow-matching training encodes with)
equals the mode. With a free posterior std the training targets of small objects drown in encoder noise (the
first ShapesWorld base runs learned backgrounds only). ``shift_factor`` / ``scaling_factor`` are set from the
latents' mean and standard deviation, so diffusion latents have unit variance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .pipeline import VAE_CONFIG
from .world import EDIT_CATEGORIES, T2I_CATEGORIES, make_edit_example, make_t2i_example, render


def world_images(n: int, rng: np.random.Generator, size: int = 64) -> torch.Tensor:
    """``n`` renders in [-1, 1]: T2I scenes and the sources and targets of edits (all styles)."""
    images = []
    while len(images) < n:
        if rng.random() < 0.4:
            ex = make_t2i_example(T2I_CATEGORIES[int(rng.integers(len(T2I_CATEGORIES)))], rng)
            images.append(render(ex["scene"], size))
        else:
            ex = make_edit_example(EDIT_CATEGORIES[int(rng.integers(len(EDIT_CATEGORIES)))], rng)
            images.append(render(ex["source_scene"], size))
            images.append(render(ex["target_scene"], size, ex.get("target_style") or "solid"))
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images[:n]])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def pin_posterior_variance(vae, logvar: float = -30.0) -> None:
    """Make the encoder's log-variance a constant, so sampling the posterior returns its mode."""
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(logvar)


def train_vae(
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,  # on the latent mean: keeps the latent scale bounded
    seed: int = 0,
    device: str = "cpu",
    log_every: int = 100,
):
    """Returns (vae, history of losses)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL(**VAE_CONFIG, shift_factor=0.0, scaling_factor=1.0).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    history = []
    for step in range(steps):
        x = world_images(batch_size, rng).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mode()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * posterior.mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(history[-log_every:]):.5f}", flush=True)
    vae.eval()
    pin_posterior_variance(vae)
    with torch.no_grad():  # latent statistics for shift / scale
        z = torch.cat(
            [vae.encode(world_images(batch_size, rng).to(device)).latent_dist.mode() for _ in range(8)]
        )
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return vae, history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the ShapesWorld VAE.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae, history = train_vae(args.steps, args.batch_size, args.learning_rate, seed=args.seed, device=device)
    vae.to("cpu").save_pretrained(args.output_dir)
    k = max(1, len(history) // 10)
    summary = {
        "first_loss": float(np.mean(history[:k])),
        "last_loss": float(np.mean(history[-k:])),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    Path(args.output_dir, "training.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
