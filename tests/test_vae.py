"""Tests of dalle_lesson.vae: the ELBO's pieces against independent computations, training,
checkpoints, and errors."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dalle_lesson import checkpoint, vae
from dalle_lesson.stages import vae_stage
from dalle_lesson.train import Recipe, TrainingDiverged, fit
from dalle_lesson.vae import VAE, Autoencoder, VAEConfig


def small_config(**overrides) -> VAEConfig:
    return VAEConfig(**{"width": 8, "latent_dim": 4, **overrides})


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return vae.shapes_images(64, image_size=32)


# ---- the KL term ----------------------------------------------------------------------


def test_closed_form_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(5, 7) * 2, torch.randn(5, 7)
    reference = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(vae.kl_to_standard_normal(mean, logvar), reference, rtol=1e-5, atol=1e-5)


def test_closed_form_kl_matches_monte_carlo_estimate():
    # KL(q || p) = E_q[log q(z) - log p(z)]: average over many samples from q, compare to
    # the closed form with a bound of 5 standard errors of the Monte-Carlo mean.
    generator = torch.Generator().manual_seed(1)
    mean = torch.tensor([[0.5, -1.5, 2.0, 0.0]], dtype=torch.float64)
    logvar = torch.tensor([[-1.0, 0.3, 0.0, -2.5]], dtype=torch.float64)
    std = (0.5 * logvar).exp()
    n = 200_000
    z = mean + std * torch.randn(n, 4, generator=generator, dtype=torch.float64)
    log_ratio = (Normal(mean, std).log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)
    estimate, standard_error = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    closed_form = vae.kl_to_standard_normal(mean, logvar)[0]
    assert standard_error < 0.01  # the bound below is tight enough to catch a wrong formula
    assert abs(estimate - closed_form) < 5 * standard_error, (estimate, closed_form, standard_error)


def test_kl_is_zero_only_at_the_prior():
    zero = torch.zeros(1, 3)
    assert vae.kl_to_standard_normal(zero, zero).item() == 0.0
    assert vae.kl_to_standard_normal(zero + 0.1, zero).item() > 0
    assert vae.kl_to_standard_normal(zero, zero - 0.1).item() > 0


# ---- the reparameterisation trick -----------------------------------------------------


def test_reparameterized_sample_has_the_right_mean_and_std():
    n = 100_000
    mean = torch.tensor([-2.0, 0.0, 3.0]).expand(n, 3)
    logvar = torch.tensor([0.0, -3.0, 1.5]).expand(n, 3)
    z = vae.reparameterize(mean, logvar, torch.Generator().manual_seed(2))
    true_std = torch.tensor([1.0, math.exp(-1.5), math.exp(0.75)])
    # 5 standard errors: std/sqrt(n) for the mean, about std/sqrt(2n) for the std
    assert ((z.mean(0) - mean[0]).abs() < 5 * true_std / math.sqrt(n)).all(), z.mean(0)
    assert ((z.std(0) - true_std).abs() < 5 * true_std / math.sqrt(2 * n)).all(), z.std(0)


def test_gradients_flow_to_mean_and_logvar_through_the_sample():
    mean = torch.randn(4, 3, requires_grad=True)
    logvar = torch.randn(4, 3, requires_grad=True)
    z = vae.reparameterize(mean, logvar, torch.Generator().manual_seed(3))
    z.sum().backward()
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))  # the same noise again
    # z = mean + exp(logvar / 2) * eps, so dz/dmean = 1 and dz/dlogvar = exp(logvar / 2) * eps / 2
    torch.testing.assert_close(mean.grad, torch.ones(4, 3))
    torch.testing.assert_close(logvar.grad, (0.5 * logvar.detach()).exp() * eps / 2)


def test_vae_loss_is_reconstruction_plus_weighted_kl(images):
    torch.manual_seed(0)
    model = VAE(small_config())
    batch = images[:8]
    terms = model.loss(batch, kl_weight=0.25, generator=torch.Generator().manual_seed(4))
    # recompute by hand with the same noise
    mean, logvar = model.encode(batch)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(4))
    recon = ((batch - model.decode(z)) ** 2).sum((1, 2, 3)) / (2 * 0.1**2)
    kl = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(terms["reconstruction"], recon.mean())
    torch.testing.assert_close(terms["kl"], kl.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms["loss"], recon.mean() + 0.25 * kl.mean())


# ---- models and training --------------------------------------------------------------


def test_shapes():
    config = VAEConfig()
    model = VAE(config)
    x = torch.rand(2, 3, 32, 32)
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (2, 16)
    assert model.decode(mean).shape == (2, 3, 32, 32)
    out = model.sample(5, torch.Generator().manual_seed(0))
    assert out.shape == (5, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert Autoencoder(VAEConfig.latent_2d()).encode(x).shape == (2, 2)


def train(model, images, steps, batch_size, lr=2e-3, checkpoint=None, save_every=500, progress=False):
    """The lesson's recipe (Adam, cosine to a tenth) through the engine, logging every step."""
    recipe = Recipe(steps=steps, batch_size=batch_size, lr=lr, save_every=save_every, log_every=1)
    return fit(vae_stage(model, images), recipe, out=checkpoint, progress=progress)


