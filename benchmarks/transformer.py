"""Speed and memory of the DALL·E transformer and of its sparse attention (lesson 04).

Two measurements, in one run, on this machine:

1. Training throughput of the tiny preset (d_model 256, 4 layers, 8 heads of 32, 32 text
   tokens + an 8x8 image): tokens per second of forward + backward + AdamW step at batch
   16, for dense-masked and for sparse (block-wise row/column) attention. For scale: the
   course issue quotes DALLE-pytorch 1.6.6 at this size at about 3,500 tokens/s on this
   machine (quoted, not re-measured here).
2. One attention forward + backward at the paper's stream length (256 text + 32x32 image
   tokens, d_model 256 = 8 heads of 32): median time, and peak extra memory, for
   - dense_sdpa: F.scaled_dot_product_attention with the boolean mask (what the model's
     dense path runs; PyTorch may pick a fused kernel that never stores the n x n scores),
   - dense_explicit: softmax(QK^T/sqrt(d) + mask) V written out (the textbook computation,
     which stores the n x n scores),
   - sparse_row, sparse_column: dalle_lesson.attention.sparse_attention.

Peak memory on CPU: the process's resident set size is no use here, because importing
torch already sets a high-water mark above what one attention needs, and freed heap memory
is reused without showing up in RSS (we tried getrusage deltas in fresh processes: they
read 0). So we measure what PyTorch's allocator hands out: torch.profiler with
``profile_memory=True`` records every tensor allocation and free with its size and time;
the running sum of those over one forward + backward, maximised, is the peak extra memory
of the computation (the inputs q, k, v, allocated before, not counted). It is
deterministic, so one run per case suffices.

    OMP_NUM_THREADS=1 python benchmarks/transformer.py            # writes results/transformer.json
    python benchmarks/transformer.py --threads 2 --out benchmarks/results/transformer_2threads.json

The second line uses both cores of the course machine; the DALLE-pytorch figure quoted above
does not say how many threads it ran with, so both are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "transformer.json"
DALLE_PYTORCH_TOKENS_PER_S = 3500  # quoted in the course issue for DALLE-pytorch 1.6.6 at the tiny size


# --------------------------------------------------------------------------------------
# 1. Training throughput
# --------------------------------------------------------------------------------------


def training_throughput(variants=(("dense", "paper"), ("sparse", "paper"), ("dense", "causal")),
                        batch_size: int = 16, warmup: int = 3, repeats: int = 15) -> list[dict]:
    """Tokens/s of training steps for each (attention, masks) variant of the tiny preset.

    The variants take turns step by step (round-robin), so a change in the machine's load
    during the run hits them all alike; medians of ``repeats`` steps each.
    """
    from dalle_lesson.dalle import DALLE, DALLEConfig
    from dalle_lesson.stages import RECIPES
    from dalle_lesson.train import parameter_groups

    recipe = RECIPES["dalle"]

    def make_optimizer(model):  # the engine's optimiser for the transformer stage
        groups = parameter_groups(model, recipe.weight_decay, decay_only_matrices=True)
        return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.beta1, recipe.beta2))

    runs = []
    for attention, masks in variants:
        torch.manual_seed(0)
        config = DALLEConfig.tiny(attention=attention, masks=masks)
        model = DALLE(config).train()
        runs.append((model, make_optimizer(model), []))
    text = torch.randint(0, config.text_vocab_total, (batch_size, config.text_seq_len))
    codes = torch.randint(0, config.image_vocab_size, (batch_size, config.image_size, config.image_size))
    for step in range(warmup + repeats):
        for model, optimizer, times in runs:
            start = time.perf_counter()
            loss = model.loss(text, codes)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
            optimizer.step()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    results = []
    for (attention, masks), (_, _, times) in zip(variants, runs):
        step_s = statistics.median(times)
        results.append({"attention": attention, "masks": masks, "batch_size": batch_size,
                        "tokens_per_step": batch_size * config.seq_len, "step_ms_median": round(step_s * 1000, 2),
                        "tokens_per_s": round(batch_size * config.seq_len / step_s, 1), "repeats": repeats})
    return results


# --------------------------------------------------------------------------------------
# 2. One attention layer at the paper's stream length
# --------------------------------------------------------------------------------------

TEXT_LEN, IMAGE_SIZE, HEADS, HEAD_DIM = 256, 32, 8, 32


def explicit_attention(q, k, v, mask):
    scores = (q @ k.transpose(-2, -1)) / HEAD_DIM**0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def attention_case(case: str, batch_size: int, text_len=TEXT_LEN, image_size=IMAGE_SIZE):
    """Inputs and a function doing one forward + backward of ``case``."""
    from dalle_lesson.attention import attention_mask, dense_attention, sparse_attention

    n = text_len + image_size**2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch_size, HEADS, n, HEAD_DIM, generator=g).requires_grad_() for _ in range(3))
    upstream = torch.randn(batch_size, HEADS, n, HEAD_DIM, generator=g)
    kind = "column" if case.endswith("column") else "row"
    mask = attention_mask(kind, text_len, image_size)

    def run():
        if case.startswith("dense_sdpa"):
            out = dense_attention(q, k, v, mask)
        elif case.startswith("dense_explicit"):
            out = explicit_attention(q, k, v, mask)
        else:
            out = sparse_attention(q, k, v, kind, text_len, image_size)
        out.backward(upstream)
        q.grad = k.grad = v.grad = None

    return run


def peak_memory_mb(case: str, batch_size: int) -> float:
    """Peak of (allocated - freed) tensor bytes during one forward + backward, in MiB."""
    from torch.profiler import ProfilerActivity, profile

    run = attention_case(case, batch_size)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def attention_time_ms(case: str, batch_size: int, warmup: int = 2, repeats: int = 7) -> float:
    run = attention_case(case, batch_size)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        run()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def allowed_pairs(kind: str) -> int:
    from dalle_lesson.attention import attention_mask

    return int(attention_mask(kind, TEXT_LEN, IMAGE_SIZE).sum())


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4, help="batch of the attention measurement")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.time()
    load_before = os.getloadavg()
    training = training_throughput()
    for row in training:
        row["vs_dalle_pytorch_3500"] = round(row["tokens_per_s"] / DALLE_PYTORCH_TOKENS_PER_S, 3)

    cases = ["dense_sdpa_row", "dense_explicit_row", "sparse_row", "dense_sdpa_column", "dense_explicit_column",
             "sparse_column"]
    attention = {}
    for case in cases:
        attention[case] = {"time_ms_median": round(attention_time_ms(case, args.batch_size), 2),
                           "peak_mem_mb": round(peak_memory_mb(case, args.batch_size), 1)}
    ratios = {}
    for kind in ("row", "column"):
        sparse = attention[f"sparse_{kind}"]
        for dense in ("dense_sdpa", "dense_explicit"):
            reference = attention[f"{dense}_{kind}"]
            ratios[f"{kind}: {dense} / sparse time"] = round(reference["time_ms_median"] / sparse["time_ms_median"], 2)
            ratios[f"{kind}: sparse / {dense} memory"] = round(sparse["peak_mem_mb"] / reference["peak_mem_mb"], 3)
    n = TEXT_LEN + IMAGE_SIZE**2
    pairs = {"all_pairs": n * n, "causal": allowed_pairs("causal"), "row": allowed_pairs("row"),
             "column": allowed_pairs("column"), "conv": allowed_pairs("conv")}

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
        "torch_version": torch.__version__,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads,
        "training_tiny_batch16": training,
        "attention_fwd_bwd": {"stream": f"{TEXT_LEN} text + {IMAGE_SIZE}x{IMAGE_SIZE} image", "heads": HEADS,
                              "head_dim": HEAD_DIM, "batch_size": args.batch_size, "cases": attention,
                              "ratios": ratios, "mask_pairs_allowed": pairs},
        "wall_s": round(time.time() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"torch {torch.__version__}, {args.threads} thread(s), load {load_before}")
    print(f"\ntraining, tiny preset, batch 16 (fwd + bwd + AdamW); DALLE-pytorch quoted at {DALLE_PYTORCH_TOKENS_PER_S}")
    print(f"{'attention':10} {'masks':7} {'step ms':>9} {'tokens/s':>10} {'vs 3500':>8}")
    for row in training:
        print(f"{row['attention']:10} {row['masks']:7} {row['step_ms_median']:9.1f} {row['tokens_per_s']:10.0f} "
              f"{row['vs_dalle_pytorch_3500']:8.2f}")
    print(f"\none attention fwd + bwd at {TEXT_LEN} + {IMAGE_SIZE}x{IMAGE_SIZE}, {HEADS} heads of {HEAD_DIM}, "
          f"batch {args.batch_size}")
    print(f"{'case':24} {'time ms':>9} {'peak MB':>9}")
    for case, row in attention.items():
        print(f"{case:24} {row['time_ms_median']:9.1f} {row['peak_mem_mb']:9.1f}")
    for name, value in ratios.items():
        print(f"  {name}: {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
