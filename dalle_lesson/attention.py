"""Attention over one stream [text tokens ; image tokens], dense and sparse.

DALL·E is a decoder-only transformer over a single stream of ``n = text_len + H*W``
tokens: the caption's ``text_len`` BPE tokens, then the ``H x W`` image codes in raster
order (row by row, left to right). Which earlier tokens a token may look at is set by a
boolean mask (``True`` = may attend). The paper (Ramesh et al. 2021, Fig. 11) uses:

* text tokens: causal among themselves (a text token never sees the image);
* every image token sees **all** text tokens, and then, among the image tokens,
    - ``causal``: every earlier image token (plain GPT; our reference);
    - ``row``: the previous ``W + 1`` image tokens in raster order, counting itself, i.e.
      raster indices ``p - W .. p``: the rest of its own row to the left, and the end of
      the row above from its own column on (so the token straight above is included);
    - ``column``: the image tokens in its own column, from the top row down to itself;
    - ``conv``: a causal ``11 x 11`` neighbourhood: tokens at most 5 rows up and at most
      5 columns left or right, that come before it in raster order (or are itself).

Layer ``i`` of the paper's 64 uses ``column`` when ``(i - 2) mod 4 == 0`` and ``row``
otherwise, except the last layer, which uses ``conv`` (see :func:`layer_mask_kinds`).

Two ways to compute masked attention, which give the same numbers:

* :func:`dense_attention` -- ``F.scaled_dot_product_attention`` with the full ``n x n``
  boolean mask. Simple, works for every mask, with a KV cache, for any prefix length;
  but it pays for all ``n^2`` pairs, most of them masked out.
* :func:`sparse_attention` -- for ``row`` and ``column`` only: cut the image into blocks
  (rows; or columns, after transposing the image grid, as the paper does), and let each
  block of queries attend to the text plus the one or two image blocks it may see. The
  cost is ``n * (text_len + 2W)`` pairs for row and ``n * (text_len + H)`` for column
  instead of ``n^2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MASK_KINDS = ("causal", "row", "column", "conv")


# --------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------


def image_mask(kind: str, image_size: int, conv_kernel: int = 11) -> torch.Tensor:
    """Which image token may attend to which: BoolTensor[N, N], ``N = image_size**2``.

    Entry ``[p, q]`` is True when the image token at raster index ``p`` may attend to the
    one at raster index ``q``. Every kind is causal (``q <= p``).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    if image_size < 1:
        raise ValueError(f"image_size must be a positive grid side, got {image_size}")
    width = image_size
    index = torch.arange(width * width)
    p, q = index[:, None], index[None, :]  # query index down, key index across
    row_p, col_p = p // width, p % width
    row_q, col_q = q // width, q % width
    causal = q <= p
    if kind == "causal":
        return causal
    if kind == "row":
        return causal & (p - q <= width)  # the previous W + 1 tokens, counting itself
    if kind == "column":
        return causal & (col_q == col_p)
    # conv: a causal neighbourhood of conv_kernel x conv_kernel around the query
    if conv_kernel % 2 != 1:
        raise ValueError(f"conv_kernel must be odd (a window centred on the token), got {conv_kernel}")
    reach = conv_kernel // 2
    return causal & ((row_p - row_q).abs() <= reach) & ((col_p - col_q).abs() <= reach)


def attention_mask(kind: str, text_len: int, image_size: int, conv_kernel: int = 11) -> torch.Tensor:
    """The full mask over the stream [text ; image]: BoolTensor[n, n], True = may attend.

    ``n = text_len + image_size**2``. Text tokens see earlier text tokens (and themselves);
    image tokens see all text tokens and the image tokens :func:`image_mask` allows.
    """
    if text_len < 0:
        raise ValueError(f"text_len must be >= 0, got {text_len}")
    n_image = image_size * image_size
    n = text_len + n_image
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:text_len, :text_len] = torch.ones(text_len, text_len, dtype=torch.bool).tril()
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len:] = image_mask(kind, image_size, conv_kernel)
    return mask


