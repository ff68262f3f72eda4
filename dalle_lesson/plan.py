"""Lesson 07's planner: how big is a DALL·E, will a step fit on a GPU, and how long will it take?

Pure arithmetic from a :class:`~dalle_lesson.dalle.DALLEConfig`: no model is built, nothing
is allocated, so the paper's 12-billion-parameter model is planned in microseconds::

    >>> from dalle_lesson.dalle import DALLEConfig
    >>> from dalle_lesson.plan import GiB, parameter_count, memory_per_gpu
    >>> f"{parameter_count(DALLEConfig.paper())['total'] / 1e9:.2f} B"
    '12.29 B'
    >>> memory = memory_per_gpu(DALLEConfig.paper(), gpus=1024, shard=True)
    >>> memory.mode, round(memory.total / GiB, 1), memory.fits(16)
    ('FSDP', 6.4, True)

Four questions, one section each:

1. **Parameters** (:func:`parameter_count`), layer by layer, read off ``DALLE.__init__``.
2. **Activations** (:func:`activation_memory`): the bytes autograd keeps for the backward
   pass. Every term is a tensor the code really saves, found by listing them with
   ``torch.autograd.graph.saved_tensors_hooks`` (``tests/test_plan.py`` checks the sum
   against that measurement). Some of it is surprising: the fused attention kernels that
   ``F.scaled_dot_product_attention`` picks keep no ``n x n`` matrix at all, while the
   block-sparse attention keeps its per-block probabilities and a few copies of q, k, v.
3. **Memory per GPU** (:func:`memory_per_gpu`): weights, gradients and AdamW moments
   (16 bytes per parameter: 4 + 4 + 8, all fp32, bf16 only for compute), whole on every
   GPU under DDP, divided by the GPU count under FSDP, plus activations and the copies each
   way of training makes.
4. **FLOPs and time** (:func:`flops_per_image`, :func:`step_time`): 6 FLOPs per weight
   per token for the matmuls (2 forward, 4 backward), the attention scores on top, and
   one more forward of every block when activation checkpointing recomputes it.

:func:`plan_table` puts it together for several GPU counts and :func:`report` prints what
``dalle-lesson plan`` shows. The saved activations are byte-exact as measured on CPU with
PyTorch 2.14 (CUDA's fused kernels pad a few small buffers); the named approximations
(marked *estimate* below) are the backward pass's short-lived buffers, the runtime
overhead and the assumption that gradients exist for the whole step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dalle_lesson.dalle import DALLEConfig

GiB = 2**30  # GPU memory is sold in these: an "80 GB" A100 holds 80 GiB
BYTES = {"fp32": 4, "bf16": 2}  # bytes per number of each compute precision
STATE_BYTES = {"weights": 4, "gradients": 4, "adamw_moments": 8}  # fp32 master copy: 16 B per parameter
PAPER_GPU_FLOPS = 125e12  # the paper's V100: fp16 tensor-core peak, FLOP/s (an A100 does 312e12 in bf16)
DEFAULT_MFU = 0.4  # the fraction of that peak a well-tuned large training run sustains
DEFAULT_GPU_MEMORY_GB = (80, 16)  # today's 80 GiB cards, and the paper's 16 GiB V100s
RUNTIME_OVERHEAD_GB = 1.0  # estimate: CUDA context, NCCL buffers, allocator slack per GPU
# ``train --shard`` left to itself (the engine's automatic choice, :func:`wants_sharding`):
# shard when one process's fp32 training state would fill more than this fraction of its GPU.
SHARD_ABOVE_FRACTION_OF_GPU = 0.5
PRECISIONS = ("bf16", "fp32")
ATTENTION_KERNELS = ("fused", "math")


# --------------------------------------------------------------------------------------
# 1. Parameters
# --------------------------------------------------------------------------------------


def parameter_count(config: DALLEConfig) -> dict[str, int]:
    """Parameters of ``DALLE(config)``, layer by layer (``block.*`` entries are per block).

    >>> counts = parameter_count(DALLEConfig.tiny())
    >>> counts["block.qkv"], counts["block"], counts["total"]
    (197376, 789760, 3974656)
    """
    d, hidden = config.d_model, config.mlp_ratio * config.d_model
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out  # noqa: E731  weight + bias
    block = {
        "block.ln_attention": 2 * d,  # LayerNorm: weight and bias
        "block.qkv": linear(d, 3 * d),
        "block.proj": linear(d, d),
        "block.ln_mlp": 2 * d,
        "block.mlp_in": linear(d, hidden),
        "block.mlp_out": linear(hidden, d),
    }
    counts = {
        "text_embedding": config.text_vocab_total * d,  # BPE ids + one padding id per text position
        "text_position": config.text_seq_len * d,
        "image_embedding": config.image_vocab_size * d,
        "row_embedding": config.image_size * d,
        "column_embedding": config.image_size * d,
        **block,
        "block": sum(block.values()),
        "blocks": config.n_layers * sum(block.values()),
        "ln_final": 2 * d,
        "head": config.vocab_total * d,  # no bias
    }
    embeddings = ("text_embedding", "text_position", "image_embedding", "row_embedding", "column_embedding")
    counts["total"] = sum(counts[k] for k in embeddings) + counts["blocks"] + counts["ln_final"] + counts["head"]
    return counts


def _linear_weights_per_block(config: DALLEConfig) -> int:
    """Weights (no biases) of one block's matmuls: qkv, proj, the two MLP layers."""
    d = config.d_model
    return 4 * d * d + 2 * config.mlp_ratio * d * d


