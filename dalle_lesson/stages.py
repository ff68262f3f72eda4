"""Each stage of the course as something the training engine can train.

A stage joins a model module's loss (``dalle_lesson.vae``, ``dvae``, ``vqvae``, ``dalle``) to
its data; :func:`dalle_lesson.train.fit` does the rest. The same functions serve the
notebooks and ``dalle-lesson train <stage>``::

    images = preload_images(ShapesDataset(length=20_000, image_size=32), 20_000)
    stage = dvae_stage(DiscreteVAE(DVAEConfig.lesson()), images, steps=3600)
    log = fit(stage, RECIPES["dvae"], out="dvae.safetensors")

``RECIPES`` holds each stage's default optimiser recipe (the shipped checkpoints' own,
except where ``data/README.md`` says otherwise).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dalle_lesson import data
from dalle_lesson.checkpoint import file_digest  # names caches after the dVAE that made them
from dalle_lesson.dalle import DALLE, validation_loss
from dalle_lesson.dvae import DiscreteVAE, DVAESchedule, evaluate_dvae, load_dvae
from dalle_lesson.dvae import training_loss as dvae_loss
from dalle_lesson.train import Recipe, Stage
from dalle_lesson.vae import VAE, Autoencoder
from dalle_lesson.vae import evaluate as vae_evaluate
from dalle_lesson.vqvae import VQVAE
from dalle_lesson.vqvae import training_loss as vqvae_loss

RECIPES = {
    # lesson 01: Adam (AdamW without decay), cosine to a tenth, no clipping
    "vae": Recipe(steps=5000, batch_size=64, lr=2e-3, save_every=500),
    # lesson 02: AdamW, short warm-up, cosine to 1 % of the peak, clip 1
    "dvae": Recipe(steps=3600, batch_size=32, lr=2e-3, warmup_steps=100, final_lr_fraction=0.01,
                   weight_decay=1e-4, grad_clip=1.0, save_every=200),
    "vqvae": Recipe(steps=3600, batch_size=32, lr=2e-3, final_lr_fraction=0.01, save_every=500),
    # lesson 04: the paper's AdamW (betas 0.9 / 0.96, decay 4.5e-2 on matrices), clip 4
    "dalle": Recipe(steps=1500, batch_size=32, lr=1e-3, warmup_steps=100, weight_decay=4.5e-2, beta2=0.96,
                    grad_clip=4.0, eval_every=250, save_every=250),
    # lesson 06: CLIP's AdamW (betas 0.9 / 0.98, decay 0.1 on matrices), warm-up, clip 1
    "clip": Recipe(steps=5000, batch_size=64, lr=1e-3, warmup_steps=100, final_lr_fraction=0.01,
                   weight_decay=0.1, beta2=0.98, grad_clip=1.0, eval_every=250, save_every=250),
    # lesson 08: the unCLIP decoder and prior, plain AdamW with warm-up and cosine decay
    "decoder": Recipe(steps=2000, batch_size=64, lr=2e-3, warmup_steps=100, final_lr_fraction=0.01,
                      grad_clip=1.0, eval_every=500, save_every=500),
    "prior": Recipe(steps=3000, batch_size=256, lr=1e-3, warmup_steps=100, final_lr_fraction=0.01,
                    weight_decay=1e-4, grad_clip=1.0, eval_every=500, save_every=500),
}


def recipe(stage: str, **changes) -> Recipe:
    """A copy of ``RECIPES[stage]`` with some fields changed: ``recipe("dvae", steps=80)``."""
    return replace(RECIPES[stage], **changes)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def make_dataset(name: str, image_size: int, split: str = "train", folder: str | None = None,
                 length: int = 10_000):
    """One of the course's datasets by name: ``shapes``, ``emoji`` or ``folder``."""
    if name == "shapes":
        return data.ShapesDataset(length=length, image_size=image_size, split=split)
    if name == "emoji":
        return data.EmojiDataset(image_size=image_size)
    if name == "folder":
        if not folder:
            raise ValueError("--dataset folder needs --folder PATH (images with same-named .txt captions)")
        return data.ImageFolderDataset(folder, image_size=image_size)
    raise ValueError(f"unknown dataset {name!r}: choose shapes, emoji or folder")


