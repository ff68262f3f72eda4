"""Autoencoders and variational autoencoders (lesson 01).

An autoencoder squeezes an image through a small latent vector and rebuilds it. It learns
to reconstruct, but nothing makes its latent space a place you can *sample* from: random
vectors land where no training image ever went and decode to mush.

A VAE (Kingma & Welling 2013) fixes that by making the encoder output a distribution
q(z|x) = N(mean, diag(exp(logvar))) and training on the evidence lower bound (ELBO)

    log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || N(0, I))
               \\_ reconstruction _/   \\____ keeps q near the prior ____/

The first term rewards rebuilding x from a sampled z; the second pulls every q(z|x)
towards the standard normal, so the prior N(0, I) covers the codes the decoder knows and
samples from it decode to plausible images. DALL·E's first stage is a *discrete* cousin
of this model (``dalle_lesson.dvae``).

Everything here works on ``[B, 3, S, S]`` images in [0, 1] (the course datasets give
exactly that). The lesson size is S = 32 with a 16-dimensional latent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class VAEConfig:
    image_size: int = 32  # side of the square input images, in pixels
    channels: int = 3  # RGB
    width: int = 32  # channels after the first conv; doubled after every downsampling
    n_down: int = 3  # stride-2 convs: 32 -> 16 -> 8 -> 4 pixels
    latent_dim: int = 16  # size of the bottleneck vector z
    pixel_sigma: float = 0.1  # std of the Gaussian likelihood p(x|z): sets how much
    # reconstruction weighs against the KL term (smaller = sharper, less regular latents)

    @classmethod
    def lesson(cls) -> "VAEConfig":
        """32x32 shapes, 16 latent dimensions: the model the lesson trains and ships."""
        return cls()

    @classmethod
    def latent_2d(cls) -> "VAEConfig":
        """The same model with a 2-D latent, so the whole latent space fits in one plot."""
        return cls(latent_dim=2)

    def __post_init__(self):
        if self.image_size % (2**self.n_down) != 0:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**n_down = {2**self.n_down} "
                "(every downsampling halves the image)"
            )
        if self.latent_dim < 1 or self.pixel_sigma <= 0:
            raise ValueError(f"latent_dim must be >= 1 and pixel_sigma > 0, got {self.latent_dim}, {self.pixel_sigma}")


# --------------------------------------------------------------------------------------
# The two halves: image -> vector, vector -> image
# --------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Strided convs shrink the image; one linear layer maps the feature map to ``out_features``."""

    def __init__(self, config: VAEConfig, out_features: int):
        super().__init__()
        layers, in_channels = [], config.channels
        for i in range(config.n_down):
            out_channels = config.width * 2**i
            # kernel 4, stride 2, padding 1 halves the side exactly and sees every pixel evenly
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.GELU()]
            in_channels = out_channels
        self.convs = nn.Sequential(*layers)
        side = config.image_size // 2**config.n_down
        self.to_vector = nn.Linear(in_channels * side * side, out_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_vector(self.convs(images).flatten(1))


class Decoder(nn.Module):
    """The encoder in reverse: linear to a small feature map, transposed convs up to pixels."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.side = config.image_size // 2**config.n_down
        self.top_channels = config.width * 2 ** (config.n_down - 1)
        self.from_vector = nn.Linear(config.latent_dim, self.top_channels * self.side * self.side)
        layers, in_channels = [], self.top_channels
        for i in reversed(range(config.n_down)):
            last = i == 0
            out_channels = config.channels if last else config.width * 2 ** (i - 1)
            layers.append(nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.GELU())
            in_channels = out_channels
        self.convs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        features = F.gelu(self.from_vector(z)).view(-1, self.top_channels, self.side, self.side)
        # sigmoid keeps the output a valid pixel value in [0, 1]; it is the mean of p(x|z)
        return torch.sigmoid(self.convs(features))


# --------------------------------------------------------------------------------------
# The pieces of the ELBO
# --------------------------------------------------------------------------------------


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample z ~ N(mean, exp(logvar)) as a differentiable function of mean and logvar.

    Sampling itself has no gradient. Writing z = mean + std * eps with eps ~ N(0, I) moves
    the randomness into eps, which does not depend on the parameters, so gradients flow
    to ``mean`` (dz/dmean = 1) and to ``logvar`` (dz/dlogvar = std * eps / 2).
    """
    std = torch.exp(0.5 * logvar)  # predict log-variance: any real number is a valid output
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in closed form, summed over latent dims: ``[B]``.

    Per dimension KL = 0.5 * (mean^2 + var - 1 - log var): zero only when mean = 0, var = 1.
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def gaussian_reconstruction_loss(images: torch.Tensor, reconstruction: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log p(x|z) for a Gaussian with mean ``reconstruction`` and fixed std ``sigma``: ``[B]``.

    Summed over pixels, in nats, without the constant D * log(sigma * sqrt(2 pi)) (it has no
    gradient and would only shift the curve).
    """
    return (images - reconstruction).pow(2).flatten(1).sum(dim=1) / (2 * sigma**2)


# --------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------


class _ImageModel(nn.Module):
    """What both models share: shape checks, the decoder, a latent size."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)

    def check_images(self, images: torch.Tensor) -> None:
        c = self.config
        expected = (c.channels, c.image_size, c.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"expected images of shape [B, {c.channels}, {c.image_size}, {c.image_size}] "
                f"(a batch of RGB images, values in [0, 1]), got {got}. Resize the images or build "
                f"the model with VAEConfig(image_size=...); add a batch dimension with images[None]."
            )
        if images.numel() and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
            raise ValueError(
                f"expected pixel values in [0, 1], got values in [{images.min().item():.3g}, "
                f"{images.max().item():.3g}]; undo any normalisation (e.g. x * 0.5 + 0.5 for [-1, 1])"
            )

    def check_latents(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"expected latents of shape [B, {self.config.latent_dim}], got {tuple(z.shape)}")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent vectors ``[B, latent_dim]`` -> images ``[B, 3, S, S]`` in [0, 1]."""
        self.check_latents(z)
        return self.decoder(z)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Autoencoder(_ImageModel):
    """A plain autoencoder: deterministic code z = encoder(x), loss = reconstruction only.

    It uses the same Gaussian reconstruction loss as :class:`VAE` so the two are directly
    comparable; its ``kl`` is reported as zero.
    """

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        self.encoder = Encoder(config, config.latent_dim)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> latent codes ``[B, latent_dim]``."""
        self.check_images(images)
        return self.encoder(images)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(images))

    def loss(self, images: torch.Tensor, kl_weight: float = 1.0, generator: torch.Generator | None = None) -> dict:
        """Mean over the batch of the reconstruction loss (nats per image)."""
        reconstruction = gaussian_reconstruction_loss(images, self.reconstruct(images), self.config.pixel_sigma).mean()
        return {"loss": reconstruction, "reconstruction": reconstruction, "kl": torch.zeros_like(reconstruction)}


class VAE(_ImageModel):
    """A variational autoencoder with a diagonal Gaussian posterior and a N(0, I) prior."""

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        # one head, twice as wide: first half the mean, second half the log-variance
        self.encoder = Encoder(config, 2 * config.latent_dim)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (mean, logvar) of q(z|x), each ``[B, latent_dim]``."""
        self.check_images(images)
        mean, logvar = self.encoder(images).chunk(2, dim=-1)
        return mean, logvar

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """One pass of the ELBO: returns (reconstruction from a sampled z, mean, logvar)."""
        mean, logvar = self.encode(images)
        z = reparameterize(mean, logvar, generator)
        return self.decoder(z), mean, logvar

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean (no sampling noise): the model's best single guess."""
        return self.decoder(self.encode(images)[0])

    def loss(self, images: torch.Tensor, kl_weight: float = 1.0, generator: torch.Generator | None = None) -> dict:
        """Negative ELBO, averaged over the batch (nats per image), and its two terms.

        ``kl_weight`` (beta) scales the KL term; 1 is the true ELBO.
        """
        reconstruction, mean, logvar = self(images, generator)
        recon = gaussian_reconstruction_loss(images, reconstruction, self.config.pixel_sigma).mean()
        kl = kl_to_standard_normal(mean, logvar).mean()
        return {"loss": recon + kl_weight * kl, "reconstruction": recon, "kl": kl}

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw z from the prior N(0, I) and decode: ``count`` new images."""
        device = next(self.parameters()).device
        z = torch.randn(count, self.config.latent_dim, generator=generator, device=device)
        return self.decoder(z)


# --------------------------------------------------------------------------------------
# Checkpoints: safetensors (loading runs no code), written atomically
# --------------------------------------------------------------------------------------

_KINDS = {"vae": VAE, "autoencoder": Autoencoder}


def save_vae(
    model: Autoencoder | VAE,
    path: str | Path,
    step: int | None = None,
    dtype: torch.dtype = torch.float32,
    history: dict[str, list[float]] | None = None,
) -> Path:
    """Write the weights and config to ``path``; a crash mid-write never leaves a broken file.

    ``dtype=torch.float16`` halves the size (used for the shipped checkpoint). ``history``
    (the loss curves :func:`train` returns) is stored too, so a loaded model can show how
    it was trained; read it back with :func:`checkpoint_history`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "vae" if isinstance(model, VAE) else "autoencoder"
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    metadata = {"format": "dalle_lesson.vae", "kind": kind, "config": json.dumps(asdict(model.config))}
    if step is not None:
        metadata["step"] = str(step)
    if history is not None:  # 0.1 nat is far below the step-to-step noise; keeps the header small
        metadata["history"] = json.dumps({name: [round(v, 1) for v in values] for name, values in history.items()})
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)  # atomic on POSIX and Windows: readers see old or new, never half
    return path