def _root_parameters(config: DALLEConfig) -> int:
    """What is not in a block (embeddings, final LayerNorm, head): FSDP's root unit."""
    counts = parameter_count(config)
    return counts["total"] - counts["blocks"]


# --------------------------------------------------------------------------------------
# 2. Activations: the tensors autograd saves for backward
# --------------------------------------------------------------------------------------


def attention_path(config: DALLEConfig, kind: str) -> str:
    """Which code computes a layer's attention in training: ``sparse`` or ``dense``.

    Mirrors ``SelfAttention.forward``: block-sparse only for row/column layers of a model
    with ``attention="sparse"`` and no dropout; everything else is masked dense SDPA.

    >>> [attention_path(DALLEConfig.paper(), k) for k in ("row", "column", "conv")]
    ['sparse', 'sparse', 'dense']
    """
    sparse = config.attention == "sparse" and kind in ("row", "column") and config.dropout == 0.0
    return "sparse" if sparse else "dense"


def block_activation_bytes(config: DALLEConfig, kind: str, batch: int = 1, precision: str = "bf16",
                           attention_kernel: str = "fused", device: str = "cuda") -> dict[str, int]:
    """Bytes one block saves for backward, by tensor; ``kind`` is the layer's mask kind.

    ``precision="bf16"`` = autocast: the residual stream and LayerNorms stay fp32 (4 B),
    the matmuls' inputs and outputs are bf16 (2 B). ``attention_kernel`` = what dense
    attention runs: ``fused`` is what ``F.scaled_dot_product_attention`` picks for a
    boolean mask (flash on CPU, memory-efficient on CUDA: it keeps q, k, v, the output and
    one log-sum-exp per query, never the n x n probabilities); ``math`` is the textbook
    ``softmax(q k^T) v`` (SDPA's fallback), which keeps the probabilities, n x n per head,
    in fp32. ``device`` matters
    only for the sparse path under bf16: CUDA's autocast runs softmax in fp32, CPU's in bf16.

    >>> b = block_activation_bytes(DALLEConfig.tiny(), "row", batch=1, precision="fp32")
    >>> b["mlp_hidden"] == 2 * 96 * 1024 * 4  # before and after GELU: [B, n, 4d] fp32, n = 96
    True
    """
    _check_choice(precision, PRECISIONS, "precision")
    _check_choice(attention_kernel, ATTENTION_KERNELS, "attention_kernel")
    B, n, D, h = batch, config.seq_len, config.d_model, config.n_heads
    T, H, I = config.text_seq_len, config.image_size, config.image_seq_len
    c = BYTES[precision]  # compute dtype; the residual stream is always fp32
    terms = {
        "layernorm_inputs": 2 * B * n * D * 4,  # x before each LayerNorm (fp32 residual stream)
        "layernorm_statistics": 2 * 2 * B * n * 4,  # mean and 1/std per token, two LayerNorms
        "qkv_input": B * n * D * c,  # LN output (under autocast: its bf16 copy)
        "qkv_output": 3 * B * n * D * c,  # q, k, v: views of one [B, n, 3D] tensor (or copies, math)
        "attention_output": B * n * D * c,  # [B, n, D], the input of proj
    }
    path = attention_path(config, kind)
    # SDPA's kernel: dropout on CPU falls back to the math kernel (CUDA's fused kernels do dropout)
    math_kernel = attention_kernel == "math" or (config.dropout > 0 and device == "cpu")
    # With one example a reshape of a slice of qkv is often a view, so einsum and the math
    # kernel make no copy; the view keeps the whole qkv output alive instead.
    alias = B == 1
    if path == "dense" and not math_kernel:
        terms["logsumexp"] = B * h * n * 4  # fp32, one per query and head
        terms["mask_as_float"] = n * n * c  # SDPA turns the bool mask into an additive one (no batch dim)
    elif path == "dense":
        # the math kernel computes in fp32 even under autocast (unless
        # torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)): fp32 copies of q, k, v
        v_aliases_qkv = alias and c == 4
        terms["qkv_output"] = 2 * B * n * D * 4 + (3 if v_aliases_qkv else 1) * B * n * D * 4
        terms["attention_probabilities"] = B * h * n * n * 4  # [B, h, n, n]: the textbook cost
    else:
        # sparse_attention: text queries run causal SDPA; image queries come in blocks (image
        # rows, or columns), each attending to all T text keys + its bk local keys.
        bk = 2 * H if kind == "row" else H  # row: [row above ; own row]; column: own column
        softmax_bytes = c + (4 if c < 4 and device == "cuda" else 0)  # CUDA: fp32 softmax + a bf16 copy
        if not math_kernel:
            # the text SDPA saves q, k, v[:, :, :T]: views, which keep the whole qkv output alive
            terms["text_attention"] = B * T * D * c + B * h * T * 4  # SDPA output + log-sum-exp
        else:
            if not alias:
                del terms["qkv_output"]  # the math kernel and einsum save copies of its slices instead
            copies = 2 if alias and c == 4 else 3  # fp32 q, k, v of the text (v may be a view)
            terms["text_attention"] = copies * B * T * D * 4 + B * h * T * T * 4  # + probabilities
        terms["text_key_value_copies"] = 0 if alias else 2 * B * T * D * c  # einsum's contiguous copies
        terms["query_copies"] = (1 if alias and kind == "row" else 2) * B * I * D * c  # one per einsum
        terms["local_keys_values"] = 2 * B * (bk // H) * I * D * c  # row: cat of two rows; column: a transpose
        terms["block_probabilities"] = B * h * I * (T + bk) * softmax_bytes  # [B, h, blocks, bq, T + bk]
        terms["block_masks"] = H * H * bk  # bool, no batch dim
    terms["mlp_input"] = B * n * D * c
    terms["mlp_hidden"] = 2 * B * n * config.mlp_ratio * D * c  # before GELU (its input) and after
    if config.dropout > 0:
        # CUDA's fused dropout keeps a bool mask; CPU keeps the scaled noise it multiplied by
        mask_bytes = 1 if device == "cuda" else c
        terms["dropout_masks"] = 2 * B * n * D * mask_bytes  # one per residual branch
        if path == "dense" and math_kernel:  # the mask of the probabilities, and the dropped probabilities
            terms["attention_dropout"] = B * h * n * n * ((1 if device == "cuda" else 4) + 4)
    return terms


@dataclass
class Activations:
    """Activation memory of one training step, in bytes, as named terms.

    ``saved``: held for backward when the forward pass ends (measurable: see the tests).
    ``transient``: *estimates* of buffers that live briefly during backward; they come one
    after another, so the peak is ``saved + max(transient)``.
    """

    saved: dict[str, int]
    transient: dict[str, int]

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    @property
    def peak_bytes(self) -> int:
        return self.saved_bytes + max(self.transient.values(), default=0)


def activation_memory(config: DALLEConfig, batch: int = 1, checkpointing: bool | None = None,
                      precision: str = "bf16", attention_kernel: str = "fused", device: str = "cuda") -> Activations:
    """Activation bytes of one ``model.loss(...)`` forward + backward with ``batch`` examples.

    ``checkpointing=None`` uses ``config.activation_checkpointing``. With checkpointing each
    block keeps only its input (``[B, n, D]`` fp32) and recomputes the rest in backward, so
    one block's full activations come back for a moment (the ``transient``).

    >>> a = activation_memory(DALLEConfig.paper(), batch=1)   # checkpointing on (the preset)
    >>> round(a.saved["block_inputs"] / GiB, 2)              # 64 x 1280 x 3968 x 4 bytes
    1.21
    """
    _check_positive(batch, "batch")
    checkpointing = config.activation_checkpointing if checkpointing is None else checkpointing
    B, n, D = batch, config.seq_len, config.d_model
    T, I = config.text_seq_len, config.image_seq_len
    blocks = [sum(block_activation_bytes(config, kind, B, precision, attention_kernel, device).values())
              for kind in config.layer_kinds()]
    log_probs = B * ((T - 1) * config.text_vocab_total + I * config.image_vocab_size) * 4
    if checkpointing:  # a checkpointed block keeps only its input: [B, n, D] fp32 (the residual stream)
        saved = {"block_inputs": config.n_layers * B * n * D * 4}
    else:
        saved = {"blocks": sum(blocks)}
    saved |= {
        "final_layernorm": B * n * D * 4 + 2 * B * n * 4,  # input + statistics, fp32
        # the two slices of hidden the loss multiplies by the head: copies (views when B = 1,
        # which keep the whole final LayerNorm output)
        "head_inputs": B * (n if B == 1 else n - 1) * D * 4,
        "log_probs": log_probs,  # fp32 log_softmax of each half of the logits (DALLE.loss)
        # int64: the stream (text and image embeddings index it), text positions, rows and
        # columns, the two cross-entropy targets (and their two fp32 total weights)
        "token_ids": 8 * (B * n + T + 2 * I + B * (T if B == 1 else T - 1) + B * I) + 2 * 4,
    }
    transient = {
        "loss_backward": 2 * log_probs,  # estimate: the gradients of the log-probs and of the logits
        # estimate: a block's gradients are about as big as what it saved; with checkpointing
        # the block's saved tensors are recomputed first
        "block_backward": (2 if checkpointing else 1) * max(blocks),
    }
    return Activations(saved, transient)


# --------------------------------------------------------------------------------------
# 3. Memory per GPU
# --------------------------------------------------------------------------------------


@dataclass
class Memory:
    """Bytes on one GPU, by term, in three groups.

    ``state`` lives all the time; ``forward_backward`` during the forward and backward
    passes; ``optimizer_step`` during ``optimizer.step()``, after backward has freed the
    activations. So the peak is ``state + max(forward_backward, optimizer_step) + overhead``.
    Gradients are counted in ``state`` for the whole step: an upper bound (``train.py``
    frees them after each step and backward refills them as it frees activations).
    """

    mode: str  # "single" (one GPU), "DDP" (a full copy per GPU) or "FSDP" (sharded)
    state: dict[str, int]
    forward_backward: dict[str, int]
    optimizer_step: dict[str, int]
    overhead: int
    activations: Activations = field(repr=False, default=None)

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    @property
    def forward_backward_bytes(self) -> int:
        return sum(self.forward_backward.values())

    @property
    def total(self) -> int:
        step = sum(self.optimizer_step.values())
        return self.state_bytes + max(self.forward_backward_bytes, step) + self.overhead

    def fits(self, gpu_memory_gb: float) -> bool:
        """Whether the peak stays within ``gpu_memory_gb`` GiB."""
        return self.total <= gpu_memory_gb * GiB

    def terms(self) -> dict[str, int]:
        """Every term in one flat dict (for a table)."""
        return {**self.state, **self.forward_backward, **self.optimizer_step, "runtime_overhead": self.overhead}


def memory_per_gpu(config: DALLEConfig, gpus: int = 1, batch: int = 1, shard: bool = False,
                   checkpointing: bool | None = None, precision: str = "bf16", attention_kernel: str = "fused",
                   overhead_gb: float = RUNTIME_OVERHEAD_GB) -> Memory:
    """Peak bytes on each of ``gpus`` GPUs training ``config`` with ``batch`` examples per GPU.

    As ``dalle_lesson.train.fit`` trains: one GPU = no wrapper; several = DDP, or FSDP with
    ``shard=True`` (one unit per block, gathered in bf16 just before it runs; the root unit
    of embeddings + head stays fp32, as in ``train.shard_model``). AdamW keeps two fp32
    moments per parameter.

    >>> m = memory_per_gpu(DALLEConfig.paper(), gpus=8)                # DDP: a full copy each
    >>> m.mode, round(m.state["weights"] / 1e9, 1), m.fits(80)
    ('DDP', 49.2, False)
    """
    _check_positive(gpus, "gpus")
    _check_positive(batch, "batch")
    counts = parameter_count(config)
    P = counts["total"]
    mode = "single" if gpus == 1 else "FSDP" if shard else "DDP"
    share = gpus if mode == "FSDP" else 1  # FSDP: each GPU holds 1/gpus of every tensor
    state = {name: math.ceil(P * size / share) for name, size in STATE_BYTES.items()}
    c = BYTES[_check_choice(precision, PRECISIONS, "precision")]
    forward_backward = {}
    if mode == "DDP":
        state["ddp_gradient_buckets"] = 4 * P  # DDP's default gradient_as_bucket_view=False: a 2nd copy
    if mode == "FSDP":
        block, root = counts["block"], _root_parameters(config)
        forward_backward["fsdp_gathered_blocks"] = 2 * block * c  # the running block + the prefetched next
        forward_backward["fsdp_block_gradients"] = block * (c + (4 if c < 4 else 0))  # unsharded, + fp32 for reduce
        forward_backward["fsdp_root_unit"] = root * 8  # embeddings + head gathered, fp32 weights + gradients
    elif precision == "bf16":
        # autocast casts every Linear's weight and bias to bf16 and keeps the copy (in its
        # cache, and saved for backward): 2 bytes per parameter of the blocks' Linears
        blocks_linear = config.n_layers * (counts["block"] - counts["block.ln_attention"] - counts["block.ln_mlp"])
        forward_backward["bf16_weight_copies"] = blocks_linear * 2
    activations = activation_memory(config, batch, checkpointing, precision, attention_kernel)
    forward_backward["activations_saved"] = activations.saved_bytes
    forward_backward["backward_transient"] = max(activations.transient.values())
    optimizer_step = {"adamw_step_temporary": math.ceil(4 * P / share)}  # foreach AdamW: sqrt(v) for all
    return Memory(mode, state, forward_backward, optimizer_step, int(overhead_gb * GiB), activations)


# --------------------------------------------------------------------------------------
# 4. FLOPs and time
# --------------------------------------------------------------------------------------


def attention_pairs(config: DALLEConfig, kind: str) -> int:
    """Query-key pairs one layer computes per example (masked-out pairs count if computed).

    Dense SDPA with a mask computes all ``n^2`` pairs: a mask is not a pattern a fused kernel
    can skip. Sparse: causal text (``T(T+1)/2``, the kernel skips the upper triangle) plus
    each image query against the ``T`` text keys and its block's keys (``2W`` for row,
    ``H`` for column).

    >>> c = DALLEConfig.paper()
    >>> attention_pairs(c, "conv") == 1280 ** 2, attention_pairs(c, "row") < 1280 ** 2 / 4
    (True, True)
    """
    T, H, I = config.text_seq_len, config.image_size, config.image_seq_len
    if attention_path(config, kind) == "dense":
        return config.seq_len**2
    return T * (T + 1) // 2 + I * (T + (2 * H if kind == "row" else H))


def flops_per_image(config: DALLEConfig, checkpointing: bool | None = None) -> dict[str, float]:
    """Training FLOPs for one example (forward + backward), by term.

    Matmuls cost 2 FLOPs per weight per token forward and 4 backward (gradients of the
    input and of the weight). Attention: ``q k^T`` and ``probs v`` cost ``2 * d`` FLOPs per
    computed pair each, forward; backward twice that (softmax, biases, LayerNorms and
    GELU are left out). The loss multiplies each position by its half of the head only.
    Checkpointing adds one more forward of every block.

    >>> f = flops_per_image(DALLEConfig.tiny(), checkpointing=False)
    >>> f["block_matmuls"] == 6 * 96 * 4 * 12 * 256**2   # 6 x tokens x layers x 12 d^2
    True
    """
    checkpointing = config.activation_checkpointing if checkpointing is None else checkpointing
    n, d, T, I = config.seq_len, config.d_model, config.text_seq_len, config.image_seq_len
    forward_matmuls = 2 * n * config.n_layers * _linear_weights_per_block(config)
    forward_attention = sum(2 * 2 * d * attention_pairs(config, kind) for kind in config.layer_kinds())
    forward_head = 2 * d * ((T - 1) * config.text_vocab_total + I * config.image_vocab_size)
    flops = {
        "block_matmuls": 3 * forward_matmuls,  # forward + twice that backward
        "attention": 3 * forward_attention,
        "head": 3 * forward_head,
        "recompute": forward_matmuls + forward_attention if checkpointing else 0,
    }
    flops["total"] = sum(flops.values())
    flops["rule_of_thumb_6PN"] = 6 * parameter_count(config)["total"] * n  # 6 x parameters x tokens
    return flops


def step_time(config: DALLEConfig, gpus: int = 1, batch: int = 1, checkpointing: bool | None = None,
              flops_per_gpu: float = PAPER_GPU_FLOPS, mfu: float = DEFAULT_MFU) -> dict[str, float]:
    """FLOPs and seconds per optimiser step, each GPU doing ``batch`` examples at ``mfu x flops_per_gpu``.

    Communication is assumed to overlap with compute (it does in a well-tuned run; it is
    what the paper's PowerSGD compression was for). ``mfu`` here counts recomputed FLOPs as work.

    >>> t = step_time(DALLEConfig.paper(), gpus=1024, batch=1)
    >>> round(t["seconds_per_step"], 1)
    2.5
    """
    _check_positive(gpus, "gpus")
    _check_positive(batch, "batch")
    if not flops_per_gpu > 0:
        raise ValueError(f"flops_per_gpu must be > 0 FLOP/s, got {flops_per_gpu}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu (the fraction of peak FLOP/s sustained) must lie in (0, 1], got {mfu}")
    per_image = flops_per_image(config, checkpointing)["total"]
    seconds = batch * per_image / (flops_per_gpu * mfu)
    return {"flops_per_image": per_image, "flops_per_gpu_step": batch * per_image,
            "flops_per_step": gpus * batch * per_image, "seconds_per_step": seconds,
            "images_per_second": gpus * batch / seconds}


# --------------------------------------------------------------------------------------
# 5. The table, and what to change when it does not fit
# --------------------------------------------------------------------------------------


@dataclass
class PlanRow:
    """One GPU count of :func:`plan_table`."""

    gpus: int
    batch: int  # per GPU
    memory: Memory
    fits: dict[float, bool]  # GiB -> whether the peak fits
    time: dict[str, float]
    remedies: dict[float, str]  # GiB -> what to change when it does not fit

    @property
    def global_batch(self) -> int:
        return self.gpus * self.batch


def plan_table(config: DALLEConfig, gpus=(1, 8, 64, 1024), shard: bool = False, checkpointing: bool | None = None,
               batch: int = 1, gpu_memory_gb=DEFAULT_GPU_MEMORY_GB, precision: str = "bf16",
               attention_kernel: str = "fused", flops_per_gpu: float = PAPER_GPU_FLOPS,
               mfu: float = DEFAULT_MFU) -> list[PlanRow]:
    """Memory and time per step for each GPU count; print it with :func:`format_table`.

    >>> rows = plan_table(DALLEConfig.paper(), gpus=[8, 1024], shard=True)
    >>> [(r.gpus, r.fits[80], r.fits[16]) for r in rows]
    [(8, True, False), (1024, True, True)]
    """
    if not gpus:
        raise ValueError("gpus must list at least one GPU count, e.g. [8, 64, 1024]")
    if not gpu_memory_gb or any(not g > 0 for g in gpu_memory_gb):
        raise ValueError(f"gpu_memory_gb must be positive GiB values, got {list(gpu_memory_gb)}")
    rows = []
    for count in gpus:
        setup = dict(gpus=count, batch=batch, shard=shard, checkpointing=checkpointing, precision=precision,
                     attention_kernel=attention_kernel)
        memory = memory_per_gpu(config, **setup)
        fits = {gb: memory.fits(gb) for gb in gpu_memory_gb}
        remedies = {gb: remedy(config, gb, **setup) for gb in gpu_memory_gb if not fits[gb]}
        rows.append(PlanRow(count, batch, memory, fits, step_time(config, count, batch, checkpointing,
                                                                   flops_per_gpu, mfu), remedies))
    return rows


def remedy(config: DALLEConfig, gpu_memory_gb: float, gpus: int, batch: int, shard: bool,
           checkpointing: bool | None, **setup) -> str:
    """The smallest change of ``dalle-lesson plan`` flags that makes a setup fit.

    Tries, in order: checkpointing; sharding (several GPUs); both; a micro-batch of 1 (keep
    the global batch with train's ``--grad-accum``) with whatever else it needs; then the
    fewest GPUs (a power of two) that fit with all of it.

    >>> remedy(DALLEConfig.paper(), 80, gpus=8, batch=1, shard=False, checkpointing=True)
    'fits with --shard'
    """
    checkpointing = config.activation_checkpointing if checkpointing is None else checkpointing
    now = dict(gpus=gpus, batch=batch, shard=shard, checkpointing=checkpointing)

    def fits(change: dict) -> bool:
        return memory_per_gpu(config, **{**now, **change}, **setup).fits(gpu_memory_gb)

    sharding = [dict(shard=True)] if gpus > 1 and not shard else []
    changes = [dict(checkpointing=True), *sharding, dict(shard=gpus > 1, checkpointing=True)]
    changes += [{**change, "batch": 1} for change in [{}, *changes]] if batch > 1 else []
    changes += [dict(gpus=2**k, shard=True, checkpointing=True, batch=1) for k in range(1, 21) if 2**k > gpus]
    for change in changes:
        flags = [f"--{key} {change[key]}" for key in ("gpus", "batch") if change.get(key, now[key]) != now[key]]
        flags += [f"--{key}" for key in ("shard", "checkpointing") if change.get(key) and not now[key]]
        if flags and fits(change):
            smaller_batch = any(flag.startswith("--batch") for flag in flags)
            return "fits with " + " ".join(flags) + (" (keep the global batch with train's --grad-accum)"
                                                     if smaller_batch else "")
    return "does not fit at any GPU count: one example's activations alone are too big for this GPU"


def format_table(rows: list[PlanRow]) -> str:
    """The memory table of :func:`plan_table`, one line per GPU count, in GiB."""
    memories = list(rows[0].fits) if rows else []
    header = ["GPUs", "mode", "batch/GPU", "global batch", "state", "fwd/bwd: copies", "+ activations",
              "or step: AdamW", "total/GPU"]
    header += [f"fits {gb:g} GiB" for gb in memories] + ["s/step", "images/s"]
    lines = []
    for row in rows:
        m = row.memory
        activations = m.forward_backward["activations_saved"] + m.forward_backward["backward_transient"]
        copies = m.forward_backward_bytes - activations
        cells = [str(row.gpus), m.mode, str(row.batch), str(row.global_batch), _gib(m.state_bytes), _gib(copies),
                 _gib(activations), _gib(sum(m.optimizer_step.values())), _gib(m.total)]
        cells += ["yes" if row.fits[gb] else "no" for gb in memories]
        cells += [f"{row.time['seconds_per_step']:.3g}", f"{row.time['images_per_second']:.3g}"]
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    render = lambda cells: "  ".join(cell.rjust(w) for cell, w in zip(cells, widths))  # noqa: E731
    legend = ("state = fp32 weights + gradients + AdamW moments (+ DDP's gradient buckets); total = state + "
              f"max(copies + activations, AdamW step temporary) + {_gib(rows[0].memory.overhead) if rows else 0} GiB "
              "runtime overhead")
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines), legend])