def preload_images(dataset, count: int) -> torch.Tensor:
    """The first ``count`` images of a dataset as one uint8 tensor ``[count, C, S, S]``.

    Rendering or decoding an image costs far more than a training step of the small
    models, so the lessons do it once; uint8 keeps 20,000 images of 32x32 in 60 MB.
    """
    return preload_pairs(dataset, count)[0]


def preload_pairs(dataset, count: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` images (uint8, as :func:`preload_images`) and their captions, read once."""
    count = min(count, len(dataset))
    if count < 1:
        raise ValueError("the dataset has no images")
    first = dataset[0][0]
    out, captions = torch.empty((count, *first.shape), dtype=torch.uint8), []
    for i in tqdm(range(count), desc="loading images", leave=False, mininterval=1.0):
        image, caption = dataset[i]
        out[i] = (image * 255).round().to(torch.uint8)
        captions.append(caption)
    return out, captions


@torch.no_grad()
def encode_dataset(dvae: DiscreteVAE, dataset, batch_size: int = 256, device="cpu", progress: bool = True):
    """Run the dVAE encoder over a whole dataset: (codes ShortTensor[N, h, w], captions list)."""
    codes, captions = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="images -> codes", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([image for image, _ in items]).to(device)
        codes.append(dvae.encode(images).to("cpu", torch.int16))  # 512 or 8192 codes fit in int16
        captions += [caption for _, caption in items]
    return torch.cat(codes), captions


def default_cache_dir() -> Path:
    return Path(os.environ.get("DALLE_LESSON_CACHE", Path.home() / ".cache" / "dalle_lesson"))


def cached_codes(dataset, name: str, dvae_path: str | Path | None = None, cache_dir: str | Path | None = None,
                 device="cpu", progress: bool = True):
    """The codes and captions of ``dataset``, encoded with the dVAE once and then read from disk.

    ``name`` identifies the dataset (e.g. ``"shapes-train-20000-32"``); the cache file name
    also carries a digest of the dVAE file, so a new dVAE never reuses stale codes.
    Returns ``(codes ShortTensor[N, h, w], captions list[str])``.
    """
    from dalle_lesson.checkpoint import atomic_write

    dvae_file = Path(dvae_path) if dvae_path is not None else data.shipped_path("dvae_lesson.safetensors")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"codes-{name}-dvae{file_digest(dvae_file)}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)  # tensors and strings only: no code runs
        if progress:
            print(f"reusing the codes cached in {path}")
        return saved["codes"], saved["captions"]
    codes, captions = encode_dataset(load_dvae(dvae_file, device=device), dataset, device=device, progress=progress)
    atomic_write(path, lambda temporary: torch.save({"codes": codes, "captions": captions}, temporary))
    return codes, captions


def shapes_codes(split: str, length: int, image_size: int = 32, dvae_path=None, cache_dir=None, progress=True):
    """Codes + captions of ``ShapesDataset(length, image_size, split)`` (cached)."""
    dataset = data.ShapesDataset(length=length, image_size=image_size, split=split)
    return cached_codes(dataset, f"shapes-{split}-{length}-{image_size}", dvae_path, cache_dir, progress=progress)


def codes_cache_name(dataset, name: str) -> str:
    """The cache name of a dataset's codes: for a folder, a digest of its files and captions
    (so replacing images or captions never reuses stale codes); else ``name-count-size``."""
    if isinstance(dataset, data.ImageFolderDataset):
        return f"folder-{dataset.fingerprint()}-{len(dataset)}"
    return f"{name}-{len(dataset)}-{dataset.image_size}"


# --------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images


def vae_stage(model: VAE | Autoencoder, images: torch.Tensor, kl_weight: float = 1.0,
              validation_images: torch.Tensor | None = None) -> Stage:
    """Lesson 01: the negative ELBO (or, for the autoencoder, reconstruction) per image."""
    model.check_images(_as_float(images[:1]))

    def loss(model, images, step):
        return model.loss(_as_float(images), kl_weight=kl_weight)

    validate = None
    if validation_images is not None:
        validate = lambda model: vae_evaluate(model, _as_float(validation_images))  # noqa: E731
    return Stage(model, loss, batch=lambda indices: images[indices], num_examples=len(images), validate=validate,
                 metadata={"kl_weight": kl_weight})


def dvae_stage(model: DiscreteVAE, images: torch.Tensor, steps: int, schedule: DVAESchedule | None = None,
               validation_images: torch.Tensor | None = None) -> Stage:
    """Lesson 02: the dVAE's ELBO with Gumbel-softmax codes; tau and beta follow ``schedule``
    over a run of ``steps``. Validation: hard-code PSNR and codebook use."""
    schedule = schedule or DVAESchedule()
    model.check_images(_as_float(images[:1]))

    def loss(model, images, step):
        return dvae_loss(model, images, step, steps, schedule)

    validate = None
    if validation_images is not None:
        validate = lambda model: evaluate_dvae(model, validation_images)  # noqa: E731
    return Stage(model, loss, batch=lambda indices: images[indices], num_examples=len(images), validate=validate,
                 metadata={"schedule": vars(schedule)})


def vqvae_stage(model: VQVAE, images: torch.Tensor, validation_images: torch.Tensor | None = None) -> Stage:
    """Lesson 02's comparison: the VQ-VAE's reconstruction + codebook + commitment loss."""
    model.check_images(_as_float(images[:1]))
    validate = None
    if validation_images is not None:
        validate = lambda model: evaluate_dvae(model, validation_images)  # noqa: E731
    return Stage(model, lambda model, images, step: vqvae_loss(model, images),
                 batch=lambda indices: images[indices], num_examples=len(images), validate=validate)


def dalle_stage(model: DALLE, text_ids: torch.Tensor, codes: torch.Tensor, pad_ids: torch.Tensor | None = None,
                caption_dropout: float = 0.0, validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> Stage:
    """Lesson 04: next-token loss over [caption ; codes], 1/8 text + 7/8 image.

    With ``caption_dropout`` that fraction of captions is replaced by the empty caption
    ``pad_ids`` (all padding), so the model also learns p(image | no caption), which
    classifier-free guidance needs (lesson 05).
    """
    c = model.config
    if len(text_ids) != len(codes):
        raise ValueError(f"{len(text_ids)} captions but {len(codes)} images of codes")
    model.check_text(text_ids[:1])
    if tuple(codes.shape[1:]) != (c.image_size, c.image_size):
        raise ValueError(f"codes must be [N, {c.image_size}, {c.image_size}] for this model, got "
                         f"{tuple(codes.shape)}: was the dVAE's grid size the model's image_size?")
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"caption dropout must lie in [0, 1), got {caption_dropout}")
    if caption_dropout > 0 and pad_ids is None:
        raise ValueError("caption_dropout > 0 needs pad_ids, the token ids of an empty caption")

    def loss(model, batch, step):
        text, image = batch
        if caption_dropout > 0:
            dropped = torch.rand(len(text), device=text.device) < caption_dropout
            text = torch.where(dropped[:, None], pad_ids.to(text.device), text)
        return model(text, image, return_loss=True)

    validate = None
    if validation is not None:
        validate = lambda model: validation_loss(model, *validation)  # noqa: E731
    return Stage(model, loss, batch=lambda indices: (text_ids[indices], codes[indices].long()),
                 num_examples=len(codes), validate=validate, decay_only_matrices=True,
                 metadata={"caption_dropout": caption_dropout})


def clip_stage(model, images: torch.Tensor, captions: list[str], validation=None, keys: list[str] | None = None,
               pairs: bool = False) -> Stage:
    """Lesson 06: CLIP's contrastive loss over batches of (image, caption) pairs.

    ``images``: uint8 ``[N, 3, S, S]``; ``captions``: N strings, tokenized once here.
    ``keys``: what each example means (``dalle_lesson.clip.scene_key``; default: its caption);
    a batch never holds two examples of one meaning, since each would be the other's wrong
    answer although it is right. ``pairs``: examples ``2k`` and ``2k + 1`` differ in one
    attribute (``dalle_lesson.clip.hard_negative_pairs``) and always share a batch.
    ``validation``: ``(images, captions, keys)``, or a ``ScenePairs`` (then one-attribute
    accuracy is measured too); it reports the contrastive loss and retrieval accuracy.
    """
    from dalle_lesson.clip import ScenePairs, distinct_batch, evaluate_clip

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if pairs and len(images) % 2:
        raise ValueError("with pairs, the examples come two by two: give an even number")
    model.check_images(_as_float(images[:1]))
    tokens = model.tokenize(captions)  # [N, context_length]
    keys = list(keys) if keys is not None else list(captions)
    names = {name: k for k, name in enumerate(dict.fromkeys(keys))}
    groups = torch.tensor([names[key] for key in keys])  # [N] meaning ids
    unit = 2 if pairs else 1

    def batch(indices):
        chosen = distinct_batch(indices, groups, unit)
        return images[chosen], tokens[chosen]

    def loss(model, batch, step):
        images, tokens = batch
        return model.training_loss(_as_float(images), tokens)

    validate = None
    if validation is not None:
        extra = {"pairs": True, "attributes": validation.attributes} if isinstance(validation, ScenePairs) else {}
        if extra:
            validation = (validation.images, validation.captions, validation.keys)
        validate = lambda model: evaluate_clip(model, *validation, **extra)  # noqa: E731
    return Stage(model, loss, batch=batch, num_examples=len(images), validate=validate, decay_only_matrices=True,
                 metadata={"pairs": pairs, "meanings": len(names)})


def unclip_decoder_stage(model, image_vectors: torch.Tensor, codes: torch.Tensor, validation=None,
                         metadata: dict | None = None) -> Stage:
    """Lesson 08: CLIP image vector -> the dVAE codes of its picture (``codes``: of the
    picture moved to the middle, ``unclip.decoder_targets``).

    ``validation``: ``(dvae, image_vectors, captions)`` of pictures it is not trained on;
    their decoded pictures are read by the course scorer against those captions.
    """
    from dalle_lesson.unclip import decoder_accuracy, decoder_loss

    if len(image_vectors) != len(codes):
        raise ValueError(f"{len(image_vectors)} image vectors but {len(codes)} code grids")
    c = model.config
    if image_vectors.shape[1] != c.embed_dim or tuple(codes.shape[1:]) != (c.grid_size, c.grid_size):
        raise ValueError(f"the decoder wants vectors of {c.embed_dim} and {c.grid_size}x{c.grid_size} grids, "
                         f"got {tuple(image_vectors.shape[1:])} and {tuple(codes.shape[1:])}")
    targets = codes.long()
    validate = None
    if validation is not None:
        validate = lambda model: decoder_accuracy(model, *validation)  # noqa: E731
    return Stage(model, lambda model, batch, step: decoder_loss(model, *batch),
                 batch=lambda indices: (image_vectors[indices], targets[indices]), num_examples=len(codes),
                 validate=validate, metadata=metadata or {})


def unclip_prior_stage(model, text_vectors: torch.Tensor, image_vectors: torch.Tensor, validation=None,
                       metadata: dict | None = None) -> Stage:
    """Lesson 08: a caption's CLIP vector -> its picture's CLIP vector (cosine loss).

    ``validation``: ``(text_vectors, image_vectors)`` of other pairs; reports their mean cosine.
    """
    from dalle_lesson.unclip import prior_loss

    if text_vectors.shape != image_vectors.shape:
        raise ValueError(f"text vectors {tuple(text_vectors.shape)} and image vectors "
                         f"{tuple(image_vectors.shape)} must pair up one to one")

    def validate(model):
        with torch.no_grad():
            return {"cosine": float(prior_loss(model, *validation)["cosine"])}

    return Stage(model, lambda model, batch, step: prior_loss(model, *batch),
                 batch=lambda indices: (text_vectors[indices], image_vectors[indices]),
                 num_examples=len(text_vectors), validate=validate if validation is not None else None,
                 metadata=metadata or {})
