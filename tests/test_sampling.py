"""Tests of dalle_lesson.sampling: the cache, the filters, guidance, priming, bad settings.

The models here are small and random, with weights scaled up so their next-token
distributions are far from uniform and depend on the context: a cache that mixed up
positions, or a guidance that ignored the empty caption, would change the drawn codes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dalle_lesson.dalle import DALLE, DALLEConfig
from dalle_lesson.sampling import (
    draw_from,
    empty_text_ids,
    filter_logits,
    generate,
    guided_logits,
    next_image_logits,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)

KINDS = ("causal", "row", "column", "conv")


def small_model(kind: str = "paper", seed: int = 0) -> DALLE:
    """A random DALL·E over 6 text tokens + a 5x5 grid whose layers all use ``kind``.

    ``kind="paper"`` keeps the paper's mixed schedule (row, column, row, conv). A 3x3 conv
    window on a 5x5 grid differs from causal attention, so every kind is really tested.
    """
    torch.manual_seed(seed)
    config = DALLEConfig(d_model=32, n_layers=4, n_heads=2, text_seq_len=6, text_vocab_size=40, image_size=5,
                         image_vocab_size=24, conv_kernel=3, masks="causal" if kind == "causal" else "paper")
    model = DALLE(config).eval()
    if kind not in ("causal", "paper"):
        for block in model.blocks:  # every layer of this kind (its mask buffer exists: row/column/conv)
            block.kind = block.attention.kind = kind
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.25)
    return model


def captions(model: DALLE, batch: int = 3, seed: int = 1) -> torch.Tensor:
    """Random text ids: a few BPE ids, then each position's padding id."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.text_vocab_size, (batch, c.text_seq_len), generator=generator)
    lengths = torch.randint(1, c.text_seq_len + 1, (batch,), generator=generator)
    padding = empty_text_ids(c, batch)
    return torch.where(torch.arange(c.text_seq_len) < lengths[:, None], ids, padding)


# ---- the cache ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS + ("paper",))
@pytest.mark.parametrize("settings", [
    dict(),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8, guidance_scale=2.5),
])
def test_cache_gives_the_same_codes_as_recomputing(kind, settings):
    model = small_model(kind)
    text = captions(model)
    cached = generate(model, text, seed=7, use_cache=True, **settings)
    recomputed = generate(model, text, seed=7, use_cache=False, **settings)
    assert cached.shape == (3, 5, 5)
    assert torch.equal(cached, recomputed)
    # The codes depend on the caption (so equality above is not a trivially constant output).
    other = generate(model, captions(model, seed=99), seed=7, use_cache=True, **settings)
    assert not torch.equal(cached, other)


