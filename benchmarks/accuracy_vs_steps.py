"""How composition grows with training: the composition benchmark on a run's saved checkpoints.

Give it checkpoints of one training run (``dalle-lesson train dalle --stop-at K`` then
``--resume``, copying the checkpoint at each stop) and it scores each one like
``benchmarks/composition.py``, at a smaller size: a seeded set of captions per split, 16
candidates each, the default sampling settings. The curve says whether more steps would help.

    python benchmarks/accuracy_vs_steps.py run_750.safetensors run_1000.safetensors ...

Writes benchmarks/results/accuracy_vs_steps.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from composition import benchmark_split, percent, report_header, summarize_groups
from dalle_lesson.checkpoint import read_metadata
from dalle_lesson.clip import load_clip
from dalle_lesson.pipeline import SAMPLING_DEFAULTS, Pipeline

RESULTS = Path(__file__).parent / "results" / "accuracy_vs_steps.json"
COUNTS = (1, 16)
SPLITS = {"training distribution": "test", "held-out combinations": "heldout"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="DALL·E checkpoints of one run")
    parser.add_argument("--captions", type=int, default=40, help="captions per split")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dvae", default=None, help="their dVAE (default: the shipped one)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clip = load_clip()
    rows = []
    for path in args.checkpoints:
        pipeline = Pipeline.load(model_path=path, dvae_path=args.dvae)
        row = {"checkpoint": Path(path).name, "step": read_metadata(path)["step"]}
        for label, split in SPLITS.items():
            timing = {"sampling_s": 0.0, "clip_s": 0.0, "images": 0}
            records = benchmark_split(pipeline, clip, split, args.captions, args.seed, max(COUNTS), timing,
                                      SAMPLING_DEFAULTS)
            row[label] = summarize_groups(records, COUNTS)
        rows.append(row)
        print(table(rows[-1:]), flush=True)
    report = {
        **report_header("accuracy_vs_steps", args.threads),
        "settings": {"captions_per_split": args.captions, "seed": args.seed, "candidates": max(COUNTS),
                     "sampling": SAMPLING_DEFAULTS, "dvae": args.dvae or "shipped"},
        "units": "rates are fractions of captions whose chosen picture fully matches; ci95 = 95% Wilson interval",
        "checkpoints": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| step | split | N = 1 | CLIP best of 16 (oracle) | two objects: N = 1 | best of 16 (oracle) |",
             "|" + " --- |" * 6]
    for row in rows:
        for label in SPLITS:
            a, two = row[label]["all"], row[label]["two objects"]
            lines.append(f"| {row['step']} | {label} | {percent(a['clip_best_of_1'])} | "
                         f"{percent(a['clip_best_of_16'])} ({percent(a['oracle_best_of_16'])}) | "
                         f"{percent(two['clip_best_of_1'])} | {percent(two['clip_best_of_16'])} "
                         f"({percent(two['oracle_best_of_16'])}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