def layer_mask_kinds(n_layers: int) -> list[str]:
    """The mask kind of each layer, in order, following the paper's schedule.

    The paper numbers its 64 layers ``i = 1 .. 64`` (we read its "(i - 2) mod 4 = 0" with
    1-based numbering): layers 2, 6, 10, ..., 62 use ``column``, the last layer ``conv``,
    every other layer ``row``. Our Python list is 0-based, so entry ``k`` is layer
    ``i = k + 1``. For 4 layers: row, column, row, conv.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers + 1)]
    kinds[-1] = "conv"
    return kinds


# --------------------------------------------------------------------------------------
# Attention: dense (the reference) and sparse (block-wise, for row and column)
# --------------------------------------------------------------------------------------


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention over all pairs; q: [..., Lq, d], k, v: [..., Lk, d], mask: [Lq, Lk]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _blocked_image_attention(q_blocks, k_text, v_text, k_local, v_local, local_mask):
    """Image queries, grouped in blocks, attend to all text plus their block's local keys.

    q_blocks: [B, h, nb, bq, d] (nb blocks of bq queries); k_text, v_text: [B, h, T, d];
    k_local, v_local: [B, h, nb, bk, d] (each block's own bk keys); local_mask: [nb, bq, bk].
    Returns [B, h, nb, bq, d]. Text keys are shared by every block, so they are not copied:
    the two groups of scores are computed apart and joined only for the softmax.
    """
    scale = 1.0 / math.sqrt(q_blocks.shape[-1])
    text_scores = torch.einsum("bhnqd,bhtd->bhnqt", q_blocks, k_text) * scale
    local_scores = torch.einsum("bhnqd,bhnkd->bhnqk", q_blocks, k_local) * scale
    local_scores = local_scores.masked_fill(~local_mask, float("-inf"))
    weights = torch.softmax(torch.cat([text_scores, local_scores], dim=-1), dim=-1).to(v_local.dtype)
    text_weights, local_weights = weights.split([k_text.shape[-2], k_local.shape[-2]], dim=-1)
    return torch.einsum("bhnqt,bhtd->bhnqd", text_weights, v_text) + torch.einsum(
        "bhnqk,bhnkd->bhnqd", local_weights, v_local
    )


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, text_len: int, image_size: int
) -> torch.Tensor:
    """Row or column attention computed block-wise; same result as dense with the mask.

    q, k, v: [B, h, n, d] over the whole stream, ``n = text_len + image_size**2``.

    * text queries: ordinary causal attention among the text tokens;
    * ``row``: image row ``r`` attends to all text plus rows ``r - 1`` and ``r`` (the band
      of W + 1 tokens never reaches further back than the row above);
    * ``column``: transpose the image grid so each column is contiguous, then column ``c``
      attends to all text plus column ``c`` itself (causal within it); transpose back.
    """
    if kind not in ("row", "column"):
        raise ValueError(f"sparse_attention computes 'row' or 'column' masks, not {kind!r}; use dense_attention")
    T, H = text_len, image_size
    if q.shape[-2] != T + H * H:
        raise ValueError(f"sparse_attention needs the whole stream: {T} + {H}x{H} = {T + H * H} positions, got {q.shape[-2]}")
    B, h, _, d = q.shape
    text_out = F.scaled_dot_product_attention(q[:, :, :T], k[:, :, :T], v[:, :, :T], is_causal=True)
    k_text, v_text = k[:, :, :T], v[:, :, :T]
    grid = lambda x: x[:, :, T:].reshape(B, h, H, H, d)  # noqa: E731  [B, h, row, column, d]
    q_img, k_img, v_img = grid(q), grid(k), grid(v)
    cell = torch.arange(H, device=q.device)
    if kind == "row":
        # keys of block r: [row r-1 ; row r]; row -1 does not exist: zeros, masked out.
        shift_down = lambda x: F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :H]  # noqa: E731
        k_local = torch.cat([shift_down(k_img), k_img], dim=3)
        v_local = torch.cat([shift_down(v_img), v_img], dim=3)
        query_col, key_col = cell[:, None], cell[None, :]
        above = (key_col >= query_col).expand(H, H, H).clone()  # row above: from my column on
        above[0] = False  # the first image row has no row above
        left = (key_col <= query_col).expand(H, H, H)  # my row: up to and including me
        out = _blocked_image_attention(q_img, k_text, v_text, k_local, v_local, torch.cat([above, left], dim=-1))
    else:
        transpose = lambda x: x.transpose(2, 3)  # noqa: E731  columns become blocks
        causal = (cell[None, :] <= cell[:, None]).expand(H, H, H)  # rows above me, and me
        out = _blocked_image_attention(
            transpose(q_img), k_text, v_text, transpose(k_img), transpose(v_img), causal
        )
        out = transpose(out)
    return torch.cat([text_out, out.reshape(B, h, H * H, d)], dim=2)