def test_next_image_logits_are_the_image_half_of_the_full_forward():
    model = small_model("paper")
    c = model.config
    text = captions(model)
    codes = torch.randint(0, 24, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(text, codes)[:, -1, c.text_vocab_total:]
        torch.testing.assert_close(next_image_logits(model, torch.cat([text, codes], 1)), full, rtol=1e-5, atol=1e-5)
        cache = model.new_cache(3)
        next_image_logits(model, torch.cat([text, codes[:, :6]], 1), 0, cache)
        torch.testing.assert_close(next_image_logits(model, codes[:, 6:], c.text_seq_len + 6, cache), full,
                                   rtol=1e-5, atol=1e-5)


def test_cache_with_priming_gives_the_same_codes():
    model = small_model("paper")
    text = captions(model)
    prime = torch.randint(0, 24, (3, 2, 5), generator=torch.Generator().manual_seed(3))
    cached = generate(model, text, prime_codes=prime, seed=4, top_k=8)
    recomputed = generate(model, text, prime_codes=prime, seed=4, top_k=8, use_cache=False)
    assert torch.equal(cached, recomputed)


# ---- the filters ----------------------------------------------------------------------


def greedy_reference(model: DALLE, text: torch.Tensor) -> torch.Tensor:
    """Argmax decoding with full forward passes and no sampling code at all."""
    c = model.config
    codes = torch.zeros(text.shape[0], 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(c.image_seq_len):
            logits = model(text, codes)[:, -1, c.text_vocab_total:]
            codes = torch.cat([codes, logits.argmax(-1, keepdim=True)], dim=1)
    return codes.view(-1, c.image_size, c.image_size)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_k_one_is_greedy_argmax(temperature):
    model = small_model("paper")
    text = captions(model)
    assert torch.equal(generate(model, text, top_k=1, temperature=temperature, seed=0), greedy_reference(model, text))


def test_top_p_keeps_the_smallest_set_reaching_p():
    """Compare with brute force: over all subsets, the smallest with mass >= p (most mass on ties of size)."""
    generator = torch.Generator().manual_seed(0)
    vocab = 6
    for trial in range(200):
        logits = torch.randn(vocab, generator=generator) * 2
        p = float(torch.rand((), generator=generator)) * 0.98 + 0.01
        probabilities = logits.softmax(-1)
        best = None
        for size in range(1, vocab + 1):
            masses = [(float(probabilities[list(subset)].sum()), subset)
                      for subset in itertools.combinations(range(vocab), size)]
            reaching = [(mass, subset) for mass, subset in masses if mass >= p]
            if reaching:
                best = set(max(reaching)[1])
                break
        kept = set(torch.isfinite(top_p_filter(logits[None], p)[0]).nonzero().flatten().tolist())
        assert kept == best, (trial, p, probabilities.tolist())
    # p = 1 keeps everything; a tiny p keeps only the most likely entry
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()
    assert torch.isfinite(top_p_filter(logits, 1e-6)).nonzero()[:, 1].tolist() == [1]


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(2))
    for k in (1, 4, 30):
        kept = torch.isfinite(top_k_filter(logits, k))
        assert kept.sum(-1).tolist() == [k] * 5
        threshold = logits.sort(-1, descending=True).values[:, k - 1 : k]
        assert torch.equal(kept, logits >= threshold)


def test_samples_follow_the_tempered_distribution():
    """20,000 draws: each frequency within 5 standard deviations of softmax(logits / T)."""
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3]]).repeat(20_000, 1)
    for temperature in (0.5, 1.0, 2.0):
        draws = sample_from_logits(logits, temperature, generator=torch.Generator().manual_seed(0))
        frequencies = torch.bincount(draws, minlength=5).double() / len(draws)
        expected = (logits[0].double() / temperature).softmax(-1)
        bound = 5 * (expected * (1 - expected) / len(draws)).sqrt()
        assert ((frequencies - expected).abs() <= bound).all(), (temperature, frequencies, expected)


def test_draw_from_is_the_inverse_cdf_rule():
    """Each draw is the entry where the same uniform number lands, found by a plain loop."""
    probabilities = torch.tensor([[0.0, 0.1, 0.0, 0.0, 0.5, 0.4, 0.0], [0.25, 0.25, 0.0, 0.25, 0.25, 0.0, 0.0]])
    for seed in range(200):
        draws = draw_from(probabilities, torch.Generator().manual_seed(seed))
        uniform = torch.rand(2, 1, generator=torch.Generator().manual_seed(seed))  # the same numbers
        for row, draw in zip(range(2), draws.tolist()):
            running_sum = probabilities[row].cumsum(0)
            point = (1 - uniform[row, 0]) * running_sum[-1]
            first = next(index for index in range(7) if running_sum[index] >= point)
            assert draw == first and probabilities[row, first] > 0, (seed, row)


def test_draw_from_never_picks_a_zero_probability_entry():
    """Zeros first, last and between: 50,000 draws land only on the non-zero entries, in proportion."""
    probabilities = torch.tensor([0.0, 0.0, 0.3, 0.0, 0.7, 0.0]).repeat(50_000, 1)
    draws = draw_from(probabilities, torch.Generator().manual_seed(3))
    counts = torch.bincount(draws, minlength=6)
    assert counts[[0, 1, 3, 5]].sum() == 0
    assert abs(counts[2] / len(draws) - 0.3) < 5 * (0.3 * 0.7 / len(draws)) ** 0.5
    one_hot = torch.zeros(8, 512)
    one_hot[torch.arange(8), torch.arange(8) * 60] = 1.0  # all the mass on one entry
    assert draw_from(one_hot, torch.Generator().manual_seed(0)).tolist() == [i * 60 for i in range(8)]


