"""Benchmark of one 256x256 training step of the paper dVAE on a CPU, on a real photo.

    python benchmarks/dvae_256.py                 # about 4 minutes on the 2-core course machine (7 when busy)
    python benchmarks/dvae_256.py --batch-4       # also batch 4 (about 4x longer per step)

The model is ``DiscreteVAE(DVAEConfig.paper())`` (256x256 -> 32x32 codes of 8192, the
released dall_e layout) with random weights (seed 0); the image is the shipped photo
data/photos/astronaut.png (batch 4: the three shipped photos and the astronaut mirrored).
One training step is what the engine does for the dvae stage: the loss of
``dalle_lesson.dvae.training_loss`` (the function ``dalle_lesson.stages.dvae_stage`` calls:
Gumbel-softmax codes, logit-Laplace likelihood, KL to the uniform prior), backward, gradient
clipping at 4, an AdamW step with the paper's settings, gradients freed.

Measured, each thread count in a fresh subprocess, one after the other:

* the time of a step: one warm-up step, then the median (and the minimum, the run least
  disturbed by other jobs) of ``--repeats`` timed steps;
* peak memory of the warm-up step: the process's peak RSS (``resource.getrusage``
  ``ru_maxrss``) and its increase over the RSS just before the step (the increase holds the
  gradients, the AdamW moments, which the first step allocates, the saved activations and
  the convolutions' workspace); and the bytes of the tensors autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``, distinct storages, parameters left out);
* encode (image -> 32x32 codes) and decode (codes -> image) time of one image, no grad.

Counted without running anything (on the ``meta`` device): parameters of the encoder and
decoder, FLOPs (``torch.utils.flop_counter.FlopCounterMode``) of the step and of encode and
decode, and the saved-activation bytes at batch 1 and 4.

Writes benchmarks/results/dvae_256.json and prints a table. The course machine has 2 cores
that other jobs share, so times there vary by tens of percent from run to run; the JSON
records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dalle_lesson.data import load_image, shipped_path
from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, DVAESchedule, training_loss
from dalle_lesson.train import parameter_groups

MB = 2**20
PHOTOS = ("astronaut", "chelsea", "coffee")
# The paper's dVAE recipe: AdamW betas (0.9, 0.96), weight decay 4.5e-2, LR 4.5e-4, clip 4;
# beta 0 -> 6.6 over 5000 updates (the logit-Laplace scale). Step 0 of a long run: tau 1, beta 0.
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 4.5e-4, (0.9, 0.96), 4.5e-2, 4.0
SCHEDULE = DVAESchedule(beta_max=6.6, beta_steps=5000)
TOTAL_STEPS = 100_000


def photos(batch_size: int) -> torch.Tensor:
    """Batch 1: the astronaut. Batch 4: the three photos and the astronaut mirrored."""
    images = [load_image(shipped_path(f"photos/{name}.png"), 256) for name in PHOTOS]
    images.append(images[0].flip(-1))
    return torch.stack(images[:batch_size]) if batch_size > 1 else images[0][None]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class SavedTensors:
    """Distinct storages autograd saves for backward, parameters left out."""

    def __init__(self, model: torch.nn.Module):
        self.skip = {p.untyped_storage()._cdata for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.skip:
            self.storages[storage._cdata] = storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def mb(self) -> float:
        return sum(self.storages.values()) / MB


def train_step(model, optimizer, images, step: int, saved: SavedTensors | None = None) -> float:
    """One engine step of the dvae stage; returns the loss."""
    if saved is None:
        losses = training_loss(model, images, step, TOTAL_STEPS, SCHEDULE)
    else:
        with saved.hooks():
            losses = training_loss(model, images, step, TOTAL_STEPS, SCHEDULE)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(losses["loss"])


def build(device: str = "cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        model = DiscreteVAE(DVAEConfig.paper())
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, WEIGHT_DECAY, False), lr=LR, betas=BETAS)
    return model, optimizer


def worker(threads: int, batch_size: int, repeats: int, encode_decode: bool) -> dict:
    """Runs in a fresh process: warm-up step (memory), timed steps, encode/decode."""
    torch.set_num_threads(threads)
    model, optimizer = build()
    images = photos(batch_size)
    saved = SavedTensors(model)
    rss_before = rss_mb()
    start = time.perf_counter()
    warmup_loss = train_step(model, optimizer, images, 0, saved)
    warmup_s = time.perf_counter() - start
    peak = max_rss_mb()
    step_s, losses = [], [warmup_loss]
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, images, step))
        step_s.append(time.perf_counter() - start)
    result = {
        "threads": threads, "batch_size": batch_size, "warmup_step_s": warmup_s, "step_s_all": step_s,
        "step_s": statistics.median(step_s), "step_s_min": min(step_s), "images_per_s": batch_size / statistics.median(step_s),
        "loss_per_step": losses, "rss_before_step_mb": rss_before, "peak_rss_mb": peak,
        "peak_rss_increase_mb": peak - rss_before, "saved_activations_mb": saved.mb,
        "saved_activation_storages": len(saved.storages),
    }
    if encode_decode:
        model.eval()
        image = images[:1]
        times = {"encode": [], "decode": []}
        with torch.no_grad():
            for i in range(3):  # the first is a warm-up
                start = time.perf_counter()
                codes = model.encode(image)
                middle = time.perf_counter()
                model.decode(codes)
                end = time.perf_counter()
                if i:
                    times["encode"].append(middle - start)
                    times["decode"].append(end - middle)
        result.update({"encode_s_all": times["encode"], "decode_s_all": times["decode"],
                       "encode_s": statistics.median(times["encode"]),
                       "decode_s": statistics.median(times["decode"])})
    return result


def counted_on_meta() -> dict:
    """Parameters, FLOPs and saved-activation bytes, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = build("meta")
    result = {
        "parameters_encoder": sum(p.numel() for p in model.encoder.parameters()),
        "parameters_decoder": sum(p.numel() for p in model.decoder.parameters()),
    }
    result["parameters_total"] = result["parameters_encoder"] + result["parameters_decoder"]
    n = result["parameters_total"]
    result.update({"parameters_fp32_mb": 4 * n / MB, "gradients_fp32_mb": 4 * n / MB,
                   "adamw_moments_fp32_mb": 8 * n / MB})
    for batch in (1, 4):
        images = torch.rand(batch, 3, 256, 256, device="meta")
        saved = SavedTensors(model)
        with FlopCounterMode(display=False) as counter:
            with saved.hooks():
                loss = training_loss(model, images, 0, TOTAL_STEPS, SCHEDULE)["loss"]
            forward = counter.get_total_flops()
            loss.backward()
        model.zero_grad(set_to_none=True)
        result[f"batch{batch}"] = {"forward_gflop": forward / 1e9, "step_gflop": counter.get_total_flops() / 1e9,
                                   "saved_activations_mb": saved.mb}
    codes = torch.zeros(1, 32, 32, dtype=torch.long, device="meta")
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.encoder(torch.rand(1, 3, 256, 256, device="meta"))
        result["encode_gflop"] = counter.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as counter:
            model.decoder.forward_codes(codes)
        result["decode_gflop"] = counter.get_total_flops() / 1e9
    return result


