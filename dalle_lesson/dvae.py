"""The discrete VAE: stage one of DALL·E, which turns an image into a grid of tokens.

The encoder maps an image to a grid of *logits* over a vocabulary of codes (8192 in the
paper); the token at each grid cell is the argmax. The decoder maps a grid of codes (one-hot
vectors, or during training soft relaxed ones) back to pixels.

Codes are discrete, so gradients cannot flow through ``argmax``. DALL·E trains with the
**Gumbel-softmax relaxation**: add Gumbel noise to the logits and take a softmax at a
temperature ``tau`` instead of an argmax. As ``tau`` falls towards 0 the samples become
one-hot. The loss is an ELBO: the reconstruction negative log-likelihood of the pixels under
a **logit-Laplace** distribution, plus ``beta`` times the KL divergence from the encoder's
softmax to a **uniform prior** over codes.

The network is the one OpenAI released in the ``dall_e`` package, written out again here:
groups of residual blocks, a 7x7 input convolution, max-pool between encoder groups,
nearest-neighbour up-sampling between decoder groups, 1x1 convolutions at the bottleneck,
and every residual branch scaled by ``1 / n_layers**2``. The module names follow the
released ones (``blocks.group_1.block_1.res_path.conv_1``...) so that
:func:`dalle_lesson.openai_dvae.load_openai_dvae` can read OpenAI's weights directly.

Presets: :meth:`DVAEConfig.lesson` (32x32 shapes -> 8x8 codes from 512, trains on a CPU) and
:meth:`DVAEConfig.paper` (256x256 -> 32x32 codes from 8192). The shipped lesson dVAE is the
lesson preset with a 16x16 grid and width 48 (``--grid-size 16 --n-hid 48``): at 8x8 small
shapes lose their outlines (lesson 02 and data/README.md give the measurements).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle_lesson import checkpoint

LOGIT_LAPLACE_EPS = 0.1  # the paper's epsilon: pixels live in [eps, 1 - eps]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class DVAEConfig:
    """Shape of a discrete VAE. ``group_count - 1`` halvings take the image to the code grid."""

    image_size: int = 256
    channels: int = 3
    vocab_size: int = 8192
    n_hid: int = 256  # width of the first encoder group (and the last decoder group)
    n_init: int = 128  # width of the decoder right after its 1x1 input convolution
    group_count: int = 4
    n_blk_per_group: int = 2
    likelihood: str = "logit_laplace"  # or "mse", the simple alternative

    def __post_init__(self) -> None:
        if self.likelihood not in ("logit_laplace", "mse"):
            raise ValueError(f"likelihood must be 'logit_laplace' or 'mse', got {self.likelihood!r}")
        if self.group_count < 1 or self.image_size % self.downsample != 0:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**(group_count - 1) = {self.downsample}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def grid_size(self) -> int:
        """Side of the grid of codes (32 in the paper, 8 in the lesson)."""
        return self.image_size // self.downsample

    @staticmethod
    def group_count_for(image_size: int, grid_size: int) -> int:
        """The ``group_count`` that turns ``image_size`` pixels into a ``grid_size`` grid: every
        encoder group but the last halves the image. ``DVAEConfig.group_count_for(32, 16) == 2``."""
        halvings = (image_size // grid_size).bit_length() - 1 if 1 <= grid_size <= image_size else -1
        if halvings < 0 or grid_size * 2**halvings != image_size:
            raise ValueError(f"grid size {grid_size} must be the image size {image_size} divided by a power "
                             f"of two (e.g. {image_size // 2} or {image_size // 4})")
        return halvings + 1

    @classmethod
    def lesson(cls) -> "DVAEConfig":
        """32x32 shapes -> 8x8 codes from a 512-code vocabulary; trains on one CPU core.

        Squared error instead of the logit-Laplace likelihood: on a short CPU budget it reaches
        a higher PSNR (the lesson compares both). The shipped checkpoint overrides two sizes:
        ``DVAEConfig(**{**asdict(DVAEConfig.lesson()), "group_count": 2, "n_hid": 48})``
        draws a 16x16 grid, which keeps small shapes.
        """
        return cls(image_size=32, vocab_size=512, n_hid=32, n_init=64, group_count=3, n_blk_per_group=1,
                   likelihood="mse")

    @classmethod
    def paper(cls) -> "DVAEConfig":
        """The released DALL·E dVAE: 256x256 -> 32x32 codes from 8192."""
        return cls(image_size=256, vocab_size=8192, n_hid=256, n_init=128, group_count=4, n_blk_per_group=2)


PRESETS = {"lesson": DVAEConfig.lesson, "paper": DVAEConfig.paper}


# --------------------------------------------------------------------------------------
# The network (same layout and names as OpenAI's dall_e package)
# --------------------------------------------------------------------------------------


def conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    """A 'same' convolution initialised as in dall_e: normal weights with std 1/sqrt(fan_in), zero bias."""
    layer = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(layer.weight, std=1 / math.sqrt(n_in * kernel**2))
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``: a bottleneck residual block.

    The residual branch is scaled by ``1 / n_layers**2`` so that at initialisation the whole
    stack of blocks is close to the identity, which keeps deep stacks trainable.
    The encoder's branch uses kernels (3, 3, 3, 1), the decoder's (1, 3, 3, 3).
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, kernel in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", conv(widths[i], widths[i + 1], kernel))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """Pixels (mapped to [eps, 1-eps]) -> logits ``[B, vocab_size, h, w]``."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        c = config
        n_layers = c.group_count * c.n_blk_per_group
        widths = [c.n_hid * 2**g for g in range(c.group_count)]  # 1, 2, 4, 8 x n_hid in the paper
        blocks: list = [("input", conv(c.channels, c.n_hid, 7))]
        n_in = c.n_hid
        for g, width in enumerate(widths):
            group = []
            for b in range(c.n_blk_per_group):
                group.append((f"block_{b + 1}", ResBlock(n_in, width, n_layers, (3, 3, 3, 1))))
                n_in = width
            if g < c.group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        blocks.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", conv(n_in, c.vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Codes as (relaxed) one-hot vectors ``[B, vocab_size, h, w]`` -> ``2 * channels`` maps.

    The first ``channels`` outputs are the logit-Laplace location mu (the image after a
    sigmoid), the other ``channels`` are ln b, the log of its scale.
    """

    def __init__(self, config: DVAEConfig):
        super().__init__()
        c = config
        n_layers = c.group_count * c.n_blk_per_group
        widths = [c.n_hid * 2**g for g in reversed(range(c.group_count))]  # 8, 4, 2, 1 x n_hid
        # The 1x1 input convolution of a one-hot vector is a lookup table: one column per code.
        blocks: list = [("input", conv(c.vocab_size, c.n_init, 1))]
        n_in = c.n_init
        for g, width in enumerate(widths):
            group = []
            for b in range(c.n_blk_per_group):
                group.append((f"block_{b + 1}", ResBlock(n_in, width, n_layers, (1, 3, 3, 3))))
                n_in = width
            if g < c.group_count - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        blocks.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", conv(n_in, 2 * c.channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Same as ``forward(one_hot(codes))`` but looks the codes up instead of multiplying by zeros."""
        table = self.blocks.input.weight[:, :, 0, 0]  # [n_init, vocab]
        x = F.embedding(codes, table.t()) + self.blocks.input.bias  # [B, h, w, n_init]
        x = x.permute(0, 3, 1, 2)
        for name, block in self.blocks.named_children():
            if name != "input":
                x = block(x)
        return x


