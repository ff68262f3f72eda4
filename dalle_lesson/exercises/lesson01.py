"""Checkers for the exercises of lesson 01 (autoencoders and VAEs).

Exercises 1, 2 and 5 train small models, which a checker cannot redo in a second, so
their checkers hold the learner's numbers against what such runs give: the bounds below
come from five seeds of the exercise's recipe (``VAEConfig(width=16)``, 250 steps of
batch 32 at the recipe's learning rate, on ``shapes_images(4000)``, scored with
``vae.evaluate`` on ``shapes_images(256, split="test")``), widened to leave room for
other seeds and machines, and the checks that matter are orderings that held in every
seed (exercise 5's checker also recomputes the 2-D model's KL from the model itself).
Exercise 4 is recomputed exactly from the shipped VAE, exercise 3 by the checker's own
repeated importance sampling with it.
"""

from __future__ import annotations

import math

import torch

from dalle_lesson.vae import evaluate, load_vae, shapes_images
from dalle_lesson.exercises import correct, unanswered

# What the exercise recipe gives, in nats per test image (min and max over five seeds
# were 51 to 89, 7 to 20, 37 to 61 and 14 to 37; the bounds leave room around them).
KL_BOUNDS = {
    "sigma 0.05": (40.0, 130.0),
    "sigma 0.3": (2.0, 40.0),
    "beta 1": (20.0, 100.0),
    "beta 4": (4.0, 60.0),
}
PSNR_BOUNDS = (13.0, 21.0)  # dB on the test images after 250 steps of a width-16 model


def _test_images(count: int = 256) -> torch.Tensor:

    return shapes_images(count, image_size=32, split="test")


def _check_in(value: float, bounds: tuple[float, float], what: str, hint: str) -> None:
    low, high = bounds
    assert low <= value <= high, (
        f"{what} = {value:.3g} is not what this run gives (expected {low:g} to {high:g}): {hint}")


def check_balance_knob(kl_at_sigma_005: float | None, kl_at_sigma_03: float | None,
                       psnr_at_sigma_005: float | None, psnr_at_sigma_03: float | None) -> None:
    """Exercise 1: test KL (nats per image) and reconstruction PSNR (dB) of the two quick
    VAEs trained with ``pixel_sigma=0.05`` and ``pixel_sigma=0.3``.

    The KL is the number to compare: the reconstruction term is scaled by 1/(2 sigma^2)
    and leaves out a constant that depends on sigma, so it is not comparable across sigma."""
    if unanswered(kl_at_sigma_005, kl_at_sigma_03, psnr_at_sigma_005, psnr_at_sigma_03,
                  expects="the test KL and PSNR of the sigma = 0.05 model and of the sigma = 0.3 model"):
        return
    for name, kl in (("sigma 0.05", kl_at_sigma_005), ("sigma 0.3", kl_at_sigma_03)):
        if kl > 1000:
            raise AssertionError(f"the {name} KL of {kl:.0f} nats looks like the reconstruction term: take "
                                 f"vae.evaluate(model, test_images)['kl']")
        _check_in(kl, KL_BOUNDS[name], f"the test KL at {name}",
                  "width 16, 250 steps of batch 32, and the KL from vae.evaluate on the 256 test images")
    assert kl_at_sigma_005 > 2 * kl_at_sigma_03, (
        f"the KL at sigma = 0.05 ({kl_at_sigma_005:.1f}) should be several times the KL at sigma = 0.3 "
        f"({kl_at_sigma_03:.1f}): a smaller sigma makes pixel errors dearer, so the encoder buys more "
        f"information. Did you swap the two?")
    for name, psnr in (("sigma 0.05", psnr_at_sigma_005), ("sigma 0.3", psnr_at_sigma_03)):
        _check_in(psnr, PSNR_BOUNDS, f"the PSNR at {name}",
                  "10 * log10(1 / MSE) of model.reconstruct(test_images), pixels in [0, 1]")
    sharper = "sigma = 0.05" if psnr_at_sigma_005 > psnr_at_sigma_03 else "sigma = 0.3"
    correct(f"KL {kl_at_sigma_005:.1f} nats at sigma = 0.05 against {kl_at_sigma_03:.1f} at sigma = 0.3; "
            f"PSNR {psnr_at_sigma_005:.1f} against {psnr_at_sigma_03:.1f} dB ({sharper} reconstructs sharper "
            f"in your run). Small sigma: more information in z, sharper images, a less covered prior")


