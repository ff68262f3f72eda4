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
:func:`load_openai_dvae` can read OpenAI's weights directly.

Presets: :meth:`DVAEConfig.lesson` (32x32 shapes -> 8x8 codes from 512, trains on a CPU) and
:meth:`DVAEConfig.paper` (256x256 -> 32x32 codes from 8192).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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

    @classmethod
    def lesson(cls) -> "DVAEConfig":
        """32x32 shapes -> 8x8 codes from a 512-code vocabulary; trains on one CPU core.

        Squared error instead of the logit-Laplace likelihood: on a short CPU budget it reaches
        a higher PSNR (the lesson compares both).
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
# Saving and loading (safetensors: no code ever runs when loading)
# --------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "dalle_lesson.dvae/1"


def save_dvae(model: DiscreteVAE, path: str | Path, half: bool = True, extra: dict | None = None) -> Path:
    """Write the weights (fp16 by default) and the config atomically: a temp file, then os.replace."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: (t.half() if half and t.is_floating_point() else t).contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(model.config))}
    metadata.update({key: json.dumps(value) for key, value in (extra or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_checkpoint_metadata(path: str | Path) -> dict:
    """The metadata of a dVAE checkpoint, JSON values decoded (config, step, train_seconds, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return {key: (json.loads(value) if key != "format" else value) for key, value in raw.items()}


def load_dvae(path: str | Path | None = None, device: str | torch.device = "cpu") -> DiscreteVAE:
    """Load a dVAE saved by :func:`save_dvae`; ``None`` loads the shipped lesson dVAE.

    Weights are stored in fp16 and come back as fp32. The model is returned in eval mode.
    """
    from safetensors.torch import load_file

    if path is None:
        from dalle_lesson.data import shipped_path

        path = shipped_path("dvae_lesson.safetensors")
    metadata = read_checkpoint_metadata(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dalle_lesson dVAE checkpoint (metadata format {metadata.get('format')!r})")
    model = DiscreteVAE(DVAEConfig(**metadata["config"]))
    state = {name: t.float() for name, t in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------
# OpenAI's released weights (the ``dall_e`` package), read without running its code
# --------------------------------------------------------------------------------------

# Every global a pickled ``dall_e`` Encoder or Decoder may name. Each is replaced by an inert
# stand-in class that only stores the pickled attributes, so nothing from the file runs:
# torch.load(weights_only=True) refuses any other global (os.system, eval, ...).
_DALL_E_CLASSES = (
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock", "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.linear.Identity",
    "torch.nn.modules.upsampling.Upsample",
)


class _PickledModule:
    """Inert stand-in for a pickled ``nn.Module``: it only keeps the pickled ``__dict__``."""


def _stand_ins() -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[1], (_PickledModule,), {"pickled_name": name}), name) for name in _DALL_E_CLASSES]


def _parameters_of(module: _PickledModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """Walk a stand-in module tree and collect its parameters under their dotted names."""
    found = {}
    for name, tensor in (module.__dict__.get("_parameters") or {}).items():
        if tensor is not None:
            found[prefix + name] = tensor
    for name, tensor in (module.__dict__.get("_buffers") or {}).items():
        if tensor is not None:
            found[prefix + name] = tensor
    for name, child in (module.__dict__.get("_modules") or {}).items():
        if child is not None:
            found.update(_parameters_of(child, f"{prefix}{name}."))
    return found


def read_dall_e_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``dall_e`` state dict in ``path``: a saved state dict, or a whole pickled module.

    Uses ``torch.load(weights_only=True)``: a file that names any global outside the
    ``dall_e`` encoder/decoder classes (for example one that would call ``os.system``) is
    refused before anything from it runs.
    """
    import pickle

    with torch.serialization.safe_globals(_stand_ins()):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"refusing to load {path}: it is not a plain dall_e encoder/decoder file (state dict or "
                f"pickled module). Nothing from it was run. The unpickler said: {error}"
            ) from None
    if isinstance(loaded, _PickledModule):
        loaded = _parameters_of(loaded)
    if not isinstance(loaded, dict) or not all(torch.is_tensor(t) for t in loaded.values()):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a dall_e state dict or module")
    return {name: tensor.detach().float() for name, tensor in loaded.items()}


def _count(state: dict, pattern: str) -> int:
    """How many of ``pattern.format(1), pattern.format(2), ...`` prefix some key of ``state``."""
    n = 0
    while any(key.startswith(pattern.format(n + 1)) for key in state):
        n += 1
    return n


def load_openai_dvae(encoder_path: str | Path, decoder_path: str | Path, image_size: int = 256) -> DiscreteVAE:
    """A :class:`DiscreteVAE` with the weights of OpenAI's released ``dall_e`` Encoder and Decoder.

    Each path may hold a state dict (``torch.save(encoder.state_dict())``) or the original
    pickled module (``encoder.pkl``, ``torch.save(encoder)``). The sizes (width, vocabulary,
    groups, blocks) are read from the tensor shapes; the ``dall_e`` package is not needed
    and no code from the files is executed. ``model.logits(x)`` equals
    ``dall_e_encoder(map_pixels(x))`` and ``model.decode(z)`` equals
    ``unmap_pixels(sigmoid(dall_e_decoder(one_hot(z))[:, :3]))``.
    """
    encoder, decoder = read_dall_e_weights(encoder_path), read_dall_e_weights(decoder_path)
    for name, state, key in (("encoder", encoder, "blocks.input.w"), ("decoder", decoder, "blocks.output.conv.w")):
        if key not in state:
            raise ValueError(f"the {name} file has no {key!r}: is it a dall_e {name}? keys: {sorted(state)[:5]}...")
    n_hid, channels = encoder["blocks.input.w"].shape[:2]
    config = DVAEConfig(
        image_size=image_size, channels=channels, vocab_size=encoder["blocks.output.conv.w"].shape[0], n_hid=n_hid,
        n_init=decoder["blocks.input.w"].shape[0], group_count=_count(encoder, "blocks.group_{}."),
        n_blk_per_group=_count(encoder, "blocks.group_1.block_{}."), likelihood="logit_laplace",
    )
    if decoder["blocks.output.conv.w"].shape[:2] != (2 * channels, n_hid) or decoder["blocks.input.w"].shape[1] != config.vocab_size:
        raise ValueError("the encoder and decoder files do not belong together (widths or vocabulary differ)")
    rename = {"w": "weight", "b": "bias"}
    state = {}
    for part, weights in (("encoder", encoder), ("decoder", decoder)):
        for name, tensor in weights.items():
            stem, _, leaf = name.rpartition(".")
            state[f"{part}.{stem}.{rename.get(leaf, leaf)}"] = tensor
    model = DiscreteVAE(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"these files do not match the dall_e layout: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def preload_images(dataset, count: int, image_size: int | None = None) -> torch.Tensor:
    """The first ``count`` images of a dataset as one uint8 tensor ``[count, C, S, S]`` (fast batches)."""
    from tqdm.auto import tqdm

    count = min(count, len(dataset))
    first = dataset[0][0]
    if image_size is not None and first.shape[-1] != image_size:
        raise ValueError(f"the dataset gives {first.shape[-1]}x{first.shape[-1]} images, the model expects {image_size}")
    out = torch.empty((count, *first.shape), dtype=torch.uint8)
    for i in tqdm(range(count), desc="rendering images", leave=False, mininterval=1.0):
        out[i] = (dataset[i][0] * 255).round().to(torch.uint8)
    return out


@dataclass
class TrainSettings:
    """The dVAE training recipe. Defaults are the shipped lesson checkpoint's."""

    steps: int = 3600
    batch_size: int = 32
    lr: float = 2e-3
    lr_end: float = 2e-5  # cosine decay of the learning rate
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    tau_start: float = 1.0
    tau_end: float = 1 / 16
    tau_steps: int | None = None  # anneal tau over this many steps; None: the first two thirds of training
    beta_max: float = 0.01  # the paper's 6.6 is for the logit-Laplace likelihood; squared errors are ~100x smaller
    beta_steps: int | None = None  # raise beta over this many steps; None: the first seventh of training
    hard_from: float = 1.0  # switch to straight-through one-hot codes after this fraction of steps
    grad_clip: float = 1.0
    seed: int = 0


def train_dvae(
    model: DiscreteVAE,
    images: torch.Tensor,
    settings: TrainSettings | None = None,
    checkpoint: str | Path | None = None,
    save_every: int = 500,
    log_path: str | Path | None = None,
    progress: bool = True,
    previous_seconds: float = 0.0,
    previous_steps: int = 0,
    eval_images: torch.Tensor | None = None,
) -> list[dict]:
    """Train ``model`` on ``images`` (uint8 ``[N, C, S, S]``); return the per-step log.

    If the loss becomes NaN or infinite, training stops at once and the checkpoint on disk
    (the last good one) is left untouched. With ``eval_images``, every ``save_every`` steps
    the log also records hard-code PSNR and codebook use on them.
    """
    from tqdm.auto import tqdm

    s = settings or TrainSettings()
    torch.manual_seed(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    tau_steps = s.tau_steps or max(1, 2 * s.steps // 3)
    beta_steps = s.beta_steps or max(1, s.steps // 7)
    history: list[dict] = []
    log_file = open(log_path, "a") if log_path else None
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(s.steps), desc="dVAE", disable=not progress, mininterval=2.0)
    try:
        for step in bar:
            lr = s.lr * min(1.0, (step + 1) / max(s.warmup_steps, 1))
            lr = min(lr, cosine_schedule(step, s.steps, s.lr, s.lr_end)) if step >= s.warmup_steps else lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            tau = cosine_schedule(step, tau_steps, s.tau_start, s.tau_end)
            beta = cosine_schedule(step, beta_steps, 0.0, s.beta_max)
            hard = step >= s.hard_from * s.steps
            batch = images[torch.randint(len(images), (s.batch_size,), generator=generator)].float() / 255
            out = model(batch, tau=tau, beta=beta, hard=hard)
            if not torch.isfinite(out.loss):
                message = f"loss became {out.loss.item()} at step {step}; stopping."
                if checkpoint:
                    message += f" The last good checkpoint is still at {checkpoint}."
                print(message)
                break
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()
            record = {
                "step": step + 1, "loss": out.loss.item(), "reconstruction": out.reconstruction_loss.item(),
                "kl": out.kl.item(), "tau": tau, "beta": beta, "lr": lr,
                "seconds": previous_seconds + time.perf_counter() - start,
            }
            if eval_images is not None and ((step + 1) % save_every == 0 or step + 1 == s.steps):
                record.update({f"eval_{k}": v for k, v in evaluate_dvae(model, eval_images).items()})
                model.train()
                if progress:
                    bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval_")))
            history.append(record)
            if log_file:
                log_file.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.3f}", tau=f"{tau:.3f}", refresh=False)
            if checkpoint and ((step + 1) % save_every == 0 or step + 1 == s.steps):
                save_dvae(model, checkpoint, extra={
                    "step": previous_steps + step + 1, "train_seconds": record["seconds"], "settings": asdict(s),
                })
                if log_file:
                    log_file.flush()
    finally:
        if log_file:
            log_file.close()
        model.eval()
    return history


@torch.no_grad()
def evaluate_dvae(model: DiscreteVAE, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """PSNR of hard-code reconstructions, codebook use and perplexity on float images in [0, 1]."""
    model.eval()
    scores, all_codes = [], []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].float()
        batch = batch / 255 if images.dtype == torch.uint8 else batch
        codes = model.encode(batch)
        scores.append(psnr(model.decode(codes), batch))
        all_codes.append(codes)
    usage = codebook_usage(torch.cat(all_codes), model.config.vocab_size)
    return {"psnr_db": float(torch.cat(scores).mean()), **usage}


# --------------------------------------------------------------------------------------
# Command line: dalle-lesson train dvae --preset lesson ...
# --------------------------------------------------------------------------------------


def _train_command(args: argparse.Namespace) -> None:
    from dalle_lesson.cli import make_dataset

    torch.set_num_threads(args.threads)
    config = PRESETS[args.preset]()
    if args.likelihood:
        config.likelihood = args.likelihood
    if args.image_size:
        config.image_size = args.image_size
    if args.vocab_size:
        config.vocab_size = args.vocab_size
    if args.n_hid:
        config.n_hid = args.n_hid
    config.__post_init__()
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, beta_max=args.beta, beta_steps=args.beta_steps or None,
        tau_end=args.tau_end, tau_steps=args.tau_steps or None, hard_from=args.hard_from, seed=args.seed,
    )
    dataset = make_dataset(args.dataset, config.image_size, "train", args.folder, length=args.train_images)
    images = preload_images(dataset, args.train_images, config.image_size)
    model, previous_seconds, previous_steps = DiscreteVAE(config), 0.0, 0
    if args.init_from:  # continue from a checkpoint (its config wins over the preset)
        model = load_dvae(args.init_from)
        config = model.config
        metadata = read_checkpoint_metadata(args.init_from)
        previous_seconds, previous_steps = metadata.get("train_seconds", 0.0), metadata.get("step", 0)
        print(f"starting from {args.init_from} ({previous_steps} steps, {previous_seconds / 60:.1f} min so far)")
    print(f"dVAE preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{config.image_size}x{config.image_size} -> {config.grid_size}x{config.grid_size} codes of {config.vocab_size}; "
          f"{len(images)} training images")
    held_out = None
    if args.dataset == "shapes":
        held_out = preload_images(make_dataset("shapes", config.image_size, "heldout", length=500), 500)
    train_dvae(model, images, settings, checkpoint=args.out, save_every=args.save_every, log_path=args.log,
               eval_images=held_out, previous_seconds=previous_seconds, previous_steps=previous_steps)
    if held_out is not None:
        print("held-out shapes, saved checkpoint:", evaluate_dvae(load_dvae(args.out), held_out))


def add_train_command(subparsers) -> None:
    """Add ``train dvae`` to the ``dalle-lesson`` command."""
    from dalle_lesson.cli import add_dataset_arguments

    parser = subparsers.add_parser("dvae", help="train the discrete VAE (images -> grids of tokens)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="lesson")
    add_dataset_arguments(parser, image_size=0)
    parser.add_argument("--vocab-size", type=int, default=0, help="override the preset's codebook size")
    parser.add_argument("--n-hid", type=int, default=0, help="override the preset's width")
    parser.add_argument("--likelihood", choices=["logit_laplace", "mse"], default=None,
                        help="override the preset's likelihood (lesson: mse, paper: logit_laplace)")
    defaults = TrainSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--beta", type=float, default=defaults.beta_max, help="final KL weight")
    parser.add_argument("--beta-steps", type=int, default=0,
                        help="raise the KL weight over this many steps (default: a seventh of --steps)")
    parser.add_argument("--tau-end", type=float, default=defaults.tau_end)
    parser.add_argument("--tau-steps", type=int, default=0,
                        help="anneal the temperature over this many steps (default: two thirds of --steps)")
    parser.add_argument("--hard-from", type=float, default=defaults.hard_from,
                        help="fraction of training after which codes are straight-through one-hot")
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--out", default="dvae.safetensors")
    parser.add_argument("--init-from", default=None, help="continue training the dVAE in this checkpoint")
    parser.add_argument("--log", default=None, help="append one JSON line per step here")
    parser.set_defaults(run=_train_command)