# --------------------------------------------------------------------------------------
# The pieces of the objective
# --------------------------------------------------------------------------------------


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """phi(x) = (1 - 2 eps) x + eps: squeeze [0, 1] into [eps, 1 - eps], away from the poles of logit."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """The inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool = False, dim: int = 1) -> torch.Tensor:
    """A differentiable, approximately one-hot sample from ``softmax(logits)``.

    Gumbel-max: ``argmax(logits + g)`` with ``g = -log(-log(u))``, ``u ~ U(0, 1)``, is an exact
    sample of the categorical. Replacing the argmax by ``softmax(. / tau)`` makes it
    differentiable; as ``tau -> 0`` it approaches the one-hot sample. With ``hard=True`` the
    forward pass uses the one-hot argmax and the backward pass the soft gradient
    (straight-through).
    """
    gumbels = -torch.empty_like(logits).exponential_().log()  # -log(E), E ~ Exp(1), is Gumbel(0, 1)
    soft = F.softmax((logits + gumbels) / tau, dim=dim)
    if not hard:
        return soft
    index = soft.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return one_hot - soft.detach() + soft


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(q || uniform) = sum_k q_k log q_k + log K, per grid cell (same shape as logits minus ``dim``)."""
    log_q = F.log_softmax(logits, dim=dim)
    return (log_q.exp() * log_q).sum(dim) + math.log(logits.shape[dim])


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-value negative log-likelihood of ``x`` in (0, 1) under the logit-Laplace distribution.

    The density is ``1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b)``: a Laplace on the logit
    of x, so its support is (0, 1) like the pixels'. ``x`` must already be mapped by
    :func:`map_pixels`.
    """
    return math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x) + (torch.logit(x) - mu).abs() * torch.exp(-log_b)


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Half a cosine from ``start`` (step 0) to ``end`` (step >= total_steps)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@dataclass
class DVAEOutput:
    loss: torch.Tensor  # what is minimised: reconstruction + beta * KL, per pixel value
    reconstruction_loss: torch.Tensor  # NLL (or squared error) per pixel value
    kl: torch.Tensor  # KL to the uniform prior, summed over grid cells, per pixel value
    images: torch.Tensor  # the reconstructions in [0, 1] (from the relaxed codes)
    logits: torch.Tensor  # encoder logits [B, vocab, h, w]


