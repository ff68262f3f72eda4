"""Which sampling settings draw the best pictures? Chosen on training captions, reported on held-out ones.

For each setting (temperature, top-k, classifier-free guidance scale), draw 16 candidates for
each of a seeded set of test-split captions (the training distribution: the same attribute mix
as training, other scenes) and score them with the course scorer, exactly as
``benchmarks/composition.py`` does. The winner is the setting with the highest rate of fully
right pictures among CLIP's best of 16 (the way the CLI is meant to be used), one sample (N = 1)
breaking ties. Only the winner and plain sampling are then run on the held-out split, so the
held-out rates are an honest report, not a second choice.

    python benchmarks/sampling_settings.py                  # 60 captions per setting
    python benchmarks/sampling_settings.py --captions 10    # a quick look

Writes benchmarks/results/sampling_settings.json and prints a table. Put the winner into
``dalle_lesson.pipeline.SAMPLING_DEFAULTS``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from composition import benchmark_split, percent, report_header, summarize_groups
from dalle_lesson.clip import load_clip
from dalle_lesson.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results" / "sampling_settings.json"
COUNTS = (1, 4, 16)
PLAIN = {"temperature": 1.0, "top_k": None, "guidance_scale": None}
SETTINGS = [
    PLAIN,
    {"temperature": 0.8, "top_k": None, "guidance_scale": None},
    {"temperature": 0.6, "top_k": None, "guidance_scale": None},
    {"temperature": 1.0, "top_k": 32, "guidance_scale": None},
    {"temperature": 0.8, "top_k": 32, "guidance_scale": None},
    {"temperature": 1.0, "top_k": None, "guidance_scale": 2.0},
    {"temperature": 0.8, "top_k": None, "guidance_scale": 2.0},
    {"temperature": 1.0, "top_k": None, "guidance_scale": 4.0},
]


def name(setting: dict) -> str:
    """``name({"temperature": 0.8, "top_k": 32, "guidance_scale": None}) == 't0.8 k32 g-'``"""
    return f"t{setting['temperature']:g} k{setting['top_k'] or '-'} g{setting['guidance_scale'] or '-'}"


def measure(pipeline, clip, split: str, setting: dict, args) -> dict:
    timing = {"sampling_s": 0.0, "clip_s": 0.0, "images": 0}
    records = benchmark_split(pipeline, clip, split, args.captions, args.seed, max(COUNTS), timing, setting)
    return {"setting": setting, "split": split,
            "sampling_s_per_image": round(timing["sampling_s"] / timing["images"], 5),
            **summarize_groups(records, COUNTS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=60, help="captions per setting and split")
    parser.add_argument("--seed", type=int, default=11, help="not composition.py's 7: other captions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="a DALL·E checkpoint (default: the shipped one)")
    parser.add_argument("--dvae", default=None, help="its dVAE (default: the shipped one)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipeline, clip = Pipeline.load(model_path=args.model, dvae_path=args.dvae), load_clip()
    start = time.perf_counter()
    chosen_on = [measure(pipeline, clip, "test", setting, args) for setting in SETTINGS]
    best = max(chosen_on, key=lambda m: (m["all"]["clip_best_of_16"]["rate"], m["all"]["clip_best_of_1"]["rate"]))
    on_heldout = [best["setting"]] + ([PLAIN] if best["setting"] != PLAIN else [])
    reported = [measure(pipeline, clip, "heldout", setting, args) for setting in on_heldout]
    report = {
        **report_header("sampling_settings", args.threads),
        "settings": {"captions_per_setting": args.captions, "seed": args.seed, "candidates": max(COUNTS),
                     "criterion": "CLIP best of 16 on the test split, then N = 1",
                     "checkpoints": {"dalle": args.model or "shipped", "dvae": args.dvae or "shipped"}},
        "units": "rates are fractions of captions whose chosen picture fully matches; ci95 = 95% Wilson interval",
        "wall_seconds": round(time.perf_counter() - start, 1),
        "best": best["setting"], "chosen_on_training_captions": chosen_on, "reported_on_heldout": reported,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


def table(report: dict) -> str:
    lines = ["| split | setting | N = 1 | CLIP best of 4 | CLIP best of 16 (oracle) | two objects: N = 1 | best of 16 | ms/image |",
             "|" + " --- |" * 8]
    for m in report["chosen_on_training_captions"] + report["reported_on_heldout"]:
        a, two = m["all"], m["two objects"]
        lines.append(f"| {m['split']} | {name(m['setting'])} | {percent(a['clip_best_of_1'])} | "
                     f"{percent(a['clip_best_of_4'])} | {percent(a['clip_best_of_16'])} "
                     f"({percent(a['oracle_best_of_16'])}) | {percent(two['clip_best_of_1'])} | "
                     f"{percent(two['clip_best_of_16'])} | {m['sampling_s_per_image'] * 1000:.0f} |")
    lines.append(f"\nbest on the training captions: {name(report['best'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
