"""CLIP-guided generation: draw a picture by optimising dVAE codes until CLIP likes them (lesson 08).

DALL·E draws codes with a transformer and then asks CLIP which pictures fit the caption.
Soon after the paper, people turned this around (the *dall-e-explained* notebook, "The Big
Sleep", VQGAN + CLIP): keep only the dVAE's decoder and CLIP, and *search* for a grid of
codes whose picture CLIP scores high for the caption. No transformer, no training, just
gradient ascent through two frozen networks::

    logits [B, vocab, h, w]  --relax-->  code probabilities  --dVAE decoder-->  image [B, 3, S, S]
    image  --K random augmentations-->  CLIP image vectors [B*K, D]
    loss = -(mean cosine similarity with the caption's vector);  Adam step on the logits

Three details of the loop, and what measuring them on training captions showed:

* **Codes are discrete; gradients need something continuous.** We optimise one logit per
  code per grid cell and relax them with a Gumbel-softmax (lesson 02). With ``hard=True``
  (the default) the forward pass uses one-hot codes and the backward pass the soft ones
  (straight-through), so CLIP always judges a picture the dVAE can really draw. With soft
  codes (``hard=False``) the optimiser may exploit blends of codes that no grid of real
  codes makes: with small steps (lr 0.1) the relaxed picture scored 0.26 after 50 steps but
  its argmax picture -0.15. With lr 1 the logits soon grow so large that the soft sample is
  nearly one-hot and the gap closes; straight-through closes it by construction, and scored
  as well or better.
* **CLIP can be fooled.** A network's gradient happily finds pixel patterns that raise a
  score without drawing anything (adversarial examples). So CLIP never sees the decoded
  picture itself, only K randomly shifted, mirrored and noised copies: a pattern that
  fools CLIP at one exact pixel offset rarely fools it at all of them, while a red circle
  is a red circle wherever it sits. Mirroring is used only when the caption has no
  left/right relation (a mirror turns "left of" into "right of"). Measured: without
  augmentations the mean CLIP score of 24 training captions' pictures rose from 0.59 to
  0.75, and the scorer found them no better; the extra 0.16 was CLIP being fooled.
* **The answer is the hard codes.** The result is ``dvae.decode(argmax of the logits)``:
  a picture the dVAE can make, the same kind of thing the transformer samples.

What augmentations cannot fix: CLIP is the only judge, and the course CLIP gives 0.9 and
more (true renderings score about 0.95) to blobs of roughly the right colours in roughly
the right places, which the course scorer reads as the wrong shapes. Some captions also
stall on an empty canvas, where changing any one code changes CLIP's score too little
to be worth it. ``benchmarks/clip_guided.py`` measures all this against the transformer,
whose training on real code grids is exactly the prior this method lacks.

Example::

    from dalle_lesson.clip import load_clip
    from dalle_lesson.dvae import load_dvae
    result = generate(load_clip(), load_dvae(), "a red circle", seed=0)
    result.images.shape          # torch.Size([1, 3, 32, 32]), from result.codes [1, 16, 16]
    result.history[[0, -1], 0]   # CLIP's score of the hard picture: at the random start, at the end

``generate`` takes one caption or a list of them (optimised together, as one batch);
``callback(step, images)`` is called with the current hard pictures, so a notebook can
show them as they evolve.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dalle_lesson.clip import CourseCLIP
from dalle_lesson.data import RELATION_WORDS
from dalle_lesson.dvae import DiscreteVAE, gumbel_softmax

# The words that make a caption's meaning change under a horizontal flip.
SIDEWAYS_WORDS = tuple(word for relation in ("left of", "right of") for word in RELATION_WORDS[relation])


@dataclass
class CLIPGuidedResult:
    """What :func:`generate` made, one row per caption."""

    images: torch.Tensor  # [B, 3, S, S] in [0, 1]: dvae.decode(codes)
    codes: torch.Tensor  # [B, h, w]: the argmax of the optimised logits
    captions: list[str]
    scores: torch.Tensor  # [B]: CLIP's cosine of each final image with its caption
    history: torch.Tensor  # [steps + 1, B]: the same score of the hard picture before every step, and at the end
    objective: torch.Tensor  # [steps, B]: what was maximised, the cosine averaged over the augmented copies
    seconds: float  # wall time of the whole optimisation

    def save_grid(self, path, ncols: int | None = None) -> str:
        """Save the images with their captions as a PNG grid (``dalle_lesson.viz.save_grid``)."""
        from dalle_lesson.viz import save_grid

        return save_grid(list(self.images), str(path), self.captions, ncols=ncols or min(len(self.images), 4))


# --------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(*models: nn.Module):
    """Eval mode and no parameter gradients inside the block; each model's state is restored after.

    Gradients still flow *through* a frozen model to its inputs (our logits), which is all
    we need; not computing them for the weights saves time.

    >>> model = nn.Linear(2, 2)
    >>> with frozen(model):
    ...     model.weight.requires_grad, model.training
    (False, False)
    >>> model.weight.requires_grad, model.training
    (True, True)
    """
    saved = [(model.training, [p.requires_grad for p in model.parameters()]) for model in models]
    try:
        for model in models:
            model.eval().requires_grad_(False)
        yield
    finally:
        for model, (training, flags) in zip(models, saved):
            model.train(training)
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)


def may_flip(caption: str) -> bool:
    """Whether a horizontal flip keeps the caption true (no "left of" / "right of" in it).

    >>> may_flip("a red circle above a blue star"), may_flip("a red circle to the left of a blue star")
    (True, False)
    """
    text = " ".join(caption.lower().split())
    return not any(word in text for word in SIDEWAYS_WORDS)


def augment(images: torch.Tensor, copies: int, max_shift: int = 3, noise: float = 0.03,
            flip: Sequence[bool] | None = None) -> torch.Tensor:
    """``copies`` random variants of each image: shifted, maybe mirrored, with a little noise.

    ``images [B, 3, S, S]`` -> ``[B * copies, 3, S, S]``, the copies of image 0 first. Shifts
    of up to ``max_shift`` pixels each way pad with the border's own colour (the background),
    so no black frame appears; ``flip[b]`` allows mirroring image b. Differentiable.

    >>> augment(torch.rand(2, 3, 32, 32), copies=4).shape
    torch.Size([8, 3, 32, 32])
    """
    b, _, s, _ = images.shape
    flip = [True] * b if flip is None else list(flip)
    padded = F.pad(images, [max_shift] * 4, mode="replicate")  # [B, 3, S + 2m, S + 2m]
    shifts = torch.randint(0, 2 * max_shift + 1, (b, copies, 2)).tolist()
    mirror = (torch.rand(b, copies) < 0.5).tolist()
    out = []
    for i in range(b):
        for k in range(copies):
            dy, dx = shifts[i][k]
            crop = padded[i, :, dy : dy + s, dx : dx + s]  # [3, S, S], moved by (dy - m, dx - m)
            out.append(crop.flip(-1) if flip[i] and mirror[i][k] else crop)
    out = torch.stack(out)
    return (out + noise * torch.randn_like(out)).clamp(0, 1)  # CLIP reads [0, 1]


def relax(logits: torch.Tensor, tau: float, hard: bool) -> torch.Tensor:
    """Logits ``[B, vocab, h, w]`` -> code probabilities of the same shape (dim 1 sums to 1).

    A Gumbel-softmax sample at temperature ``tau`` (lesson 02). With ``hard`` its forward
    value is the one-hot argmax of the sample and its gradient the soft one (straight-through):
    the decoder then only ever sees real codes, as it does when the transformer samples.
    """
    return gumbel_softmax(logits, tau, hard=hard, dim=1)


@torch.no_grad()
def hard_images(dvae: DiscreteVAE, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes the logits stand for (their argmax, ``[B, h, w]``) and the dVAE's picture of them."""
    codes = logits.argmax(dim=1)
    return codes, dvae.decode(codes)