class DiscreteVAE(nn.Module):
    """DALL·E's discrete VAE. ``encode`` gives token grids, ``decode`` gives images back."""

    kind, config_class = "dvae", DVAEConfig  # how its checkpoints are named and rebuilt

    def __init__(self, config: DVAEConfig | None = None):
        super().__init__()
        self.config = config or DVAEConfig.lesson()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    # ---- checking inputs ------------------------------------------------------------

    def check_images(self, images: torch.Tensor) -> None:
        c = self.config
        expected = f"[batch, {c.channels}, {c.image_size}, {c.image_size}]"
        if not torch.is_tensor(images) or images.dim() != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"expected images of shape {expected} with values in [0, 1], got {shape}")
        if images.shape[1] != c.channels or images.shape[2] != c.image_size or images.shape[3] != c.image_size:
            raise ValueError(
                f"this dVAE expects images of shape {expected}, got {list(images.shape)}; "
                f"resize to {c.image_size}x{c.image_size} with {c.channels} channels first"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}")

    @staticmethod
    def check_pixel_range(images: torch.Tensor) -> None:
        """Refuse pixels outside [0, 1] (0..255, -1..1, NaN). Called by :meth:`encode`, not in the
        training step: reading the min and max waits for the device every time."""
        if images.numel() and images.device.type != "meta":
            low, high = images.min().item(), images.max().item()  # NaN makes both NaN
            if not (0.0 <= low and high <= 1.0):
                raise ValueError(
                    f"images must have values in [0, 1], got values from {low:.4g} to {high:.4g}; divide 0..255 "
                    "images by 255, map -1..1 images with x * 0.5 + 0.5, and check for NaN"
                )

    def check_codes(self, codes: torch.Tensor) -> None:
        c = self.config
        if not torch.is_tensor(codes) or codes.dtype not in (torch.int64, torch.int32) or codes.dim() != 3:
            got = f"{codes.dtype} {list(codes.shape)}" if torch.is_tensor(codes) else type(codes).__name__
            raise ValueError(f"expected codes as a LongTensor[batch, {c.grid_size}, {c.grid_size}], got {got}")
        if codes.shape[1] != c.grid_size or codes.shape[2] != c.grid_size:
            raise ValueError(f"expected a {c.grid_size}x{c.grid_size} grid of codes, got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= c.vocab_size):
            raise ValueError(
                f"codes must lie in [0, {c.vocab_size - 1}] (the vocabulary size is {c.vocab_size}), "
                f"got values from {int(codes.min())} to {int(codes.max())}"
            )

    # ---- the public API ---------------------------------------------------------------

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder logits ``[B, vocab_size, h, w]`` for images in [0, 1]."""
        self.check_images(images)
        return self.encoder(map_pixels(images.float()))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, S, S]`` in [0, 1] -> codes ``LongTensor[B, h, w]`` (argmax of the logits)."""
        self.check_pixel_range(images)
        return self.logits(images).argmax(dim=1)

    def stats_to_images(self, stats: torch.Tensor) -> torch.Tensor:
        """The decoder's ``2C`` output maps -> images in [0, 1] (the location mu, via a sigmoid)."""
        mu = stats[:, : self.config.channels]
        if self.config.likelihood == "logit_laplace":
            return unmap_pixels(torch.sigmoid(mu))
        return torch.sigmoid(mu)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``LongTensor[B, h, w]`` -> images ``[B, C, S, S]`` in [0, 1]."""
        self.check_codes(codes)
        return self.stats_to_images(self.decoder.forward_codes(codes.long()))

    def decode_soft(self, code_probs: torch.Tensor) -> torch.Tensor:
        """Soft (relaxed) codes ``[B, vocab_size, h, w]`` -> images in [0, 1]."""
        return self.stats_to_images(self.decoder(code_probs))

    def forward(self, images: torch.Tensor, tau: float = 1.0, beta: float = 0.0, hard: bool = False) -> DVAEOutput:
        """One ELBO evaluation with Gumbel-softmax codes at temperature ``tau``."""
        logits = self.logits(images)
        codes = gumbel_softmax(logits, tau, hard=hard, dim=1)
        stats = self.decoder(codes)
        c = self.config
        if c.likelihood == "logit_laplace":
            mu, log_b = stats[:, : c.channels], stats[:, c.channels :]
            reconstruction_loss = logit_laplace_nll(map_pixels(images.float()), mu, log_b).mean()
        else:
            reconstruction_loss = F.mse_loss(torch.sigmoid(stats[:, : c.channels]), images.float())
        # The paper divides the whole ELBO by the number of pixel values (256*256*3).
        values_per_image = c.channels * c.image_size**2
        kl = kl_to_uniform(logits).sum(dim=(1, 2)).mean() / values_per_image
        return DVAEOutput(reconstruction_loss + beta * kl, reconstruction_loss, kl, self.stats_to_images(stats), logits)


# --------------------------------------------------------------------------------------
# Measuring a tokenizer: PSNR, codebook use, perplexity
# --------------------------------------------------------------------------------------


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for values in [0, 1]."""
    mse = ((images.float() - reference.float()) ** 2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def codebook_usage(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """How many codes are in use, and the perplexity exp(H) of their frequencies."""
    counts = torch.bincount(codes.flatten(), minlength=vocab_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"fraction_used": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}


# --------------------------------------------------------------------------------------
# The training objective over time: temperature and KL-weight schedules
# --------------------------------------------------------------------------------------


@dataclass
class DVAESchedule:
    """How tau and beta move during training (the paper: tau 1 -> 1/16, beta 0 -> 6.6, cosine).

    ``tau_steps`` / ``beta_steps``: how long each anneals (None: two thirds and one seventh
    of the run). After ``hard_from`` (a fraction of the run) the codes are straight-through
    one-hot. The defaults are the shipped lesson checkpoint's, except that it used ``hard_from=0.5``.
    """

    tau_start: float = 1.0
    tau_end: float = 1 / 16
    tau_steps: int | None = None
    beta_max: float = 0.01  # the paper's 6.6 is for the logit-Laplace likelihood; squared errors are ~100x smaller
    beta_steps: int | None = None
    hard_from: float = 1.0

    def at(self, step: int, total_steps: int) -> tuple[float, float, bool]:
        """(tau, beta, hard) at ``step`` of a run of ``total_steps``.

        >>> DVAESchedule(beta_max=1.0, beta_steps=10).at(10, 100)[1]
        1.0
        """
        tau = cosine_schedule(step, self.tau_steps or max(1, 2 * total_steps // 3), self.tau_start, self.tau_end)
        beta = cosine_schedule(step, self.beta_steps or max(1, total_steps // 7), 0.0, self.beta_max)
        return tau, beta, step >= self.hard_from * total_steps


def training_loss(model: DiscreteVAE, images: torch.Tensor, step: int, total_steps: int,
                  schedule: DVAESchedule) -> dict[str, torch.Tensor]:
    """One training loss at ``step``: the ELBO at that step's tau and beta, and its terms.

    ``images`` may be uint8 (0..255, as preloaded for speed) or float in [0, 1].
    """
    images = images.float() / 255 if images.dtype == torch.uint8 else images
    tau, beta, hard = schedule.at(step, total_steps)
    out = model(images, tau=tau, beta=beta, hard=hard)
    return {"loss": out.loss, "reconstruction": out.reconstruction_loss, "kl": out.kl,
            "tau": torch.tensor(tau), "beta": torch.tensor(beta)}


@torch.no_grad()
def evaluate_dvae(model: DiscreteVAE, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """PSNR of hard-code reconstructions, codebook use and perplexity (uint8 or [0, 1] images)."""
    was_training = model.training
    model.eval()
    scores, all_codes = [], []
    device = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].to(device).float()
        batch = batch / 255 if images.dtype == torch.uint8 else batch
        codes = model.encode(batch)
        scores.append(psnr(model.decode(codes), batch))
        all_codes.append(codes)
    model.train(was_training)
    usage = codebook_usage(torch.cat(all_codes), model.config.vocab_size)
    return {"psnr_db": float(torch.cat(scores).mean()), **usage}


# --------------------------------------------------------------------------------------
# Saving and loading (dalle_lesson.checkpoint: safetensors, no code runs when loading)
# --------------------------------------------------------------------------------------


def save_dvae(model: DiscreteVAE, path: str | Path, dtype: torch.dtype = torch.float16, **metadata) -> Path:
    """Write the weights (fp16 by default: half the size, PSNR unchanged) and the config."""
    return checkpoint.save(model, path, dtype=dtype, **metadata)


def load_dvae(path: str | Path | None = None, device: str | torch.device = "cpu") -> DiscreteVAE:
    """Load a dVAE checkpoint (``None``: the shipped lesson dVAE) in fp32 and eval mode."""
    from dalle_lesson.data import shipped_path

    return checkpoint.load(path or shipped_path("dvae_lesson.safetensors"), DiscreteVAE, device)