def report(config: DALLEConfig, gpus=(1, 8, 64, 1024), shard: bool = False, checkpointing: bool | None = None,
           batch: int = 1, gpu_memory_gb=DEFAULT_GPU_MEMORY_GB, precision: str = "bf16",
           attention_kernel: str = "fused", flops_per_gpu: float = PAPER_GPU_FLOPS, mfu: float = DEFAULT_MFU,
           name: str = "") -> str:
    """Everything ``dalle-lesson plan`` prints: parameters, the memory table, FLOPs and time."""
    checkpointing = config.activation_checkpointing if checkpointing is None else checkpointing
    rows = plan_table(config, gpus, shard, checkpointing, batch, gpu_memory_gb, precision, attention_kernel,
                      flops_per_gpu, mfu)
    c = config
    lines = [f"DALL·E {name + ' ' if name else ''}configuration: {c.n_layers} layers, d_model {c.d_model}, "
             f"{c.n_heads} heads of {c.head_dim}, mlp x{c.mlp_ratio}; stream {c.text_seq_len} text + "
             f"{c.image_size}x{c.image_size} image = {c.seq_len} tokens; attention {c.attention}, masks {c.masks}",
             "", "parameters"]
    lines += _parameter_lines(c)
    lines += ["", f"memory per GPU (GiB; {precision} compute, fp32 weights, gradients and AdamW moments = 16 B per "
                  f"parameter; activation checkpointing {'on' if checkpointing else 'off'}; "
                  f"{'FSDP over several GPUs' if shard else 'DDP over several GPUs'}; {attention_kernel} attention "
                  f"kernel)", format_table(rows)]
    notes = [f"  {row.gpus} GPU{'s' if row.gpus > 1 else ''}, {gb:g} GiB: needs {_gib(row.memory.total)} GiB; "
             f"{text}" for row in rows for gb, text in row.remedies.items()]
    if notes:
        lines += ["does not fit:", *notes]
    parameters = parameter_count(c)["total"]
    automatic = [f"{gb:g} GiB: {'yes' if wants_sharding(parameters, gb * GiB) else 'no'}" for gb in gpu_memory_gb]
    lines += [f"train without --shard/--no-shard shards by itself on many GPUs of {', '.join(automatic)} "
              f"(when 16 B x parameters > {SHARD_ABOVE_FRACTION_OF_GPU:g} x GPU memory)"]
    lines += ["", *_activation_lines(config, batch, checkpointing, precision, attention_kernel)]
    lines += ["", "per-GPU terms of the last row (GiB):"]
    lines += [f"  {name.replace('_', ' '):32s}{_gib(value, 3):>10}" for name, value in rows[-1].memory.terms().items()]
    flops = flops_per_image(c, checkpointing)
    lines += ["", "FLOPs per image (forward + backward):"]
    lines += [f"  {name.replace('_', ' '):32s}{value:10.3e}" for name, value in flops.items()]
    lines += ["", f"time per step at {flops_per_gpu:.3g} FLOP/s per GPU x MFU {mfu:g} (communication overlapped):"]
    lines += [f"  {row.gpus:5d} GPUs x batch {row.batch}: {row.time['flops_per_step']:.3e} FLOPs per step, "
              f"{row.time['seconds_per_step']:.3g} s per step, {row.time['images_per_second']:.3g} images/s"
              for row in rows]
    return "\n".join(lines)


