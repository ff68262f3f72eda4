"""How fast does dalle_lesson.sampling draw an image, with and without the KV cache?

    OMP_NUM_THREADS=1 python benchmarks/sampling.py      # writes benchmarks/results/sampling.json

Measures seconds per image (random weights: the speed does not depend on them) for

* the ``tiny`` preset (32 text tokens + 8x8 codes, 4 layers of width 256), batch 1 and 16;
* a 32x32 grid after 256 text tokens, d_model 256, 2 layers, 8 heads of 32, batch 1
  (the paper's stream length; text vocab 16384, image vocab 8192 as in the paper),
  with the cache, with the cache and classifier-free guidance (two streams per image),
  and without the cache.

With the cache every image is drawn in full by ``generate`` (median of repeats). Without
the cache at the long stream a full image takes minutes, so this script times the real
uncached step (one forward pass over the whole prefix + sampling) at evenly spaced prefix
lengths and multiplies their mean by the number of steps. That estimate is marked
``uncached_extrapolated: true`` in the JSON; for the tiny preset both the full run and the
estimate are reported, which shows how well the estimate works.
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

from dalle_lesson.dalle import DALLE, DALLEConfig
from dalle_lesson.sampling import generate, next_image_logits, sample_from_logits

RESULTS = Path(__file__).resolve().parent / "results" / "sampling.json"


def random_text(config: DALLEConfig, batch_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.text_vocab_size, (batch_size, config.text_seq_len), generator=generator)


def time_full_images(model: DALLE, text: torch.Tensor, repeats: int, **options) -> float:
    """Median seconds per image of ``generate`` over ``repeats`` runs (after one warm-up run)."""
    generate(model, text, seed=0, **options)
    times = []
    for repeat in range(repeats):
        start = time.perf_counter()
        generate(model, text, seed=repeat, **options)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / text.shape[0]


@torch.no_grad()
def estimate_uncached(model: DALLE, text: torch.Tensor, samples: int) -> float:
    """Seconds per image without the cache, from ``samples`` timed steps at evenly spaced prefixes.

    Each timed step is what ``generate(use_cache=False)`` does per code: the whole stream
    so far through the model, then sampling from the last position's image logits.
    """
    c = model.config
    n = c.image_seq_len
    positions = [round(k * (n - 1) / (samples - 1)) for k in range(samples)]
    codes = torch.randint(0, c.image_vocab_size, (text.shape[0], n), generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(0)
    step_seconds = []
    for position in positions:
        prefix = torch.cat([text, codes[:, :position]], dim=1)
        start = time.perf_counter()
        logits = next_image_logits(model, prefix)
        sample_from_logits(logits, generator=generator)
        step_seconds.append(time.perf_counter() - start)
    return statistics.mean(step_seconds) * n / text.shape[0]


def measure(name: str, config: DALLEConfig, batch_size: int, repeats: int, full_uncached: bool,
            estimate_samples: int) -> dict:
    torch.manual_seed(0)
    model = DALLE(config).eval()
    text = random_text(config, batch_size)
    row = {"config": name, "batch_size": batch_size, "stream_tokens": config.seq_len,
           "image_tokens": config.image_seq_len, "parameters_m": round(model.num_parameters() / 1e6, 2)}
    row["cached_s_per_image"] = round(time_full_images(model, text, repeats, use_cache=True), 4)
    if batch_size == 1:
        row["cached_guided_s_per_image"] = round(
            time_full_images(model, text, repeats, use_cache=True, guidance_scale=3.0), 4)
    estimate = estimate_uncached(model, text, estimate_samples)
    if full_uncached:
        row["uncached_s_per_image"] = round(time_full_images(model, text, max(1, repeats // 2), use_cache=False), 4)
        row["uncached_estimate_s_per_image"] = round(estimate, 4)
        row["uncached_extrapolated"] = False
    else:
        row["uncached_s_per_image"] = round(estimate, 4)
        row["uncached_extrapolated"] = True
        row["uncached_method"] = (f"mean time of {estimate_samples} uncached steps at evenly spaced prefix lengths "
                                  f"x {config.image_seq_len} steps")
    row["cache_speedup"] = round(row["uncached_s_per_image"] / row["cached_s_per_image"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--estimate-samples", type=int, default=17, help="timed uncached steps for an estimate")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    load_before = os.getloadavg()

    long_stream = DALLEConfig(d_model=256, n_layers=2, n_heads=8, text_seq_len=256, text_vocab_size=16384,
                              image_size=32, image_vocab_size=8192)
    rows = [
        measure("tiny", DALLEConfig.tiny(), 1, args.repeats, full_uncached=True, estimate_samples=args.estimate_samples),
        measure("tiny", DALLEConfig.tiny(), 16, args.repeats, full_uncached=True, estimate_samples=args.estimate_samples),
        measure("256 text + 32x32 image, d_model 256, 2 layers, 8 heads", long_stream, 1, args.repeats,
                full_uncached=False, estimate_samples=args.estimate_samples),
    ]
    result = {
        "benchmark": "sampling",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    # the machine is shared: a 1-minute load above the core count means the timings are inflated
                    "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "torch_version": torch.__version__,
        "notes": ("random weights; seconds per image = wall time of one generate() call / batch size, median of "
                  "repeats; guided = classifier-free guidance, two streams per image in one batch; reference on "
                  "this machine (issue 6): DALLE-pytorch 1.6.6 at the long stream took 87 s without its cache "
                  "and 5.8 s with its cache and guidance"),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    header = f"{'config':58} {'batch':>5} {'cached s/img':>12} {'guided s/img':>12} {'uncached s/img':>15} {'speedup':>8}"
    print(header)
    for row in rows:
        uncached = f"{row['uncached_s_per_image']:.3f}" + ("*" if row["uncached_extrapolated"] else "")
        guided = f"{row['cached_guided_s_per_image']:.3f}" if "cached_guided_s_per_image" in row else "-"
        print(f"{row['config']:58} {row['batch_size']:>5} {row['cached_s_per_image']:>12.3f} {guided:>12} "
              f"{uncached:>15} {row['cache_speedup']:>7.1f}x")
    print("* estimated from timed steps (see uncached_method in the JSON)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