def run_worker(threads: int, batch_size: int, repeats: int, encode_decode: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--worker", "--threads", str(threads), "--batch-size", str(batch_size),
               "--repeats", str(repeats)] + ([] if encode_decode else ["--no-encode-decode"])
    print(f"  measuring: {threads} thread(s), batch {batch_size} ...", flush=True)
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--batch-4", action="store_true", help="also time batch 4 (2 threads; about 4x a batch-1 step)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dvae_256.json"))
    # internal: one measurement in this (fresh) process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-encode-decode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.threads[0], args.batch_size, args.repeats, not args.no_encode_decode)))
        return

    load_before, started = os.getloadavg(), time.perf_counter()
    counted = counted_on_meta()
    runs = [run_worker(threads, 1, args.repeats, True) for threads in args.threads]  # one at a time
    if args.batch_4:
        runs.append(run_worker(max(args.threads), 4, args.repeats, False))
    for run in runs:
        run["gflop_per_s"] = counted[f"batch{run['batch_size']}"]["step_gflop"] / run["step_s"]
    results = {
        "benchmark": "dvae_256", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "shared": True,
                    "note": "2 cores shared with other jobs: times vary by tens of percent between runs",
                    "load_average_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
        "model": {"preset": "DVAEConfig.paper()", "config": vars(DVAEConfig.paper()), "init": "random, seed 0"},
        "image": "data/photos/astronaut.png (batch 4: astronaut, chelsea, coffee, astronaut mirrored)",
        "step": ("dalle_lesson.dvae.training_loss (as dalle_lesson.stages.dvae_stage) at step 0: tau 1, beta 0, "
                 "soft Gumbel-softmax codes, logit-Laplace NLL; backward; clip_grad_norm 4; AdamW lr 4.5e-4 "
                 "betas (0.9, 0.96) weight decay 4.5e-2; zero_grad(set_to_none=True)"),
        "timing": f"one warm-up step (memory measured there), then the median of {args.repeats} timed steps; "
                  "encode/decode: one warm-up, median of 2; each thread count in a fresh subprocess, one at a time",
        "memory_note": ("peak_rss_increase_mb is about saved activations + gradients, not + AdamW moments too: "
                        "backward frees the activations as it makes the gradients, and the first optimizer.step "
                        "allocates the moments after that"),
        "counted_on_meta_device": counted,
        "runs": runs,
        "benchmark_wall_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    c = counted
    print(f"\npaper dVAE at 256x256 on CPU, random init: {c['parameters_encoder'] / 1e6:.1f}M encoder + "
          f"{c['parameters_decoder'] / 1e6:.1f}M decoder = {c['parameters_total'] / 1e6:.1f}M parameters "
          f"({c['parameters_fp32_mb']:.0f} MB fp32; gradients {c['gradients_fp32_mb']:.0f} MB, "
          f"AdamW moments {c['adamw_moments_fp32_mb']:.0f} MB)")
    print(f"FLOPs per image: training step {c['batch1']['step_gflop']:.0f} GFLOP (forward "
          f"{c['batch1']['forward_gflop']:.0f}), encode {c['encode_gflop']:.0f}, decode {c['decode_gflop']:.0f}; "
          f"saved activations {c['batch1']['saved_activations_mb']:.0f} MB per image "
          f"(batch 4: {c['batch4']['saved_activations_mb']:.0f} MB)")
    print(f"{'threads':>7}{'batch':>6}{'step s':>8}{'min s':>7}{'GFLOP/s':>9}{'peak RSS MB':>13}{'RSS +MB':>9}"
          f"{'saved act MB':>14}{'encode s':>10}{'decode s':>10}")
    for run in runs:
        encode = f"{run['encode_s']:>10.2f}{run['decode_s']:>10.2f}" if "encode_s" in run else f"{'-':>10}{'-':>10}"
        print(f"{run['threads']:>7}{run['batch_size']:>6}{run['step_s']:>8.1f}{run['step_s_min']:>7.1f}{run['gflop_per_s']:>9.1f}"
              f"{run['peak_rss_mb']:>13.0f}{run['peak_rss_increase_mb']:>9.0f}{run['saved_activations_mb']:>14.0f}"
              + encode)
    print(f"(machine shared: load average {results['machine']['load_average_1_5_15_before'][0]} before, "
          f"{results['machine']['load_average_1_5_15_after'][0]} after; {results['benchmark_wall_s']:.0f} s in all)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