def _parameter_lines(config: DALLEConfig) -> list[str]:
    counts, d = parameter_count(config), config.d_model
    hidden = config.mlp_ratio * d
    shapes = {
        "text_embedding": f"{config.text_vocab_total} x {d} ({config.text_vocab_size} BPE + {config.text_seq_len} pad)",
        "text_position": f"{config.text_seq_len} x {d}",
        "image_embedding": f"{config.image_vocab_size} x {d}",
        "row_embedding": f"{config.image_size} x {d}", "column_embedding": f"{config.image_size} x {d}",
        "block.ln_attention": f"2 x {d}", "block.qkv": f"{d} x {3 * d} + bias", "block.proj": f"{d} x {d} + bias",
        "block.ln_mlp": f"2 x {d}", "block.mlp_in": f"{d} x {hidden} + bias",
        "block.mlp_out": f"{hidden} x {d} + bias", "block": "one block",
        "blocks": f"{config.n_layers} blocks", "ln_final": f"2 x {d}",
        "head": f"{config.vocab_total} x {d}, no bias", "total": "",
    }
    return [f"  {name:20s}{shapes[name]:40s}{value:>16,}" for name, value in counts.items()]


def _activation_lines(config: DALLEConfig, batch: int, checkpointing: bool, precision: str,
                      attention_kernel: str) -> list[str]:
    """What one block of each mask kind saves for backward, term by term, in MiB."""
    kinds = sorted(set(config.layer_kinds()), key=config.layer_kinds().index)
    per_kind = {kind: block_activation_bytes(config, kind, batch, precision, attention_kernel) for kind in kinds}
    names = list(dict.fromkeys(name for terms in per_kind.values() for name in terms))
    mib = lambda value: f"{value / 2**20:.1f}" if value else "-"  # noqa: E731
    lines = [f"activations one block saves for backward (MiB, batch {batch}; {attention_kernel} kernel for dense "
             f"layers, {config.attention} attention):",
             f"  {'':28s}" + "".join(f"{f'{kind} ({attention_path(config, kind)})':>20s}" for kind in kinds)]
    lines += [f"  {name.replace('_', ' '):28s}" + "".join(f"{mib(per_kind[k].get(name, 0)):>20s}" for k in kinds)
              for name in names]
    lines.append(f"  {'one block':28s}" + "".join(f"{mib(sum(per_kind[k].values())):>20s}" for k in kinds))
    activations = activation_memory(config, batch, checkpointing, precision, attention_kernel)
    lines.append("  saved in all: " + ", ".join(f"{name.replace('_', ' ')} {_gib(value)} GiB"
                                                for name, value in activations.saved.items())
                 + (" (checkpointing: each block keeps only its input)" if checkpointing else ""))
    return lines


def _gib(value: float, digits: int | None = None) -> str:
    """Bytes as GiB, with about three significant digits."""
    gib = value / GiB
    return f"{gib:.{digits if digits is not None else 3 if gib < 0.1 else 2 if gib < 10 else 1}f}"


def _check_positive(value: int, name: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def wants_sharding(parameters: int, gpu_memory_bytes: int) -> bool:
    """The engine's automatic ``--shard``: would a full copy of the training state (16 bytes
    per parameter) fill more than half of one GPU? ``wants_sharding(12_293_824_256, 80 * GiB) == True``."""
    return parameters * sum(STATE_BYTES.values()) > SHARD_ABOVE_FRACTION_OF_GPU * gpu_memory_bytes
