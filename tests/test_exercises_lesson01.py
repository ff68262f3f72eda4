"""The lesson 01 checkers accept a right answer and reject a wrong one (tiny models, so fast)."""

import math

import pytest
import torch

from dalle_lesson import vae
from dalle_lesson.exercises import lesson01


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vae.VAE(vae.VAEConfig(width=4, latent_dim=3)).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_none_only_says_what_is_expected(capsys):
    lesson01.check_balance_knob(None, None, None, None)
    lesson01.check_beta_vae(None, None, None)
    lesson01.check_importance_sampling(None, None, None)
    lesson01.check_active_dimensions(None, None, None)
    lesson01.check_latent_2d(None, None, None)
    assert capsys.readouterr().out.count("Not answered yet") == 5


def test_balance_knob():
    lesson01.check_balance_knob(70.0, 12.0, 17.4, 16.3)  # a seed-0-like run
    with pytest.raises(AssertionError, match="swap"):
        lesson01.check_balance_knob(45.0, 30.0, 17.4, 16.3)  # sigma = 0.3 keeps too much information
    with pytest.raises(AssertionError, match="reconstruction term"):
        lesson01.check_balance_knob(11865.0, 449.0, 17.4, 16.3)


def test_beta_vae():
    lesson01.check_beta_vae(99.0, 53.0, 32.0)
    lesson01.check_beta_vae(1.6e11, 37.0, 14.0)  # a beta = 0 run whose variances ran away
    with pytest.raises(AssertionError, match="four times dearer"):
        lesson01.check_beta_vae(99.0, 30.0, 50.0)
    with pytest.raises(AssertionError):
        lesson01.check_beta_vae(99.0, 53.0, 4 * 32.0)  # beta times the KL


def importance_estimate(model, image, K, generator):
    """log p(x) by importance sampling, written with torch.distributions (independent of the checker)."""
    sigma = model.config.pixel_sigma
    with torch.no_grad():
        mean, logvar = model.encode(image)
        q = torch.distributions.Normal(mean[0], (0.5 * logvar[0]).exp())
        z = mean[0] + q.scale * torch.randn(K, mean.shape[1], generator=generator)
        likelihood = torch.distributions.Normal(model.decode(z), sigma).log_prob(image).flatten(1).sum(1)
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        log_w = likelihood + prior - q.log_prob(z).sum(1)
    return (torch.logsumexp(log_w, 0) - math.log(K)).item()


def test_importance_sampling(tiny, images):
    image = images[:1]
    generator = torch.Generator().manual_seed(5)
    right = [importance_estimate(tiny, image, K, generator) for K in (1, 10, 100)]
    lesson01.check_importance_sampling(*right, model=tiny, image=image)
    constant = image.numel() * math.log(tiny.config.pixel_sigma * math.sqrt(2 * math.pi))
    with pytest.raises(AssertionError, match="constant"):
        lesson01.check_importance_sampling(*(value + constant for value in right), model=tiny, image=image)
    with pytest.raises(AssertionError):
        lesson01.check_importance_sampling(right[0], right[1], right[1] + 500, model=tiny, image=image)


def test_active_dimensions(tiny, images):
    with torch.no_grad():
        mean, logvar = tiny.encode(images)
    per_dim = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).mean(0)
    busiest, off = int(per_dim.argmax()), int((per_dim < 0.1).sum())
    lesson01.check_active_dimensions(per_dim.tolist(), busiest, off, model=tiny, images=images)
    with pytest.raises(AssertionError, match="factor 1/2"):
        lesson01.check_active_dimensions((2 * per_dim).tolist(), busiest, off, model=tiny, images=images)
    with pytest.raises(AssertionError, match="busiest"):
        lesson01.check_active_dimensions(per_dim.tolist(), (busiest + 1) % 3, off, model=tiny, images=images)


def test_latent_2d(images):
    torch.manual_seed(0)
    model_2d = vae.VAE(vae.VAEConfig(width=4, latent_dim=2)).eval()
    with torch.no_grad():
        mean, logvar = model_2d.encode(images)
    kl_2d = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum(1).mean().item()
    lesson01.check_latent_2d(model_2d, kl_2d, 50.0, images=images)
    with pytest.raises(AssertionError, match="not"):
        lesson01.check_latent_2d(model_2d, kl_2d + 3, 50.0, images=images)
    with pytest.raises(AssertionError, match="latent dimensions"):
        lesson01.check_latent_2d(vae.VAE(vae.VAEConfig(width=4, latent_dim=3)), kl_2d, 50.0, images=images)
