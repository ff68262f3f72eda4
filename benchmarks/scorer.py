"""How accurate is the course's scorer (dalle_lesson.evaluate) itself?

    OMP_NUM_THREADS=1 python benchmarks/scorer.py      # writes benchmarks/results/scorer.json

Every image here is scored against its own caption, so on clean renders every miss is a
mistake of the scorer. Measured, per attribute (colour, shape, size of every object of the
caption; the relation of every two-object caption; the object count and the full match of
every image):

* clean renders, 32x32 (the lesson size), of each split: train, test and heldout;
* clean renders at 64x64, to show the reader is not tied to one size;
* clean renders made harder on purpose: Gaussian blur (sigma 0.7 and 1.0 pixels), pixel
  noise (sigma 0.05) and JPEG at quality 75, and pairs of objects of one colour whose boxes
  are only 0.02 apart (the closest data._place_pair allows, so the two blobs touch);
* dVAE round trips, ``decode(encode(images))`` with the shipped lesson dVAE, of each split
  (the same scenes as the clean rows). This blurs small crosses and stars into other
  shapes, so these rows measure the dVAE at least as much as the scorer; the per-shape
  breakdown in the JSON (``shape_read_as``) shows where.

Speed is milliseconds per image on one thread.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import platform
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from dalle_lesson import data, evaluate
from dalle_lesson.data import SIZES, Scene, ShapeObject, ShapesDataset, pil_to_tensor, render_scene

RESULTS = Path(__file__).resolve().parent / "results" / "scorer.json"
BACKGROUND = torch.tensor(data.BACKGROUND).view(3, 1, 1) / 255


def dataset_images(split: str, count: int, image_size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    dataset = ShapesDataset(count, image_size, split=split, seed=seed)
    images, captions = zip(*(dataset[i] for i in range(count)))
    return torch.stack(images), list(captions)


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    # Blur the difference from the background, so the border does not darken.
    return (evaluate.blur(images - BACKGROUND, sigma) + BACKGROUND).clamp(0, 1)


def noisy(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, "JPEG", quality=quality)
        out.append(pil_to_tensor(Image.open(buffer)))
    return torch.stack(out)


def touching_pairs(count: int, image_size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Two objects of one colour with boxes 0.02-0.03 apart along the relation's axis."""
    rng = random.Random(seed)
    images, captions = [], []
    while len(images) < count:
        scene = data.random_scene(rng, "test")
        if scene.relation is None:
            continue
        first, second = scene.objects
        half_a, half_b = SIZES[first.size] / 2, SIZES[second.size] / 2
        along = half_a + half_b + 0.02 + rng.uniform(0, 0.01)
        across = rng.uniform(-along / 2, along / 2)
        dx, dy = {"left of": (along, across), "right of": (-along, across),
                  "above": (across, along), "below": (across, -along)}[scene.relation]
        x, y = first.x, first.y
        if not (half_b <= x + dx <= 1 - half_b and half_b <= y + dy <= 1 - half_b):
            continue  # the second object would leave the picture
        second = ShapeObject(second.shape, first.colour, second.size, x + dx, y + dy)
        scene = Scene((first, second), scene.relation)
        images.append(pil_to_tensor(render_scene(scene, image_size)))
        captions.append(data.canonical_caption(scene))
    return torch.stack(images), captions


def measure(images: torch.Tensor, captions: list[str]) -> dict:
    start = time.perf_counter()
    scores = evaluate.score_batch(images, captions)
    seconds = time.perf_counter() - start
    row = evaluate.summarize(scores)
    read_as = collections.defaultdict(collections.Counter)
    for result in scores:
        for obj in result.objects:
            found = "missing" if obj.found is None else obj.found.shape or "no_shape"
            read_as[obj.expected.shape][found] += 1
    row["shape_accuracy_by_shape"] = {
        shape: read_as[shape][shape] / sum(read_as[shape].values()) for shape in data.SHAPES if read_as[shape]
    }
    row["shape_read_as"] = {shape: dict(read_as[shape].most_common()) for shape in data.SHAPES if read_as[shape]}
    row["ms_per_image"] = 1000 * seconds / len(images)
    return row


