"""CLIP: a model that scores how well a caption fits a picture (lesson 06).

DALL·E draws many images for one caption and keeps the few that a second model, CLIP,
likes best. This module builds that second model, small enough to train on a CPU.

The idea: contrastive learning
------------------------------

CLIP has two encoders. The image encoder turns a picture into a vector; the text encoder
turns a caption into a vector of the same length. Both vectors are scaled to length 1, so
their dot product is the cosine of the angle between them: 1 when they point the same way,
near 0 when they have nothing to do with each other. That number is the *similarity*.

Nobody tells CLIP what a "red circle" looks like. It learns from a batch of B pictures and
their B captions laid out as a B x B table of similarities::

                  "a red circle"  "a big blue star"  "a tiny green cross"
    picture 0         high              low                 low
    picture 1         low               high                low
    picture 2         low               low                 high

Training pushes the diagonal (the true pairs) up and everything else (the other captions of
the batch, the *negatives*) down. Concretely, each row is read as a B-way classification,
"which caption is mine?", and so is each column, "which picture is mine?"; the loss is the
average cross-entropy of the two (open_clip's ``ClipLoss``). The similarities are multiplied
by a learned ``logit_scale`` first (a temperature): cosines live in [-1, 1], and a softmax
over numbers that close together could never be confident.

What the model learns is only as good as its negatives. If every other caption in the batch
differs in colour, the model may learn colour and nothing else. Two things in this module
deal with that:

* **Hard negatives.** :func:`hard_negative_pairs` renders each Shapes scene next to a copy
  that differs in exactly one attribute (a colour, a shape, a size, or the two objects'
  positions swapped), so every batch holds pairs that only the right detail tells apart.
  That is also what a reranker of DALL·E samples has to do.
* **False negatives.** Two different scenes can share a meaning ("a red circle" drawn at two
  places, or said as "a little red circle"). In the table above the second would count as a
  wrong answer although it is right. :func:`scene_key` names a scene's meaning, and
  :func:`distinct_batch` never puts two examples with the same meaning into one batch;
  :meth:`CourseCLIP.training_loss` reports how many identical captions a batch still had.

The model is open_clip's own ``CLIP`` class (a vision transformer and a text transformer),
built from a small :class:`CLIPConfig`; the text side reads the course BPE tokenizer's ids
plus a start and an end token::

    model = CourseCLIP(CLIPConfig.lesson())
    model.similarity(images, ["a red circle", "a blue square"])   # [B_img, 2], cosines
    rerank(model, samples, "a red circle")                        # best first, with scores

Also here: :func:`load_open_clip_weights` builds any open_clip architecture and fills it
from a local file (nothing is downloaded), and :func:`zero_shot_classify` reads a picture by
asking which of several prompts it is most similar to.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from dalle_lesson import checkpoint, data
from dalle_lesson.bpe import BPETokenizer, load_course_tokenizer

# CLIP's pixel normalisation: the mean and spread of each colour channel in OpenAI's
# training pictures. Any fixed values would do for a model trained from scratch; these are
# the ones every open_clip model expects, so we keep them.
CLIP_MEAN = open_clip.OPENAI_DATASET_MEAN
CLIP_STD = open_clip.OPENAI_DATASET_STD
MAX_LOGIT_SCALE = math.log(100)  # as in CLIP: the temperature never goes below 1/100


# --------------------------------------------------------------------------------------
# Configuration, and the same architecture as an open_clip model config
# --------------------------------------------------------------------------------------


@dataclass
class CLIPConfig:
    """Sizes of a course CLIP. ``vocab_size`` = the BPE tokenizer's ids + start + end."""

    image_size: int = 32
    patch_size: int = 8  # a 4 x 4 grid of 8 x 8 patches: 16 image tokens (patches of 4 cost 4x, did no better)
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32  # heads = width / head_width
    embed_dim: int = 128  # the length of the shared image/text vectors
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 24  # start + up to 22 BPE tokens + end (the longest course caption has 20)
    vocab_size: int = 1024 + 2

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_head_width or self.text_width % self.text_heads:
            raise ValueError("vision_width must divide by vision_head_width and text_width by text_heads")
        if self.context_length < 3 or self.vocab_size < 3:
            raise ValueError("context_length and vocab_size must leave room for start, end and one token")

    @classmethod
    def lesson(cls, **changes) -> "CLIPConfig":
        """The shipped course CLIP: 32x32 pictures in 8x8 patches, two 4-layer transformers of width 128."""
        return cls(**changes)

    @property
    def start_id(self) -> int:
        return self.vocab_size - 2

    @property
    def end_id(self) -> int:
        # The highest id: open_clip's "argmax" pooling reads the text transformer's output at
        # the position of the largest id in each row, which is then always the end token.
        return self.vocab_size - 1

    def open_clip_config(self) -> dict:
        """The same model as an open_clip config (the JSON its ``model_configs/`` hold)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
                           "layers": self.vision_layers, "head_width": self.vision_head_width},
            "text_cfg": {"context_length": self.context_length, "vocab_size": self.vocab_size,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers,
                         "pool_type": "argmax"},
        }


_REGISTERED: dict[str, str] = {}  # name -> JSON text already registered in this process


def register_with_open_clip(name: str, config: CLIPConfig | dict) -> str:
    """Register a model config with open_clip under ``name``; returns ``name``.

    open_clip finds architectures by name in a folder of JSON files. We write ours to a
    temporary folder and add it, after which open_clip's own factory builds it::

        register_with_open_clip("course-clip", CLIPConfig.lesson())
        model = open_clip.create_model("course-clip", pretrained=None)   # open_clip.CLIP
    """
    cfg = config.open_clip_config() if isinstance(config, CLIPConfig) else dict(config)
    if not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError("an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    text = json.dumps(cfg, indent=2, sort_keys=True)
    if _REGISTERED.get(name) == text:
        return name
    if name in open_clip.list_models() and name not in _REGISTERED:
        raise ValueError(f"open_clip already has a model called {name!r}; choose another name")
    path = Path(tempfile.mkdtemp(prefix="dalle_lesson_clip_")) / f"{name}.json"  # the file name is the model name
    path.write_text(text)
    open_clip.add_model_config(path)
    _REGISTERED[name] = text
    return name


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class CourseCLIP(nn.Module):
    """open_clip's ``CLIP`` with the course tokenizer, CLIP's pixel normalisation and a loss.

    ``encode_images`` and ``encode_text`` give unit vectors ``[B, embed_dim]``; their dot
    products are the similarities. Example::

        model = CourseCLIP(CLIPConfig.lesson())
        images = torch.rand(2, 3, 32, 32)                        # values in [0, 1]
        model.similarity(images, ["a red circle", "a blue star"]).shape   # (2, 2)
    """

    kind = "clip"
    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig, tokenizer: BPETokenizer | None = None):
        super().__init__()
        self.config = config
        self.clip = open_clip.CLIP(**config.open_clip_config())  # open_clip's vision + text transformers
        self.loss_fn = ClipLoss()  # no weights: the symmetric cross-entropy of the similarity table
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = tokenizer  # loaded on first use: building on the meta device needs none

    # ---- text -------------------------------------------------------------------------

    @property
    def tokenizer(self) -> BPETokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_course_tokenizer()
        if self._tokenizer.vocab_size + 2 != self.config.vocab_size:
            raise ValueError(f"the tokenizer has {self._tokenizer.vocab_size} ids, this CLIP reads "
                             f"{self.config.vocab_size} = tokenizer + start + end; use the tokenizer it was built for")
        return self._tokenizer

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> LongTensor[B, context_length]: start, BPE ids, end, then zeros.

        >>> CourseCLIP(CLIPConfig.lesson()).tokenize(["a red circle"])[0, :6]
        tensor([1024,  320,  563,  562, 1025,    0])
        >>> # start, "a", "red", "circle", end, padding

        The padding id 0 is also a real token, which is harmless: the text transformer is
        causal, so nothing after the end token reaches the output read at the end token.
        A caption too long for ``context_length`` is cut, keeping its end token, with a warning.
        """
        if isinstance(captions, str):
            raise TypeError("expected a list of captions; wrap a single caption as [caption]")
        c = self.config
        rows = torch.zeros(len(captions), c.context_length, dtype=torch.long)
        cut = 0
        for row, caption in enumerate(captions):
            ids = self.tokenizer.encode(caption)
            if len(ids) > c.context_length - 2:
                ids, cut = ids[: c.context_length - 2], cut + 1
            ids = [c.start_id, *ids, c.end_id]
            rows[row, : len(ids)] = torch.tensor(ids)
        if cut:
            warnings.warn(f"{cut} of {len(captions)} captions had more than {c.context_length - 2} tokens and were "
                          f"cut to fit context_length={c.context_length}", stacklevel=2)
        return rows

    def encode_text(self, captions: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Captions (strings, or ids from :meth:`tokenize`) -> unit vectors ``[B, embed_dim]``."""
        tokens = captions if torch.is_tensor(captions) else self.tokenize(captions)
        if tokens.dim() != 2 or tokens.shape[1] != self.config.context_length:
            raise ValueError(f"token ids must be [B, {self.config.context_length}], got {tuple(tokens.shape)}")
        return self.clip.encode_text(tokens.to(self.mean.device), normalize=True)

    # ---- images -----------------------------------------------------------------------

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse anything but float images ``[B, 3, S, S]`` with values in [0, 1]."""
        s = self.config.image_size
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"expected images of shape [batch, 3, {s}, {s}] with values in [0, 1], got {shape}")
        if tuple(images.shape[2:]) != (s, s):
            raise ValueError(f"this CLIP reads {s}x{s} images, got {images.shape[2]}x{images.shape[3]}; resize them "
                             f"first (rerank() does so for square images, with a warning)")
        if not images.is_floating_point():
            raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
        if images.numel() and images.device.type != "meta":
            low, high = images.min().item(), images.max().item()
            if not (0.0 <= low and high <= 1.0):  # also False for NaN
                raise ValueError(f"image values must lie in [0, 1], got [{low:.3g}, {high:.3g}]; "
                                 "pixels in 0..255 must be divided by 255")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in [0, 1] -> unit vectors ``[B, embed_dim]``."""
        self.check_images(images)
        images = images.to(self.mean.device, self.mean.dtype)
        return self.clip.encode_image((images - self.mean) / self.std, normalize=True)

    # ---- both -------------------------------------------------------------------------

    def similarity(self, images: torch.Tensor, captions: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every image with every caption: ``[B_img, B_txt]`` in [-1, 1]."""
        return self.encode_images(images) @ self.encode_text(captions).T

    def forward(self, images: torch.Tensor, captions: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """``model(images, captions)`` is :meth:`similarity`."""
        return self.similarity(images, captions)

    def logit_scale(self) -> torch.Tensor:
        """exp(the learned log-scale), capped at 100 as CLIP does (the cap keeps training stable)."""
        return self.clip.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def training_loss(self, images: torch.Tensor, captions: Sequence[str] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The contrastive loss of one batch of matching (image, caption) pairs, and how it goes.

        Returns ``loss`` (open_clip's ``ClipLoss``: the mean of the image->caption and the
        caption->image cross-entropies over the batch's similarity table, scaled by the
        learned temperature), ``acc_i2t`` / ``acc_t2i`` (how often the true partner is the
        batch's most similar), ``scale`` (the temperature's inverse) and ``dup_captions``
        (the share of examples whose exact caption occurs twice in the batch: those pairs
        are counted as negatives although they are positives).
        """
        tokens = captions if torch.is_tensor(captions) else self.tokenize(captions)
        image_features = self.encode_images(images)  # [B, D], unit length
        text_features = self.encode_text(tokens)  # [B, D]
        scale = self.logit_scale()
        loss = self.loss_fn(image_features, text_features, scale)
        with torch.no_grad():
            logits = image_features @ text_features.T  # [B_img, B_txt]
            target = torch.arange(len(logits), device=logits.device)
            same = (tokens[:, None, :] == tokens[None, :, :]).all(-1)  # [B, B]: identical captions
            return {"loss": loss,
                    "acc_i2t": (logits.argmax(1) == target).float().mean(),
                    "acc_t2i": (logits.argmax(0) == target).float().mean(),
                    "scale": scale.detach(),
                    "dup_captions": (same.sum(1) > 1).float().mean()}


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------

SHIPPED = "clip_lesson.safetensors"


def save_clip(model: CourseCLIP, path: str | Path, dtype: torch.dtype = torch.float32, **metadata) -> Path:
    """Write a course CLIP in the course's checkpoint format (``dalle_lesson.checkpoint``)."""
    return checkpoint.save(model, path, dtype=dtype, **metadata)


def load_clip(path: str | Path | None = None, device: str | torch.device = "cpu") -> CourseCLIP:
    """Load a course CLIP (``None``: the shipped ``data/clip_lesson.safetensors``) in fp32, eval mode."""
    return checkpoint.load(path or data.shipped_path(SHIPPED), CourseCLIP, device)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or from a torch file without running any code in it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses pickled classes: say so in one line
        raise ValueError(f"{path}: not a plain state dict that torch.load(weights_only=True) can read ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip's training script saves {"epoch", "state_dict", ...}
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_open_clip_weights(model_name_or_config: str | dict | CLIPConfig, path: str | Path) -> nn.Module:
    """Build an open_clip architecture and fill it with weights from a local file.

    ``model_name_or_config``: a name open_clip knows (``"ViT-B-32"``, or one registered
    with :func:`register_with_open_clip`), an open_clip config dict, or a
    :class:`CLIPConfig`. ``path``: a ``.safetensors`` file, or a torch file read with
    ``weights_only=True``. The model is built with ``pretrained=None``, so nothing is
    downloaded; a file that does not fit the architecture is refused. Returns open_clip's
    model, in eval mode. Example::

        model = load_open_clip_weights("ViT-B-32", "ViT-B-32-openai.safetensors")
        model.encode_image(preprocessed_images)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if isinstance(model_name_or_config, str):
        name = model_name_or_config
        if name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"{name!r}: give an architecture name, not a download location; the weights come from path")
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ValueError(f"open_clip knows no model called {name!r} (see open_clip.list_models())")
    else:
        cfg = model_name_or_config.open_clip_config() if isinstance(model_name_or_config, CLIPConfig) \
            else dict(model_name_or_config)
        name = register_with_open_clip("dalle-lesson-" + _digest(cfg), cfg)
    if cfg.get("text_cfg", {}).get("hf_model_name") or cfg.get("vision_cfg", {}).get("timm_model_pretrained"):
        raise ValueError(f"{name!r} builds a tower from Hugging Face or timm pretrained files, which needs a download")
    model = open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False)
    state = _read_state_dict(path)
    for prefix in ("module.", "clip."):  # saved from DistributedDataParallel, or a course CLIP checkpoint
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    wanted = model.state_dict()
    missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    wrong = [k for k in sorted(set(wanted) & set(state)) if tuple(wanted[k].shape) != tuple(state[k].shape)]
    if missing or extra or wrong:
        raise ValueError(f"{path} does not fit open_clip's {name!r}: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"other shapes {wrong[:3]}")
    model.load_state_dict({k: v.to(wanted[k].dtype) for k, v in state.items()})
    return model.eval()


def _digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------
# Using the model: reranking and zero-shot classification
# --------------------------------------------------------------------------------------


def _model_images(model: CourseCLIP, images: torch.Tensor) -> torch.Tensor:
    """Images as the model reads them: refused if not [N, 3, H, W] in [0, 1] or not square;
    a square image of another size is resized (with a warning), since its content is still
    all there. Non-square images are refused: squeezing them would move and stretch shapes."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"expected images [N, 3, H, W] with values in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
    low, high = images.min().item(), images.max().item()
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(f"image values must lie in [0, 1], got [{low:.3g}, {high:.3g}]; a CLIP score of such "
                         "pixels would mean nothing (divide 0..255 pixels by 255, clamp decoder outputs)")
    s = model.config.image_size
    h, w = images.shape[2:]
    if h != w:
        raise ValueError(f"images are {h}x{w}; this CLIP reads square {s}x{s} images: crop them to a square first")
    if h != s:
        warnings.warn(f"resizing {h}x{h} images to the {s}x{s} this CLIP reads", stacklevel=3)
        images = F.interpolate(images.float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        images = images.clamp(0, 1)
    return images


def _as_batch(clip_model: CourseCLIP, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(images, (list, tuple)):
        s = clip_model.config.image_size
        return torch.stack(list(images)) if len(images) else torch.empty(0, 3, s, s)
    return images


@torch.no_grad()
def clip_scores(clip_model: CourseCLIP, images: torch.Tensor | Sequence[torch.Tensor],
                captions: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """How well each image fits its caption: the cosine similarity, FloatTensor ``[N]`` on the
    CPU, in the images' own order. Same inputs (and the same refusals) as :func:`rerank`."""
    images = _as_batch(clip_model, images)
    captions = [captions] if isinstance(captions, str) else list(captions)
    if len(captions) not in (1, len(images)):
        raise ValueError(f"give one caption for all {len(images)} images or one per image, not {len(captions)}")
    if len(images) == 0:
        return torch.empty(0)
    model_images = _model_images(clip_model, images)
    text = clip_model.encode_text(captions)  # [1 or N, D]
    image_features = torch.cat([clip_model.encode_images(chunk) for chunk in model_images.split(batch_size)])  # [N, D]
    return (image_features * text).sum(-1).cpu()  # [N]: each image with its caption (one caption broadcasts)


def rerank(clip_model: CourseCLIP, images: torch.Tensor | Sequence[torch.Tensor],
           captions: str | Sequence[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort images by how well they fit their caption: ``(images, scores)``, best first.

    ``images``: ``[N, 3, H, W]`` in [0, 1] (or a list of ``[3, H, W]``). Square images of
    another size are resized, with a warning; images that are not square, not RGB, or
    have values outside [0, 1] are refused with a ValueError (a score for them would mean
    nothing). ``captions``: one caption for all images, or one per image. ``scores[i]`` is
    the cosine similarity of ``images[i]`` (as returned) with its caption::

        best, scores = rerank(clip, samples, "a red circle")   # samples: [8, 3, 32, 32]
        best[0]                                                # the one CLIP likes most

    An empty input gives an empty result. Ties keep their input order.
    """
    images = _as_batch(clip_model, images)
    scores = clip_scores(clip_model, images, captions, batch_size)  # [N]
    order = torch.argsort(scores, descending=True, stable=True)
    return images[order], scores[order]


@torch.no_grad()
def zero_shot_classify(clip_model: CourseCLIP, images: torch.Tensor,
                       prompts: Sequence[str] | Sequence[Sequence[str]]) -> torch.Tensor:
    """The class of each image: the index of its most similar prompt. LongTensor ``[B]``.

    A class may be a list of prompts ("prompt ensembling", from the CLIP paper): their
    embeddings are averaged into one direction for the class::

        zero_shot_classify(clip, images, ["a red circle", "a blue circle"])
        zero_shot_classify(clip, images, [["a red circle", "a red star"], ["a blue circle", "a blue star"]])
    """
    groups = [[p] if isinstance(p, str) else list(p) for p in prompts]
    if not groups or not all(groups):
        raise ValueError("give at least one class, each with at least one prompt")
    flat = [p for group in groups for p in group]
    text = clip_model.encode_text(flat)  # [P, D]
    owner = torch.tensor([k for k, group in enumerate(groups) for _ in group], device=text.device)
    classes = torch.zeros(len(groups), text.shape[1], device=text.device).index_add_(0, owner, text)
    classes = F.normalize(classes, dim=-1)  # [K, D]: one direction per class
    image_features = clip_model.encode_images(_model_images(clip_model, images))  # [B, D]
    return (image_features @ classes.T).argmax(1).cpu()


# --------------------------------------------------------------------------------------
# Shapes: what a scene means, and scenes that differ from it in one attribute
# --------------------------------------------------------------------------------------

ATTRIBUTES = ("colour", "shape", "size", "relation")


def scene_key(scene: data.Scene) -> str:
    """A name for what a scene *means*: equal for two scenes exactly when every caption of
    one is also a caption of the other (positions and wording do not matter).

    Every caption names every attribute, so the alphabetically first caption will do::

        scene_key(Scene((ShapeObject("circle", "red", "small", 0.3, 0.6),)))  # 'a little red circle'
    """
    return min(data.scene_captions(scene))


def distinct_batch(indices: torch.Tensor, groups: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """The examples of one batch, no two of the same meaning: a LongTensor as long as ``indices``.

    ``groups[i]`` is example i's meaning (an id per :func:`scene_key`). ``unit=2`` keeps
    examples ``2k`` and ``2k + 1`` (a scene and its one-attribute twin) together. A drawn
    example whose meaning is already in the batch is replaced by the next example in the
    data whose meaning is not, so the batch is still a function of ``indices`` alone (the
    engine's resume needs that). Only data with too few meanings keep some repeats::

        distinct_batch(torch.tensor([0, 1, 2]), groups=torch.tensor([5, 5, 6, 7]))  # tensor([0, 2, 3])
    """
    units = len(groups) // unit
    drawn = (indices // unit).tolist()
    after = drawn[-1] + 1 if drawn else 0
    walk = ((after + k) % units for k in range(units))  # the rest of the data, in order
    chosen, seen = [], set()
    for u in itertools.chain(drawn, walk):
        if len(chosen) >= len(indices):
            break
        members = range(u * unit, u * unit + unit)
        meanings = {int(groups[m]) for m in members}
        if len(meanings) == unit and not meanings & seen:
            chosen += members
            seen |= meanings
    for u in drawn:  # too few meanings in the data: repeats after all
        if len(chosen) >= len(indices):
            break
        chosen += range(u * unit, u * unit + unit)
    return torch.tensor(chosen[: len(indices)], dtype=torch.long)


def _fits(scene: data.Scene) -> bool:
    """Whether the objects lie inside the picture and, for two, the relation clearly holds
    without overlap (the rule the data generator places pairs by)."""
    halves = [data.SIZES[obj.size] / 2 for obj in scene.objects]
    if any(not (h <= o.x <= 1 - h and h <= o.y <= 1 - h) for o, h in zip(scene.objects, halves)):
        return False
    if scene.relation is None:
        return True
    a, b = scene.objects
    along, across = {"left of": (b.x - a.x, b.y - a.y), "right of": (a.x - b.x, b.y - a.y),
                     "above": (b.y - a.y, b.x - a.x), "below": (a.y - b.y, b.x - a.x)}[scene.relation]
    return along > halves[0] + halves[1] + 0.02 and abs(across) * 2 <= along


def swap_attribute(scene: data.Scene, attribute: str, rng: random.Random, split: str = "train") -> data.Scene | None:
    """A copy of ``scene`` that differs in exactly one ``attribute``, or None if it cannot.

    ``colour`` / ``shape`` / ``size``: one object (picked by ``rng``) gets another value;
    ``relation``: the two objects trade sides (their centres are mirrored along the
    relation's axis, so "a red circle left of a blue star" becomes "... right of ...").
    Outside the held-out split, no held-out shape-colour pair is ever made, so hard negatives
    never leak the combinations that zero-shot tests need unseen.
    """
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    objects = list(scene.objects)
    if attribute == "relation":
        if scene.relation is None:
            return None
        axis = "x" if scene.relation in ("left of", "right of") else "y"
        mirrored = tuple(replace(obj, **{axis: 1 - getattr(obj, axis)}) for obj in objects)
        variant = data.Scene(mirrored, data.INVERSE_RELATION[scene.relation])
    else:
        k = rng.randrange(len(objects))
        obj = objects[k]
        allowed = lambda shape, colour: split == "heldout" or (shape, colour) not in data.HELD_OUT_PAIRS  # noqa: E731
        if attribute == "colour":
            choices = [{"colour": c} for c in data.COLOURS if c != obj.colour and allowed(obj.shape, c)]
        elif attribute == "shape":
            choices = [{"shape": s} for s in data.SHAPES if s != obj.shape and allowed(s, obj.colour)]
        else:
            size = "large" if obj.size == "small" else "small"
            half = data.SIZES[size] / 2  # a bigger object may need to move in from the border
            choices = [{"size": size, "x": min(max(obj.x, half), 1 - half), "y": min(max(obj.y, half), 1 - half)}]
        objects[k] = replace(obj, **rng.choice(choices))
        variant = data.Scene(tuple(objects), scene.relation)
    if not _fits(variant) or scene_key(variant) == scene_key(scene):
        return None
    return variant


@dataclass
class ScenePairs:
    """Shapes scenes side by side with their one-attribute variants.

    Examples ``2k`` and ``2k + 1`` are a scene and its variant; ``attributes[k]`` says what
    differs. ``images``: uint8 ``[2n, 3, S, S]``; ``captions`` and ``keys`` (:func:`scene_key`):
    ``2n`` strings each.
    """

    images: torch.Tensor
    captions: list[str]
    keys: list[str]
    attributes: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _render(scene: data.Scene, image_size: int) -> torch.Tensor:
    pixels = data.pil_to_tensor(data.render_scene(scene, image_size))  # [3, S, S] in [0, 1]
    return (pixels * 255).round().to(torch.uint8)


def hard_negative_pairs(count: int, image_size: int = 32, split: str = "train", seed: int = 0,
                        attributes: Sequence[str] = ATTRIBUTES, weights: Sequence[float] | None = None) -> ScenePairs:
    """``count`` scenes of ``ShapesDataset(split=split, seed=seed)``, each followed by a copy
    that differs in one of ``attributes``, drawn among those the scene allows in proportion
    to ``weights`` (default: equal; e.g. ``(1, 2, 1, 4)`` swaps relations most often).

    Each gets a caption drawn from all its paraphrases, so a pair can never be told apart
    by wording alone. Scenes that allow none of ``attributes`` (one object, only
    ``"relation"`` asked for) are skipped. Deterministic in ``(count, split, seed, weights)``.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    weights = dict(zip(attributes, weights if weights is not None else [1.0] * len(attributes), strict=True))
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"weights must be >= 0 and not all 0, got {list(weights.values())}")
    dataset = data.ShapesDataset(length=20 * count + 100, image_size=image_size, split=split, seed=seed)
    rng = random.Random(f"clip-hard-negatives/{split}/{seed}")
    images, captions, keys, changed = [], [], [], []
    for index in range(len(dataset)):
        if len(changed) == count:
            break
        scene = dataset.scene(index)
        options = [a for a in attributes if weights[a] > 0 and (a != "relation" or scene.relation is not None)]
        if not options:
            continue
        first = rng.choices(options, [weights[a] for a in options])[0]
        rest = [a for a in options if a != first]
        rng.shuffle(rest)
        for attribute in [first, *rest]:  # the drawn attribute, or another if it cannot change here
            variant = swap_attribute(scene, attribute, rng, split)
            if variant is not None:
                break
        else:
            continue
        for s in (scene, variant):
            images.append(_render(s, image_size))
            captions.append(rng.choice(data.scene_captions(s)))
            keys.append(scene_key(s))
        changed.append(attribute)
    if len(changed) < count:
        raise ValueError(f"found only {len(changed)} scenes that allow a change of {list(attributes)}")
    return ScenePairs(torch.stack(images), captions, keys, changed)


def emoji_pairs(image_size: int = 32) -> ScenePairs:
    """The emoji set laid out like :class:`ScenePairs`: neighbours in Unicode's order are
    paired ("thumbs up: light skin tone" next to "thumbs up: medium-light skin tone"), which
    makes them natural hard negatives for each other. An odd last emoji is left out."""
    dataset = data.EmojiDataset(image_size=image_size)
    count = len(dataset) // 2 * 2
    images = torch.stack([(dataset[i][0] * 255).round().to(torch.uint8) for i in range(count)])
    names = dataset.names[:count]
    return ScenePairs(images, list(names), list(names), ["emoji"] * (count // 2))


# --------------------------------------------------------------------------------------
# Measuring a CLIP
# --------------------------------------------------------------------------------------


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images


@torch.no_grad()
def embed(clip_model: CourseCLIP, images: torch.Tensor, captions: Sequence[str] | torch.Tensor,
          batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors of many images (uint8 or [0, 1] floats) and captions, in chunks: ``([N, D], [M, D])``."""
    image_features = torch.cat([clip_model.encode_images(_as_float(chunk)) for chunk in images.split(batch_size)])
    tokens = captions if torch.is_tensor(captions) else clip_model.tokenize(captions)
    text_features = torch.cat([clip_model.encode_text(chunk) for chunk in tokens.split(batch_size)])
    return image_features, text_features


@torch.no_grad()
def evaluate_clip(clip_model: CourseCLIP, images: torch.Tensor, captions: Sequence[str] | torch.Tensor,
                  keys: Sequence[str] | None = None, pairs: bool = False, attributes: Sequence[str] | None = None,
                  batch_size: int = 250) -> dict[str, float]:
    """How a CLIP does on matching (image, caption) examples it was not trained on.

    * ``loss``: the contrastive loss, over chunks of ``batch_size`` examples;
    * ``i2t_acc``: image -> text retrieval among *all* the captions: the most similar caption
      is right when it means the same (same ``keys``; by default, the same text);
    * ``t2i_acc``: the same, caption -> image;
    * ``pair_acc`` (with ``pairs``, examples laid out as in :class:`ScenePairs`): how often a
      caption is more similar to its own image than to the image that differs in one attribute;
      and ``pair_acc_<attribute>`` for each kind of difference, given the pairs' ``attributes``.
    """
    image_features, text_features = embed(clip_model, images, captions, batch_size)
    scale = clip_model.logit_scale()
    losses = [clip_model.loss_fn(i, t, scale) for i, t in zip(image_features.split(batch_size),
                                                              text_features.split(batch_size))]
    names = list(keys) if keys is not None else [str(c) for c in captions]
    ids = {name: k for k, name in enumerate(dict.fromkeys(names))}
    meaning = torch.tensor([ids[name] for name in names], device=image_features.device)  # [N]
    similarity = image_features @ text_features.T  # [N_img, N_txt]
    result = {"loss": torch.stack(losses).mean().item(),
              "i2t_acc": (meaning[similarity.argmax(1)] == meaning).float().mean().item(),
              "t2i_acc": (meaning[similarity.argmax(0)] == meaning).float().mean().item()}
    if pairs:
        twin = torch.arange(len(meaning), device=meaning.device) ^ 1  # 0 <-> 1, 2 <-> 3, ...
        own = (image_features * text_features).sum(-1)
        other = (image_features[twin] * text_features).sum(-1)
        right = (own > other).float()  # [N]: each caption of each pair
        result["pair_acc"] = right.mean().item()
        for attribute in dict.fromkeys(attributes or []):
            chosen = torch.tensor([a == attribute for a in attributes for _ in range(2)], device=right.device)
            result[f"pair_acc_{attribute}"] = right[chosen].mean().item()
    return result


@torch.no_grad()
def one_attribute_accuracy(clip_model: CourseCLIP, count: int = 500, split: str = "test", seed: int = 0,
                           attributes: Sequence[str] = ATTRIBUTES) -> dict[str, float]:
    """What reranking needs: does the caption prefer the right picture over one that
    differs in a single attribute? Chance is 0.5.

    For each attribute, ``count`` scenes and their one-attribute variants; returns
    ``image_<attribute>``: how often ``sim(caption, right image) > sim(caption, variant)``
    (the reranking question: one caption, several pictures), and ``text_<attribute>``: how
    often ``sim(right caption, image) > sim(variant's caption, image)``.
    """
    result = {}
    for attribute in attributes:
        pairs = hard_negative_pairs(count, clip_model.config.image_size, split, seed, attributes=[attribute])
        image_features, text_features = embed(clip_model, pairs.images, pairs.captions)
        image_features, text_features = image_features.view(count, 2, -1), text_features.view(count, 2, -1)
        right = (image_features[:, 0] * text_features[:, 0]).sum(-1)  # [count]
        wrong_image = (image_features[:, 1] * text_features[:, 0]).sum(-1)
        wrong_text = (image_features[:, 0] * text_features[:, 1]).sum(-1)
        result[f"image_{attribute}"] = (right > wrong_image).float().mean().item()
        result[f"text_{attribute}"] = (right > wrong_text).float().mean().item()
    return result


def one_object_scenes(count: int, image_size: int = 32, split: str = "heldout", seed: int = 0):
    """The first ``count`` one-object scenes of ``ShapesDataset(split=split)``: (images [N, 3, S, S], scenes)."""
    dataset = data.ShapesDataset(length=20 * count + 100, image_size=image_size, split=split, seed=seed)
    picked = [i for i in range(len(dataset)) if len(dataset.scene(i).objects) == 1][:count]
    return torch.stack([dataset[i][0] for i in picked]), [dataset.scene(i) for i in picked]


def one_object_prompts() -> tuple[list[str], list[tuple[str, str, str]]]:
    """Every one-object description, "a small red circle" ... "a large white cross" (96),
    with the (shape, colour, size) each names."""
    kinds = [(shape, colour, size) for shape in data.SHAPES for colour in data.COLOURS for size in data.SIZES]
    return [f"a {data.SIZE_WORDS[size][0]} {colour} {shape}" for shape, colour, size in kinds], kinds


@torch.no_grad()
def zero_shot_accuracy(clip_model: CourseCLIP, count: int = 300, split: str = "heldout", seed: int = 0) -> dict:
    """Which colour? Which shape? Zero-shot, on one-object scenes of ``split``.

    Each picture is classified among all 96 one-object descriptions (:func:`one_object_prompts`);
    its colour and shape are read from the winning one. In the held-out split every such
    scene is a shape-colour pair the model never saw in training ("a purple circle"): the
    right prompt is one it has never read, and it must put together a colour and a shape it
    knows only apart. Chance: 1/8 for the colour, 1/6 for the shape.

    (CLIP's "prompt ensembling", one averaged direction per colour over all shapes and
    sizes, did worse for this small model: the attributes averaged over do not cancel out.)
    """
    images, scenes = one_object_scenes(count, clip_model.config.image_size, split, seed)
    prompts, kinds = one_object_prompts()
    predicted = [kinds[k] for k in zero_shot_classify(clip_model, images, prompts).tolist()]
    truth = [(s.objects[0].shape, s.objects[0].colour, s.objects[0].size) for s in scenes]
    right = lambda part: sum(p[part] == t[part] for p, t in zip(predicted, truth)) / len(truth)  # noqa: E731
    return {"colour_acc": right(1), "shape_acc": right(0), "size_acc": right(2), "images": len(scenes)}