def checkpoint_metadata(path: str | Path) -> dict:
    """The metadata stored with a checkpoint (kind, config, step) without loading weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def checkpoint_history(path: str | Path) -> dict[str, list[float]]:
    """The training curves stored with a checkpoint (empty if it was saved without them)."""
    return json.loads(checkpoint_metadata(path).get("history", "{}"))


def load_vae(path: str | Path | None = None, device: str | torch.device = "cpu") -> Autoencoder | VAE:
    """Load a model written by :func:`save_vae` (``None`` = the shipped lesson VAE), in eval mode."""
    from safetensors.torch import load_file

    if path is None:
        from dalle_lesson.data import shipped_path

        path = shipped_path("vae_lesson.safetensors")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `dalle-lesson train vae --out {path}`")
    metadata = checkpoint_metadata(path)
    if metadata.get("format") != "dalle_lesson.vae" or metadata.get("kind") not in _KINDS:
        raise ValueError(f"{path} is not a dalle_lesson VAE checkpoint (metadata: {metadata})")
    model = _KINDS[metadata["kind"]](VAEConfig(**json.loads(metadata["config"])))
    state = {name: t.float() for name, t in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def shapes_images(count: int, image_size: int = 32, split: str = "train", seed: int = 0) -> torch.Tensor:
    """Render ``count`` shapes images once into one ``[count, 3, S, S]`` tensor (fast to batch)."""
    from dalle_lesson.data import ShapesDataset

    dataset = ShapesDataset(length=count, image_size=image_size, split=split, seed=seed)
    return torch.stack([dataset[i][0] for i in range(count)])


def train(
    model: Autoencoder | VAE,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1.0,
    checkpoint: str | Path | None = None,
    save_every: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train on random mini-batches of ``images`` with Adam; returns the per-step history.

    The history has ``loss``, ``reconstruction`` and ``kl`` (nats per image). With a
    ``checkpoint`` path the model is saved every ``save_every`` steps and at the end. A
    non-finite loss stops training with ``FloatingPointError`` *before* the bad step
    touches the weights or the file, so the last checkpoint on disk is a good one.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    model.check_images(images[:1])
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)  # picks batches (and on CPU, the VAE's noise)
    noise_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # cosine decay to 10%: big steps early, then settle (helps the short lesson runs most)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    history: dict[str, list[float]] = {"loss": [], "reconstruction": [], "kl": []}
    on_disk = f"the last good checkpoint {checkpoint} is intact" if checkpoint else "no checkpoint was being written"
    model.train()
    bar = tqdm(range(1, steps + 1), desc=f"train {type(model).__name__}", disable=not progress)
    for step in bar:
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)].to(device)
        terms = model.loss(batch, kl_weight=kl_weight, generator=noise_generator)
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(
                f"loss became {terms['loss'].item()} at step {step}; training stopped ({on_disk}). "
                "Try a smaller learning rate, or check the images for NaNs."
            )
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        # a finite loss can still give infinite gradients; one such step would poison the weights
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(
                f"gradient norm became {grad_norm.item()} at step {step}; training stopped before the "
                f"update ({on_disk}). Try a smaller learning rate."
            )
        optimizer.step()
        schedule.step()
        for name in history:
            history[name].append(terms[name].item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{history['loss'][-1]:.1f}", kl=f"{history['kl'][-1]:.1f}")
        if checkpoint and (step % save_every == 0 or step == steps):
            save_vae(model, checkpoint, step=step, history=history)
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: Autoencoder | VAE, images: torch.Tensor, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Mean loss terms (nats per image) over ``images``, with a fixed seed for the VAE's noise."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    totals = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        terms = model.loss(batch, generator=generator)
        for name in totals:
            totals[name] += terms[name].item() * len(batch)
    return {name: total / len(images) for name, total in totals.items()}


# --------------------------------------------------------------------------------------
# dalle-lesson train vae ...
# --------------------------------------------------------------------------------------


def _train_command(args: argparse.Namespace) -> None:
    from dalle_lesson.cli import make_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = VAEConfig(image_size=args.image_size, latent_dim=args.latent_dim, width=args.width, pixel_sigma=args.pixel_sigma)
    model = (Autoencoder if args.autoencoder else VAE)(config).to(args.device)
    dataset = make_dataset(args.dataset, args.image_size, "train", args.folder, length=args.train_images)
    count = min(args.train_images, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(count)])
    print(f"{type(model).__name__}: {model.num_parameters():,} parameters, {count} {args.dataset} images, {args.steps} steps")
    history = train(model, images, args.steps, args.batch_size, args.lr, args.kl_weight, args.out, args.save_every, args.seed)
    if args.fp16:  # rewrite the final checkpoint at half size (what data/ ships)
        save_vae(model, args.out, step=args.steps, dtype=torch.float16, history=history)
    tail = slice(-min(100, len(history["loss"])), None)
    mean = {name: sum(values[tail]) / len(values[tail]) for name, values in history.items()}
    print(f"last {len(history['loss'][tail])} steps: loss {mean['loss']:.1f} = reconstruction {mean['reconstruction']:.1f} + KL {mean['kl']:.1f} nats/image")
    print(f"saved {args.out}")


def add_train_command(subparsers) -> None:
    """Add ``dalle-lesson train vae`` to the CLI's ``train`` sub-commands."""
    from dalle_lesson.cli import add_dataset_arguments

    parser = subparsers.add_parser("vae", help="train the lesson-01 VAE (or a plain autoencoder)")
    add_dataset_arguments(parser, image_size=32)
    parser.add_argument("--autoencoder", action="store_true", help="train a plain autoencoder instead of a VAE")
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv layer")
    parser.add_argument("--pixel-sigma", type=float, default=0.1, help="std of the Gaussian likelihood")
    parser.add_argument("--kl-weight", type=float, default=1.0, help="beta; 1 = the true ELBO")
    parser.add_argument("--train-images", type=int, default=20_000, help="images rendered once and batched from")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="store the final weights in float16 (half the size)")
    parser.add_argument("--out", default="vae.safetensors")
    parser.set_defaults(run=_train_command)