def dvae_round_trip(images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    from dalle_lesson.dvae import load_dvae

    model = load_dvae()
    with torch.no_grad():
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        return torch.cat([model.decode(model.encode(batch)) for batch in batches])


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


COLUMNS = ("colour", "shape", "size", "relation", "count", "full_match")


def print_table(rows: dict) -> None:
    print(f"{'images':<30}{'n':>6}" + "".join(f"{name:>11}" for name in COLUMNS) + f"{'ms/image':>10}")
    for name, row in rows.items():
        if row is None:
            print(f"{name:<30}  (not available)")
            continue
        cells = "".join(
            f"{row[f'{column}_accuracy']:>11.1%}" if row[f"{column}_accuracy"] is not None else f"{'-':>11}"
            for column in COLUMNS
        )
        print(f"{name:<30}{row['images']:>6}{cells}{row['ms_per_image']:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=1000, help="scenes per split at 32x32 (clean and dVAE)")
    parser.add_argument("--scenes-64", type=int, default=300, help="scenes per split at 64x64")
    parser.add_argument("--hard", type=int, default=500, help="scenes per made-harder row")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-dvae", action="store_true", help="skip the dVAE round trips")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows, clean = {}, {}
    for split in data.SPLITS:
        clean[split] = dataset_images(split, args.scenes, 32, args.seed)
        rows[f"clean_32px_{split}"] = measure(*clean[split])
    for split in data.SPLITS:
        rows[f"clean_64px_{split}"] = measure(*dataset_images(split, args.scenes_64, 64, args.seed))
    images, captions = clean["test"][0][: args.hard], clean["test"][1][: args.hard]
    rows["blur_0.7px_32px_test"] = measure(blurred(images, 0.7), captions)
    rows["blur_1.0px_32px_test"] = measure(blurred(images, 1.0), captions)
    rows["noise_0.05_32px_test"] = measure(noisy(images, 0.05, args.seed), captions)
    rows["jpeg_q75_32px_test"] = measure(jpeg(images, 75), captions)
    rows["touching_same_colour_32px"] = measure(*touching_pairs(args.hard, 32, args.seed))

    dvae = {"checkpoint": "data/dvae_lesson.safetensors", "error": None}
    if not args.no_dvae:
        try:
            dvae["sha256_16"] = file_digest(data.shipped_path("dvae_lesson.safetensors"))
            for split in data.SPLITS:
                images, captions = clean[split]
                rows[f"dvae_round_trip_32px_{split}"] = measure(dvae_round_trip(images), captions)
        except Exception as error:  # the table still reports the scorer's own accuracy
            dvae["error"] = f"{type(error).__name__}: {error}"
            for split in data.SPLITS:
                rows.setdefault(f"dvae_round_trip_32px_{split}", None)

    uname = platform.uname()
    results = {
        "benchmark": "scorer",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "uname": f"{uname.system} {uname.release} {uname.machine}", "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "settings": {"scenes_per_split_32px": args.scenes, "scenes_per_split_64px": args.scenes_64,
                     "scenes_per_hard_row": args.hard, "seed": args.seed,
                     "reader": {name: getattr(evaluate, name) for name in (
                         "FOREGROUND_ALPHA", "COLOUR_TOLERANCE", "MIN_OBJECT_AREA", "MAY_BE_TWO_ERROR",
                         "PART_ERROR", "MAX_FIT_ERROR", "BLURS")}},
        "units": "accuracies are fractions in [0, 1]; colour/shape/size per object of the caption, relation per "
                 "two-object caption, count and full_match per image",
        "dvae": dvae,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(rows)
    if dvae["error"]:
        print(f"dVAE round trips not measured: {dvae['error']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