@pytest.mark.parametrize("kind", [VAE, Autoencoder])
def test_short_training_reduces_the_loss_on_a_fixed_batch(kind, images):
    torch.manual_seed(0)
    model = kind(small_config())
    batch = images[:16]
    before = vae.evaluate(model, batch)["loss"]
    history = train(model, batch, steps=60, batch_size=16, lr=3e-3, progress=False)
    after = vae.evaluate(model, batch)["loss"]
    assert len(history) == 60 and all("kl" in row for row in history)
    assert after < 0.5 * before, (before, after)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, images):
    torch.manual_seed(0)
    for model in (VAE(small_config()), Autoencoder(small_config(latent_dim=2))):
        path = vae.save_vae(model, tmp_path / "model.safetensors", step=7)
        loaded = vae.load_vae(path)
        assert type(loaded) is type(model) and loaded.config == model.config
        assert checkpoint.read_metadata(path)["step"] == 7
        with torch.no_grad():
            assert torch.equal(loaded.encoder(images[:4]), model.encoder(images[:4]))
            z = torch.randn(4, model.config.latent_dim)
            assert torch.equal(loaded.decode(z), model.decode(z))
    assert not list(tmp_path.glob("*.tmp")), "the temporary file must be renamed away"


def test_fp16_checkpoint_matches_the_rounded_weights(tmp_path):
    torch.manual_seed(0)
    model = VAE(small_config())
    loaded = vae.load_vae(vae.save_vae(model, tmp_path / "half.safetensors", dtype=torch.float16))
    for (name, original), (_, restored) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert restored.dtype == torch.float32
        assert torch.equal(restored, original.half().float()), name


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, images):
    torch.manual_seed(0)
    model = VAE(small_config())
    path = tmp_path / "run.safetensors"
    calls = {"n": 0}

    def poison_after_five_steps(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 5 else output

    model.decoder.register_forward_hook(poison_after_five_steps)
    with pytest.raises(TrainingDiverged, match="step 6: the loss is nan"):
        train(model, images, steps=20, batch_size=8, checkpoint=path, save_every=2, progress=False)
    assert checkpoint.read_metadata(path)["step"] == 4  # saved at 2 and 4, never after the NaN
    saved = vae.load_vae(path)
    assert all(torch.isfinite(t).all() for t in saved.state_dict().values())
    # the bad step stopped before the optimizer update, so the live model is finite too
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_infinite_gradient_stops_training_before_the_update(tmp_path, images):
    torch.manual_seed(0)
    model = VAE(small_config())
    path = tmp_path / "run.safetensors"
    calls = {"n": 0}

    def blow_up_on_step_three(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 3 else grad

    model.decoder.from_vector.weight.register_hook(blow_up_on_step_three)
    with pytest.raises(TrainingDiverged, match="step 3: .* gradient norm inf"):
        train(model, images, steps=10, batch_size=8, checkpoint=path, save_every=1, progress=False)
    assert checkpoint.read_metadata(path)["step"] == 2
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert all(torch.isfinite(t).all() for t in vae.load_vae(path).state_dict().values())


def test_nan_from_the_first_step_leaves_an_existing_checkpoint_untouched(tmp_path, images):
    torch.manual_seed(0)
    model = VAE(small_config())
    path = vae.save_vae(model, tmp_path / "good.safetensors", step=100)
    before = path.read_bytes()
    with torch.no_grad():
        model.decoder.from_vector.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="not touched by this run"):
        train(model, images, steps=5, batch_size=8, checkpoint=path, save_every=1, progress=False)
    assert path.read_bytes() == before


# ---- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (2, 1, 32, 32), (3, 32, 32), (2, 32, 32, 3)])
def test_bad_image_shape_names_the_expected_shape(shape):
    model = VAE(VAEConfig())
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        model.encode(torch.rand(shape))


def test_bad_pixel_range_and_latent_size_are_refused():
    model = VAE(VAEConfig())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        model.decode(torch.randn(2, 8))
    with pytest.raises(ValueError, match="divisible"):
        VAEConfig(image_size=30)


def test_loading_something_else_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not a dalle_lesson checkpoint"):
        vae.load_vae(path)
    with pytest.raises(FileNotFoundError, match="no VAE or autoencoder checkpoint at"):
        vae.load_vae(tmp_path / "missing.safetensors")


def test_cli_trains_and_saves_a_loadable_model(tmp_path):
    from dalle_lesson.cli import main

    out = tmp_path / "cli.safetensors"
    main(["train", "vae", "--steps", "3", "--train-images", "16", "--batch-size", "4", "--width", "8",
          "--latent-dim", "2", "--log-every", "1", "--fp16", "--out", str(out)])
    model = vae.load_vae(out)
    assert isinstance(model, VAE) and model.config.latent_dim == 2
    assert checkpoint.read_metadata(out)["step"] == 3
    assert len(vae.checkpoint_history(out)["kl"]) == 3
