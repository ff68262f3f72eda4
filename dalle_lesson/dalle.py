"""The DALL·E transformer: one decoder-only model over the stream [text ; image].

API in five lines (what the sampling lesson uses)::

    model = load_dalle()                             # the shipped tiny checkpoint, eval mode
    logits = model(text_ids, image_codes)            # [B, L, V] fp32, L = text_seq_len + codes given
    cache = model.new_cache(batch_size)              # preallocated keys/values for all n positions
    logits = model.forward_tokens(tokens, start_pos, cache)   # continue the stream with a KV cache
    image_logits = logits[..., config.text_vocab_total:]      # the image half of the head

The stream and what predicts what
    Position ``t`` of the stream holds text id ``t`` for ``t < T = text_seq_len`` and image
    code ``t - T`` (raster order) after that; ``n = T + H*W`` positions in all. The output
    at position ``t`` predicts the token at position ``t + 1`` (shifted next-token
    prediction over the joint stream). So outputs ``0 .. T-2`` predict text tokens
    ``1 .. T-1`` (the first text token is given, never predicted), output ``T-1`` (the last
    text position) predicts the first image code, and output ``n-2`` the last one; output
    ``n-1`` predicts nothing and is ignored.

    The head has one row per token of both vocabularies, ``[text ids ; image codes]``
    (``vocab_total = text_vocab_total + image_vocab_size``). Where the next token is text,
    the image half of the logits is ``-inf``; where it is an image code, the text half is.
    Text ids are BPE ids ``0 .. text_vocab_size-1`` plus one padding id per position,
    ``text_vocab_size + t`` (see ``dalle_lesson.bpe.tokenize_batch``).

KV cache
    ``forward_tokens(tokens, start_pos, cache)`` embeds ``tokens`` as stream positions
    ``start_pos .. start_pos+L-1`` (text or image by position, a chunk may straddle the
    boundary), writes their keys and values into ``cache`` at those positions, and attends
    with rows ``start_pos .. start_pos+L-1`` of each layer's full mask over columns
    ``0 .. start_pos+L-1``. Every mask kind (causal, row, column, conv) works this way,
    because each is a mask on the full stream. ``start_pos`` may not pass ``cache.length``
    (no gaps); a smaller ``start_pos`` rewinds. Typical use: prefill the text
    (``start_pos=0``), then feed one image code at a time. The logits equal those of the
    full forward pass (tested to 1e-5 for every mask kind).

Loss
    ``model.loss(text_ids, image_codes)`` = 1/8 * text cross-entropy + 7/8 * image
    cross-entropy, each the mean over its own positions (the paper's weighting).

Precision
    Embeddings are looked up in fp32 (autocast leaves embedding lookups alone), and the
    final LayerNorm and the head run with autocast disabled, so logits are fp32 even when
    the blocks run in bf16/fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from dalle_lesson import checkpoint
from dalle_lesson.attention import MASK_KINDS, attention_mask, dense_attention, layer_mask_kinds, sparse_attention


@dataclass
class DALLEConfig:
    """Sizes of the transformer and of the stream it models."""

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    text_seq_len: int = 32  # T: text positions in the stream
    text_vocab_size: int = 1024  # BPE ids; then T padding ids, one per position
    image_size: int = 8  # the image is an image_size x image_size grid of codes
    image_vocab_size: int = 512  # codes of the dVAE
    mlp_ratio: int = 4
    dropout: float = 0.0
    conv_kernel: int = 11  # side of the causal neighbourhood of the last layer
    masks: str = "paper"  # "paper": the row/column schedule + conv last; or one kind for every layer
    # "dense": masked SDPA in every layer; "sparse": block-wise row/column layers (dense
    # still for causal/conv layers, with a KV cache, or for a partial stream). Same numbers.
    # Measured (benchmarks/results/transformer.json): at the tiny size dense trains ~6%
    # faster on CPU (the grid is too small for blocks to pay); at the paper's stream length
    # one sparse row/column attention is ~1.5x faster than dense, so paper() uses sparse.
    attention: str = "dense"
    activation_checkpointing: bool = False  # recompute blocks in backward (big models)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.masks not in ("paper", *MASK_KINDS):
            raise ValueError(f"masks must be 'paper' or one of {MASK_KINDS} (every layer), got {self.masks!r}")
        if self.attention not in ("dense", "sparse"):
            raise ValueError(f"attention must be 'dense' or 'sparse', got {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def text_vocab_total(self) -> int:
        """Text ids the embedding knows: BPE ids plus one padding id per text position."""
        return self.text_vocab_size + self.text_seq_len

    @property
    def image_seq_len(self) -> int:
        return self.image_size * self.image_size

    @property
    def seq_len(self) -> int:
        """n, the length of the whole stream [text ; image]."""
        return self.text_seq_len + self.image_seq_len

    @property
    def vocab_total(self) -> int:
        """Rows of the output head: [text ids ; image codes]."""
        return self.text_vocab_total + self.image_vocab_size

    def layer_kinds(self) -> list[str]:
        if self.masks == "paper":
            return layer_mask_kinds(self.n_layers)
        return [self.masks] * self.n_layers

    @classmethod
    def tiny(cls, **overrides) -> "DALLEConfig":
        """The CPU lesson model: 4 layers of width 256 over 32 text tokens + 8x8 codes (training
        on the shipped dVAE's codes sets ``image_size`` to its 16x16 grid)."""
        return cls(**{**dict(d_model=256, n_layers=4, n_heads=8, text_seq_len=32, text_vocab_size=1024,
                             image_size=8, image_vocab_size=512), **overrides})

    @classmethod
    def paper(cls, **overrides) -> "DALLEConfig":
        """The paper's 12-billion-parameter model: 64 layers, 62 heads of 64, 256 + 32x32 tokens."""
        return cls(**{**dict(d_model=3968, n_layers=64, n_heads=62, text_seq_len=256, text_vocab_size=16384,
                             image_size=32, image_vocab_size=8192, attention="sparse",
                             activation_checkpointing=True), **overrides})


@dataclass
class KVCache:
    """Keys and values of every layer for every stream position, allocated once.

    ``keys``/``values``: [n_layers, B, n_heads, n, head_dim]; positions ``0 .. length-1``
    are filled.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]


# --------------------------------------------------------------------------------------
# The blocks
# --------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with one mask kind; dense, sparse, or with a KV cache."""

    def __init__(self, config: DALLEConfig, kind: str):
        super().__init__()
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {kind!r}")
        self.config, self.kind = config, kind
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x, mask, start_pos: int = 0, keys_cache=None, values_cache=None):
        B, L, _ = x.shape
        c = self.config
        q, k, v = (t.view(B, L, c.n_heads, c.head_dim).transpose(1, 2) for t in self.qkv(x).split(c.d_model, dim=-1))
        end = start_pos + L
        if keys_cache is not None:
            keys_cache[:, :, start_pos:end] = k  # remember this chunk's keys and values ...
            values_cache[:, :, start_pos:end] = v
            k, v = keys_cache[:, :, :end].to(q.dtype), values_cache[:, :, :end].to(q.dtype)  # ... attend to all so far
        use_sparse = (
            c.attention == "sparse" and self.kind in ("row", "column") and keys_cache is None
            and L == c.seq_len and self.dropout == 0.0
        )
        if use_sparse:
            out = sparse_attention(q, k, v, self.kind, c.text_seq_len, c.image_size)
        elif self.training and self.dropout > 0:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[start_pos:end, :end], dropout_p=self.dropout)
        else:
            out = dense_attention(q, k, v, mask[start_pos:end, :end])
        return self.proj(out.transpose(1, 2).reshape(B, L, c.d_model))