def check_beta_vae(kl_at_beta_0: float | None, kl_at_beta_1: float | None, kl_at_beta_4: float | None) -> None:
    """Exercise 2: the test KL (nats per image) of three quick VAEs trained with
    ``kl_weight`` beta = 0, 1 and 4, everything else the same."""
    if unanswered(kl_at_beta_0, kl_at_beta_1, kl_at_beta_4, expects="the test KL at beta = 0, 1 and 4"):
        return
    for name, kl in (("beta 1", kl_at_beta_1), ("beta 4", kl_at_beta_4)):
        _check_in(kl, KL_BOUNDS[name], f"the test KL at {name}",
                  "width 16, 250 steps of batch 32; report the plain KL, not beta times the KL")
    assert kl_at_beta_4 < kl_at_beta_1, (
        f"beta = 4 makes every nat of KL four times dearer, so its KL ({kl_at_beta_4:.1f}) should be below the "
        f"beta = 1 model's ({kl_at_beta_1:.1f})")
    assert kl_at_beta_0 > kl_at_beta_1, (
        f"with beta = 0 nothing charges for the KL, so it should end above the beta = 1 model's "
        f"({kl_at_beta_0:.1f} is not above {kl_at_beta_1:.1f}). The test KL is still the plain KL, measured "
        f"with vae.evaluate, even though training ignored it")
    correct(f"KL {kl_at_beta_0:.4g} > {kl_at_beta_1:.1f} > {kl_at_beta_4:.1f} nats for beta = 0, 1, 4. With "
            f"beta = 0 nothing holds the codes near N(0, I): it is an autoencoder with noise added to its codes")


def importance_estimates(model, image: torch.Tensor, K: int, repeats: int,
                         generator: torch.Generator) -> torch.Tensor:
    """``repeats`` independent K-sample importance estimates of log p(x) for one image ``[1, 3, S, S]``,
    with the full Gaussian likelihood (its constant included)."""
    sigma, pixels = model.config.pixel_sigma, image.numel()
    with torch.no_grad():
        mean, logvar = model.encode(image)
        std = (0.5 * logvar).exp()
        eps = torch.randn(repeats * K, mean.shape[1], generator=generator)
        z = mean + std * eps
        # log N(x; decoder(z), sigma^2 I), written out: squared error plus the normaliser
        log_likelihood = (-((image - model.decode(z)) ** 2).flatten(1).sum(1) / (2 * sigma**2)
                          - pixels * math.log(sigma * math.sqrt(2 * math.pi)))
        log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
        log_posterior = (-0.5 * eps**2 - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(1)
        log_weights = (log_likelihood + log_prior - log_posterior).view(repeats, K)
    return torch.logsumexp(log_weights, dim=1) - math.log(K)


def check_importance_sampling(log_px_k1: float | None, log_px_k10: float | None, log_px_k100: float | None,
                              model=None, image: torch.Tensor | None = None) -> None:
    """Exercise 3: importance-sampling estimates of log p(x) for K = 1, 10, 100 samples.

    ``model`` defaults to the shipped lesson VAE and ``image`` to the first test image,
    ``shapes_images(256, split="test")[:1]``. Each of your numbers must lie where this
    checker's own repeated estimates with the same K fall (mean +- 5 standard deviations)."""
    if unanswered(log_px_k1, log_px_k10, log_px_k100, expects="three estimates of log p(x), for K = 1, 10 and 100"):
        return

    model = model if model is not None else load_vae()
    image = image if image is not None else _test_images(1)
    constant = image.numel() * math.log(model.config.pixel_sigma * math.sqrt(2 * math.pi))
    generator = torch.Generator().manual_seed(0)
    means = {}
    for K, repeats, theirs in ((1, 64, log_px_k1), (10, 32, log_px_k10), (100, 16, log_px_k100)):
        estimates = importance_estimates(model, image, K, repeats, generator)
        means[K], spread = estimates.mean().item(), max(estimates.std().item(), 0.5)
        if abs(theirs - means[K] - constant) < 5 * spread:
            raise AssertionError(f"your K = {K} estimate {theirs:.1f} is off by the likelihood's constant "
                                 f"3072 * log(sigma * sqrt(2 pi)) = {constant:.1f}: subtract it from log p(x|z)")
        assert abs(theirs - means[K]) < 5 * spread, (
            f"for K = {K} the estimates of log p(x) come out near {means[K]:.1f} (spread {spread:.1f}), yours is "
            f"{theirs:.1f}. Average the weights p(x|z) p(z) / q(z|x), not their logs: "
            f"logsumexp(log_weights) - log(K). log p(x) is positive here: a density can exceed 1")
    correct(f"log p(x) estimates {log_px_k1:.1f}, {log_px_k10:.1f}, {log_px_k100:.1f} for K = 1, 10, 100. On "
            f"average they rise ({means[1]:.1f}, {means[10]:.1f}, {means[100]:.1f}): K = 1 is the ELBO, "
            f"more samples tighten the bound towards log p(x)")


def check_active_dimensions(per_dimension_kl, busiest: int | None, switched_off: int | None,
                            model=None, images: torch.Tensor | None = None) -> None:
    """Exercise 4: the average KL of each latent dimension over the test images, the index
    of the busiest one, and how many dimensions are switched off (average KL below 0.1 nats).

    ``model`` defaults to the shipped lesson VAE, ``images`` to ``shapes_images(256, split="test")``."""
    if unanswered(per_dimension_kl, busiest, switched_off,
                  expects="the per-dimension KL (16 numbers), the busiest dimension, the number switched off"):
        return

    model = model if model is not None else load_vae()
    images = images if images is not None else _test_images()
    with torch.no_grad():
        mean, logvar = model.encode(images)
    want = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).mean(0)  # KL per dimension, averaged over images
    theirs = torch.as_tensor(per_dimension_kl, dtype=torch.float32).flatten()
    assert theirs.numel() == want.numel(), (
        f"expected one KL per latent dimension ({want.numel()} numbers), got {theirs.numel()}: average over the "
        f"images (dim 0), keep the dimensions apart")
    if torch.allclose(theirs, 2 * want, rtol=1e-3, atol=1e-4):
        raise AssertionError("your values are twice the KL: the closed form has a factor 1/2")
    if torch.allclose(theirs, len(images) * want, rtol=1e-3, atol=1e-4):
        raise AssertionError("your values are sums over the images: take the mean over them")
    assert torch.allclose(theirs, want, rtol=1e-3, atol=1e-3), (
        f"per-dimension KL should be {[round(v, 2) for v in want.tolist()]}, got "
        f"{[round(v, 2) for v in theirs.tolist()]}: 0.5 * (mean^2 + exp(logvar) - 1 - logvar), averaged over images")
    assert busiest == int(want.argmax()), f"the busiest dimension is {int(want.argmax())}, not {busiest}"
    off = int((want < 0.1).sum())
    assert switched_off == off, f"{off} dimensions average below 0.1 nats, not {switched_off}"
    correct(f"the dimensions carry {want.min():.2f} to {want.max():.2f} nats each (total {want.sum():.1f}), "
            f"the busiest is {busiest}, {off} switched off"
            + (": the lesson VAE uses all of its latent dimensions" if off == 0 else ""))


