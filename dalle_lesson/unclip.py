"""DALL·E 2's ideas at course size: generate in CLIP's shared space (lesson 08).

DALL·E 2 (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP
Latents", the paper calls it *unCLIP*) turns CLIP around. CLIP maps images and captions
to unit vectors in one space; unCLIP learns to go back from that space to pictures:

    caption --CLIP text encoder--> text vector --prior--> image vector --decoder--> picture

Everything in between is a 128-number vector here (a 1024-number one there), so ideas that
are hard to say about pixels become arithmetic on vectors:

* **retrieval**: the nearest image vectors to a caption's vector are its best pictures,
  the nearest caption vectors to a picture its best descriptions (:func:`retrieve`);
* **interpolation**: walk along the great circle between two pictures' vectors (:func:`slerp`)
  and decode every step;
* **text-diff edits**: turn a picture's vector toward the *difference* between two captions'
  vectors, "a red circle" -> "a blue circle" (:func:`text_diff`).

The course's decoder, :class:`EmbeddingDecoder`, is small and deterministic: a few
convolutions that map an image vector to a grid of the lesson dVAE's codes, trained with
cross-entropy against the codes of the picture the vector came from. One vector stands for
many pictures (CLIP keeps what the caption says, not where the objects sit), and a
deterministic decoder can only draw one of them; trained on the pictures as they are it
learns the *average* over positions, which is an empty canvas. So it is trained on the
codes of the pictures moved so that their objects sit in the middle (:func:`centred`): the
scorer never asks where a picture's objects are, only what they are and how they relate. DALL·E 2's decoder is a
diffusion model instead, which *samples* the details the vector leaves open.

The prior, :class:`EmbeddingPrior`, maps a caption's vector to an image vector. In a
web-scale CLIP a caption's vector is far from its image's (the two encoders fill different
regions of the sphere, the "modality gap"), so DALL·E 2 decodes the prior's vector, not the
caption's. In the course CLIP the gap is small (cosine 0.97 between a picture and its
caption; the prior's prediction 0.99), and lesson 08 measures how little the prior changes.
Ours is a regression (an MLP trained with cosine loss), so it predicts the *mean* image
vector of a caption; DALL·E 2's prior is a diffusion or autoregressive model that samples one.

Example::

    unclip = UnCLIP.load()      # the shipped CLIP, prior, decoder and dVAE
    images = unclip(["a red circle", "a big blue square above a small green star"])   # [2, 3, 32, 32]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dalle_lesson import checkpoint, data, evaluate
from dalle_lesson.clip import CourseCLIP
from dalle_lesson.dvae import DiscreteVAE

# --------------------------------------------------------------------------------------
# Moving around in the shared space
# --------------------------------------------------------------------------------------


def retrieve(queries: torch.Tensor, items: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` items most similar to each query: ``(similarities [Q, k], indices [Q, k])``, best first.

    Both are unit vectors (``[Q, D]`` and ``[N, D]``), so the dot product is the cosine.

    >>> retrieve(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]]), k=2)[1]
    tensor([[2, 1]])
    """
    if queries.shape[-1] != items.shape[-1]:
        raise ValueError(f"queries have {queries.shape[-1]} numbers each but items {items.shape[-1]}: "
                         "embed both with the same CLIP")
    k = min(k, len(items))
    return (queries @ items.T).topk(k, dim=1)


