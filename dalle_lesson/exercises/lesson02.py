"""Checkers for the exercises of lesson 02 (the discrete VAE).

Every answer here is recomputed, not looked up: exercise 1 from the logit-Laplace density
(``dvae.logit_laplace_nll``), exercises 2 and 3 from the shipped dVAE on the lesson's 500
held-out shapes (or the ``model`` and ``images`` you pass), exercise 4 from the sizes in
the configs. Exercise 3 draws random codes, so its checker draws its own and compares
within the spread that sampling gives.
"""

from __future__ import annotations

import math

import torch

from dalle_lesson.data import ShapesDataset
from dalle_lesson.dvae import DVAEConfig, load_dvae, logit_laplace_nll, psnr
from dalle_lesson.exercises import correct, unanswered

FLAT_STD = 0.05  # exercise 2: a picture is "flat" when no channel varies more than this across it


def _shipped_dvae():
    return load_dvae()


def _held_out(count: int = 500) -> torch.Tensor:
    """The lesson's held-out shapes in [0, 1]: the notebook's ``held_out[:count].float() / 255``
    (rounded to 8 bits, as ``preload_images`` stores them)."""
    scenes = ShapesDataset(length=500, image_size=32, split="heldout", seed=1)
    return torch.stack([(scenes[i][0] * 255).round() / 255 for i in range(min(count, len(scenes)))])


def _close(value: float, want: float, tolerance: float) -> bool:
    return abs(float(value) - want) <= tolerance


# --------------------------------------------------------------------------------------
# Exercise 1: what a learned scale b does in the logit-Laplace likelihood
# --------------------------------------------------------------------------------------


def _nll(x: float, mu: float, log_b: torch.Tensor) -> torch.Tensor:
    return logit_laplace_nll(torch.tensor(x, dtype=torch.float64), torch.tensor(mu, dtype=torch.float64), log_b)


def check_learned_scale(best_b: float | None, nats_saved: float | None) -> None:
    """Exercise 1. A pixel of value 0 is mapped to x = map_pixels(0) = 0.1.

    ``best_b``: the scale b that minimises the NLL when the decoder's mu misses logit(x) by 0.5.
    ``nats_saved``: how much the NLL falls, for a pixel whose mu is exactly logit(x), when b
    shrinks from 1 to 0.01."""
    if unanswered(best_b, nats_saved,
                  expects="the b that minimises the NLL for an error of 0.5, and the nats saved going from b = 1 "
                          "to b = 0.01 at zero error"):
        return
    x = 0.1
    mu_exact = math.log(x / (1 - x))
    log_b = torch.linspace(-8, 4, 120_001, dtype=torch.float64)  # a fine grid: the minimum is found, not assumed
    want_b = float(log_b[_nll(x, mu_exact + 0.5, log_b).argmin()].exp())
    at = lambda b: float(_nll(x, mu_exact, torch.tensor(math.log(b), dtype=torch.float64)))  # noqa: E731
    want_saved = at(1.0) - at(0.01)

    if _close(best_b, math.log(want_b), 0.01):
        raise AssertionError(f"{best_b:.3f} is ln b; the question asks for b itself (exp of it)")
    assert _close(best_b, want_b, 0.01 * want_b), (
        f"the NLL for an error of 0.5 is smallest at b = {want_b:.3f}, not {best_b:.3g}. Hint: write the NLL as "
        f"ln b + |error| / b + terms without b, and set its derivative in b to zero")
    if _close(nats_saved, -want_saved, 0.01):
        raise AssertionError("the NLL falls, so the saving is positive: NLL(b = 1) - NLL(b = 0.01)")
    if _close(nats_saved, want_saved / math.log(10), 0.01):
        raise AssertionError(f"{nats_saved:.3f} is in decimal digits (log10); nats are natural logarithms")
    assert _close(nats_saved, want_saved, 0.01), (
        f"at zero error the NLL falls by {want_saved:.3f} nats from b = 1 to b = 0.01, not {nats_saved:.3g}. "
        f"Hint: with |logit(x) - mu| = 0 only the ln b term changes")
    correct(f"b = {want_b:.2f} (the size of the error) and {want_saved:.2f} nats (ln 100). On an edge, where mu "
            f"misses, b settles at the size of the miss; on a flat background that the decoder gets exactly right, "
            f"every tenfold smaller b is worth another ln 10 = {math.log(10):.2f} nats per pixel value, without "
            f"end. A learned scale lets the easy pixels earn most of the likelihood")


# --------------------------------------------------------------------------------------
# Exercise 2: what one code means on its own
# --------------------------------------------------------------------------------------