class Block(nn.Module):
    """Pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: DALLEConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.ln_attention = nn.LayerNorm(config.d_model)
        self.attention = SelfAttention(config, kind)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask, start_pos=0, keys_cache=None, values_cache=None):
        x = x + self.drop(self.attention(self.ln_attention(x), mask, start_pos, keys_cache, values_cache))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class DALLE(nn.Module):
    """Decoder-only transformer over [text tokens ; image codes]; see the module docstring."""

    kind, config_class = "dalle", DALLEConfig  # how its checkpoints are named and rebuilt

    def __init__(self, config: DALLEConfig):
        super().__init__()
        self.config = c = config
        self.text_embedding = nn.Embedding(c.text_vocab_total, c.d_model)  # includes the padding ids
        self.text_position = nn.Embedding(c.text_seq_len, c.d_model)
        self.image_embedding = nn.Embedding(c.image_vocab_size, c.d_model)
        self.row_embedding = nn.Embedding(c.image_size, c.d_model)
        self.column_embedding = nn.Embedding(c.image_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c, kind) for kind in c.layer_kinds())
        self.ln_final = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_total, bias=False)
        # One full-stream mask per kind in use, shared by the layers of that kind, and which
        # half of the head is allowed at each output position (True = image half).
        for kind in sorted(set(c.layer_kinds())):
            self.register_buffer(f"mask_{kind}", torch.empty(c.seq_len, c.seq_len, dtype=torch.bool), persistent=False)
        self.register_buffer("predicts_image", torch.empty(c.seq_len, dtype=torch.bool), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fill the masks and draw fresh weights (GPT-2 style init), in place, on any device."""
        c = self.config
        device = self.head.weight.device
        for kind in sorted(set(c.layer_kinds())):
            self.mask(kind).copy_(attention_mask(kind, c.text_seq_len, c.image_size, c.conv_kernel).to(device))
        self.predicts_image.copy_((torch.arange(c.seq_len) + 1 >= c.text_seq_len).to(device))
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # residual branches start small so the stream's variance does not grow with depth
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * c.n_layers))

    def materialize(self, device) -> "DALLE":
        """A model built on the ``meta`` device, given real (initialised) memory on ``device``.

        ``with torch.device("meta"): model = DALLE(config)`` costs nothing; then
        ``model.materialize("cuda")`` allocates and initialises it where it will train.
        """
        self.to_empty(device=device)
        with torch.no_grad():
            self.reset_parameters()
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def mask(self, kind: str) -> torch.Tensor:
        return getattr(self, f"mask_{kind}")

    # ---- checking inputs ------------------------------------------------------------

    def check_text(self, text_ids: torch.Tensor) -> None:
        c = self.config
        if text_ids.dim() != 2 or text_ids.shape[1] != c.text_seq_len:
            raise ValueError(
                f"text_ids must be a LongTensor[batch, {c.text_seq_len}] (captions tokenized with "
                f"tokenize_batch(tokenizer, captions, {c.text_seq_len})), got shape {tuple(text_ids.shape)}"
            )
        _check_range(text_ids, c.text_vocab_total, "text ids", f"BPE ids 0..{c.text_vocab_size - 1} and padding ids "
                      f"{c.text_vocab_size}..{c.text_vocab_total - 1}")

    def check_codes(self, image_codes: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Validate image codes ([B, H, W] or the first k in raster order, [B, k]); return them flat."""
        c = self.config
        shape = tuple(image_codes.shape)
        if image_codes.dim() == 3 and shape[1:] == (c.image_size, c.image_size):
            image_codes = image_codes.flatten(1)
        elif image_codes.dim() != 2 or image_codes.shape[1] > c.image_seq_len:
            raise ValueError(
                f"image_codes must be a LongTensor[batch, {c.image_size}, {c.image_size}] or its first k codes "
                f"in raster order, [batch, k] with k <= {c.image_seq_len}; got shape {shape}"
            )
        if batch_size is not None and image_codes.shape[0] != batch_size:
            raise ValueError(f"image_codes has batch size {image_codes.shape[0]} but text_ids has {batch_size}")
        _check_range(image_codes, c.image_vocab_size, "image codes", f"dVAE codes 0..{c.image_vocab_size - 1}")
        return image_codes

    # ---- the forward pass ------------------------------------------------------------

    def embed(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Embeddings of stream positions ``start_pos ..`` (text or image by position), fp32."""
        c = self.config
        L = tokens.shape[1]
        n_text = max(0, min(L, c.text_seq_len - start_pos))  # how many of these positions are text
        parts = []
        if n_text:
            positions = torch.arange(start_pos, start_pos + n_text, device=tokens.device)
            parts.append(self.text_embedding(tokens[:, :n_text]) + self.text_position(positions))
        if n_text < L:
            image_index = torch.arange(start_pos + n_text, start_pos + L, device=tokens.device) - c.text_seq_len
            rows, columns = image_index // c.image_size, image_index % c.image_size
            parts.append(self.image_embedding(tokens[:, n_text:]) + self.row_embedding(rows)
                         + self.column_embedding(columns))
        return torch.cat(parts, dim=1)

    def forward_tokens(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, L, vocab_total] (fp32) for stream positions ``start_pos .. start_pos+L-1``.

        Without a cache, ``start_pos`` must be 0 (the model sees only ``tokens``). With a
        cache, the chunk's keys/values are stored and earlier ones reused; see the module
        docstring.
        """
        c = self.config
        B, L = tokens.shape
        end = start_pos + L
        if L == 0 or end > c.seq_len:
            raise ValueError(f"stream positions {start_pos}..{end - 1} are outside 0..{c.seq_len - 1} "
                             f"({c.text_seq_len} text + {c.image_seq_len} image positions)")
        if cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs a KV cache holding the earlier positions (model.new_cache)")
        if cache is not None and not 0 <= start_pos <= cache.length:
            raise ValueError(f"start_pos {start_pos} would leave a gap: the cache holds positions 0..{cache.length - 1}")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"the cache was made for batch size {cache.batch_size}, tokens have {B}")
        n_text = max(0, min(L, c.text_seq_len - start_pos))  # the chunk's text positions come first
        _check_range(tokens[:, :n_text], c.text_vocab_total, "text ids", f"0..{c.text_vocab_total - 1}")
        _check_range(tokens[:, n_text:], c.image_vocab_size, "image codes", f"dVAE codes 0..{c.image_vocab_size - 1}")

        hidden = self.transform(tokens, start_pos, cache)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            logits = self.head(hidden)
        # The wrong half of the vocabulary can never be the next token: -inf.
        predicts_image = self.predicts_image[start_pos:end, None]
        is_image_column = torch.arange(c.vocab_total, device=logits.device) >= c.text_vocab_total
        return logits.masked_fill(predicts_image != is_image_column, float("-inf"))

    def transform(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Embed, run the blocks, final LayerNorm: the fp32 features the head reads, [B, L, d_model]."""
        c = self.config
        x = self.embed(tokens, start_pos)
        for i, block in enumerate(self.blocks):
            mask = self.mask(block.kind)
            keys = cache.keys[i] if cache is not None else None
            values = cache.values[i] if cache is not None else None
            if c.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = recompute_in_backward(block, x, mask, start_pos, keys, values, use_reentrant=False)
            else:
                x = block(x, mask, start_pos, keys, values)
        if cache is not None:
            cache.length = start_pos + tokens.shape[1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.ln_final(x.float())

    def forward(self, text_ids: torch.Tensor, image_codes: torch.Tensor | None = None,
                cache: KVCache | None = None, return_loss: bool = False):
        """Logits for the stream [text_ids ; image_codes] from position 0.

        text_ids: LongTensor[B, text_seq_len]; image_codes: None, [B, H, W], or the first k
        codes in raster order [B, k]. Returns fp32 logits [B, text_seq_len + k, vocab_total].
        With ``cache`` (fresh from :meth:`new_cache`), fills it for these positions.
        With ``return_loss=True`` returns :meth:`loss` instead (so wrappers such as
        DistributedDataParallel, which hook ``forward``, see the training step).
        """
        if return_loss:
            return self.loss(text_ids, image_codes)
        self.check_text(text_ids)
        stream = text_ids
        if image_codes is not None:
            stream = torch.cat([text_ids, self.check_codes(image_codes, text_ids.shape[0]).to(text_ids.dtype)], dim=1)
        return self.forward_tokens(stream, 0, cache)

    def new_cache(self, batch_size: int, device=None, dtype=None) -> KVCache:
        """An empty KV cache for ``batch_size`` streams of the full length."""
        c = self.config
        reference = self.head.weight
        shape = (c.n_layers, batch_size, c.n_heads, c.seq_len, c.head_dim)
        device, dtype = device or reference.device, dtype or reference.dtype
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def loss(self, text_ids: torch.Tensor, image_codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss on whole captions + images: 1/8 text + 7/8 image cross-entropy.

        Returns a dict with ``loss`` (to minimise), ``text_loss`` and ``image_loss`` (nats per token).
        """
        c = self.config
        self.check_text(text_ids)
        codes = self.check_codes(image_codes, text_ids.shape[0])
        if codes.shape[1] != c.image_seq_len:
            raise ValueError(f"the loss needs whole images: {c.image_size}x{c.image_size} codes, got {codes.shape[1]}")
        stream = torch.cat([text_ids, codes.to(text_ids.dtype)], dim=1)
        hidden = self.transform(stream)
        T, Vt = c.text_seq_len, c.text_vocab_total
        # Only the allowed half of the head is computed at each position (the same numbers
        # as slicing forward()'s masked logits, for a third of the head's work):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            text_logits = F.linear(hidden[:, : T - 1], self.head.weight[:Vt])  # outputs 0..T-2 -> text 1..T-1
            image_logits = F.linear(hidden[:, T - 1 : -1], self.head.weight[Vt:])  # outputs T-1..n-2 -> the codes
        text_loss = F.cross_entropy(text_logits.reshape(-1, Vt), text_ids[:, 1:].reshape(-1))
        image_loss = F.cross_entropy(image_logits.reshape(-1, c.image_vocab_size), codes.reshape(-1))
        return {"loss": (text_loss + 7 * image_loss) / 8, "text_loss": text_loss, "image_loss": image_loss}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def validation_loss(model: DALLE, text_ids: torch.Tensor, codes: torch.Tensor, batch_size: int = 128) -> dict[str, float]:
    """Mean loss, text loss and image loss (nats per token) over a whole set of pairs."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    totals = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
    for start in range(0, len(codes), batch_size):
        text = text_ids[start : start + batch_size].to(device)
        image = codes[start : start + batch_size].to(device).long()
        for key, value in model.loss(text, image).items():
            totals[key] += value.item() * len(image)
    model.train(was_training)
    return {key: value / len(codes) for key, value in totals.items()}


def _check_range(ids: torch.Tensor, size: int, what: str, meaning: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor (torch.long), got {ids.dtype}")
    if ids.numel() and ids.device.type != "meta":
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            raise ValueError(f"{what} must lie in 0..{size - 1} ({meaning}); got values from {low} to {high}")


# --------------------------------------------------------------------------------------
# Saving and loading (safetensors, config in the metadata)
# --------------------------------------------------------------------------------------


def save_dalle(model: DALLE, path: str | Path, dtype: torch.dtype = torch.float16, **metadata) -> Path:
    """Write the weights (as ``dtype``) and the config (:mod:`dalle_lesson.checkpoint`)."""
    return checkpoint.save(model, path, dtype=dtype, **metadata)


def load_dalle(path: str | Path | None = None, device: str | torch.device = "cpu") -> DALLE:
    """Load a DALL·E checkpoint; ``None`` = the shipped tiny model. fp32, eval mode, on ``device``."""
    from dalle_lesson.data import shipped_path

    return checkpoint.load(path or shipped_path("dalle_tiny.safetensors"), DALLE, device)