def recall_at_k(indices: torch.Tensor, query_keys: Sequence[str], item_keys: Sequence[str]) -> float:
    """How often one of a query's retrieved items (``indices [Q, k]`` from :func:`retrieve`)
    means the same as the query (equal keys, e.g. ``clip.scene_key``).

    >>> recall_at_k(torch.tensor([[1, 0], [1, 0]]), ["a", "b"], ["a", "c"])
    0.5
    """
    hits = [any(item_keys[j] == key for j in row.tolist()) for row, key in zip(indices, query_keys, strict=True)]
    return sum(hits) / len(hits)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """The point a fraction ``t`` of the way from unit vector ``a`` to ``b`` along the great
    circle (spherical linear interpolation); every point is a unit vector again.

    >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    tensor([0.7071, 0.7071])
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    t = torch.as_tensor(t, dtype=a.dtype)
    angle = torch.acos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))  # [..., 1]
    # sin(angle) > 0 after the clamp; for nearly equal vectors this is nearly linear interpolation
    return (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)


def text_diff(image_vector: torch.Tensor, source_text: torch.Tensor, target_text: torch.Tensor,
              amount: float) -> torch.Tensor:
    """DALL·E 2's text-diff edit: turn ``image_vector`` by ``amount`` (0 = unchanged, 1 = all
    the way) toward the direction from the source caption's vector to the target caption's.

    >>> text_diff(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.0)
    tensor([1., 0.])
    """
    direction = F.normalize(target_text - source_text, dim=-1)
    return slerp(image_vector, direction, amount)


# --------------------------------------------------------------------------------------
# The decoder: image vector -> dVAE codes
# --------------------------------------------------------------------------------------


def border_colour(image: torch.Tensor) -> torch.Tensor:
    """The most common colour ``[C]`` on the edge of an image ``[C, S, S]``: its background.

    >>> border_colour(torch.tensor([[[7, 7, 7], [7, 0, 7], [7, 7, 7]]]))
    tensor([7])
    """
    edge = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)  # [C, 4S]
    colours, counts = edge.T.unique(dim=0, return_counts=True)
    return colours[counts.argmax()]


def centred(images: torch.Tensor, tolerance: int = 24) -> torch.Tensor:
    """Each picture (uint8 ``[N, C, S, S]``) moved by whole pixels so that the bounding box of
    its objects (pixels unlike the border colour by more than ``tolerance`` in some channel)
    sits in the middle; the pixels moved in are background. What the picture shows, and how
    its objects relate, is unchanged; only where they sit.

    >>> centred(torch.tensor([[[[99, 0, 0], [0, 0, 0], [0, 0, 0]]]], dtype=torch.uint8))[0, 0]
    tensor([[ 0,  0,  0],
            [ 0, 99,  0],
            [ 0,  0,  0]], dtype=torch.uint8)
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"centred wants uint8 pictures [N, C, S, S], got {images.dtype} {tuple(images.shape)}")
    out = images.clone()
    size = images.shape[-1]
    for image, moved in zip(images, out):
        background = border_colour(image)
        objects = ((image.int() - background[:, None, None].int()).abs() > tolerance).any(0)  # [S, S]
        rows, columns = objects.any(1).nonzero(), objects.any(0).nonzero()
        if len(rows) == 0:
            continue  # an empty picture stays as it is
        down = (size - 1 - int(rows.max()) - int(rows.min())) // 2
        across = (size - 1 - int(columns.max()) - int(columns.min())) // 2
        moved[:] = background[:, None, None]
        moved[:, max(0, down):size + min(0, down), max(0, across):size + min(0, across)] = \
            image[:, max(0, -down):size - max(0, down), max(0, -across):size - max(0, across)]
    return out


@dataclass
class DecoderConfig:
    embed_dim: int = 128  # the CLIP's vector length
    grid_size: int = 16  # the dVAE's code grid side (a power of two, at least 4)
    vocab_size: int = 512  # the dVAE's codebook
    width: int = 128  # channels of the convolutions

    def __post_init__(self) -> None:
        if min(self.embed_dim, self.vocab_size, self.width) < 1:
            raise ValueError("embed_dim, vocab_size and width must be at least 1")
        if self.grid_size < 4 or self.grid_size & (self.grid_size - 1):
            raise ValueError(f"grid_size must be a power of two >= 4, got {self.grid_size}")


class UpBlock(nn.Module):
    """Double the grid (nearest neighbour), then a residual pair of 3x3 convolutions."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2h, 2w)
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


class EmbeddingDecoder(nn.Module):
    """A CLIP image vector -> logits over the dVAE's codes at every grid cell."""

    kind = "unclip_decoder"
    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = c = config
        self.project = nn.Linear(c.embed_dim, c.width * 4 * 4)  # the vector becomes a 4x4 grid of features
        self.up = nn.Sequential(*[UpBlock(c.width) for _ in range(c.grid_size.bit_length() - 3)])  # 4 -> grid_size
        self.to_logits = nn.Conv2d(c.width, c.vocab_size, 1)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        x = self.project(vectors).view(-1, self.config.width, 4, 4)  # (B, C, 4, 4)
        return self.to_logits(F.gelu(self.up(x)))  # (B, vocab, h, w)

    @torch.no_grad()
    def codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """The most likely code of every cell: ``[B, h, w]``."""
        return self(vectors).argmax(1)


