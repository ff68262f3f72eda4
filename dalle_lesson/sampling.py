"""Sampling: turn a trained DALL·E into images, one image token at a time.

The transformer predicts the next token of the stream [text ; image]. To draw an image we
feed it the caption, read the logits at the last text position, draw the first image code
from them, append it to the stream, and repeat until all ``H*W`` codes are drawn. The dVAE
decoder then turns the grid of codes into pixels (see :mod:`dalle_lesson.pipeline`).

What this module adds to that loop:

* **Only image codes.** At image positions the head's text half is already ``-inf``; we
  go further and keep only the image half of the logits, so code ``c`` is column ``c``.
* **Temperature, top-k, top-p.** Logits are divided by the temperature (below 1: sharper,
  safer; above 1: flatter, wilder), then top-k keeps the ``k`` most likely codes and top-p
  (the "nucleus") keeps the smallest set of most likely codes whose probability adds up to
  at least ``p``. Everything else gets probability zero.
* **A KV cache.** Without it each step runs the model over the whole prefix again, so
  drawing ``N`` codes costs ``N`` full forward passes (quadratic in ``N``). With it, each
  step feeds only the one new token and reuses the keys and values stored for the earlier
  positions (``model.new_cache`` / ``model.forward_tokens``), so the cost grows linearly.
  Both paths give the same logits, so for the same seed they draw the same codes.
* **Priming.** Given the first rows of an image's codes, we only draw the rest: the
  paper's image completion (its Figure 2 primes with the top 15 of 32 rows).
* **Classifier-free guidance.** The batch holds every caption twice: once as given, once
  as the empty caption (all padding). With guidance scale ``s`` the logits we sample from
  are ``conditional + (s - 1) * (conditional - unconditional)``: ``s = 1`` is plain
  sampling, ``s > 1`` pushes away from what the model would draw without a caption. This
  only means something if the model saw empty captions in training (caption dropout).

Randomness comes from one ``torch.Generator`` (``seed=`` or ``generator=``), drawn once per
step for the whole batch, in the same order with and without the cache.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


# --------------------------------------------------------------------------------------
# Checking the settings
# --------------------------------------------------------------------------------------


def check_sampling_settings(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float | None = None,
    vocab_size: int | None = None,
) -> None:
    """Refuse settings that make no sense, saying what was wrong and what would work."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(
            f"temperature must be a number > 0 (1 = the model's own distribution, lower = safer, "
            f"higher = more varied), got {temperature!r}"
        )
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a whole number >= 1 (or None to keep every code), got {top_k!r}")
        if vocab_size is not None and top_k > vocab_size:
            raise ValueError(f"top_k={top_k} is larger than the image vocabulary ({vocab_size} codes); "
                             f"use at most {vocab_size}, or None to keep every code")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 keeps every code, 0.9 keeps the most likely codes "
                             f"holding 90% of the probability), got {top_p!r}")
    if guidance_scale is not None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0 (1 = plain sampling, 3 = typical guidance) "
                             f"or None for no guidance, got {guidance_scale!r}")


# --------------------------------------------------------------------------------------
# One step: logits -> a code
# --------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf``."""
    kept = torch.zeros_like(logits, dtype=torch.bool)
    kept.scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~kept, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely entries whose probability sums to at least ``p``.

    Sort the probabilities in decreasing order; an entry is kept when the mass of the
    entries *before* it is still below ``p`` (so the most likely entry is always kept, and
    the entry that first reaches ``p`` is kept too).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probabilities = sorted_logits.softmax(dim=-1)
    mass_before = probabilities.cumsum(dim=-1) - probabilities
    kept_sorted = mass_before < p
    kept = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return logits.masked_fill(~kept, float("-inf"))


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the logits we actually sample from (fp32)."""
    check_sampling_settings(temperature, top_k, top_p, vocab_size=logits.shape[-1])
    logits = logits.float()
    if not torch.isfinite(logits).all():
        raise ValueError("the logits hold NaN or infinity, so no code can be drawn from them: the model's "
                         "weights are broken (reload or retrain the checkpoint)")
    # Shift each row so its largest logit is 0, then divide: the same distribution, and a tiny
    # temperature sends every other logit to -inf (greedy) instead of overflowing to inf - inf = NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one index per row of ``logits`` [B, V] after filtering; returns LongTensor[B]."""
    probabilities = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return draw_from(probabilities, generator)