def _clip_images(clip_model: CourseCLIP, images: torch.Tensor) -> torch.Tensor:
    """dVAE pictures at the size CLIP reads (the shipped models agree: 32 x 32)."""
    size = clip_model.config.image_size
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(0, 1)


@torch.no_grad()
def _scores(clip_model: CourseCLIP, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine of each image with its own caption vector: ``[B]``."""
    return (clip_model.encode_images(_clip_images(clip_model, images)) * text).sum(-1)


def _check(captions, steps, lr, tau, augmentations, max_shift, noise) -> list[str]:
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    if not captions:
        raise ValueError("give at least one caption")
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(f"a caption is a str, got {type(caption).__name__}")
        if not caption.strip():
            raise ValueError("a caption is empty: CLIP-guided generation needs something to aim for "
                             "(the transformer can draw from no caption, this method cannot)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    if isinstance(augmentations, bool) or not isinstance(augmentations, int) or augmentations < 1:
        raise ValueError(f"augmentations must be a whole number >= 1 (the copies CLIP sees per step), "
                         f"got {augmentations!r}")
    if not (lr > 0 and tau > 0):
        raise ValueError(f"lr and tau must be positive, got lr={lr!r}, tau={tau!r}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0 or not noise >= 0:
        raise ValueError(f"max_shift must be a whole number >= 0 and noise >= 0, got {max_shift!r}, {noise!r}")
    return captions


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def generate(clip_model: CourseCLIP, dvae: DiscreteVAE, caption: str | Sequence[str], steps: int = 150,
             lr: float = 1.0, tau: float = 1.0, augmentations: int = 8, seed: int = 0, progress: bool = True,
             callback: Callable[[int, torch.Tensor], None] | None = None, hard: bool = True,
             max_shift: int = 3, noise: float = 0.03, init_std: float = 2.0) -> CLIPGuidedResult:
    """Optimise a dVAE code grid per caption so that CLIP scores its picture high for the caption.

    ``caption``: one caption or a list (each gets its own grid; all are optimised as one
    batch). ``steps`` Adam steps of size ``lr`` on logits ``[B, vocab, h, w]`` that start
    as seeded Gaussian noise of std ``init_std``; each step relaxes them to code
    probabilities (a Gumbel-softmax sample at temperature ``tau``; one-hot codes with a
    straight-through gradient if ``hard``), decodes them, makes ``augmentations`` random
    copies of each picture (shifts of up to ``max_shift`` pixels, mirroring unless the
    caption says left/right, Gaussian pixel noise of std ``noise``) and maximises their mean
    cosine similarity with the caption in CLIP.

    Both models are frozen while it runs (eval mode, no weight gradients) and left as they
    were. The same ``seed`` gives the same result for the same captions in the same batch.
    ``callback(step, images)`` gets the current hard pictures ``[B, 3, S, S]`` before every
    step and once at the end (step == steps). Example::

        result = generate(clip, dvae, ["a red circle", "a big blue square"], steps=100)
        result.images, result.scores      # [2, 3, 32, 32] from the argmax codes; their CLIP scores
        result.history[:, 0]              # the first picture's CLIP score, step by step
    """
    captions = _check(caption, steps, lr, tau, augmentations, max_shift, noise)
    c, b = dvae.config, len(captions)
    device = next(dvae.parameters()).device
    flip = [may_flip(text) for text in captions]
    started = time.perf_counter()
    # Our own random stream: the same seed gives the same pictures, and the caller's stream is untouched.
    with frozen(clip_model, dvae), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            text = clip_model.encode_text(captions).to(device)  # [B, D], unit vectors
        logits = (init_std * torch.randn(b, c.vocab_size, c.grid_size, c.grid_size)).to(device).requires_grad_()
        optimizer = torch.optim.Adam([logits], lr=lr)
        history, objective = [], []
        bar = tqdm(range(steps + 1), desc="CLIP-guided", disable=not progress, leave=False)
        for step in bar:
            codes, images = hard_images(dvae, logits)  # what we would return if we stopped now
            history.append(_scores(clip_model, images, text))
            bar.set_postfix(clip=f"{history[-1].mean():.3f}")
            if callback is not None:
                with torch.random.fork_rng(devices=[]):  # whatever the callback draws leaves our stream alone
                    callback(step, images.cpu())
            if step == steps:
                break
            decoded = dvae.decode_soft(relax(logits, tau, hard))  # [B, 3, S, S]
            copies = augment(_clip_images(clip_model, decoded), augmentations, max_shift, noise, flip)  # [B*K, 3, s, s]
            features = clip_model.encode_images(copies).view(b, augmentations, -1)  # [B, K, D]
            similarity = (features * text[:, None]).sum(-1).mean(1)  # [B]: cosine, averaged over the copies
            optimizer.zero_grad(set_to_none=True)
            (-similarity.sum()).backward()  # a sum: each caption's grid gets the gradient of its own score
            optimizer.step()
            objective.append(similarity.detach())
    return CLIPGuidedResult(images=images.cpu(), codes=codes.cpu(), captions=captions, scores=history[-1].cpu(),
                            history=torch.stack(history).cpu(), objective=torch.stack(objective).cpu(),
                            seconds=time.perf_counter() - started)