@torch.no_grad()
def decoder_targets(dvae: DiscreteVAE, images: torch.Tensor, centre: bool = True, batch_size: int = 500,
                    progress: bool = True) -> torch.Tensor:
    """What the decoder learns to write: the dVAE codes ``[N, h, w]`` of pictures (uint8),
    moved to the middle first (:func:`centred`) unless ``centre`` is False."""
    chunks = []
    for chunk in tqdm(images.split(batch_size), desc="decoder targets", leave=False, disable=not progress):
        chunk = centred(chunk) if centre else chunk
        chunks.append(dvae.encode(chunk.float() / 255))
    return torch.cat(chunks)


def decoder_loss(model: EmbeddingDecoder, vectors: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy of the decoder's logits against the code grids (:func:`decoder_targets`), and the
    fraction of cells it gets right."""
    logits = model(vectors)  # (B, vocab, h, w)
    return {"loss": F.cross_entropy(logits, codes), "cell_acc": (logits.argmax(1) == codes).float().mean()}


@torch.no_grad()
def decoder_accuracy(decoder: EmbeddingDecoder, dvae: DiscreteVAE, image_vectors: torch.Tensor,
                     captions: Sequence[str]) -> dict[str, float]:
    """Decode image vectors and read the pictures against the captions of the pictures
    they came from (``dalle_lesson.evaluate``): how much of a caption the vector keeps,
    and how much of it the decoder can draw back."""
    summary = evaluate.summarize(evaluate.score_batch(dvae.decode(decoder.codes(image_vectors)), list(captions)))
    return {"full_match": summary["full_match_accuracy"], "shape": summary["shape_accuracy"],
            "colour": summary["colour_accuracy"]}


# --------------------------------------------------------------------------------------
# The prior: caption vector -> image vector
# --------------------------------------------------------------------------------------


@dataclass
class PriorConfig:
    embed_dim: int = 128
    width: int = 512
    layers: int = 2  # residual MLP blocks

    def __post_init__(self) -> None:
        if min(self.embed_dim, self.width, self.layers) < 1:
            raise ValueError("embed_dim, width and layers must be at least 1")


class PriorBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class EmbeddingPrior(nn.Module):
    """A caption's CLIP vector -> the unit image vector it predicts."""

    kind = "unclip_prior"
    config_class = PriorConfig

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = c = config
        self.project = nn.Linear(c.embed_dim, c.width)
        self.blocks = nn.Sequential(*[PriorBlock(c.width) for _ in range(c.layers)])
        self.out = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.embed_dim))

    def forward(self, text_vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.out(self.blocks(self.project(text_vectors))), dim=-1)  # (B, D), unit


def prior_loss(model: EmbeddingPrior, text_vectors: torch.Tensor, image_vectors: torch.Tensor) -> dict:
    """1 - cosine between the predicted and the true image vectors (both unit)."""
    cosine = (model(text_vectors) * image_vectors).sum(-1).mean()
    return {"loss": 1 - cosine, "cosine": cosine.detach()}


# --------------------------------------------------------------------------------------
# Files, and the whole pipeline
# --------------------------------------------------------------------------------------

SHIPPED_DECODER = "unclip_decoder.safetensors"
SHIPPED_PRIOR = "unclip_prior.safetensors"


def save_unclip(model: EmbeddingDecoder | EmbeddingPrior, path: str | Path, dtype: torch.dtype = torch.float32,
                **metadata) -> Path:
    return checkpoint.save(model, path, dtype=dtype, **metadata)


def load_decoder(path: str | Path | None = None, device: str | torch.device = "cpu") -> EmbeddingDecoder:
    """A decoder (``None``: the shipped ``data/unclip_decoder.safetensors``), fp32, eval mode."""
    return checkpoint.load(path or data.shipped_path(SHIPPED_DECODER), EmbeddingDecoder, device)


