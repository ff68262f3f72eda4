"""Checkers for the exercises of lesson 04 (the sparse transformer)."""

from __future__ import annotations

import math

import torch

from dalle_lesson.exercises import correct, unanswered


def _conv_keys(row: int, column: int, size: int, kernel: int) -> int:
    """Image keys a query at (row, column) sees under the causal kernel x kernel window, counted directly."""
    reach = kernel // 2
    seen = 0
    for key_row in range(max(0, row - reach), row + 1):
        for key_column in range(max(0, column - reach), min(size, column + reach + 1)):
            seen += (key_row, key_column) <= (row, column)  # raster order: earlier rows, or this row up to me
    return seen


def check_conv_keys(middle: int | None, corner: int | None, size: int = 32, kernel: int = 11) -> None:
    """Exercise 1: image keys under the convolutional mask, at the middle (16, 16) and the corner (0, 0).

    >>> check_conv_keys(61, 1)
    Correct: 61 keys in the middle (5 full rows of 11, 5 to the left, itself), 1 in the corner
    """
    if unanswered(middle, corner, expects="the number of image keys at (16, 16) and at (0, 0) of a 32x32 grid"):
        return
    want_middle, want_corner = _conv_keys(size // 2, size // 2, size, kernel), _conv_keys(0, 0, size, kernel)
    reach = kernel // 2
    assert middle == want_middle, (
        f"the middle token sees {want_middle} image keys, not {middle}: {reach} full rows above it of {kernel} "
        f"columns each, then {reach} keys to its left in its own row, then itself (keys to its right come later)")
    assert corner == want_corner, (
        f"the corner token sees {want_corner} image key(s), not {corner}: nothing is above it or to its left")
    correct(f"{middle} keys in the middle ({reach} full rows of {kernel}, {reach} to the left, itself), "
            f"{corner} in the corner")


def _column_attention_reference(q, k, v, text_len: int, size: int) -> torch.Tensor:
    """Masked softmax attention written from the definition of the column mask, one pair at a time."""
    n = text_len + size * size
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for query in range(n):
        for key in range(query + 1):
            if query < text_len or key < text_len:
                allowed[query, key] = True
            else:
                allowed[query, key] = (query - text_len) % size == (key - text_len) % size
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def check_column_attention(column_attention) -> None:
    """Exercise 2: ``column_attention(q, k, v, text_len, size)`` against column-masked attention.

    ``q, k, v`` are [batch, heads, text_len + size*size, head_dim]; the answer must have the
    same shape. Tried on two grid sizes, so a size written into the function is caught.
    """
    if unanswered(column_attention, expects="a function column_attention(q, k, v, text_len, size)"):
        return
    generator = torch.Generator().manual_seed(0)
    for text_len, size in ((5, 4), (3, 6)):
        q, k, v = torch.randn(3, 2, 2, text_len + size * size, 8, generator=generator)
        expected = _column_attention_reference(q, k, v, text_len, size)
        got = column_attention(q, k, v, text_len, size)
        assert tuple(got.shape) == tuple(expected.shape), (
            f"with {text_len} text tokens and a {size}x{size} grid the output should be {tuple(expected.shape)}, "
            f"got {tuple(got.shape)}")
        error = (got - expected).abs().amax(dim=(0, 1, 3))  # per stream position
        if error.max() > 1e-5:
            first = int((error > 1e-5).nonzero()[0])
            where = "a text position" if first < text_len else f"image position {divmod(first - text_len, size)} (row, column)"
            raise AssertionError(
                f"wrong output at stream position {first}, {where}, by {error.max():.3g}: text queries must see "
                f"only earlier text; an image query sees all text plus the tokens above it in its own column. "
                f"Did you transpose back to raster order?")
    correct("your block-by-block column attention equals column-masked attention on 4x4 and 6x6 grids")


def check_mask_handicap(causal_loss: float | None, paper_loss: float | None, handicap: bool | None) -> None:
    """Exercise 3: the image losses after the same short run with causal and with the paper's masks.

    ``handicap``: your reading of the two numbers, True if the sparse masks learned clearly
    worse (by more than 0.05 nats per code)."""
    if unanswered(causal_loss, paper_loss, handicap,
                  expects="the two final image losses and whether the sparse masks are a handicap (True/False)"):
        return
    untrained = math.log(512)
    for name, loss in (("causal", causal_loss), ("paper", paper_loss)):
        assert 0 < loss < untrained - 1, (
            f"the {name} model's image loss {loss:.3f} is not what a trained model gives (an untrained one starts "
            f"near ln 512 = {untrained:.2f}): run the 30 steps and take the last logged image_loss")
    clearly_worse = paper_loss > causal_loss + 0.05
    assert handicap == clearly_worse, (
        f"with causal {causal_loss:.3f} and paper {paper_loss:.3f} nats per code the sparse masks are "
        f"{'clearly worse' if clearly_worse else 'not clearly worse'}: read the numbers again")
    correct(f"causal {causal_loss:.3f}, paper masks {paper_loss:.3f} nats per code: "
            + ("the sparse masks cost something here" if handicap else "no handicap at this size and length"))