def check_latent_2d(model_2d, kl_2d: float | None, kl_16d: float | None,
                    images: torch.Tensor | None = None) -> None:
    """Exercise 5: your trained 2-D VAE, its test KL, and the test KL of a 16-D VAE trained
    with the same recipe (nats per image). ``images`` defaults to the 256 test images."""
    if unanswered(model_2d, kl_2d, kl_16d,
                  expects="the trained 2-D model, its test KL and the test KL of a 16-D model of the same recipe"):
        return

    assert model_2d.config.latent_dim == 2, (
        f"this model has {model_2d.config.latent_dim} latent dimensions: build it with VAEConfig.latent_2d() "
        f"or VAEConfig(latent_dim=2, ...)")
    images = images if images is not None else _test_images()
    measured = evaluate(model_2d, images)["kl"]
    assert math.isclose(kl_2d, measured, rel_tol=0.01, abs_tol=0.01), (
        f"your 2-D model's test KL is {measured:.2f} nats, not {kl_2d:.2f}: vae.evaluate(model_2d, test_images)")
    _check_in(kl_16d, KL_BOUNDS["beta 1"], "the 16-D model's test KL",
              "the same recipe as the 2-D model, only latent_dim=16")
    assert kl_2d < kl_16d / 2, (
        f"the 2-D model's KL ({kl_2d:.1f}) should be well below the 16-D model's ({kl_16d:.1f}): did you train "
        f"both with the same recipe?")
    correct(f"{kl_2d:.1f} nats through two dimensions against {kl_16d:.1f} through sixteen: the 2-D code keeps "
            f"only the few attributes that lower the squared error most")