@torch.no_grad()
def uniform_grid_pictures(model) -> torch.Tensor:
    """Every code decoded as a grid filled with that one code: ``[vocab_size, C, S, S]``."""
    side, vocab = model.config.grid_size, model.config.vocab_size
    codes = torch.arange(vocab)[:, None, None].expand(vocab, side, side)
    return torch.cat([model.decode(codes[i : i + 128]) for i in range(0, vocab, 128)])


def check_single_code_pictures(background_code: int | None, flat_codes: int | None, model=None,
                               images: torch.Tensor | None = None) -> None:
    """Exercise 2. ``background_code``: the code the dVAE uses most often on the held-out images.
    ``flat_codes``: how many of the codes, each decoded as a grid filled with that one code,
    give a flat picture (in every channel the pixels' standard deviation is below 0.05).

    ``model`` defaults to the shipped dVAE, ``images`` to the lesson's 500 held-out shapes."""
    if unanswered(background_code, flat_codes,
                  expects="the most used code on the held-out images, and the number of codes whose one-code grid "
                          "decodes to a flat picture"):
        return
    model = model if model is not None else _shipped_dvae()
    images = images if images is not None else _held_out()
    with torch.no_grad():
        codes = torch.cat([model.encode(images[i : i + 250]) for i in range(0, len(images), 250)])
    counts = torch.bincount(codes.flatten(), minlength=model.config.vocab_size)
    want_background = int(counts.argmax())
    pictures = uniform_grid_pictures(model)
    flat = pictures.std(dim=(2, 3)).amax(dim=1) < FLAT_STD  # the largest of the three channels' spreads
    want_flat = int(flat.sum())
    vocab = model.config.vocab_size

    assert int(background_code) == want_background, (
        f"the most used code on these images is {want_background} ({counts.max() / counts.sum():.0%} of the "
        f"cells), not {background_code}. Hint: torch.bincount over model.encode(images).flatten(), then argmax")
    if abs(int(flat_codes) - (vocab - want_flat)) <= 3 and abs(int(flat_codes) - want_flat) > 3:
        raise AssertionError(f"{flat_codes} looks like the number of codes that are NOT flat ({vocab - want_flat})")
    # A few codes sit close to the threshold; allow for arithmetic that differs in the last digits.
    assert abs(int(flat_codes) - want_flat) <= 3, (
        f"{want_flat} of the {vocab} one-code grids decode to a flat picture, not {flat_codes}. Hint: decode "
        f"torch.full((1, side, side), k) for every k, take .std(dim=(2, 3)) per channel, and call a picture flat "
        f"when its largest channel spread is below {FLAT_STD}")
    background_colour = pictures[want_background].mean(dim=(1, 2))
    correct(f"code {want_background} is the background (alone it decodes to the colour "
            f"{[round(v, 2) for v in background_colour.tolist()]}), and {want_flat} of {vocab} codes decode alone to "
            f"a flat picture. On its own a code is mostly a colour: outlines come from neighbouring codes together, "
            f"which the decoder's 3x3 convolutions mix")


# --------------------------------------------------------------------------------------
# Exercise 3: a sample of the encoder's distribution against its argmax
# --------------------------------------------------------------------------------------


@torch.no_grad()
def sample_against_argmax(model, images: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
    """Mean top probability, how often a Gumbel-max sample differs from the argmax, and the PSNR
    the sample loses against the argmax, for one draw of the noise."""
    logits = model.logits(images)
    top = logits.softmax(dim=1).amax(dim=1)
    argmax = logits.argmax(dim=1)
    uniform = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).clamp_min(1e-20)
    sampled = (logits - torch.log(-torch.log(uniform))).argmax(dim=1)  # Gumbel-max: an exact sample of q
    drop = psnr(model.decode(argmax), images).mean() - psnr(model.decode(sampled), images).mean()
    return {"mean_top_probability": float(top.mean()), "differs_fraction": float((sampled != argmax).float().mean()),
            "psnr_drop_db": float(drop)}


