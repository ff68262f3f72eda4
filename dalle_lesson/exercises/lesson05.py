"""Checkers for the exercises of lesson 05 (sampling)."""

from __future__ import annotations

import torch

from dalle_lesson.data import ShapesDataset
from dalle_lesson.exercises import correct, unanswered


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = logits.sort(dim=-1, descending=True).values[:, k - 1 : k]
    return logits >= kth


def _keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Codes in the smallest most-likely head whose probability reaches p, the rest refused."""
    probs = logits.softmax(-1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for row in range(len(probs)):
        total = 0.0
        for code in probs[row].argsort(descending=True).tolist():
            if total >= p:
                break
            keep[row, code] = True
            total += float(probs[row, code])
    return keep


def check_filter_order(logits: torch.Tensor, kept_k_then_p, kept_p_then_k, top_k: int = 32, top_p: float = 0.9) -> None:
    """Exercise 1: which codes survive top-k then top-p, and top-p then top-k (Bool [B, V] each).

    In both orders the second filter works on the probabilities renormalised over what
    the first one kept."""
    if unanswered(kept_k_then_p, kept_p_then_k, expects="two boolean tensors [B, V]: the codes each order keeps"):
        return
    logits = logits.float()
    k_first = _keep_top_k(logits, top_k)
    want_k_then_p = _keep_top_p(logits.masked_fill(~k_first, float("-inf")), top_p) & k_first
    p_first = _keep_top_p(logits, top_p)
    want_p_then_k = _keep_top_k(logits.masked_fill(~p_first, float("-inf")), top_k) & p_first
    for name, got, want in (("top-k then top-p", kept_k_then_p, want_k_then_p),
                            ("top-p then top-k", kept_p_then_k, want_p_then_k)):
        assert tuple(got.shape) == tuple(want.shape), f"{name}: expected a [B, V] mask {tuple(want.shape)}, got {tuple(got.shape)}"
        wrong = int((got.bool() != want).sum())
        assert wrong == 0, (f"{name}: {wrong} codes differ from what that order keeps; remember that the second filter "
                            f"sees the probabilities renormalised over the codes the first one left")
    a, b = want_k_then_p.sum(-1).float().mean(), want_p_then_k.sum(-1).float().mean()
    correct(f"top-k then top-p keeps {a:.1f} codes per row on average, top-p then top-k {b:.1f}; "
            f"never more in the first order ({bool((want_k_then_p.sum(-1) <= want_p_then_k.sum(-1)).all())})")


def check_left_half_completion(complete_right_half, pipeline, caption: str = "a big green circle to the left of a small blue square") -> None:
    """Exercise 2: ``complete_right_half(codes [1, h, w], caption, seed)`` keeps the left half and draws the right."""
    if unanswered(complete_right_half, expects="a function complete_right_half(codes, caption, seed)"):
        return
    image = ShapesDataset(length=1, image_size=32, split="test", seed=3)[0][0]
    codes = pipeline.dvae.encode(image[None])
    half = codes.shape[-1] // 2
    result = complete_right_half(codes, caption, seed=0)
    assert tuple(result.shape) == tuple(codes.shape), f"expected codes of shape {tuple(codes.shape)}, got {tuple(result.shape)}"
    assert result.dtype == torch.long, f"codes are integers (torch.long), got {result.dtype}"
    assert torch.equal(result[..., :half], codes[..., :half]), "the left half must be kept exactly as given"
    assert 0 <= int(result.min()) and int(result.max()) < pipeline.model.config.image_vocab_size, "codes out of range"
    assert not torch.equal(result[..., half:], codes[..., half:]), (
        "the right half is the given one, code for code: nothing was drawn. At right-half positions, sample a code "
        "from the model's prediction given everything before it in raster order")
    again = complete_right_half(codes, caption, seed=0)
    assert torch.equal(again, result), "the same seed should give the same completion: seed your generator"
    correct("the left half is kept, the right half is drawn, and the same seed repeats the same completion")


def check_batch_timing(seconds_per_image: dict | None) -> None:
    """Exercise 3: seconds per image when ``generate`` draws batches of 1, 4 and 16 images."""
    if unanswered(seconds_per_image, expects="a dict {1: s, 4: s, 16: s} of seconds per image"):
        return
    assert {1, 4, 16} <= set(seconds_per_image), f"time batches of 1, 4 and 16, got {sorted(seconds_per_image)}"
    assert all(t > 0 for t in seconds_per_image.values()), "times must be positive (time.perf_counter differences)"
    one, sixteen = seconds_per_image[1], seconds_per_image[16]
    assert sixteen < one, (
        f"16 images at once took {sixteen:.3f} s per image, not less than one alone ({one:.3f} s): divide the batch's "
        f"time by the number of images, and time the model after a warm-up call")
    correct(f"{one / sixteen:.1f}x less time per image in a batch of 16: every step's fixed cost (launching the "
            f"same operations, reading the same weights) is shared by the whole batch")
