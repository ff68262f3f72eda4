"""The VQ-VAE: the other way to get discrete codes, shown beside DALL·E's dVAE.

Instead of predicting a distribution over codes (dVAE), the VQ-VAE encoder outputs a
*vector* per grid cell, and the code is the index of the **nearest** vector in a learned
codebook. Nearest-neighbour lookup has no gradient, so the decoder's gradient is copied
straight through to the encoder output (``z + (z_q - z).detach()``). Two extra terms train
the codebook: the **codebook loss** pulls each chosen codebook vector towards the encoder
output, and the **commitment loss** keeps the encoder output close to its code.

To compare like with like, the encoder and decoder are the same networks as the dVAE's
(:mod:`dalle_lesson.dvae`); only the bottleneck differs: ``embedding_dim`` channels in and
out instead of ``vocab_size`` logits and one-hot codes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle_lesson import checkpoint
from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, Decoder, Encoder


@dataclass
class VQVAEConfig(DVAEConfig):
    """The dVAE's sizes, plus the codebook's vector size and the commitment weight."""

    embedding_dim: int = 32
    commitment_weight: float = 0.25
    likelihood: str = "mse"  # the VQ-VAE's reconstruction loss is squared error


@dataclass
class VQVAEOutput:
    loss: torch.Tensor  # reconstruction + codebook + commitment_weight * commitment
    reconstruction_loss: torch.Tensor  # mean squared error per pixel value
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    images: torch.Tensor  # reconstructions in [0, 1]
    codes: torch.Tensor  # LongTensor[B, h, w]


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for every vector: ``z [N, D]``, ``codebook [K, D]`` -> ``[N]``.

    ``|z - e|^2 = |z|^2 - 2 z.e + |e|^2``; the ``|z|^2`` term is the same for every code, so it is dropped.
    """
    distances = -2 * z @ codebook.t() + (codebook**2).sum(1)
    return distances.argmin(1)


class VQVAE(nn.Module):
    """A VQ-VAE with the dVAE's encoder and decoder and a ``vocab_size`` x ``embedding_dim`` codebook.

    ``VQVAE(DVAEConfig.lesson(), embedding_dim=32)`` takes the lesson dVAE's networks.
    """

    kind, config_class = "vqvae", VQVAEConfig  # how its checkpoints are named and rebuilt

    def __init__(self, config: DVAEConfig | None = None, embedding_dim: int | None = None,
                 commitment_weight: float | None = None):
        super().__init__()
        sizes = asdict(config or DVAEConfig.lesson())
        sizes.update({k: v for k, v in (("embedding_dim", embedding_dim), ("commitment_weight", commitment_weight))
                      if v is not None})
        self.config = VQVAEConfig(**{**sizes, "likelihood": "mse"})
        embedding_dim, self.commitment_weight = self.config.embedding_dim, self.config.commitment_weight
        self.embedding_dim = embedding_dim
        bottleneck = replace(self.config, vocab_size=embedding_dim)  # vector channels instead of logits
        self.encoder = Encoder(bottleneck)
        self.decoder = Decoder(bottleneck)
        self.codebook = nn.Embedding(self.config.vocab_size, embedding_dim)
        nn.init.uniform_(self.codebook.weight, -1 / self.config.vocab_size, 1 / self.config.vocab_size)

    # The input checks are the dVAE's.
    check_images = DiscreteVAE.check_images
    check_codes = DiscreteVAE.check_codes

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output ``[B, D, h, w]`` -> (codes ``[B, h, w]``, codebook vectors ``[B, D, h, w]``)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = nearest_codes(flat, self.codebook.weight).view(b, h, w)
        return codes, self.codebook(codes).permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        self.check_images(images)
        z = self.encoder(images.float())
        codes, z_q = self.quantize(z)
        codebook_loss = F.mse_loss(z_q, z.detach())  # moves the codes towards the encoder outputs
        commitment_loss = F.mse_loss(z, z_q.detach())  # keeps the encoder near its codes
        z_st = z + (z_q - z).detach()  # straight-through: forward uses z_q, backward copies the gradient to z
        reconstruction = torch.sigmoid(self.decoder(z_st)[:, : self.config.channels])
        reconstruction_loss = F.mse_loss(reconstruction, images.float())
        loss = reconstruction_loss + codebook_loss + self.commitment_weight * commitment_loss
        return VQVAEOutput(loss, reconstruction_loss, codebook_loss, commitment_loss, reconstruction, codes)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, S, S]`` in [0, 1] -> codes ``LongTensor[B, h, w]`` (nearest codebook vectors)."""
        self.check_images(images)
        return self.quantize(self.encoder(images.float()))[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``LongTensor[B, h, w]`` -> images ``[B, C, S, S]`` in [0, 1]."""
        self.check_codes(codes)
        z_q = self.codebook(codes.long()).permute(0, 3, 1, 2)
        return torch.sigmoid(self.decoder(z_q)[:, : self.config.channels])


def training_loss(model: VQVAE, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The VQ-VAE's loss and its terms, for uint8 (0..255) or [0, 1] images; also how many
    distinct codes the batch used (it falls when the codebook collapses)."""
    images = images.float() / 255 if images.dtype == torch.uint8 else images
    out = model(images)
    return {"loss": out.loss, "reconstruction": out.reconstruction_loss, "codebook": out.codebook_loss,
            "commitment": out.commitment_loss, "codes_in_batch": torch.tensor(float(out.codes.unique().numel()))}


# --------------------------------------------------------------------------------------
# Checkpoints (dalle_lesson.checkpoint: safetensors, written atomically)
# --------------------------------------------------------------------------------------


def save_vqvae(model: VQVAE, path: str | Path, dtype: torch.dtype = torch.float16, **metadata) -> Path:
    """Write the weights (fp16 by default) and the config."""
    return checkpoint.save(model, path, dtype=dtype, **metadata)


def load_vqvae(path: str | Path | None = None, device: str | torch.device = "cpu") -> VQVAE:
    """Load a VQ-VAE checkpoint; ``None`` loads the shipped lesson VQ-VAE."""
    from dalle_lesson.data import shipped_path

    return checkpoint.load(path or shipped_path("vqvae_lesson.safetensors"), VQVAE, device)