def check_sample_vs_argmax(mean_top_probability: float | None, differs_fraction: float | None,
                           psnr_drop_db: float | None, model=None, images: torch.Tensor | None = None) -> None:
    """Exercise 3, on the first 100 held-out images. ``mean_top_probability``: the encoder's largest
    softmax probability, averaged over all cells. ``differs_fraction``: the fraction of cells in
    which a sample of the encoder's distribution (Gumbel-max, or ``hard=True``) is not the argmax.
    ``psnr_drop_db``: PSNR of the argmax codes' reconstructions minus that of the sampled codes'.

    ``model`` defaults to the shipped dVAE, ``images`` to the first 100 held-out shapes."""
    if unanswered(mean_top_probability, differs_fraction, psnr_drop_db,
                  expects="the mean top probability, the fraction of cells where a sample is not the argmax, and "
                          "the PSNR the samples lose"):
        return
    model = model if model is not None else _shipped_dvae()
    images = images if images is not None else _held_out(100)
    draws = [sample_against_argmax(model, images, torch.Generator().manual_seed(seed)) for seed in range(4)]
    want_top = draws[0]["mean_top_probability"]
    differs = torch.tensor([d["differs_fraction"] for d in draws])
    drops = torch.tensor([d["psnr_drop_db"] for d in draws])
    # Your draw is one more draw: allow five times the spread between draws, and a floor for tiny spreads.
    differs_tolerance = max(5 * differs.std().item(), 0.01)
    drop_tolerance = max(5 * drops.std().item(), 0.3)

    assert _close(mean_top_probability, want_top, 1e-3), (
        f"the mean of the largest softmax probability is {want_top:.4f}, not {mean_top_probability:.4g}. "
        f"Hint: model.logits(images).softmax(dim=1).amax(dim=1).mean()")
    if _close(differs_fraction, want_top, differs_tolerance):
        raise AssertionError("that is how often the sample IS the argmax; the question asks how often it is not")
    assert _close(differs_fraction, differs.mean().item(), differs_tolerance), (
        f"a sample differs from the argmax in about {differs.mean():.3f} of the cells (+- {differs_tolerance:.3f}), "
        f"not {differs_fraction:.3g}. Hint: argmax(logits + Gumbel noise) over the code dimension, against "
        f"argmax(logits)")
    if _close(psnr_drop_db, -drops.mean().item(), drop_tolerance) and drops.mean() > drop_tolerance:
        raise AssertionError("the sign is the wrong way round: argmax PSNR minus sample PSNR")
    assert _close(psnr_drop_db, drops.mean().item(), drop_tolerance), (
        f"sampled codes lose about {drops.mean():.2f} dB against the argmax (+- {drop_tolerance:.2f}), not "
        f"{psnr_drop_db:.3g}. Hint: decode both grids of codes with model.decode and compare dvae.psnr means")
    correct(f"the encoder puts {want_top:.1%} on its favourite code on average, so a sample leaves the argmax in "
            f"about {1 - want_top:.1%} of the cells (in expectation exactly 1 - the top probability), yet costs "
            f"only {drops.mean():.1f} dB: the codes a sample picks instead mostly decode alike. Training saw such "
            f"samples (the temperature changes how soft a sample is, not which code wins); the transformer is "
            f"trained on the argmax codes, as in the paper")


# --------------------------------------------------------------------------------------
# Exercise 4: bits
# --------------------------------------------------------------------------------------


def check_bits_per_code(lesson_bits: float | None, shipped_bits: float | None) -> None:
    """Exercise 4: how many bits one code would need to name so that the grid of codes holds as
    many bits as the 32x32 colour image (8 bits per value): for the lesson preset's 8x8 grid,
    and for the shipped dVAE's 16x16 grid. (Such a code has a vocabulary of 2**bits.)"""
    if unanswered(lesson_bits, shipped_bits, expects="bits per code for the 8x8 grid and for the 16x16 grid"):
        return
    lesson = DVAEConfig.lesson()
    image_bits = lesson.image_size**2 * lesson.channels * 8
    want = {"lesson": image_bits / lesson.grid_size**2, "shipped": image_bits / 16**2}
    for name, theirs in (("lesson", lesson_bits), ("shipped", shipped_bits)):
        if theirs > 1e6 and _close(math.log2(theirs), want[name], 1e-6):
            raise AssertionError(f"{theirs:.3g} is the vocabulary size; give its log2, the bits: {want[name]:g}")
        if _close(theirs, want[name] / 8, 1e-6):
            raise AssertionError(f"{theirs:g} is in bytes; the question asks for bits")
        if _close(theirs, math.log2(lesson.vocab_size), 1e-6):
            raise AssertionError(f"{theirs:g} bits is what a code of the {lesson.vocab_size} vocabulary holds now")
        assert _close(theirs, want[name], 1e-6), (
            f"{name}: {image_bits:,} bits of pixels over the grid's cells is {want[name]:g} bits per code, not "
            f"{theirs:g}. Hint: image_size**2 * 3 * 8 / grid_size**2")
    correct(f"{want['lesson']:g} bits per code on the 8x8 grid and {want['shipped']:g} on the 16x16 grid, against "
            f"{math.log2(lesson.vocab_size):g} that a code of {lesson.vocab_size} holds: a vocabulary of "
            f"2**{want['shipped']:g} codes is no vocabulary at all. The dVAE must throw most of the bits away")