def load_prior(path: str | Path | None = None, device: str | torch.device = "cpu") -> EmbeddingPrior:
    """A prior (``None``: the shipped ``data/unclip_prior.safetensors``), fp32, eval mode."""
    return checkpoint.load(path or data.shipped_path(SHIPPED_PRIOR), EmbeddingPrior, device)


class UnCLIP:
    """caption -> CLIP text vector -> (prior ->) image vector -> decoder -> dVAE codes -> picture."""

    @classmethod
    def load(cls, decoder: str | Path | None = None, prior: str | Path | None = None,
             clip: str | Path | None = None, dvae: str | Path | None = None) -> "UnCLIP":
        """The four models from their files (``None``: the shipped ones), refusing a decoder or
        prior that was trained on another CLIP's vectors or another dVAE's codes (each
        checkpoint records the SHA-256 digests of the files it was trained from)."""
        from dalle_lesson.clip import SHIPPED, load_clip
        from dalle_lesson.dvae import load_dvae

        clip_file = Path(clip or data.shipped_path(SHIPPED))
        dvae_file = Path(dvae or data.shipped_path("dvae_lesson.safetensors"))
        decoder_file = Path(decoder or data.shipped_path(SHIPPED_DECODER))
        prior_file = Path(prior or data.shipped_path(SHIPPED_PRIOR))
        wanted = {"clip": (clip_file, checkpoint.file_digest(clip_file)),
                  "dvae": (dvae_file, checkpoint.file_digest(dvae_file))}
        for stage, path, needs in (("decoder", decoder_file, ("clip", "dvae")), ("prior", prior_file, ("clip",))):
            recorded = checkpoint.read_metadata(path) if path.is_file() else {}
            for name in needs:
                file, digest = wanted[name]
                if name in recorded and recorded[name] != digest:
                    raise ValueError(f"{path} was trained on a {name} file with digest {recorded[name]}, but {file} "
                                     f"has digest {digest}: retrain it on this file (dalle-lesson train {stage} "
                                     f"--{name} {file})")
        return cls(load_clip(clip_file), load_prior(prior_file), load_decoder(decoder_file), load_dvae(dvae_file))

    def __init__(self, clip_model: CourseCLIP, prior: EmbeddingPrior | None, decoder: EmbeddingDecoder,
                 dvae: DiscreteVAE):
        if decoder.config.embed_dim != clip_model.config.embed_dim:
            raise ValueError(f"the decoder reads vectors of {decoder.config.embed_dim} numbers but this CLIP "
                             f"makes {clip_model.config.embed_dim}: train the decoder on this CLIP's vectors")
        if (decoder.config.grid_size, decoder.config.vocab_size) != (dvae.config.grid_size, dvae.config.vocab_size):
            raise ValueError(f"the decoder writes {decoder.config.grid_size}x{decoder.config.grid_size} grids of "
                             f"{decoder.config.vocab_size} codes but the dVAE reads {dvae.config.grid_size}x"
                             f"{dvae.config.grid_size} of {dvae.config.vocab_size}: train it on this dVAE's codes")
        self.clip, self.prior, self.decoder, self.dvae = clip_model, prior, decoder, dvae

    @torch.no_grad()
    def decode(self, image_vectors: torch.Tensor) -> torch.Tensor:
        """Pictures ``[B, 3, S, S]`` in [0, 1] of image vectors ``[B, D]``."""
        return self.dvae.decode(self.decoder.codes(image_vectors))

    @torch.no_grad()
    def image_vectors(self, captions: Sequence[str], use_prior: bool = True) -> torch.Tensor:
        """The image vectors of captions: through the prior, or (``use_prior=False``) the
        caption's own vector, as if it were an image's."""
        text = self.clip.encode_text(list(captions))
        if not use_prior:
            return text
        if self.prior is None:
            raise ValueError("this UnCLIP has no prior: pass use_prior=False, or give it one (load_prior())")
        return self.prior(text)

    def __call__(self, captions: Sequence[str] | str, use_prior: bool = True) -> torch.Tensor:
        captions = [captions] if isinstance(captions, str) else list(captions)
        return self.decode(self.image_vectors(captions, use_prior))