def draw_from(probabilities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probabilities`` [B, V] (rows sum to 1; zeros are never drawn).

    Inverse-CDF sampling: lay the probabilities end to end (their running sum), throw one
    uniform number per row onto that line and take the entry it lands in. That is one
    random number per row; ``torch.multinomial`` makes one per entry, which at 8192 codes
    costs more on a CPU than the rest of a sampling step's arithmetic after the head.
    """
    running_sum = probabilities.cumsum(dim=-1)
    total = running_sum[:, -1]
    if not (torch.isfinite(total) & (total > 0)).all():
        raise ValueError("every row of probabilities must be finite with a positive sum; got NaN, infinity "
                         "or an all-zero row (check the logits and the sampling settings)")
    uniform = torch.rand(probabilities.shape[0], 1, generator=generator, device=probabilities.device,
                         dtype=running_sum.dtype)
    # 1 - uniform lies in (0, 1], so the point lies in (0, total]: past every zero-probability
    # entry at the start, and never beyond the last entry.
    point = (1 - uniform) * running_sum[:, -1:]
    # The first entry whose running sum reaches the point. An entry of probability 0 has
    # the same running sum as the entry before it, so that earlier entry is found first.
    return torch.searchsorted(running_sum, point).squeeze(-1)


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``conditional + (scale - 1) * (conditional - unconditional)``.

    Written this way (not ``unconditional + scale * (...)``) so that ``scale = 1`` returns
    the conditional logits exactly, bit for bit.
    """
    guided = conditional + (scale - 1) * (conditional - unconditional)
    if not torch.isfinite(guided).all():
        raise ValueError(f"guidance_scale={scale:g} makes the guided logits overflow float32; "
                         "use a scale between 0 and about 10 (3 is typical)")
    return guided


def image_head(model) -> torch.Tensor:
    """The head's image rows, transposed and contiguous: [d_model, image_vocab_size].

    A sampling step multiplies one feature vector per image by this matrix, which is far
    too big for the CPU's caches (8 MB at the paper's sizes), so the step waits on memory.
    Laid out this way the product reads the matrix once, front to back; on the course
    machine that is about twice as fast as ``F.linear`` with the head's own [vocab, d_model]
    layout. :func:`generate` makes it once per call.
    """
    return model.head.weight[model.config.text_vocab_total:].t().float().contiguous()


def next_image_logits(model, tokens: torch.Tensor, start_pos: int = 0, cache=None,
                      head: torch.Tensor | None = None) -> torch.Tensor:
    """Image-code logits [B, image_vocab_size] for the position after the last of ``tokens``.

    The same numbers as ``model.forward_tokens(tokens, start_pos, cache)[:, -1, text_vocab_total:]``,
    but only the last position goes through the head, and only through its image rows: at
    the paper's vocabulary sizes that is a third of the head's work per step. ``head``:
    :func:`image_head` of the model, if the caller has made it already.
    """
    hidden = model.transform(tokens, start_pos, cache)[:, -1]  # features of the last position
    return hidden @ (image_head(model) if head is None else head)


def empty_text_ids(config, batch_size: int, device=None) -> torch.Tensor:
    """The empty caption: every text position holds its own padding id. LongTensor[B, T]."""
    padding = config.text_vocab_size + torch.arange(config.text_seq_len, device=device)
    return padding.repeat(batch_size, 1)


def sampling_memory_bytes(config, batch_size: int, guided: bool = False) -> int:
    """About how many bytes :func:`generate` needs for ``batch_size`` images (fp32).

    The key/value cache holds 2 x layers x streams x n x d_model numbers, and the prefill
    of the caption holds a few [streams, n, d_model] activations and one layer's
    [streams, heads, n, n] attention scores at a time. With guidance every caption has a
    second, empty-caption stream.
    """
    streams = batch_size * (2 if guided else 1)
    n, d = config.seq_len, config.d_model
    cache = 2 * config.n_layers * streams * n * d
    activations = 8 * streams * n * d + streams * config.n_heads * n * n
    return 4 * (cache + activations)


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (MemAvailable on Linux for the CPU); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:  # closed even when we return from inside the loop
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(config, batch_size: int, guided: bool, device: torch.device) -> None:
    """Refuse, before allocating anything, a batch of images that would not fit in memory."""
    needed, free = sampling_memory_bytes(config, batch_size, guided), available_memory_bytes(device)
    if free is not None and needed > free:
        raise ValueError(f"drawing {batch_size} images at once needs about {needed / 2**30:.1f} GiB, but only "
                         f"{free / 2**30:.1f} GiB is free on {device.type}; ask for fewer images at a time")


# --------------------------------------------------------------------------------------
# The whole image
# --------------------------------------------------------------------------------------


def _prime_as_raster(model, prime_codes: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
    """Priming codes as [B, k] in raster order (a batch of 1 is repeated for every caption)."""
    c = model.config
    if prime_codes is None:
        return torch.zeros(batch_size, 0, dtype=torch.long, device=device)
    if not torch.is_tensor(prime_codes) or prime_codes.dim() not in (2, 3):
        raise ValueError(
            f"prime_codes must be the first rows of a code grid, LongTensor[batch, rows, {c.image_size}], or the "
            f"first k codes in raster order, LongTensor[batch, k]; got "
            f"{tuple(prime_codes.shape) if torch.is_tensor(prime_codes) else type(prime_codes).__name__}"
        )
    if prime_codes.dim() == 3:
        if prime_codes.shape[2] != c.image_size or prime_codes.shape[1] > c.image_size:
            raise ValueError(f"prime_codes as rows must have shape [batch, rows <= {c.image_size}, {c.image_size}], "
                             f"got {tuple(prime_codes.shape)}")
        prime_codes = prime_codes.flatten(1)
    if prime_codes.shape[0] == 1 and batch_size > 1:
        prime_codes = prime_codes.expand(batch_size, -1)
    prime_codes = model.check_codes(prime_codes.to(device), batch_size)  # shape, batch and range checks
    return prime_codes.long()


@torch.no_grad()
def generate(
    model,
    text_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float | None = None,
    prime_codes: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    progress: bool = False,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Draw the image codes for a batch of captions, one token at a time.

    Args:
        model: a :class:`dalle_lesson.dalle.DALLE` (run in eval mode here, restored after).
        text_ids: LongTensor[B, text_seq_len] from ``dalle_lesson.bpe.tokenize_batch``; one
            image is drawn per row (repeat a caption to draw several images of it).
        temperature, top_k, top_p: how to sample each code (see :func:`filter_logits`);
            applied to the image vocabulary only.
        guidance_scale: ``None`` for plain sampling; a number ``s >= 0`` runs every caption
            together with the empty caption in one batch and samples from
            :func:`guided_logits` (``s = 1`` gives the same codes as plain sampling).
        prime_codes: the first rows of code grids, [B or 1, r, W], or the first k codes in
            raster order, [B or 1, k]; these are kept and only the rest is drawn.
        seed / generator: the random numbers; a generator wins over a seed; with neither,
            torch's global generator is used.
        use_cache: reuse keys and values (linear cost); ``False`` recomputes the whole
            prefix every step (quadratic) and returns identical codes for the same seed.
        progress: show a tqdm bar over the image tokens.
        on_token: called as ``on_token(position, codes)`` after each drawn code, with the
            [B, H*W] raster codes so far (positions after ``position`` are not drawn yet).

    Returns:
        LongTensor[B, H, W] of image codes, ready for ``dvae.decode``.
    """
    c = model.config
    check_sampling_settings(temperature, top_k, top_p, guidance_scale, vocab_size=c.image_vocab_size)
    device = model.head.weight.device
    text_ids = text_ids.to(device)
    model.check_text(text_ids)
    batch_size = text_ids.shape[0]
    check_memory(c, batch_size, guidance_scale is not None, device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    prime = _prime_as_raster(model, prime_codes, batch_size, device)
    n_image, n_primed, T = c.image_seq_len, prime.shape[1], c.text_seq_len
    codes = torch.zeros(batch_size, n_image, dtype=torch.long, device=device)
    codes[:, :n_primed] = prime

    # With guidance the stream batch is [captions ; empty captions]: rows B.. are unconditional.
    guided = guidance_scale is not None
    text_stream = torch.cat([text_ids, empty_text_ids(c, batch_size, device)]) if guided else text_ids
    copies = 2 if guided else 1

    def next_code(image_logits: torch.Tensor) -> torch.Tensor:
        if guided:
            image_logits = guided_logits(image_logits[:batch_size], image_logits[batch_size:], guidance_scale)
        return sample_from_logits(image_logits, temperature, top_k, top_p, generator)

    was_training = model.training
    model.eval()
    head = image_head(model)
    # inference_mode, stricter than no_grad, also skips autograd's bookkeeping (version
    # counters, views) on every tensor: with a few dozen small operations per token, about
    # 5% of the time at batch 1. ``codes`` was made before it, so it stays an ordinary
    # tensor for callers and callbacks.
    try:
        with torch.inference_mode():
            if use_cache:
                cache = model.new_cache(text_stream.shape[0])
                prefix = torch.cat([text_stream, prime.repeat(copies, 1)], dim=1)
                logits = next_image_logits(model, prefix, 0, cache, head)  # prefill: caption + priming codes
            for position in tqdm(range(n_primed, n_image), desc="image tokens", disable=not progress, leave=False):
                if not use_cache:  # the whole prefix again, from scratch
                    prefix = torch.cat([text_stream, codes[:, :position].repeat(copies, 1)], dim=1)
                    logits = next_image_logits(model, prefix, head=head)
                codes[:, position] = next_code(logits)
                if on_token is not None:
                    on_token(position, codes)
                if use_cache and position + 1 < n_image:  # feed just the new code
                    new_token = codes[:, position : position + 1].repeat(copies, 1)
                    logits = next_image_logits(model, new_token, T + position, cache, head)
    finally:
        model.train(was_training)
    return codes.view(batch_size, c.image_size, c.image_size)
