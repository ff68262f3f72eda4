"""The lesson 02 checkers accept a right answer and reject a wrong one (a tiny dVAE, so fast)."""

import math

import pytest
import torch

from dalle_lesson import dvae
from dalle_lesson.exercises import lesson02


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = dvae.DVAEConfig(image_size=8, vocab_size=16, n_hid=4, n_init=4, group_count=2, n_blk_per_group=1,
                             likelihood="mse")
    return dvae.DiscreteVAE(config).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_none_only_says_what_is_expected(capsys):
    lesson02.check_learned_scale(None, None)
    lesson02.check_single_code_pictures(None, None)
    lesson02.check_sample_vs_argmax(None, None, None)
    lesson02.check_bits_per_code(None, None)
    assert capsys.readouterr().out.count("Not answered yet") == 4


def test_learned_scale():
    # d/db (ln b + d / b) = 0 at b = d; at zero error only ln b changes: ln 1 - ln 0.01 = ln 100.
    lesson02.check_learned_scale(0.5, math.log(100))
    with pytest.raises(AssertionError, match="ln b"):
        lesson02.check_learned_scale(math.log(0.5), math.log(100))
    with pytest.raises(AssertionError, match="log10"):
        lesson02.check_learned_scale(0.5, 2.0)
    with pytest.raises(AssertionError, match="smallest at b"):
        lesson02.check_learned_scale(0.25, math.log(100))


def test_single_code_pictures(tiny, images):
    with torch.no_grad():
        codes = tiny.encode(images)
        side = tiny.config.grid_size
        pictures = torch.cat([tiny.decode(torch.full((1, side, side), k)) for k in range(16)])
    background = int(torch.bincount(codes.flatten(), minlength=16).argmax())
    flat = int((pictures.std(dim=(2, 3)).amax(dim=1) < 0.05).sum())
    lesson02.check_single_code_pictures(background, flat, model=tiny, images=images)
    with pytest.raises(AssertionError, match="most used code"):
        lesson02.check_single_code_pictures((background + 1) % 16, flat, model=tiny, images=images)
    with pytest.raises(AssertionError):
        lesson02.check_single_code_pictures(background, flat + 8 if flat < 8 else flat - 8, model=tiny, images=images)


def test_sample_vs_argmax(tiny, images):
    with torch.no_grad():
        logits = tiny.logits(images)
        top = logits.softmax(dim=1).amax(dim=1).mean().item()
        torch.manual_seed(3)
        sampled = dvae.gumbel_softmax(logits, tau=0.5, hard=True).argmax(dim=1)
        argmax = logits.argmax(dim=1)
        drop = (dvae.psnr(tiny.decode(argmax), images).mean() - dvae.psnr(tiny.decode(sampled), images).mean()).item()
    lesson02.check_sample_vs_argmax(top, 1 - top, drop, model=tiny, images=images)  # 1 - top: the expectation
    with pytest.raises(AssertionError, match="IS the argmax"):
        lesson02.check_sample_vs_argmax(top, top, drop, model=tiny, images=images)
    with pytest.raises(AssertionError, match="largest softmax"):
        lesson02.check_sample_vs_argmax(top + 0.1, 1 - top, drop, model=tiny, images=images)
    with pytest.raises(AssertionError, match="dB"):
        lesson02.check_sample_vs_argmax(top, 1 - top, drop + 5, model=tiny, images=images)


def test_bits_per_code():
    lesson02.check_bits_per_code(32 * 32 * 3 * 8 / 64, 32 * 32 * 3 * 8 / 256)
    with pytest.raises(AssertionError, match="bytes"):
        lesson02.check_bits_per_code(48, 12)
    with pytest.raises(AssertionError, match="vocabulary size"):
        lesson02.check_bits_per_code(2.0**384, 96)
    with pytest.raises(AssertionError, match="holds now"):
        lesson02.check_bits_per_code(9, 96)
