"""Benchmark of the discrete VAE: how well the shipped lesson dVAE tokenizes, and how fast the paper one runs.

    OMP_NUM_THREADS=1 python benchmarks/dvae.py

Measures, on held-out shapes images (splits "test" and "heldout"): PSNR of reconstructions
from the hard (argmax) codes, the fraction of the codebook in use and its perplexity; the
training time recorded in the checkpoint; PSNR on the emoji pictures (images the dVAE never
saw); the same scores for the shipped lesson VQ-VAE (the same networks with a nearest-neighbour
codebook, trained for the same number of steps), for comparison; and encode/decode images per
second of the `paper` dVAE (256x256 -> 32x32 codes of 8192, random weights) on this CPU.
Writes benchmarks/results/dvae.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dalle_lesson.data import EmojiDataset, ShapesDataset, shipped_path
from dalle_lesson.checkpoint import read_metadata
from dalle_lesson.dvae import DiscreteVAE, DVAEConfig, codebook_usage, load_dvae, psnr


def images_of(dataset, count: int) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


@torch.no_grad()
def reconstruction_scores(model: DiscreteVAE, images: torch.Tensor, batch_size: int = 250) -> dict:
    scores, codes = [], []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        batch_codes = model.encode(batch)
        scores.append(psnr(model.decode(batch_codes), batch))
        codes.append(batch_codes)
    scores, codes = torch.cat(scores), torch.cat(codes)
    usage = codebook_usage(codes, model.config.vocab_size)
    return {
        "images": len(images), "psnr_db_mean": float(scores.mean()), "psnr_db_median": float(scores.median()),
        "psnr_db_p10": float(scores.quantile(0.1)), "codebook_fraction_used": usage["fraction_used"],
        "codebook_perplexity": usage["perplexity"],
    }


def print_row(name: str, row: dict | None) -> None:
    if row is None:
        print(f"{name:<16}  (not available)")
        return
    print(f"{name:<16}{row['images']:>6}{row['psnr_db_mean']:>14.2f}{row['psnr_db_median']:>9.2f}"
          f"{row['psnr_db_p10']:>8.2f}{row['codebook_fraction_used']:>12.1%}{row['codebook_perplexity']:>12.1f}")


@torch.no_grad()
def paper_speed(batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = DiscreteVAE(DVAEConfig.paper()).eval()
    images = torch.rand(batch_size, 3, 256, 256)
    codes = model.encode(images)  # warm-up
    model.decode(codes)
    encode_s, decode_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        codes = model.encode(images)
        encode_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.decode(codes)
        decode_s.append(time.perf_counter() - start)
    return {
        "batch_size": batch_size, "repeats": repeats,
        "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "encode_images_per_s_median": batch_size / statistics.median(encode_s),
        "decode_images_per_s_median": batch_size / statistics.median(decode_s),
        "encode_s_per_batch_median": statistics.median(encode_s),
        "decode_s_per_batch_median": statistics.median(decode_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the shipped data/dvae_lesson.safetensors")
    parser.add_argument("--vqvae", default=None, help="default: the shipped data/vqvae_lesson.safetensors")
    parser.add_argument("--images", type=int, default=1000, help="held-out images per split")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed-batch", type=int, default=2)
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dvae.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = args.checkpoint or shipped_path("dvae_lesson.safetensors")
    model = load_dvae(path)
    metadata = read_metadata(path)
    lesson = {"checkpoint": os.path.basename(str(path)), "config": metadata["config"],
              "train_steps": metadata.get("step"), "train_seconds": metadata.get("train_seconds"),
              "train_recipe": metadata.get("recipe"), "train_schedule": metadata.get("schedule")}
    # The same held-out images score both the dVAE and the VQ-VAE.
    shapes = {split: images_of(ShapesDataset(length=args.images, image_size=model.config.image_size, split=split,
                                             seed=1), args.images) for split in ("test", "heldout")}
    for split, images in shapes.items():
        lesson[f"shapes_{split}"] = reconstruction_scores(model, images)
    try:
        emoji = EmojiDataset(image_size=model.config.image_size)
    except FileNotFoundError:
        lesson["emoji"] = None
    else:
        lesson["emoji"] = reconstruction_scores(model, images_of(emoji, len(emoji)))

    from dalle_lesson.vqvae import load_vqvae

    vq_path = args.vqvae or shipped_path("vqvae_lesson.safetensors")
    vq_model, vq_metadata = load_vqvae(vq_path), read_metadata(vq_path)
    vq = {"checkpoint": os.path.basename(str(vq_path)), "train_steps": vq_metadata.get("step"),
          "train_seconds": vq_metadata.get("train_seconds"), "train_recipe": vq_metadata.get("recipe")}
    for split, images in shapes.items():
        vq[f"shapes_{split}"] = reconstruction_scores(vq_model, images)

    results = {
        "benchmark": "dvae", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "lesson_dvae": lesson,
        "lesson_vqvae": vq,
        "paper_dvae_256px_cpu": paper_speed(args.speed_batch, args.speed_repeats),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    print(f"lesson dVAE ({lesson['checkpoint']}, {lesson['train_steps']} steps, "
          f"{(lesson['train_seconds'] or 0) / 60:.1f} min of training)")
    print(f"{'images':<16}{'n':>6}{'PSNR mean dB':>14}{'median':>9}{'p10':>8}{'codes used':>12}{'perplexity':>12}")
    for name in ("shapes_test", "shapes_heldout", "emoji"):
        print_row(name, lesson[name])
    print(f"lesson VQ-VAE ({vq['checkpoint']}, {vq['train_steps']} steps, {(vq['train_seconds'] or 0) / 60:.1f} min)")
    for name in ("shapes_test", "shapes_heldout"):
        print_row(name, vq[name])
    speed = results["paper_dvae_256px_cpu"]
    print(f"paper dVAE ({speed['parameters_millions']:.1f}M parameters) at 256x256 on CPU, "
          f"{torch.get_num_threads()} thread(s), batch {speed['batch_size']}: "
          f"encode {speed['encode_images_per_s_median']:.2f} images/s, decode {speed['decode_images_per_s_median']:.2f} images/s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
