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

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, Decoder, Encoder, cosine_schedule


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
    """A VQ-VAE with the dVAE's encoder and decoder and a ``vocab_size`` x ``embedding_dim`` codebook."""

    def __init__(self, config: DVAEConfig | None = None, embedding_dim: int = 32, commitment_weight: float = 0.25):
        super().__init__()
        self.config = replace(config or DVAEConfig.lesson(), likelihood="mse")
        self.embedding_dim, self.commitment_weight = embedding_dim, commitment_weight
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


def train_vqvae(model: VQVAE, images: torch.Tensor, steps: int = 300, batch_size: int = 32, lr: float = 2e-3,
                seed: int = 0, progress: bool = True, checkpoint: str | Path | None = None,
                save_every: int = 500) -> list[dict]:
    """Train on uint8 images ``[N, C, S, S]`` with Adam and a cosine learning rate; return the log.

    With ``checkpoint``, the model is saved there every ``save_every`` steps and at the end.
    A NaN or infinite loss stops training at once, leaving the last good checkpoint as it was.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc="VQ-VAE", disable=not progress, mininterval=2.0):
        for group in optimizer.param_groups:
            group["lr"] = cosine_schedule(step, steps, lr, lr / 100)
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)].float() / 255
        out = model(batch)
        if not torch.isfinite(out.loss):
            kept = f" The last good checkpoint is still at {checkpoint}." if checkpoint else ""
            print(f"loss became {out.loss.item()} at step {step}; stopping.{kept}")
            break
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        history.append({"step": step + 1, "loss": out.loss.item(), "reconstruction": out.reconstruction_loss.item(),
                        "codebook": out.codebook_loss.item(), "commitment": out.commitment_loss.item(),
                        "codes_in_batch": out.codes.unique().numel(), "seconds": time.perf_counter() - start})
        if checkpoint and ((step + 1) % save_every == 0 or step + 1 == steps):
            settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
            save_vqvae(model, checkpoint, extra={"step": step + 1, "train_seconds": history[-1]["seconds"],
                                                 "settings": settings})
            model.train()
    model.eval()
    return history


# --------------------------------------------------------------------------------------
# Checkpoints (safetensors, written atomically) and ``dalle-lesson train vqvae``
# --------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "dalle_lesson.vqvae/1"


def save_vqvae(model: VQVAE, path: str | Path, extra: dict | None = None) -> Path:
    """Write the weights (fp16) and the config atomically: a temporary file, then ``os.replace``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.half().contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(model.config)),
                "embedding_dim": json.dumps(model.embedding_dim),
                "commitment_weight": json.dumps(model.commitment_weight)}
    metadata.update({key: json.dumps(value) for key, value in (extra or {}).items()})
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path


def load_vqvae(path: str | Path | None = None, device: str | torch.device = "cpu") -> VQVAE:
    """Load a VQ-VAE saved by :func:`save_vqvae`; ``None`` loads the shipped lesson VQ-VAE."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None:
        from dalle_lesson.data import shipped_path

        path = shipped_path("vqvae_lesson.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dalle_lesson VQ-VAE checkpoint (metadata format "
                         f"{metadata.get('format')!r}); dVAE checkpoints load with dalle_lesson.dvae.load_dvae")
    model = VQVAE(DVAEConfig(**json.loads(metadata["config"])), embedding_dim=json.loads(metadata["embedding_dim"]),
                  commitment_weight=json.loads(metadata["commitment_weight"]))
    model.load_state_dict({name: t.float() for name, t in load_file(str(path)).items()})
    return model.to(device).eval()


def checkpoint_metadata(path: str | Path) -> dict:
    """The metadata of a VQ-VAE checkpoint, JSON values decoded (step, train_seconds, settings, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return {key: (json.loads(value) if key != "format" else value) for key, value in raw.items()}


def _train_command(args: argparse.Namespace) -> None:
    from dalle_lesson.cli import make_dataset
    from dalle_lesson.dvae import evaluate_dvae, preload_images

    torch.set_num_threads(args.threads)
    config = DVAEConfig.lesson()
    images = preload_images(make_dataset(args.dataset, config.image_size, "train", args.folder,
                                         length=args.train_images), args.train_images, config.image_size)
    torch.manual_seed(args.seed)
    model = VQVAE(config, embedding_dim=args.embedding_dim)
    print(f"VQ-VAE with the lesson dVAE's networks: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, {config.vocab_size} codes of dimension {args.embedding_dim}; {len(images)} training images")
    train_vqvae(model, images, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                checkpoint=args.out, save_every=args.save_every)
    if not Path(args.out).exists():  # stopped (NaN loss) before the first save
        raise SystemExit(f"no checkpoint was written to {args.out}; try a lower --lr")
    if args.dataset == "shapes":
        held_out = preload_images(make_dataset("shapes", config.image_size, "heldout", length=500), 500)
        print("held-out shapes, saved checkpoint:", evaluate_dvae(load_vqvae(args.out), held_out))


def add_train_command(subparsers) -> None:
    """Add ``train vqvae`` (lesson 02's comparison model) to the ``dalle-lesson`` command."""
    from dalle_lesson.cli import add_dataset_arguments

    parser = subparsers.add_parser("vqvae", help="train the lesson-02 VQ-VAE (the dVAE's networks, a codebook)")
    add_dataset_arguments(parser, image_size=32)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--out", default="vqvae.safetensors")
    parser.set_defaults(run=_train_command)