def test_filtered_codes_stay_inside_the_kept_set():
    logits = torch.randn(4000, 12, generator=torch.Generator().manual_seed(5))
    draws = sample_from_logits(logits, top_k=3, generator=torch.Generator().manual_seed(1))
    top3 = logits.topk(3, -1).indices
    assert (top3 == draws[:, None]).any(-1).all()


# ---- guidance -------------------------------------------------------------------------


def test_guidance_scale_one_equals_plain_sampling():
    model = small_model("paper")
    text = captions(model)
    for settings in (dict(), dict(top_p=0.9, temperature=0.8)):
        plain = generate(model, text, seed=11, **settings)
        assert torch.equal(generate(model, text, seed=11, guidance_scale=1.0, **settings), plain)
        assert not torch.equal(generate(model, text, seed=11, guidance_scale=4.0, **settings), plain)


def test_guided_greedy_matches_a_reference_with_separate_passes():
    """Guided argmax decoding vs the same built from two separate full forward passes per step."""
    model = small_model("paper")
    c = model.config
    text = captions(model, batch=2)
    scale = 3.0
    codes = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(c.image_seq_len):
            conditional = model(text, codes)[:, -1, c.text_vocab_total:]
            unconditional = model(empty_text_ids(c, 2), codes)[:, -1, c.text_vocab_total:]
            mixed = unconditional + scale * (conditional - unconditional)
            codes = torch.cat([codes, mixed.argmax(-1, keepdim=True)], dim=1)
    expected = codes.view(2, c.image_size, c.image_size)
    assert torch.equal(generate(model, text, top_k=1, guidance_scale=scale), expected)
    assert torch.equal(generate(model, text, top_k=1, guidance_scale=scale, use_cache=False), expected)


def test_guided_logits_formula():
    conditional, unconditional = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.equal(guided_logits(conditional, unconditional, 1.0), conditional)
    torch.testing.assert_close(guided_logits(conditional, unconditional, 0.0), unconditional)  # no caption at all
    torch.testing.assert_close(guided_logits(conditional, unconditional, 3.0),
                               unconditional + 3 * (conditional - unconditional))


# ---- priming, seeds, empty captions ---------------------------------------------------


def test_priming_keeps_the_given_rows():
    model = small_model("paper")
    text = captions(model)
    prime = torch.randint(0, 24, (3, 2, 5), generator=torch.Generator().manual_seed(3))
    codes = generate(model, text, prime_codes=prime, seed=1)
    assert torch.equal(codes[:, :2], prime)
    # the rows below are drawn and depend on the priming
    other = generate(model, text, prime_codes=(prime + 1) % 24, seed=1)
    assert not torch.equal(codes[:, 2:], other[:, 2:])
    # one image's rows prime every caption; raster-order priming works too
    one = generate(model, text, prime_codes=prime[:1], seed=1)
    assert (one[:, :2] == prime[0]).all()
    raster = generate(model, text, prime_codes=prime.flatten(1)[:, :7], seed=1)
    assert torch.equal(raster.flatten(1)[:, :7], prime.flatten(1)[:, :7])
    # a whole grid as priming leaves nothing to draw
    full = torch.randint(0, 24, (3, 5, 5))
    assert torch.equal(generate(model, text, prime_codes=full), full)


