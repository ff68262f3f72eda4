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

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_lesson import checkpoint

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

    kind, config_class = "autoencoder", VAEConfig  # how its checkpoints are named and rebuilt

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

    kind, config_class = "vae", VAEConfig

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
# Checkpoints (dalle_lesson.checkpoint: safetensors, written atomically) and data
# --------------------------------------------------------------------------------------


def save_vae(model: Autoencoder | VAE, path: str | Path, dtype: torch.dtype = torch.float32, **metadata) -> Path:
    """Write the model to ``path`` (``dtype=torch.float16`` halves the file)."""
    return checkpoint.save(model, path, dtype=dtype, **metadata)


def load_vae(path: str | Path | None = None, device: str | torch.device = "cpu") -> Autoencoder | VAE:
    """Load a VAE or autoencoder checkpoint (``None`` = the shipped lesson VAE), in eval mode."""
    from dalle_lesson.data import shipped_path

    return checkpoint.load(path or shipped_path("vae_lesson.safetensors"), (VAE, Autoencoder), device)


def checkpoint_history(path: str | Path) -> dict[str, list[float]]:
    """The training curves stored with a checkpoint: ``{"loss": [...], "kl": [...], ...}``
    (one value per logged step; empty if the file has no log)."""
    log = checkpoint.read_metadata(path).get("log") or []
    return {name: [row[name] for row in log] for name in ("step", "loss", "reconstruction", "kl") if log and name in log[0]}


def shapes_images(count: int, image_size: int = 32, split: str = "train", seed: int = 0) -> torch.Tensor:
    """Render ``count`` shapes images once into one ``[count, 3, S, S]`` tensor (fast to batch)."""
    from dalle_lesson.data import ShapesDataset

    dataset = ShapesDataset(length=count, image_size=image_size, split=split, seed=seed)
    return torch.stack([dataset[i][0] for i in range(count)])


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