def test_bad_priming_is_refused():
    model = small_model("paper")
    text = captions(model)
    with pytest.raises(ValueError, match=r"\[batch, rows <= 5, 5\]"):
        generate(model, text, prime_codes=torch.zeros(3, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="image codes must lie in 0..23"):
        generate(model, text, prime_codes=torch.full((3, 1, 5), 24))
    with pytest.raises(ValueError, match="batch size"):
        generate(model, text, prime_codes=torch.zeros(2, 1, 5, dtype=torch.long))


def test_seeds_make_sampling_reproducible():
    model = small_model("paper")
    text = captions(model)
    first = generate(model, text, seed=5)
    assert torch.equal(generate(model, text, seed=5), first)
    assert torch.equal(generate(model, text, generator=torch.Generator().manual_seed(5)), first)
    assert not torch.equal(generate(model, text, seed=6), first)
    # each image in a batch is its own draw
    same_caption = captions(model, batch=1).repeat(4, 1)
    codes = generate(model, same_caption, seed=0, temperature=2.0)
    assert len({tuple(c.flatten().tolist()) for c in codes}) == 4


def test_empty_caption_samples():
    model = small_model("paper")
    codes = generate(model, empty_text_ids(model.config, 2), seed=0)
    assert codes.shape == (2, 5, 5) and codes.min() >= 0 and codes.max() < 24


def test_generate_leaves_training_mode_alone():
    model = small_model("paper").train()
    generate(model, captions(model), seed=0)
    assert model.training


def test_generated_codes_can_train_the_model():
    # generate works under inference_mode; what it returns must still be an ordinary tensor
    # that autograd accepts, e.g. as training targets.
    model = small_model("paper").train()
    text = captions(model)
    codes = generate(model, text, seed=0)
    assert not codes.is_inference()
    model.loss(text, codes)["loss"].backward()
    assert model.head.weight.grad is not None


# ---- bad settings ---------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(top_k=0), "top_k must be a whole number >= 1"),
    (dict(top_k=-3), "top_k must be a whole number >= 1"),
    (dict(top_k=2.5), "top_k must be a whole number >= 1"),
    (dict(top_k=25), r"larger than the image vocabulary \(24 codes\)"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=-0.2), r"top_p must lie in \(0, 1\]"),
    (dict(temperature=0.0), "temperature must be a number > 0"),
    (dict(temperature=-1.0), "temperature must be a number > 0"),
    (dict(temperature=float("nan")), "temperature must be a number > 0"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a number >= 0"),
])
def test_bad_settings_are_refused(settings, message):
    model = small_model("paper")
    with pytest.raises(ValueError, match=message):
        generate(model, captions(model), **settings)


def test_filter_logits_refuses_bad_settings_too():
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(torch.zeros(1, 4), temperature=0)


def test_wrong_text_shape_is_refused():
    model = small_model("paper")
    with pytest.raises(ValueError, match=r"LongTensor\[batch, 6\]"):
        generate(model, torch.zeros(2, 4, dtype=torch.long))


# ---- extreme settings never return a code outside the vocabulary --------------------------


@pytest.mark.parametrize("settings", [
    dict(temperature=1e-38), dict(temperature=1e-30, top_p=1e-9), dict(temperature=1e38), dict(temperature=1e30, top_k=1),
    dict(temperature=1e-38, guidance_scale=5.0), dict(guidance_scale=0.0), dict(top_p=1e-12),
])
def test_extreme_settings_still_give_codes_inside_the_vocabulary(settings):
    model = small_model()
    codes = generate(model, captions(model), seed=0, **settings)
    assert codes.min() >= 0 and codes.max() < model.config.image_vocab_size


def test_a_tiny_temperature_is_greedy():
    model = small_model()
    text = captions(model)
    assert torch.equal(generate(model, text, temperature=1e-38, seed=0), generate(model, text, top_k=1, seed=1))


def test_overflowing_guidance_and_broken_logits_are_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="guidance_scale=1e\\+38 makes the guided logits overflow"):
        generate(model, captions(model), guidance_scale=1e38, seed=0)
    with pytest.raises(ValueError, match="NaN or infinity"):
        filter_logits(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="finite with a positive sum"):
        draw_from(torch.tensor([[float("nan"), 0.5], [0.0, 0.0]]))
